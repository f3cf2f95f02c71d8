"""The on-disk feature cache: a second call with the same inputs reads the stored tensor; any change of
dataset file, pixels, encoder weights, views, augmentation or seed is a miss; the cache can be off."""

import os

import pandas as pd
import pytest
import torch

from retrieval.config import PreprocessConfig
from retrieval.encoders.registry import create_encoder
from retrieval.training.augment import AugmentConfig
from retrieval.training.feature_cache import cache_root, features_with_cache
from retrieval.training.trainer import cached_features


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
        enc, images, rows, PreprocessConfig(image_size=32), views, seed, "cpu", aug=aug, progress=False, root=root
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
    st = os.stat(rows["path"][0])
    os.utime(rows["path"][0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a file touched since
    assert not _call(rows, images, enc, root)[1]
    assert _call(rows, images, enc, root)[1]  # and that new state is cached in turn


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
    _, hit = features_with_cache(enc, images, rows, PreprocessConfig(image_size=32), 1, 0, "cpu", progress=False)
    assert not hit and not (tmp_path / "c").exists()
    monkeypatch.delenv("RETRIEVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "retrieve"
