"""`vectors_from: concat`: the trained head's vector joined to the backbone features (issue 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.data.dataset import load_dataset
from retrieval.embed import embed_rows
from retrieval.encoders import create_encoder, save_checkpoint
from retrieval.encoders.base import concat_vectors
from retrieval.errors import RetrieveError
from retrieval.training.config import TrainConfig
from retrieval.training.trainer import train


def _numpy_concat(head: np.ndarray, feats: np.ndarray, w: float) -> np.ndarray:
    h = head / np.linalg.norm(head, axis=1, keepdims=True)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = np.hstack([w * h, np.sqrt(1.0 - w * w) * f])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5**0.5, 0.9, 1.0])
def test_concat_formula_against_numpy(w):
    rng = np.random.default_rng(3)
    head, feats = rng.normal(size=(6, 5)) * 4, rng.normal(size=(6, 9)) + 2
    got = concat_vectors(torch.as_tensor(head), torch.as_tensor(feats), w).numpy()
    np.testing.assert_allclose(got, _numpy_concat(head, feats, w), atol=1e-12)
    # cosine similarity is the w^2 : 1 - w^2 mixture of the two parts' cosines
    ch = _numpy_concat(head, feats, 1.0)[:, :5]
    cf = _numpy_concat(head, feats, 0.0)[:, 5:]
    np.testing.assert_allclose(got @ got.T, w * w * (ch @ ch.T) + (1 - w * w) * (cf @ cf.T), atol=1e-12)


def test_config_checks_vectors_from_and_weight():
    assert TrainConfig(vectors_from="concat").concat_weight == pytest.approx(0.5**0.5)
    with pytest.raises(RetrieveError, match="vectors_from 'both'"):
        TrainConfig(vectors_from="both")
    with pytest.raises(RetrieveError, match="concat_weight 1.5"):
        TrainConfig(vectors_from="concat", concat_weight=1.5)
    with pytest.raises(RetrieveError, match="vectors_from must be head"):
        TrainConfig(method="lsd", vectors_from="concat")


@pytest.mark.slow
def test_concat_checkpoint_round_trip_and_index_build(demo_data, tmp_path):
    from indexer.index_dir import open_index_dir
    from retrieval.cli.main import main

    rows = load_dataset(demo_data).rows
    cfg = TrainConfig(
        method="supcon",
        encoder="cnn5",
        image_size=32,
        batch_size=8,
        max_steps=2,
        vectors_from="concat",
        concat_weight=0.6,
    )
    enc = train(rows, cfg, progress=False).encoder.eval()
    assert enc.dim == 128 + 512 and enc.arch["concat_weight"] == 0.6
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        vec, f = enc(x).numpy(), enc.features(x)
        head = enc.head(f).numpy()
    np.testing.assert_allclose(vec, _numpy_concat(head, f.numpy(), 0.6), atol=1e-6)

    ckpt = save_checkpoint(enc, tmp_path / "concat", enc.default_preprocess)
    assert json.loads(ckpt.with_suffix(".json").read_text())["arch"]["concat_weight"] == 0.6
    back = create_encoder(str(ckpt))
    assert back.concat_weight == 0.6 and back.dim == 640
    with torch.no_grad():
        assert torch.equal(back.eval()(x), enc(x))

    # `index build --encoder CKPT` stores the same concatenated vectors
    index = tmp_path / "index"
    assert main(["index", "build", str(demo_data), "--index", str(index), "--encoder", str(ckpt), "--quiet"]) == 0
    stored = open_index_dir(index, use_gpu=False).vectors
    assert stored.dim == 640
    mine = embed_rows(rows, enc, enc.default_preprocess, progress=False).vectors
    by_path = {str(p): i for i, p in enumerate(rows["path"])}
    order = [by_path[str(p)] for p in stored.rows["path"]]
    np.testing.assert_allclose(stored.vectors, mine[order], atol=1e-5)
