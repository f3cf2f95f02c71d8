"""`retrieve suggest-labels`: argument parsing only; the work is in retrieval.training.active."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.errors import RetrieveError

SPREAD_NAMES = {"patients": ", spread over patients", "kmeans": ", one per k-means cluster"}


def suggest_labels(
    index: Path = typer.Option(..., "--index", "-i", help="index folder; images without a label form the pool"),
    budget: int = typer.Option(..., "--budget", help="how many images to suggest"),
    strategy: str = typer.Option(
        "auto",
        "--strategy",
        help="auto (esd where the index has labelled images of two classes or more, else random); esd (paper "
        "002: the entropy of the mean of 20 dropout passes of a small head trained on the labelled images' vectors); "
        "mc-dropout (BALD from those same passes); entropy (of the kNN vote among labelled images); random",
    ),
    spread: str = typer.Option(
        "kmeans",
        "--spread",
        help="kmeans (the best image of each of BUDGET k-means clusters of the unlabelled images); patients (at "
        "most one image per patient while other patients remain); none (straight from the top of the scores)",
    ),
    head: Path | None = typer.Option(
        None,
        "--head",
        help="mc-dropout and esd: a checkpoint from `retrieve train` whose projection head gives the dropout passes "
        "(instead of training a head here); the index must be built with it or with its backbone",
    ),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="where the indexed files are now (--head reads them again for backbone features)"
    ),
    k: int = typer.Option(10, "--k", help="neighbours in the kNN vote"),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="CSV to write: path (relative to the index's data root, the folder or manifest's folder it was built "
        "from, as that manifest and `index build --labels` take it), frame_index, patient_id, score, empty label",
    ),
    seed: int = typer.Option(0, "--seed"),
):
    """The unlabelled images whose labels would help most, as a CSV a person fills in (paper 002, M9)."""
    from indexer.atomic import atomic_path, check_writable
    from retrieval.training.active import suggest_for_index

    if k < 1:
        raise RetrieveError(f"--k {k}: must be at least 1")
    if not out.is_dir() and out.suffix.lower() != ".csv":
        raise RetrieveError(f"--out {out}: give a .csv file (a table a person fills in)")
    check_writable(out, "--out")
    table = suggest_for_index(index, budget, strategy, k, seed, spread, head, data_root, progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    chosen = table.attrs.get("strategy", strategy)
    if strategy == "auto" and chosen == "random":
        print("no labelled images of two classes in the index yet: random images (spread as asked) to start with")
    print(
        f"{len(table)} image(s) to label ({chosen}{SPREAD_NAMES.get(spread, '')}) -> "
        f"{out}; fill in the label column. Its paths are relative to the index's data root, as in the dataset's "
        "manifest and in an `index build --labels` CSV: put the labels on those rows of the manifest (or append the "
        "rows to that CSV) and rebuild the index"
    )
