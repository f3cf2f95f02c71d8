"""Where a trained encoder's retrieval errors are: held-out AP per patient, grouped by a clinical column.

Same protocol and code as `retrieve benchmark`: grouped stratified k-fold, the method trained on the
training folds, held-out images querying the training folds. Each query's AP is averaged per patient,
then per bin of `--by` (for the Byra ROIs: biopsy fat percentage, where the label's 5 % cut lies
inside a continuum).

    python benchmarks/per_patient_ap.py ../shared/data/byra_steatosis_liver_rois --method supcon \
        --by fat_percent --bins 0,5,10,20,40,101 --repeats 2 [--set augment_gain=false] \
        [--out benchmarks/results/per_patient_ap.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.config import PreprocessConfig  # noqa: E402
from retrieval.data.dataset import load_dataset  # noqa: E402
from retrieval.embed import pick_device  # noqa: E402
from retrieval.evaluation.evaluate import EvalSettings, evaluate  # noqa: E402
from retrieval.training.benchmark import FoldFitter, resolve_method_config  # noqa: E402
from retrieval.training.folds import make_folds  # noqa: E402
from retrieval.training.trainer import load_image_tensors  # noqa: E402


def per_query_ap(
    rows: pd.DataFrame, method: str, overrides: dict, folds: int, repeats: int, k: int = 10
) -> pd.DataFrame:
    """Every held-out query's AP, fold by fold, with the benchmark's own training and evaluation."""
    cfg = replace(resolve_method_config(method), **overrides)
    images = {cfg.image_size: load_image_tensors(rows, PreprocessConfig(image_size=cfg.image_size))[0]}
    fitter = FoldFitter(rows, images, pick_device())
    records = []
    for r in range(repeats):
        for f, (tr, te) in enumerate(make_folds(rows, folds, r)):
            test = np.zeros(len(rows), bool)
            test[te] = True
            res = evaluate(
                rows,
                fitter.fit(replace(cfg, seed=r * folds + f), tr),
                EvalSettings(k=k),
                progress=False,
                query_mask=test,
                gallery_mask=~test,
                keep_per_query=True,
            )
            records += [
                {
                    "repeat": r,
                    "fold": f,
                    "row": q["row"],
                    "patient_id": rows["patient_id"].iloc[q["row"]],
                    "label": q["label"],
                    "ap": q["ap"],
                }
                for q in res["per_query"]
            ]
    return pd.DataFrame(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--method", default="supcon")
    ap.add_argument("--by", default="fat_percent", help="numeric column to bin patients by")
    ap.add_argument("--bins", default="0,5,10,20,40,101", help="bin edges, left-closed")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE override of the preset")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "per_patient_ap.json")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.sets)}
    t0 = time.perf_counter()
    rows = load_dataset(args.data).rows
    rows = rows[rows["label"].notna()].reset_index(drop=True)
    if args.by not in rows:
        raise SystemExit(f"per_patient_ap.py: {args.data} has no column {args.by!r}")
    q = per_query_ap(rows, args.method, overrides, args.folds, args.repeats)
    q[args.by] = pd.to_numeric(rows[args.by], errors="coerce").to_numpy()[q["row"]]
    patients = q.groupby("patient_id").agg(label=("label", "first"), value=(args.by, "first"), ap=("ap", "mean"))
    edges = [float(e) for e in args.bins.split(",")]
    patients["bin"] = pd.cut(patients["value"], edges, right=False)  # categorical: groups come out in bin order
    table = (
        patients.groupby(["bin", "label"], observed=True)
        .agg(patients=("ap", "size"), mean_ap=("ap", "mean"))
        .reset_index()
    )
    table["bin"], patients["bin"] = table["bin"].astype(str), patients["bin"].astype(str)
    print(
        f"\n{args.method} on {Path(args.data).name}: held-out AP per patient, by {args.by} "
        f"({args.folds} folds x {args.repeats} repeats; overall MAP {q['ap'].mean():.3f})\n"
    )
    print(f"| {args.by} | label | patients | mean AP |\n|---|---|---|---|")
    for rec in table.to_dict("records"):
        print(f"| {rec['bin']} | {rec['label']} | {rec['patients']} | {rec['mean_ap']:.3f} |")
    worst = patients.sort_values("ap").head(8)
    print(
        "\nlowest patients: "
        + ", ".join(f"{p} ({r.label}, {args.by} {r.value:g}, AP {r.ap:.2f})" for p, r in worst.iterrows())
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "data": args.data,
                "method": args.method,
                "overrides": overrides,
                "folds": args.folds,
                "repeats": args.repeats,
                "map": float(q["ap"].mean()),
                "by": args.by,
                "bins": table.to_dict("records"),
                "patients": patients.reset_index().to_dict("records"),
                "wall_s": round(time.perf_counter() - t0, 1),
            },
            indent=2,
            default=float,
        )
    )
    print(f"\n-> {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
