"""The fast embedding path (channels_last under inference_mode, decoding in worker processes) gives the vectors
the plain contiguous forward gives, in the same order, whatever the worker count; bad files stay one line."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, run_cli, write_png

import retrieval.data.dataset as dataset_mod
from retrieval.config import EncoderSpec
from retrieval.data.dataset import FrameDataset, load_dataset
from retrieval.embed import default_workers, embed_rows, inference_module
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError
from retrieval.pipeline import load_encoder

CPU = torch.device("cpu")  # compared with a CPU float32 forward (on CUDA the path runs in bf16)


def _plain_vectors(rows: pd.DataFrame, loaded) -> np.ndarray:
    """The previous path, computed independently: decode each row, stack, one contiguous forward."""
    ds = FrameDataset(rows, loaded.preprocess)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    enc = loaded.encoder.eval()
    assert all(p.is_contiguous() for p in enc.parameters())
    with torch.no_grad():
        return enc(x.contiguous()).numpy()


@pytest.mark.parametrize("name", ["imagenet-effnet-lite0", "imagenet-effnet-lite0-ml", "cnn5", "intensity-stats"])
def test_fast_path_vectors_equal_the_contiguous_forward(demo_data, name):
    loaded = load_encoder(EncoderSpec(name), {"image_size": 64})
    rows = load_dataset(demo_data).rows.iloc[:10].reset_index(drop=True)
    want = _plain_vectors(rows, loaded)
    got = embed_rows(rows, loaded.encoder, loaded.preprocess, batch_size=4, workers=0, device=CPU, progress=False)
    assert got.vectors.shape == want.shape and got.vectors.dtype == np.float32
    np.testing.assert_allclose(got.vectors, want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    assert list(got.rows["id"]) == list(rows["id"])


def test_the_callers_encoder_keeps_its_layout_and_fingerprint(demo_data):
    loaded = load_encoder(EncoderSpec("imagenet-effnet-lite0"), {"image_size": 64})
    rows = load_dataset(demo_data).rows.iloc[:4]
    embed_rows(rows, loaded.encoder, loaded.preprocess, workers=0, device=CPU, progress=False)
    assert all(p.is_contiguous() for p in loaded.encoder.parameters())  # safetensors needs contiguous weights
    assert loaded.encoder.fingerprint(loaded.preprocess, "imagenet-effnet-lite0") == loaded.fingerprint
    fast = inference_module(loaded.encoder, CPU)
    assert fast is not loaded.encoder
    convs = [p for p in fast.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_the_fast_copy_is_kept_and_made_again_after_the_weights_change(demo_data):
    """One channels_last copy per encoder across calls (a query embeds one image); an in-place weight change
    (an optimiser step, load_state_dict) makes a new one, so vectors always follow the current weights."""
    enc = create_encoder("cnn5", None, 0)
    rows = load_dataset(demo_data).rows.iloc[:3]
    pre = enc.default_preprocess
    first = inference_module(enc, CPU)
    assert inference_module(enc, CPU) is first
    before = embed_rows(rows, enc, pre, workers=0, device=CPU, progress=False).vectors
    assert inference_module(enc, CPU) is first
    with torch.no_grad():
        next(p for p in enc.parameters() if p.dim() == 4).mul_(-1.0)
    assert inference_module(enc, CPU) is not first
    after = embed_rows(rows, enc, pre, workers=0, device=CPU, progress=False).vectors
    with torch.no_grad():
        enc.eval()
        x = torch.stack([FrameDataset(rows, pre)[i][0] for i in range(len(rows))])
        want = torch.nn.functional.normalize(enc(x), dim=1).numpy()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, want, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_zero_and_two_workers_give_identical_results(tmp_path, demo_data):
    """Same rows, same order, bit-identical vectors and the same skip lines, a corrupt file in the middle."""
    rows = load_dataset(demo_data).rows.iloc[:12].reset_index(drop=True)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    broken = rows.iloc[[0]].assign(id="corrupt.png", path=str(bad))
    rows = pd.concat([rows.iloc[:5], broken, rows.iloc[5:]], ignore_index=True)
    loaded = load_encoder(EncoderSpec("imagenet-effnet-lite0"), {"image_size": 64})
    zero = embed_rows(rows, loaded.encoder, loaded.preprocess, batch_size=4, workers=0, device=CPU, progress=False)
    two = embed_rows(rows, loaded.encoder, loaded.preprocess, batch_size=4, workers=2, device=CPU, progress=False)
    assert list(zero.rows["id"]) == list(two.rows["id"]) == [r for r in rows["id"] if r != "corrupt.png"]
    np.testing.assert_array_equal(zero.vectors, two.vectors)
    assert [str(s) for s in zero.skipped] == [str(s) for s in two.skipped]
    assert len(zero.skipped) == 1 and str(bad) in str(zero.skipped[0]) and "\n" not in str(zero.skipped[0])


@pytest.mark.slow
def test_only_corrupt_images_with_workers_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        (data / "a").mkdir(parents=True, exist_ok=True)
        (data / "a" / f"x{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    code, _, err = run_cli(
        capsys, "embed", data, "--out", tmp_path / "v.parquet", "--workers", "2", "--image-size", "64", "--quiet"
    )
    assert code == 2
    assert_one_line_error(err, "none of the 3 images could be read", "x0.png")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no "Exception ignored" traceback
def test_a_worker_that_dies_is_a_one_line_error(tmp_path, monkeypatch):
    """A decoder that takes the worker process down with it (a segfault, the OOM killer)."""
    paths = [write_png(tmp_path / f"i{i}.png", np.full((32, 32), 40 * i, np.uint8)) for i in range(4)]
    rows = pd.DataFrame({"id": [p.name for p in paths], "path": [str(p) for p in paths]})
    rows["frame_index"] = pd.array([None] * 4, dtype="Int64")
    real = dataset_mod.read_frame

    def crashing(path, *a, **k):
        if str(path).endswith("i2.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *a, **k)

    monkeypatch.setattr(dataset_mod, "read_frame", crashing)  # forked workers inherit it
    loaded = load_encoder(EncoderSpec("cnn5"), {"image_size": 32})
    with pytest.raises(RetrieveError) as info:
        embed_rows(rows, loaded.encoder, loaded.preprocess, batch_size=1, workers=1, progress=False)
    msg = str(info.value)
    assert "decoding worker" in msg and "--workers 0" in msg and "\n" not in msg


def test_worker_count(monkeypatch):
    import retrieval.embed as embed_mod

    assert default_workers(10) == 0  # a few images: no processes to start
    monkeypatch.setattr(embed_mod, "available_cpus", lambda: 1)
    assert default_workers(10_000) == 0  # one core: decode in the process that runs the model
    monkeypatch.setattr(embed_mod, "available_cpus", lambda: 2)
    assert default_workers(10_000) == 1
    monkeypatch.setattr(embed_mod, "available_cpus", lambda: 64)
    assert default_workers(10_000) == 4


def test_negative_workers_is_refused(demo_data):
    loaded = load_encoder(EncoderSpec("cnn5"), {"image_size": 32})
    rows = load_dataset(demo_data).rows.iloc[:2]
    with pytest.raises(RetrieveError, match="--workers -1"):
        embed_rows(rows, loaded.encoder, loaded.preprocess, workers=-1, progress=False)
