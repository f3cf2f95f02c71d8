"""Every method trains end to end on generated data: loss goes down, vectors change, checkpoints reload."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from retrieval.data.dataset import load_dataset
from retrieval.encoders import create_encoder, save_checkpoint
from retrieval.errors import RetrieveError
from retrieval.training.config import METHODS, TrainConfig, load_train_config
from retrieval.training.trainer import train

X = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def rows(demo_data):
    return load_dataset(demo_data).rows


def _vectors(enc):
    with torch.no_grad():
        return enc.eval()(X)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_loss_goes_down_on_frozen_features(rows, method, tmp_path):
    """Head on frozen ImageNet features: 60 steps; mean loss of the last 8 steps < first 8 (seeds 0-2 checked)."""
    cfg = TrainConfig(
        method=method,
        encoder="imagenet-effnet-lite0",
        image_size=32,
        epochs=100,
        batch_size=16,
        lr=1e-3,
        max_steps=60,
        freeze_backbone=True,
        frozen_views=2,
        clusters=4,  # pica, lsd, scan: the demo's four grades (other methods ignore it)
    )
    res = train(rows, cfg, progress=False)
    losses = [s["loss"] for s in res.log["steps"]]
    assert len(losses) == 60 and np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])
    # the backbone stayed frozen, the head learned: vectors differ from a fresh head's
    fresh = train(rows, TrainConfig(**{**cfg.to_dict(), "max_steps": 1, "lr": 0.0}), progress=False)
    assert torch.equal(
        res.encoder.backbone.state_dict()["conv_stem.weight"], fresh.encoder.backbone.state_dict()["conv_stem.weight"]
    )
    assert not torch.allclose(_vectors(res.encoder), _vectors(fresh.encoder), atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_full_training_changes_backbone_and_checkpoint_reloads(rows, method, tmp_path):
    cfg = TrainConfig(method=method, encoder="cnn5", image_size=32, batch_size=8, lr=1e-3, max_steps=4)
    before = create_encoder("cnn5", seed=0)
    res = train(rows, cfg, progress=False)
    assert len(res.log["steps"]) == 4
    w0 = before.backbone.state_dict()["features.0.weight"]
    assert not torch.equal(w0, res.encoder.backbone.state_dict()["features.0.weight"])
    path = save_checkpoint(res.encoder, tmp_path / method, res.encoder.default_preprocess)
    back = create_encoder(str(path))
    assert torch.equal(_vectors(res.encoder), _vectors(back))
    assert back.default_preprocess.image_size == 32 and back.dim == 128


@pytest.mark.slow
def test_training_is_reproducible(rows):
    cfg = TrainConfig(method="weak-simclr", encoder="cnn5", image_size=32, batch_size=8, max_steps=3, seed=7)
    a, b = train(rows, cfg, progress=False), train(rows, cfg, progress=False)
    assert [s["loss"] for s in a.log["steps"]] == [s["loss"] for s in b.log["steps"]]
    assert torch.equal(_vectors(a.encoder), _vectors(b.encoder))


@pytest.mark.slow
def test_vectors_from_backbone_drops_the_head(rows):
    res = train(
        rows,
        TrainConfig(
            method="supervised", encoder="cnn5", image_size=32, batch_size=8, max_steps=2, vectors_from="backbone"
        ),
        progress=False,
    )
    assert res.encoder.dim == 512 and res.encoder.head_dims == []


@pytest.mark.slow
def test_label_methods_need_labels(rows):
    unlabelled = rows.assign(label=None)
    with pytest.raises(RetrieveError, match="needs a label"):
        train(unlabelled, TrainConfig(method="supcon", encoder="cnn5", image_size=32, max_steps=1), progress=False)
    res = train(
        unlabelled,
        TrainConfig(method="simclr", encoder="cnn5", image_size=32, batch_size=8, max_steps=2),
        progress=False,
    )
    assert len(res.log["steps"]) == 2


def test_config_files_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("method: simclr\nepochs: 3\ntemperature: 0.2\n")
    cfg = load_train_config(tmp_path / "c.yaml", {"epochs": 5, "lr": None})
    assert cfg.method == "simclr" and cfg.epochs == 5 and cfg.temperature == 0.2
    (tmp_path / "bad.yaml").write_text("methd: simclr\n")
    with pytest.raises(RetrieveError, match="methd"):
        load_train_config(tmp_path / "bad.yaml")
    with pytest.raises(RetrieveError, match="choose one of"):
        TrainConfig(method="byol")


@pytest.mark.slow
def test_augmentation_options_from_yaml(rows, tmp_path, monkeypatch):
    """`augment` changes the training views' AugmentConfig; bad options fail before any training."""
    import retrieval.training.trainer as trainer
    from retrieval.training.augment import AugmentConfig

    (tmp_path / "c.yaml").write_text(
        "method: simclr\naugment_gain: false\naugment: {rotation_deg: 5, crop_scale: [0.9, 1.0]}\n"
    )
    cfg = load_train_config(tmp_path / "c.yaml")
    assert cfg.augment_config() == AugmentConfig(rotation_deg=5.0, crop_scale=(0.9, 1.0), gain=(1.0, 1.0))
    assert TrainConfig().augment_config() == AugmentConfig()
    for bad, msg in [
        ({"rotation": 5}, "unknown option"),
        ({"zoom": 1.1}, "two numbers"),
        ({"blur_p": "x"}, "a number"),
        ([1, 2], "mapping"),
    ]:
        with pytest.raises(RetrieveError, match=msg):
            TrainConfig(augment=bad)
    seen = []
    real = trainer.augment
    monkeypatch.setattr(
        trainer, "augment", lambda x, aug, generator=None: seen.append(aug) or real(x, aug, generator=generator)
    )
    train(
        rows,
        TrainConfig(method="simclr", encoder="cnn5", image_size=32, batch_size=8, max_steps=1, augment={"shift": 0.0}),
        progress=False,
    )
    assert seen and all(a.shift == 0.0 and a.rotation_deg == 15.0 for a in seen)


