"""Images -> vectors: batched, decoded in DataLoader worker processes while the model runs, with a progress
bar; unreadable files are skipped.

The forward pass runs under `torch.inference_mode` on a channels_last copy of a convolutional encoder (about
twice the contiguous rate on CPU for EfficientNet-Lite0; the vectors agree to float rounding), and on CUDA
from pinned memory under bf16 autocast.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import FrameDataset, Skipped, collate_frames
from retrieval.encoders.base import Encoder
from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

MIN_ITEMS_FOR_WORKERS = 64  # below this, starting worker processes costs more than it saves


@dataclass
class Embedded:
    """Vectors for the rows that could be read, in row order, and the rows that could not."""

    rows: pd.DataFrame
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    skipped: list[Skipped]
    forward_s: float = 0.0  # seconds in the forward pass (device work included)
    wait_s: float = 0.0  # seconds the model waited for decoded batches


def pick_device(prefer_gpu: bool = True) -> torch.device:
    return torch.device("cuda") if prefer_gpu and torch.cuda.is_available() else torch.device("cpu")


def available_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(n_items: int) -> int:
    """Worker processes pay off only for larger runs; keep one core for the model (none on one core)."""
    if n_items < MIN_ITEMS_FOR_WORKERS:
        return 0
    return max(0, min(4, available_cpus() - 1))


# encoder -> (state key, its channels_last copy): one copy per encoder, not one per call (a query embeds one
# image, whose forward costs less than copying the model)
_INFERENCE_COPIES: weakref.WeakKeyDictionary[Encoder, tuple[tuple[Any, ...], Encoder]] = weakref.WeakKeyDictionary()


def _state_key(encoder: Encoder, device: torch.device) -> tuple[Any, ...]:
    """Changes whenever the encoder's weights or buffers change in place (optimiser step, load_state_dict)."""
    return (str(device), tuple(t._version for t in (*encoder.parameters(), *encoder.buffers())))


def inference_module(encoder: Encoder, device: torch.device) -> Encoder:
    """The encoder as it runs fastest: on `device`, in eval mode and, when it has convolutions, a channels_last
    copy (the caller's encoder keeps its layout: checkpoints and training need contiguous weights). The copy is
    kept with the encoder and made again only after its weights change."""
    encoder = encoder.to(device).eval()
    if not any(p.dim() == 4 for p in encoder.parameters()):
        return encoder
    key = _state_key(encoder, device)
    kept = _INFERENCE_COPIES.get(encoder)
    if kept is not None and kept[0] == key:
        return kept[1]
    fast = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    _INFERENCE_COPIES[encoder] = (key, fast)
    return fast


def _worker_failure(exc: BaseException) -> bool:
    """Whether an exception out of a loader with workers says a worker process died: the loader's own check
    (its SIGCHLD handler raises it wherever the main process is) or a pipe it was sending through broke."""
    return isinstance(exc, (ConnectionError, EOFError)) or str(exc).startswith("DataLoader worker")


def _stop_workers(iterators: list[Any]) -> None:
    """Stop the workers of a loader one of whose workers died, now: until its worker pids are unregistered, the
    loader's SIGCHLD handler raises again wherever this process is (even inside the iterator's __del__, which
    would print an ignored-exception traceback)."""
    for it in iterators:
        try:
            it._shutdown_workers()  # unregisters the pids in its `finally`, even when interrupted by that handler
        except RuntimeError:
            pass
    iterators.clear()


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
    """Embed every row of a dataset table (columns path, frame_index) with `encoder`.

    `workers` processes decode and preprocess the next batches while this one runs the model (None: as
    `default_workers`, 0: all in this process); the vectors and their order do not depend on it. A worker
    process that dies (killed, or a decoder crashing the interpreter) is a one-line error, never a traceback.
    """
    device = device or pick_device()
    dataset = FrameDataset(rows, preprocess)
    workers = default_workers(len(dataset)) if workers is None else workers
    if workers < 0:
        raise RetrieveError(f"--workers {workers}: must be 0 (decode in this process) or more")
    started: list[Any] = []  # the loader's iterator, to stop its workers if one dies
    model = inference_module(encoder, device)
    try:
        return _embed(rows, model, dataset, batch_size, workers, device, progress, desc, started)
    except (RuntimeError, ConnectionError, EOFError) as exc:
        if not (workers and _worker_failure(exc)):
            raise
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
    _stop_workers(started)
    raise RetrieveError(f"an image decoding worker process failed ({msg}); rerun with --workers 0 to find the file")


def _embed(
    rows: pd.DataFrame,
    model: Encoder,
    dataset: FrameDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool,
    desc: str,
    started: list[Any],
) -> Embedded:
    cuda = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_frames,
        pin_memory=cuda,
        persistent_workers=False,
    )
    vectors = np.zeros((len(dataset), model.dim), dtype=np.float32)
    ok = np.zeros(len(dataset), dtype=bool)
    skipped: list[Skipped] = []
    forward_s = wait_s = 0.0
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False)
    batches = iter(loader)
    started.append(batches)
    t = time.perf_counter()
    try:
        for tensors, positions, failures in batches:
            wait_s += time.perf_counter() - t
            for pos, reason in failures:
                skipped.append(Skipped(str(rows["path"].iat[pos]), reason))
            if tensors is not None:
                t = time.perf_counter()
                x = tensors.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    out = model(x)
                if cuda:  # bf16 rounding leaves the norms off 1 by ~1e-3
                    out = F.normalize(out.float(), dim=1)
                vectors[positions] = out.float().cpu().numpy()
                ok[positions] = True
                forward_s += time.perf_counter() - t
            bar.update(len(positions) + len(failures))
            t = time.perf_counter()
    finally:
        bar.close()
    log.debug("%s: %d images, %.2f s forward, %.2f s waiting for decoded batches", desc, len(rows), forward_s, wait_s)
    kept = rows.loc[ok].reset_index(drop=True)
    return Embedded(rows=kept, vectors=vectors[ok], skipped=skipped, forward_s=forward_s, wait_s=wait_s)
