"""Encoder registry, weight loading from local files, checkpoints and fingerprints."""

import numpy as np
import pytest
import timm
import torch

from retrieval.config import PreprocessConfig
from retrieval.encoders import create_encoder, list_encoders, load_checkpoint, save_checkpoint
from retrieval.encoders.base import fingerprint_difference
from retrieval.errors import RetrieveError

X = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name,dim",
    [
        ("imagenet-effnet-lite0", 1280),
        ("cnn5", 512),
        ("resnet18", 512),
        pytest.param("efficientnet_b0", 1280, marks=pytest.mark.slow),
    ],
)
def test_registry_vectors_are_unit_length(name, dim):
    enc = create_encoder(name)
    with torch.no_grad():
        v = enc(X)
    assert v.shape == (3, dim)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_survives_a_checkpoint(name, tmp_path):
    """Each registry entry gives unit vectors of its dim, and a checkpoint rebuilds it exactly."""
    enc = create_encoder(name, seed=3)
    back = create_encoder(str(save_checkpoint(enc, tmp_path / "ck")))
    with torch.no_grad():
        v = enc(X)
        assert v.shape == (3, enc.dim) and torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
        assert torch.equal(back(X), v)
    assert back.weights_sha256() == enc.weights_sha256() and back.base_arch == enc.base_arch


def test_list_and_unknown():
    assert {"imagenet-effnet-lite0", "cnn5"} <= set(list_encoders())
    with pytest.raises(RetrieveError, match="unknown"):
        create_encoder("no-such-net")
    with pytest.raises(RetrieveError, match="hubs are unreachable"):
        create_encoder("resnet18", weights="imagenet")


@pytest.mark.slow
def test_effnet_lite0_is_the_imagenet_checkpoint():
    """The packaged weights are loaded, not a random init: BN statistics are trained values."""
    enc = create_encoder("imagenet-effnet-lite0")
    bn = enc.backbone.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert enc.source.startswith("ImageNet-1k")
    assert enc.weights_sha256() == create_encoder("imagenet-effnet-lite0").weights_sha256()


@pytest.mark.slow
def test_random_init_is_seeded():
    a, b, c = create_encoder("resnet18", seed=1), create_encoder("resnet18", seed=1), create_encoder("resnet18", seed=2)
    assert a.weights_sha256() == b.weights_sha256() != c.weights_sha256()


@pytest.mark.slow
def test_timm_or_torchvision_weights_file(tmp_path):
    """A state_dict with a classifier (as torchvision/timm ship it) loads into the backbone."""
    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "resnet18.pth")
    enc = create_encoder("resnet18", weights=str(tmp_path / "resnet18.pth"))
    src.reset_classifier(0)
    src.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(src(enc.normalise_input(X)), dim=1)
        assert torch.allclose(enc(X), expected, atol=1e-5)
    # a hub snapshot folder holding model.safetensors works too
    from safetensors.torch import save_file

    snap = tmp_path / "snapshot"
    snap.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snap / "model.safetensors")
    assert create_encoder("resnet18", weights=str(snap)).weights_sha256() == enc.weights_sha256()


@pytest.mark.slow
def test_bad_weights_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"nonsense")
    with pytest.raises(RetrieveError, match="junk.pth"):
        create_encoder("resnet18", weights=str(tmp_path / "junk.pth"))
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(RetrieveError, match="do not fit"):
        create_encoder("resnet18", weights=str(tmp_path / "r34.pth"))
    with pytest.raises(RetrieveError, match="not found"):
        create_encoder("resnet18", weights=str(tmp_path / "absent.pth"))


def test_checkpoint_roundtrip_gives_identical_vectors(tmp_path):
    from retrieval.encoders.backbones import build_backbone
    from retrieval.encoders.base import Encoder

    backbone, dim = build_backbone({"type": "cnn5", "in_chans": 1})
    enc = Encoder(backbone, dim, {"type": "cnn5"}, in_chans=1, mean=(0.5,), std=(0.25,), head_dims=[64, 32]).eval()
    path = save_checkpoint(enc, tmp_path / "ck", PreprocessConfig(image_size=64, crop_sector=True))
    assert path.name == "ck.safetensors" and (tmp_path / "ck.json").is_file()
    back = create_encoder(str(path))
    assert back.dim == 32 and back.default_preprocess.crop_sector
    with torch.no_grad():
        assert torch.equal(enc(X), back(X))
    assert back.weights_sha256() == enc.weights_sha256()
    assert load_checkpoint(tmp_path / "ck.json").dim == 32
    with pytest.raises(RetrieveError, match="not found"):
        create_encoder(str(tmp_path / "missing.safetensors"))


