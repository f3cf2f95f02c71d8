"""Checkpoints this project writes: weights in safetensors, architecture and preprocessing in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from indexer.atomic import atomic_path
from retrieval.config import PreprocessConfig
from retrieval.encoders.backbones import build_backbone
from retrieval.encoders.base import ARCH_EXTRAS, Encoder
from retrieval.errors import RetrieveError

CHECKPOINT_FORMAT = "retrieve-encoder/1"
EXTRA_PREFIX = "extra."


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights .safetensors, description .json) for a checkpoint given by either file or its folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "encoder.safetensors"
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def existing_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """checkpoint_paths of a checkpoint to read, or a one-line error about the path the user gave (not a
    name derived from it): missing, a folder without encoder.safetensors, not a .safetensors, no .json."""
    given = Path(path).expanduser()
    weights_path, meta_path = checkpoint_paths(given)
    if not given.exists():
        raise RetrieveError(f"checkpoint {given}: file not found")
    if given.is_dir() and not weights_path.is_file():
        raise RetrieveError(
            f"checkpoint {given}: a folder without encoder.safetensors; give a checkpoint .safetensors from "
            "`retrieve train`"
        )
    if given.is_file() and given.suffix not in (".safetensors", ".json"):
        raise RetrieveError(
            f"checkpoint {given}: not a retrieve checkpoint (a .safetensors from `retrieve train`, with its .json)"
        )
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise RetrieveError(
                f"checkpoint {given}: {p.name} is missing beside it (a checkpoint from `retrieve train` is a "
                ".safetensors file and a .json file of the same name)"
            )
    return weights_path, meta_path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:  # a full or read-only disk: one line naming `path`
        tmp.write_bytes(data)


def save_checkpoint(
    encoder: Encoder,
    path: str | Path,
    preprocess: PreprocessConfig | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, Any] | None = None,
) -> Path:
    """Write `<path>.safetensors` and `<path>.json`; both atomically. Returns the weights path.

    `extra_tensors` (e.g. a trained pair-similarity head) are stored under the prefix `extra.`.
    """
    from safetensors.torch import save

    weights_path, meta_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tensors.update({f"{EXTRA_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "arch": encoder.arch,
        "feature_dim": encoder.feature_dim,
        "dim": encoder.dim,
        "preprocess": (preprocess or encoder.default_preprocess).to_dict(),
        "source": encoder.source,
        **(extra or {}),
    }
    _atomic_write_bytes(weights_path, save(tensors))
    _atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return weights_path


def load_checkpoint(path: str | Path) -> Encoder:
    """Rebuild an Encoder from a checkpoint written by `save_checkpoint`."""
    from safetensors.torch import load_file

    weights_path, meta_path = existing_checkpoint(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RetrieveError(f"checkpoint {meta_path}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise RetrieveError(f"checkpoint {meta_path}: not UTF-8 JSON text") from None
    if not isinstance(meta, dict):
        raise RetrieveError(f"checkpoint {meta_path}: not a JSON object")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RetrieveError(f"checkpoint {meta_path}: unknown format {meta.get('format')!r}")
    arch = meta.get("arch")
    if not isinstance(arch, dict) or "type" not in arch:
        raise RetrieveError(f"checkpoint {meta_path}: no architecture description ('arch' with a 'type')")
    backbone, feature_dim = build_backbone(arch)
    enc = Encoder(
        backbone,
        feature_dim,
        {k: v for k, v in arch.items() if k not in ARCH_EXTRAS},
        in_chans=arch.get("in_chans", 3),
        mean=tuple(arch.get("mean", (0.5,))),
        std=tuple(arch.get("std", (0.5,))),
        head_dims=arch.get("head_dims") or [],
        default_preprocess=PreprocessConfig.from_dict(meta.get("preprocess", {})),
        source=f"checkpoint {weights_path}",
        concat_weight=arch.get("concat_weight"),
    )
    try:
        state = {k: v for k, v in load_file(str(weights_path)).items() if not k.startswith(EXTRA_PREFIX)}
        enc.load_state_dict(state)
    except Exception as exc:
        raise RetrieveError(
            f"checkpoint {weights_path}: weights do not fit its architecture ({type(exc).__name__})"
        ) from None
    return enc.eval()


def load_checkpoint_extras(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata JSON, extra tensors without their prefix) of a checkpoint."""
    from safetensors.torch import load_file

    weights_path, meta_path = existing_checkpoint(path)
    meta = json.loads(meta_path.read_text())
    extras = {k[len(EXTRA_PREFIX) :]: v for k, v in load_file(str(weights_path)).items() if k.startswith(EXTRA_PREFIX)}
    return meta, extras


def trained_on(encoder_name: str) -> dict[str, Any] | None:
    """What a checkpoint encoder was trained on (its JSON's `trained_on`), or None for other encoders."""
    if not encoder_name.endswith((".safetensors", ".json")):
        return None
    try:
        found = json.loads(checkpoint_paths(encoder_name)[1].read_text()).get("trained_on")
    except (OSError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) else None
