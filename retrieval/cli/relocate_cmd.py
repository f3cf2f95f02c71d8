"""`retrieve index relocate`: record where an index's data is now (paths are stored relative to it)."""

from __future__ import annotations

from pathlib import Path

import typer


def index_relocate(
    index: Path = typer.Option(..., "--index", "-i"),
    data_root: Path = typer.Option(..., "--data-root", help="the folder the index was built from, where it is now"),
):
    """Point an index at its data's new place (checked to hold every indexed file; written atomically)."""
    from retrieval.relocate import relocate_index

    old, new = relocate_index(index, data_root)
    print(f"--index {index}: data root {old} -> {new}")
