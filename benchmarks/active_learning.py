"""Active-learning simulation (issue 11, paper 002, M9): does choosing which images to label beat labelling
at random?

On frozen ImageNet EfficientNet-Lite0 features (the CPU presets' backbone: 224 px, clean + 4 augmented
views, read from the feature cache that `retrieve benchmark` fills), per dataset and seed: one grouped,
stratified fold is held out, the rest is the pool. Start with a few labels per class; each round a small
dropout head trains on the labelled pool rows, is scored on the held-out fold (MAP, MRR, P@1 of its
hidden-layer vectors against the whole pool, balanced accuracy of its predictions), and a strategy picks
the next batch: `entropy` (kNN vote among the labelled rows), `mc-dropout` (BALD), `esd` (paper 002: the
entropy of the mean of the same dropout passes) or `random`, the baseline in the same run;
`STRATEGY+patients` spreads each batch over patients (at most one image per patient while others remain),
`STRATEGY+kmeans` over k-means clusters of the pool (the best-scored image of each of `batch` clusters).
Output: a markdown table on stdout, `active_learning.json` and `active_learning.png` (label-efficiency
curves) in --out.

    python benchmarks/active_learning.py ../shared/data/busi ../shared/data/abdominal_us_organs --out OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.embed import pick_device
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError
from retrieval.training.active import (
    ACQUIRE_FROM,
    STRATEGIES,
    SimulationSettings,
    parse_strategy,
    plot_curves,
    simulate_active_learning,
)
from retrieval.training.benchmark import PRESETS
from retrieval.training.config import load_train_config
from retrieval.training.feature_cache import features_with_cache
from retrieval.training.folds import group_ids
from retrieval.training.trainer import load_image_tensors


def dataset_features(data: Path, preset: str, views: int | None, progress: bool):
    """Labelled rows, their frozen features (V + 1, N, D) through the disk cache, and their groups."""
    cfg = load_train_config(PRESETS / f"{preset}.yaml")
    table = load_dataset(data)
    rows = table.rows[table.rows["label"].notna()].reset_index(drop=True)  # as `retrieve benchmark`
    pre = PreprocessConfig(image_size=cfg.image_size)
    images = load_image_tensors(rows, pre)[0]
    enc = create_encoder(cfg.encoder, cfg.weights, cfg.seed)
    n_views = cfg.frozen_views if views is None else views
    feats, hit = features_with_cache(
        enc, images, pre, n_views, 0, pick_device(), aug=cfg.augment_config(), progress=progress
    )
    return rows, feats, group_ids(rows), hit


def markdown(results: list[dict]) -> str:
    lines = [
        "| dataset | strategy | start: labels (fraction) | MAP start | MAP end | MAP mean over rounds "
        "| bal. acc start | bal. acc end | bal. acc mean over rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        name = Path(res["dataset"]).name
        for strategy, s in res["summary"].items():
            if strategy == "all_labels":
                continue
            first, last = s["rounds"][0], s["rounds"][-1]
            mean = s["mean_over_rounds"]
            lines.append(
                f"| {name} | {strategy} | {first['fraction']:.3f} -> {last['fraction']:.3f} "
                f"| {first['map']:.3f} | {last['map']:.3f} ± {last['map_std']:.3f} | **{mean['map']:.3f}** "
                f"| {first['balanced_accuracy']:.3f} | {last['balanced_accuracy']:.3f} ± "
                f"{last['balanced_accuracy_std']:.3f} | **{mean['balanced_accuracy']:.3f}** |"
            )
        ceil = res["summary"]["all_labels"]
        lines.append(
            f"| {name} | every pool label | 1.000 | - | {ceil['map']:.3f} | - | - "
            f"| {ceil['balanced_accuracy']:.3f} | - |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("active-learning-results"))
    ap.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated; each of entropy, mc-dropout, esd, random, optionally +patients or +kmeans",
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--start-per-class", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch", type=int, default=None, help="labels per round (default: 2%% of the pool)")
    ap.add_argument("--head-steps", type=int, default=150)
    ap.add_argument("--pca-dims", type=int, default=128, help="PCA of the features the head sits on (0: none)")
    ap.add_argument(
        "--acquire-from",
        choices=ACQUIRE_FROM,
        default="head",
        help="mc-dropout/esd passes from the round's head (runs 14-20b) or from `retrieve suggest-labels`' own scorer "
        "on the pool's unit clean vectors (index)",
    )
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--preset", default="supcon-cpu", help="training preset whose backbone and views are used")
    ap.add_argument("--views", type=int, default=None, help="augmented views (default: the preset's)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    settings = SimulationSettings(
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        seeds=tuple(range(args.seeds)),
        start_per_class=args.start_per_class,
        rounds=args.rounds,
        batch=args.batch,
        head_steps=args.head_steps,
        passes=args.passes,
        pca_dims=args.pca_dims or None,
        acquire_from=args.acquire_from,
    )
    try:  # before any features are computed: a misspelt strategy is a one-line error, exit 2
        for name in settings.strategies:
            parse_strategy(name)
    except RetrieveError as exc:
        ap.error(str(exc))
    results = []
    for data in args.data:
        t = time.perf_counter()
        rows, feats, groups, hit = dataset_features(data, args.preset, args.views, not args.quiet)
        t_feat = time.perf_counter() - t
        res = simulate_active_learning(feats, rows["label"].astype(str).to_numpy(), groups, settings)
        res.update(
            dataset=str(data),
            features_s=round(t_feat, 1),
            features_from_cache=hit,
            wall_s=round(time.perf_counter() - t, 1),
        )
        results.append(res)
        s = res["summary"]
        print(
            f"{data.name}: "
            + ", ".join(f"{k} MAP {v['mean_over_rounds']['map']:.3f}" for k, v in s.items() if k != "all_labels")
            + f" ({res['wall_s']:.0f} s)",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    from indexer.atomic import atomic_path

    with atomic_path(args.out / "active_learning.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    plot_curves(results, args.out / "active_learning.png")
    md = markdown(results)
    with atomic_path(args.out / "active_learning.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
