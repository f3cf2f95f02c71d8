"""Scratch (run 20): per fold of the benchmark's split, FixMatch at 10% of the labels trained exactly as the
benchmark's outer fit of that fold (same rows, labelled patients and seed), for the paper's FixMatch and the
pseudo-label options of run 20. After training, on the clean view of every unlabelled training row: the
share whose pseudo-label passes (with the option's own rule: group mean, agreement with label propagation),
the accuracy of the passing pseudo-labels, the accuracy of the head's label on all unlabelled rows, and
for `agree` the accuracy of the propagated labels themselves. Training rows only: no held-out row is used.

    python run20_passrate_probe.py DATA OUT.json [FOLD ...]   (folds numbered from 1; default: all 5)
"""

import json
import sys
from dataclasses import replace

import numpy as np
import torch

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.embed import pick_device
from retrieval.training.benchmark import FoldFitter, resolve_method_config
from retrieval.training.folds import keep_label_fraction, make_folds
from retrieval.training.trainer import load_image_tensors, train

torch.set_num_threads(1)
data, out_path = sys.argv[1], sys.argv[2]
folds = [int(f) for f in sys.argv[3:]] or [1, 2, 3, 4, 5]
rows = load_dataset(data).rows
rows = rows[rows["label"].notna()].reset_index(drop=True)
splits = make_folds(rows, 5, 0)
images = {224: load_image_tensors(rows, PreprocessConfig(image_size=224))[0]}
fitter = FoldFitter(rows, images, pick_device(), 0, progress=False)
base = replace(resolve_method_config("fixmatch"), label_fraction=0.1)
cache = fitter.frozen_cache(base)
variants = [
    ("paper (no option)", {}),
    ("pseudo_groups", {"fixmatch_pseudo_groups": True}),
    ("propagation agree", {"fixmatch_propagation": "agree"}),
    ("pseudo_groups + agree", {"fixmatch_pseudo_groups": True, "fixmatch_propagation": "agree"}),
]
out: dict = {}
for f in folds:
    tr, _ = splits[f - 1]
    train_rows = keep_label_fraction(rows.iloc[tr].reset_index(drop=True), 0.1, f - 1)  # the benchmark's seed
    unl = train_rows["label"].isna().to_numpy()
    truth_all = rows.iloc[tr]["label"].astype(str).to_numpy()
    for name, kw in variants:
        cfg = replace(base, seed=f - 1, **kw)
        res = train(train_rows, cfg, progress=False, features=cache[:, tr])
        loss = res.model.loss
        with torch.no_grad():
            r, pseudo, passing = loss.pseudo_labels(res.encoder.head, cache[0, tr])
            z = res.encoder.head(cache[0, tr])
            head = torch.softmax(loss.classifier(z), 1).argmax(1).numpy()
        classes = np.array(res.classes)
        sel = unl[r]
        truth, pl, ok = truth_all[r][sel], classes[pseudo][sel], passing[sel]
        rec = {
            "n_unlabelled": int(sel.sum()),
            "rate_first10": res.log["pseudo_label_rate_first_epoch_steps"],
            "rate_last10": res.log["pseudo_label_rate_last_steps"],
            "pass_after": float(ok.mean()),
            "acc_passing": float((pl[ok] == truth[ok]).mean()) if ok.any() else None,
            "acc_head_all_unlabelled": float((classes[head][unl] == truth_all[unl]).mean()),
            "acc_pseudo_all_unlabelled": float((pl == truth).mean()),
        }
        if loss.propagation is not None:
            prop = loss.prop_label.numpy()[unl]
            rec["acc_propagated"] = float((classes[np.maximum(prop, 0)] == truth_all[unl]).mean())
            rec["no_propagated_label"] = float((prop < 0).mean())
        out.setdefault(name, {})[f"fold{f}"] = rec
        print(f, name, rec, flush=True)
summary = {
    name: {
        key: float(np.mean([v[key] for v in per.values() if v.get(key) is not None]))
        for key in next(iter(per.values()))
        if key != "n_unlabelled"
    }
    for name, per in out.items()
}
print(json.dumps(summary, indent=1))
json.dump({"folds": out, "mean_over_folds": summary}, open(out_path, "w"), indent=1)
