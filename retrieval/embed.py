"""Images -> vectors: batched, with DataLoader workers and a progress bar; unreadable files are skipped."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import FrameDataset, Skipped, collate_frames
from retrieval.encoders.base import Encoder


@dataclass
class Embedded:
    """Vectors for the rows that could be read, in row order, and the rows that could not."""

    rows: pd.DataFrame
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    skipped: list[Skipped]


def pick_device(prefer_gpu: bool = True) -> torch.device:
    return torch.device("cuda") if prefer_gpu and torch.cuda.is_available() else torch.device("cpu")


def default_workers(n_items: int) -> int:
    """Worker processes pay off only for larger runs; keep one core for the model."""
    if n_items < 64:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@torch.inference_mode()
def embed_rows(
    rows: pd.DataFrame,
    encoder: Encoder,
    preprocess: PreprocessConfig,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> Embedded:
    """Embed every row of a dataset table (columns path, frame_index) with `encoder`."""
    device = device or pick_device()
    encoder = encoder.to(device).eval()
    dataset = FrameDataset(rows, preprocess)
    workers = default_workers(len(dataset)) if workers is None else workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_frames,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    vectors = np.zeros((len(dataset), encoder.dim), dtype=np.float32)
    ok = np.zeros(len(dataset), dtype=bool)
    skipped: list[Skipped] = []
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False)
    for tensors, positions, failures in loader:
        for pos, reason in failures:
            skipped.append(Skipped(str(rows["path"].iat[pos]), reason))
        if tensors is not None:
            out = encoder(tensors.to(device, non_blocking=True)).float().cpu().numpy()
            vectors[positions] = out
            ok[positions] = True
        bar.update(len(positions) + len(failures))
    bar.close()
    kept = rows.loc[ok].reset_index(drop=True)
    return Embedded(rows=kept, vectors=vectors[ok], skipped=skipped)