def test_fingerprint_difference():
    enc = create_encoder("cnn5")
    a = enc.fingerprint(PreprocessConfig(image_size=64), "cnn5")
    assert fingerprint_difference(a, enc.fingerprint(PreprocessConfig(image_size=64), "cnn5")) is None
    assert "image_size 64 vs 96" in fingerprint_difference(a, enc.fingerprint(PreprocessConfig(image_size=96), "cnn5"))
    other = create_encoder("cnn5", seed=5).fingerprint(PreprocessConfig(image_size=64), "cnn5")
    assert fingerprint_difference(a, other) == "weights differ"
    assert np.isfinite(a["dim"])


@pytest.mark.slow
def test_multilayer_effnet_extends_the_final_features(tmp_path):
    """imagenet-effnet-lite0-ml = pooled blocks 2-6, then exactly the plain encoder's features; the
    concatenation is what a direct pass with hooks gives, and a trained head reloads bit-identically."""
    from retrieval.data.dataset import load_dataset
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.training.config import TrainConfig
    from retrieval.training.trainer import train

    ml, plain = create_encoder("imagenet-effnet-lite0-ml").eval(), create_encoder("imagenet-effnet-lite0").eval()
    assert ml.feature_dim == 40 + 80 + 112 + 192 + 320 + 1280 and ml.arch["pool_layers"][0] == "blocks.2"
    with torch.no_grad():
        f_ml, f_plain = ml.features(X), plain.features(X)
        # independent: run the timm network stage by stage and pool the block outputs
        net = plain.backbone
        h = net.bn1(net.conv_stem(plain.normalise_input(X)))
        pooled = []
        for i, block in enumerate(net.blocks):
            h = block(h)
            if i >= 2:
                pooled.append(h.mean((2, 3)))
    assert torch.allclose(f_ml[:, -1280:], f_plain, atol=1e-6)
    assert torch.allclose(f_ml[:, :-1280], torch.cat(pooled, 1), atol=1e-5)
    assert ml.fingerprint(PreprocessConfig(), "a") != plain.fingerprint(PreprocessConfig(), "a")

    data = tmp_path / "d"
    generate_demo_dataset(data, n_per_grade=2, frames=2, size=64, seed=1)
    res = train(
        load_dataset(data).rows,
        TrainConfig(
            method="supcon",
            encoder="imagenet-effnet-lite0-ml",
            image_size=32,
            freeze_backbone=True,
            frozen_views=1,
            max_steps=2,
            batch_size=8,
        ),
        progress=False,
    )
    back = create_encoder(str(save_checkpoint(res.encoder, tmp_path / "ml", res.encoder.default_preprocess)))
    with torch.no_grad():
        assert torch.equal(res.encoder.eval()(X), back.eval()(X))


@pytest.mark.slow
def test_multilayer_pool_names_a_missing_layer():
    from retrieval.encoders.backbones import build_backbone

    with pytest.raises(RetrieveError, match="no layer named blocks.99"):
        build_backbone({"type": "timm", "model": "resnet18", "pool_layers": ["blocks.99"]})
    net, dim = build_backbone({"type": "timm", "model": "resnet18", "pool_layers": ["layer2", "layer3"]})
    assert dim == 128 + 256 + 512


def test_intensity_stats_match_numpy_and_train_a_head(tmp_path):
    """intensity-stats = (mean - .5, std, quantiles - .5, 16-bin histogram - 1/16) x 10, as numpy computes them."""
    enc = create_encoder("intensity-stats")
    x = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    x[1] = x[1] * 0.3  # a dark image
    with torch.no_grad():
        f = enc.features(x).numpy()
    for i in range(2):
        p = x[i].flatten().numpy().astype(np.float64)
        hist = np.histogram(p, bins=16, range=(0.0, 1.0))[0] / p.size
        want = (
            np.concatenate(
                [[p.mean() - 0.5, p.std(ddof=1)], np.quantile(p, [0.1, 0.25, 0.5, 0.75, 0.9]) - 0.5, hist - 1 / 16]
            )
            * 10
        )
        assert np.allclose(f[i], want, atol=1e-4)
    assert f[1, 0] < f[0, 0] and f[1, 7:].argmax() < 5  # darker: lower mean, mass in the low bins
    with pytest.raises(RetrieveError, match="no weights"):
        create_encoder("intensity-stats", weights="x.pth")

    from retrieval.data.dataset import load_dataset
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.training.config import TrainConfig
    from retrieval.training.trainer import train

    data = tmp_path / "d"
    generate_demo_dataset(data, n_per_grade=2, frames=2, size=64, seed=1)
    res = train(
        load_dataset(data).rows,
        TrainConfig(
            method="supcon",
            encoder="intensity-stats",
            image_size=32,
            freeze_backbone=True,
            frozen_views=1,
            max_steps=3,
            batch_size=8,
            head_dims=[16, 8],
        ),
        progress=False,
    )
    back = create_encoder(str(save_checkpoint(res.encoder, tmp_path / "st", res.encoder.default_preprocess)))
    assert back.dim == 8
    with torch.no_grad():
        assert torch.equal(res.encoder.eval()(X), back(X))
