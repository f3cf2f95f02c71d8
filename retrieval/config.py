"""Configuration as data: dataclasses for preprocessing and encoders, loadable from YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from indexer.config import IndexConfig  # noqa: F401  (re-exported: recipes hold one)
from retrieval.errors import RetrieveError

RESIZE_MODES = ("pad", "squash")
DEFAULT_ENCODER = "imagenet-effnet-lite0"  # named here, not in the registry, so the CLI can start without torch


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a tensor: grayscale, optional sector crop, resize to a square."""

    image_size: int = 224
    crop_sector: bool = False
    resize: str = "pad"  # "pad": keep aspect ratio, pad with black; "squash": stretch
    ct_window: tuple[float, float] = (-100.0, 400.0)  # HU window for CT DICOM (paper 001)

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise RetrieveError(f"--image-size {self.image_size}: must be at least 8 pixels")
        if self.resize not in RESIZE_MODES:
            raise RetrieveError(f"resize mode '{self.resize}': choose one of {', '.join(RESIZE_MODES)}")
        lo, hi = self.ct_window
        if not hi > lo:
            raise RetrieveError(f"--ct-window {lo},{hi}: the upper bound must exceed the lower one")
        object.__setattr__(self, "ct_window", (float(lo), float(hi)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ct_window"] = list(self.ct_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RetrieveError(f"unknown preprocessing option(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "ct_window" in d:
            d["ct_window"] = tuple(d["ct_window"])
        return cls(**d)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder: registry name, weights source and init seed."""

    name: str = DEFAULT_ENCODER
    weights: str | None = None  # a local weights file, or None for the encoder's default
    seed: int = 0  # used by random-init encoders so vectors are reproducible

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecipeConfig:
    """A YAML recipe for `retrieve index build --config`."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    batch_size: int = 32


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; one-line errors naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise RetrieveError(f"--config {p}: file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RetrieveError(f"--config {p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RetrieveError(f"--config {p}: expected a mapping at the top level")
    return raw


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read a recipe YAML with optional sections `encoder`, `preprocess`, `index`, `batch_size`."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    unknown = set(raw) - {"encoder", "preprocess", "index", "batch_size"}
    if unknown:
        raise RetrieveError(f"--config {p}: unknown section(s) {', '.join(sorted(unknown))}")
    try:
        return RecipeConfig(
            encoder=EncoderSpec(**(raw.get("encoder") or {})),
            preprocess=PreprocessConfig.from_dict(raw.get("preprocess") or {}),
            index=IndexConfig(**(raw.get("index") or {})),
            batch_size=int(raw.get("batch_size", 32)),
        )
    except TypeError as exc:
        raise RetrieveError(f"--config {p}: {exc}") from None


@dataclass(frozen=True)
class BuildSettings:
    """What `index build` runs with: the recipe's sections, overridden by what the user gave explicitly."""

    index: IndexConfig
    encoder: EncoderSpec
    preprocess: dict[str, Any]
    batch_size: int


def build_settings(
    recipe_path: str | Path | None,
    index: IndexConfig,
    encoder: EncoderSpec,
    preprocess: dict[str, Any],
    batch_size: int,
    *,
    encoder_given: bool,
    batch_size_given: bool,
) -> BuildSettings:
    """Merge a recipe with the command line: what the user gave explicitly wins (an 'auto' kind and unset
    preprocessing keys count as not given); without a recipe, the command line's values are used as they are."""
    if recipe_path is None:
        return BuildSettings(index, encoder, preprocess, batch_size)
    recipe = load_recipe(recipe_path)
    kind = index.kind if index.kind != "auto" else recipe.index.kind
    pre = {**recipe.preprocess.to_dict(), **{k: v for k, v in preprocess.items() if v is not None}}
    pre["ct_window"] = tuple(pre["ct_window"])
    return BuildSettings(
        replace(recipe.index, kind=kind, gpu=index.gpu and recipe.index.gpu),
        encoder if encoder_given else recipe.encoder,
        pre,
        batch_size if batch_size_given else recipe.batch_size,
    )
