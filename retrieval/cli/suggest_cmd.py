"""`retrieve suggest-labels`: argument parsing only; the work is in retrieval.training.active."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.errors import RetrieveError


def suggest_labels(
    index: Path = typer.Option(..., "--index", "-i", help="index folder; images without a label form the pool"),
    budget: int = typer.Option(..., "--budget", help="how many images to suggest"),
    strategy: str = typer.Option(
        "entropy",
        "--strategy",
        help="entropy (of the kNN vote among labelled images), mc-dropout (BALD from 20 dropout passes of a small "
        "head trained on the labelled images' vectors) or random",
    ),
    k: int = typer.Option(10, "--k", help="neighbours in the kNN vote"),
    out: Path = typer.Option(..., "--out", "-o", help="CSV to write: the suggested images and an empty label column"),
    seed: int = typer.Option(0, "--seed"),
):
    """The unlabelled images whose labels would help most, as a CSV a person fills in (paper 002, M9)."""
    from indexer.atomic import atomic_path
    from indexer.index_dir import open_index_dir
    from retrieval.training.active import suggest_labels as suggest

    if k < 1:
        raise RetrieveError(f"--k {k}: must be at least 1")
    vs = open_index_dir(index, use_gpu=False).vectors
    table = suggest(vs.rows, vs.vectors, budget, strategy, k, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    print(
        f"{len(table)} image(s) to label ({strategy}) -> {out}; fill in the label column and add them to the manifest"
    )
