"""The on-disk feature cache: a second call with the same inputs reads the stored tensor; any change of
pixels, encoder weights, views, augmentation or seed is a miss; a copied or touched archive is a hit; the
cache can be off."""

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retrieval.config import PreprocessConfig
from retrieval.encoders.registry import create_encoder
from retrieval.training.augment import AugmentConfig
from retrieval.training.feature_cache import cache_root, features_with_cache
from retrieval.training.trainer import cached_features, load_image_tensors


@pytest.fixture
def case(tmp_path):
    files = []
    for i in range(5):
        f = tmp_path / f"img{i}.png"
        f.write_bytes(b"x" * (i + 1))
        files.append(str(f))
    rows = pd.DataFrame({"path": files, "label": list("aabba")})
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    enc = create_encoder("cnn5", None, 0)
    return rows, images, enc, tmp_path / "cache"


def _call(rows, images, enc, root, views=2, seed=0, aug=AugmentConfig()):
    return features_with_cache(
        enc, images, PreprocessConfig(image_size=32), views, seed, "cpu", aug=aug, progress=False, root=root
    )


def test_hit_returns_the_stored_tensor_and_equals_a_direct_computation(case):
    rows, images, enc, root = case
    first, hit1 = _call(rows, images, enc, root)
    second, hit2 = _call(rows, images, enc, root)
    assert (hit1, hit2) == (False, True)
    assert len(list((root / "features").glob("*.pt"))) == 1
    assert not list((root / "features").glob(".*.tmp"))  # the atomic write left no temporary file
    torch.testing.assert_close(first, second)
    direct = cached_features(enc, images, 2, torch.Generator().manual_seed(0), "cpu", progress=False)
    torch.testing.assert_close(first, direct)


@pytest.mark.slow
def test_any_changed_input_is_a_miss(case):
    rows, images, enc, root = case
    _call(rows, images, enc, root)
    assert not _call(rows, images, enc, root, views=3)[1]
    assert not _call(rows, images, enc, root, seed=1)[1]
    assert not _call(rows, images, enc, root, aug=AugmentConfig(rotation_deg=5.0))[1]
    assert not _call(rows, images, create_encoder("cnn5", None, 1), root)[1]  # other weights
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert not _call(rows, changed, enc, root)[1]
    assert _call(rows, changed, enc, root)[1]  # and that new state is cached in turn
    swapped = images[[1, 0, 2, 3, 4]]
    assert not _call(rows, swapped, enc, root)[1]  # the same images in another order


def test_copied_and_touched_archive_still_hits(tmp_path):
    """The key covers the decoded pixels, not the files: an archive copied elsewhere under other names, with
    new modification times, decodes to the same tensor and hits; a changed image misses."""
    rng = np.random.default_rng(0)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(src / f"img{i}.png")
        shutil.copyfile(src / f"img{i}.png", dst / f"renamed{i}.png")
        os.utime(dst / f"renamed{i}.png", ns=(1, 10**18))
    pre = PreprocessConfig(image_size=32)
    enc = create_encoder("cnn5", None, 0)

    def call(folder: Path, pattern: str):
        rows = pd.DataFrame({"path": [str(folder / pattern.format(i)) for i in range(4)], "frame_index": [0] * 4})
        return features_with_cache(
            enc, load_image_tensors(rows, pre)[0], pre, 1, 0, "cpu", progress=False, root=tmp_path / "cache"
        )

    first, hit1 = call(src, "img{}.png")
    again, hit2 = call(dst, "renamed{}.png")
    assert (hit1, hit2) == (False, True)
    torch.testing.assert_close(first, again)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(dst / "renamed2.png")
    assert not call(dst, "renamed{}.png")[1]


def test_damaged_entry_is_recomputed(case):
    rows, images, enc, root = case
    first, _ = _call(rows, images, enc, root)
    (entry,) = (root / "features").glob("*.pt")
    entry.write_bytes(b"not a tensor")
    again, hit = _call(rows, images, enc, root)
    assert not hit
    torch.testing.assert_close(first, again)
    assert _call(rows, images, enc, root)[1]


def test_cache_folder_from_the_environment(monkeypatch, tmp_path, case):
    monkeypatch.setenv("RETRIEVE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("RETRIEVE_CACHE", "off")
    assert cache_root() is None
    rows, images, enc, _ = case
    _, hit = features_with_cache(enc, images, PreprocessConfig(image_size=32), 1, 0, "cpu", progress=False)
    assert not hit and not (tmp_path / "c").exists()
    monkeypatch.delenv("RETRIEVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "retrieve"