@pytest.mark.slow
def test_train_cli_pairs_file_and_classify(tmp_path, capsys, demo_data):
    labels = pd.read_csv(demo_data / "labels.csv")
    pairs = pd.DataFrame(
        {
            "path_a": labels["path"].iloc[:12].tolist(),
            "path_b": labels["path"].iloc[1:13].tolist(),
            "same": (labels["label"].iloc[:12].to_numpy() == labels["label"].iloc[1:13].to_numpy()).astype(int),
        }
    )
    pairs.to_csv(demo_data / "pairs.csv", index=False)
    try:
        out = tmp_path / "sl1"
        code, stdout, err = run_cli(
            capsys,
            "train",
            demo_data,
            "--method",
            "siamese-l1",
            "--out",
            out,
            "--pairs",
            demo_data / "pairs.csv",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--quiet",
        )
    finally:
        (demo_data / "pairs.csv").unlink()
    assert code == 0, err
    assert "trained siamese-l1" in stdout
    for suffix in (".safetensors", ".json", ".log.json", ".loss.png"):
        assert (tmp_path / f"sl1{suffix}").is_file()
    log = json.loads((tmp_path / "sl1.log.json").read_text())
    assert log["config"]["method"] == "siamese-l1" and len(log["steps"]) == 3
    img = demo_data / "severe" / "SYN300_f0.png"
    code, stdout, err = run_cli(
        capsys,
        "classify",
        img,
        "--anchors",
        demo_data,
        "--checkpoint",
        tmp_path / "sl1.safetensors",
        "--shots",
        "2",
        "--json",
    )
    assert code == 0, err
    res = json.loads(stdout)
    assert res[0]["scorer"] == "siamese-l1 similarity head"
    assert set(res[0]["scores"]) == {"normal", "mild", "moderate", "severe"} and res[0]["label"] in res[0]["scores"]
    # the checkpoint indexes like any encoder
    code, _, err = run_cli(
        capsys,
        "index",
        "build",
        demo_data,
        "--index",
        tmp_path / "idx",
        "--encoder",
        tmp_path / "sl1.safetensors",
        "--quiet",
    )
    assert code == 0, err
    code, stdout, _ = run_cli(capsys, "eval", "--index", tmp_path / "idx", "--quiet")
    assert code == 0 and f"this encoder was trained on {demo_data.resolve()} (24 images)" in stdout
    code, _, err = run_cli(
        capsys, "train", demo_data, "--method", "supcon", "--out", tmp_path / "x", "--pairs", tmp_path / "p.csv"
    )
    assert code == 2 and "--pairs is for the siamese methods" in err


def test_pairs_match_full_paths_not_file_names(tmp_path):
    """Two images with the same file name in different folders must not be confused."""
    from retrieval.training.trainer import _pair_indices

    rows = pd.DataFrame({"path": [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]})
    table = pd.DataFrame(
        {"path_a": [str(tmp_path / "b" / "x.png")], "path_b": [str(tmp_path / "a" / "x.png")], "same": [0]}
    )
    assert _pair_indices(rows, table).tolist() == [[1, 0, 0]]
    with pytest.raises(RetrieveError, match="not an image of the dataset"):
        _pair_indices(rows, pd.DataFrame({"path_a": ["x.png"], "path_b": [str(tmp_path / "a" / "x.png")], "same": [1]}))
