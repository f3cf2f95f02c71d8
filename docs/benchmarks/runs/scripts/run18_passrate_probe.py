"""Scratch (run 18): on fold 1 of the benchmark's split, how many unlabelled rows pass the threshold
during and after training, and how accurate their pseudo-labels are, for fixed tau / flex / align."""

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
data = sys.argv[1]
rows = load_dataset(data).rows
rows = rows[rows["label"].notna()].reset_index(drop=True)
tr, te = make_folds(rows, 5, 0)[0]
images = {224: load_image_tensors(rows, PreprocessConfig(image_size=224))[0]}
fitter = FoldFitter(rows, images, pick_device(), 0, progress=False)
base = replace(resolve_method_config("fixmatch"), label_fraction=0.1, seed=0)
cache = fitter.frozen_cache(base)
out = {}
for name, kw in [
    ("fixed tau 0.95", {}),
    ("flex", {"fixmatch_thresholds": "flex"}),
    ("align", {"fixmatch_align": True}),
    ("flex+align", {"fixmatch_thresholds": "flex", "fixmatch_align": True}),
]:
    cfg = replace(base, **kw)
    train_rows = keep_label_fraction(rows.iloc[tr].reset_index(drop=True), 0.1, 0)
    res = train(train_rows, cfg, progress=False, features=cache[:, tr])
    unl = train_rows["label"].isna().to_numpy()
    truth = rows.iloc[tr]["label"].astype(str).to_numpy()[unl]
    with torch.no_grad():
        p = torch.softmax(res.model.loss.classifier(res.encoder.head(cache[0, tr[unl]])), 1)
    conf, pred = p.max(1)
    pred_lbl = np.array(res.classes)[pred.numpy()]
    ok = conf.numpy() >= 0.95
    out[name] = {
        "rate_first10": res.log["pseudo_label_rate_first_epoch_steps"],
        "rate_last10": res.log["pseudo_label_rate_last_steps"],
        "final_pass_0.95": float(ok.mean()),
        "acc_passing": float((pred_lbl[ok] == truth[ok]).mean()) if ok.any() else None,
        "acc_all_unlabelled": float((pred_lbl == truth).mean()),
        "n_unlabelled": int(unl.sum()),
    }
    print(name, out[name], flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
