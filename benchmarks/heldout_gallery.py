"""Does a head's MAP come from the gallery it was trained on? (issue 11, methods.md run 18)

`retrieve benchmark` queries each held-out fold against the training folds, which a label-using head
was trained on. Here the same trained vectors (same folds, seeds, presets and `FoldFitter` as the
benchmark) are scored twice per fold: against the training folds (`train`, the benchmark's figure) and
against the held-out fold itself (`heldout`: leave-one-out inside the fold, the query's patient and
near-duplicate group excluded, as everywhere), a gallery no head has seen. The ImageNet features under
the heads are the baseline in the same run. Prints a markdown table, writes JSON.

    python benchmarks/heldout_gallery.py ../shared/data/byra_steatosis_liver_rois \
        --methods supcon,supcon@0.1,fixmatch@0.1 --out OUT.json [--set fixmatch@0.1.fixmatch_align=true]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.embed import pick_device
from retrieval.evaluation.evaluate import EvalSettings, evaluate
from retrieval.training.benchmark import FoldFitter, parse_method_spec, resolve_method_config
from retrieval.training.folds import make_folds
from retrieval.training.trainer import load_image_tensors

KEYS = ("map", "mrr", "p@1", "map@r", "knn_balanced_accuracy")
GALLERIES = ("train", "heldout")


def score(rows, vec: np.ndarray, te: np.ndarray, k: int = 10) -> dict[str, float]:
    test = np.zeros(len(rows), bool)
    test[te] = True
    out: dict[str, float] = {}
    for name, gallery in (("train", ~test), ("heldout", test)):
        res = evaluate(rows, vec, EvalSettings(k=k), progress=False, query_mask=test, gallery_mask=gallery)
        out.update({f"{name}:{key}": float(res["overall"][key]) for key in KEYS})
        out[f"{name}:chance"] = float(res["pr_curve"]["chance_precision"])  # a random ranking's precision
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("--methods", default="supcon,supcon@0.1,fixmatch@0.1")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE (METHOD as in --methods)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = load_dataset(args.data).rows
    rows = rows[rows["label"].notna()].reset_index(drop=True)
    splits = make_folds(rows, args.folds, args.seed)
    images = {224: load_image_tensors(rows, PreprocessConfig(image_size=224))[0]}
    fitter = FoldFitter(rows, images, pick_device(), args.seed, progress=False)
    sets = [s.partition("=") for s in args.set]
    results: dict[str, list[dict[str, float]]] = {}
    configs = {}
    for m in args.methods.split(","):
        base, frac = parse_method_spec(m)
        mine = {key[len(m) + 1 :]: yaml.safe_load(v) for key, _, v in sets if key.startswith(m + ".")}
        configs[m] = replace(resolve_method_config(base), **({"label_fraction": frac} if frac else {}), **mine)
    first = next(iter(configs.values()))  # the heads' frozen features, view 0: the baseline
    feats = fitter.frozen_cache(replace(first, seed=args.seed))[0].numpy()
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    results[f"{first.encoder} (baseline)"] = [score(rows, feats, te) for _, te in splits]
    timings = {}
    for m, cfg in configs.items():
        t = time.perf_counter()
        results[m] = []
        for f, (tr, te) in enumerate(splits):
            vec = fitter.fit(replace(cfg, seed=args.seed + f), tr)
            results[m].append({**score(rows, vec, te), "labelled_fraction": fitter.labelled_fraction})
            print(
                f"{m} fold {f + 1}: MAP train {results[m][-1]['train:map']:.4f} "
                f"heldout {results[m][-1]['heldout:map']:.4f}",
                flush=True,
            )
        timings[m] = round(time.perf_counter() - t, 1)
    out = {
        "dataset": str(args.data),
        "methods": {m: c.to_dict() for m, c in configs.items()},
        "per_fold": results,
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\n{Path(args.data).name}, {args.folds} grouped folds (mean ± std), wall {out['wall_s'] / 60:.1f} min\n")
    print("| method | gallery | MAP | MRR | P@1 | MAP@R | kNN bal. acc | chance precision |")
    print("|---|---|---|---|---|---|---|---|")
    for m, folds in results.items():
        for g in GALLERIES:
            cells = []
            for key in (*KEYS, "chance"):
                v = np.array([f[f"{g}:{key}"] for f in folds])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
            print(f"| {m} | {g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
