"""`retrieve demo`: the work is in retrieval.demo.run."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli import options as opt


def demo(
    out: Path = typer.Option(Path("retrieve-demo"), "--out", "-o", help="folder for the demo data, index and report"),
    encoder: str = opt.Encoder,
    weights: str | None = opt.Weights,
    image_size: int | None = opt.ImageSize,
    quiet: bool = opt.Quiet,
):
    """Generate synthetic liver ultrasound, index it, query it and evaluate it."""
    from retrieval.demo.run import run_demo

    run_demo(out, encoder, weights, image_size, progress=not quiet, say=print)
