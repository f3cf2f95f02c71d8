"""Frozen-backbone features on disk, so that repeated benchmark runs do not embed the same images again.

A cache entry holds `cached_features`' (V + 1, N, D) tensor: the clean image, then V augmented views.
Its key is a SHA-256 over everything the tensor depends on: the decoded pixels themselves (every image,
in order), the encoder (architecture and a hash of every weight), the preprocessing (image size, sector
crop), the number of views, the augmentation settings and code, and the seed of the views' random
stream. Change any of them and the key changes (a miss); nothing is ever overwritten with different
content. The files' paths and modification times are not in the key: the tensor depends only on the
pixels, so a copied, moved or touched archive still hits, while any changed pixel misses. Entries are
written atomically (a reader sees a whole file or none), so two runs filling the same entry at once
are harmless: both write the same tensor.

Where: `$RETRIEVE_CACHE/features/` if set (`off`, `0` or an empty value turn the cache off), else
`$XDG_CACHE_HOME/retrieve/features/`, else `~/.cache/retrieve/features/`. Entries are plain files; delete
the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from retrieval.config import PreprocessConfig
from retrieval.encoders.base import Encoder
from retrieval.training import augment as augment_module
from retrieval.training.augment import AugmentConfig
from retrieval.training.trainer import cached_features

log = logging.getLogger(__name__)

CACHE_ENV = "RETRIEVE_CACHE"
FORMAT_VERSION = 1
_OFF = ("", "0", "off", "none", "false", "no")


def cache_root() -> Path | None:
    """The user's cache folder for retrieve, or None when $RETRIEVE_CACHE turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "retrieve"


def feature_key(
    images: torch.Tensor,
    encoder: Encoder,
    preprocess: PreprocessConfig,
    views: int,
    aug: AugmentConfig,
    seed: int,
) -> str:
    """SHA-256 (hex) of everything the cached tensor depends on."""
    pixels = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    payload = {
        "format": FORMAT_VERSION,
        "pixels": [list(images.shape), str(images.dtype), pixels],
        "encoder": {k: v for k, v in encoder.fingerprint(preprocess, "").items() if k != "encoder"},
        "views": views,
        "augment": asdict(aug) if views else None,
        "augment_code": hashlib.sha256(inspect.getsource(augment_module).encode()).hexdigest() if views else None,
        "seed": seed if views else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def features_with_cache(
    encoder: Encoder,
    images: torch.Tensor,
    preprocess: PreprocessConfig,
    views: int,
    seed: int,
    device,
    aug: AugmentConfig = AugmentConfig(),
    progress: bool = True,
    root: Path | None | str = "default",
) -> tuple[torch.Tensor, bool]:
    """`cached_features` of `images` (decoded, (N, 1, S, S) uint8), read from the disk cache when an entry
    with the same key exists, else computed and stored; returns the tensor and whether it came from the cache.
    The augmented views draw from their own generator seeded with `seed`, so an entry depends on nothing
    but its key (not on what else ran before it in the process). `root=None` computes without a cache."""
    folder = cache_root() if root == "default" else (None if root is None else Path(root))

    def compute() -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return cached_features(encoder.to(device), images, views, gen, device, progress=progress, aug=aug)

    if folder is None:
        return compute(), False
    t = time.perf_counter()
    key = feature_key(images, encoder, preprocess, views, aug, seed)
    path = folder / "features" / f"{key}.pt"
    want = (views + 1, len(images), encoder.feature_dim)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, torch.Tensor) and tuple(cached.shape) == want:
                log.info("feature cache hit %s (%.1f s)", path.name[:12], time.perf_counter() - t)
                return cached, True
            log.warning("feature cache entry %s has the wrong shape; recomputing", path)
        except Exception as exc:  # a damaged entry is recomputed and replaced, never trusted
            log.warning("feature cache entry %s unreadable (%s); recomputing", path, type(exc).__name__)
    feats = compute()
    try:
        from indexer.atomic import atomic_path

        with atomic_path(path) as tmp:
            torch.save(feats, tmp)
        log.info("feature cache stored %s", path)
    except OSError as exc:  # a read-only or full cache folder costs time, not the run
        log.warning("feature cache: could not write %s (%s)", path, exc)
    return feats, False
