"""`retrieve train` as one library call: read the data (and pairs), train, write the checkpoint and its log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.dataset import Skipped, load_dataset
from retrieval.encoders.checkpoint import save_checkpoint
from retrieval.errors import RetrieveError
from retrieval.training.config import TrainConfig
from retrieval.training.trainer import train, write_training_log

PAIR_METHODS = ("siamese", "siamese-l1")


@dataclass
class TrainOutcome:
    """What a training run left behind, for the front end to report."""

    checkpoint: Path
    log_json: Path
    loss_png: Path
    log: dict[str, Any]
    skipped: list[Skipped]


def read_pairs(path: Path, method: str) -> pd.DataFrame:
    """A pairs CSV (path_a, path_b, same) for the siamese methods; relative paths are relative to the CSV."""
    if method not in PAIR_METHODS:
        raise RetrieveError(f"--pairs is for the siamese methods, not {method}")
    if not path.is_file():
        raise RetrieveError(f"--pairs {path}: file not found")
    pairs = pd.read_csv(path)
    base = path.resolve().parent
    for col in ("path_a", "path_b"):
        if col in pairs:
            pairs[col] = [str((base / p).resolve()) if not Path(p).is_absolute() else p for p in pairs[col].astype(str)]
    return pairs


def train_to_checkpoint(
    data: str | Path, cfg: TrainConfig, out: str | Path, pairs: Path | None = None, progress: bool = True
) -> TrainOutcome:
    """Train `cfg.method` on DATA and write `out` (.safetensors + .json) plus its .log.json and .loss.png."""
    table = load_dataset(data)
    pairs_table = read_pairs(pairs, cfg.method) if pairs is not None else None
    result = train(table.rows, cfg, pairs_table, progress=progress)
    path = save_checkpoint(
        result.encoder,
        out,
        result.encoder.default_preprocess,
        extra={
            "training": cfg.to_dict(),
            "classes": result.classes,
            "trained_on": {"data": str(Path(data).resolve()), "images": result.log["n_images"]},
        },
        extra_tensors=result.model.loss.extra_tensors(),
    )
    log_path, png_path = write_training_log(result.log, path)
    return TrainOutcome(Path(path), Path(log_path), Path(png_path), result.log, table.skipped + result.skipped)
