"""Configuration as data: dataclasses for preprocessing and encoders, loadable from YAML."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from indexer.config import IndexConfig  # noqa: F401  (re-exported: recipes hold one)
from retrieval.errors import RetrieveError

RESIZE_MODES = ("pad", "squash")
DEFAULT_ENCODER = "imagenet-effnet-lite0"  # named here, not in the registry, so the CLI can start without torch
# The largest square input: encoders here are trained at 224 to 512 px; 4096 px is already 200 MB of tensor per
# image, and a size of 100000 ran for minutes before failing as if the images were at fault.
MAX_IMAGE_SIZE = 4096


def check_image_size(size: int) -> None:
    if size < 8:
        raise RetrieveError(f"--image-size {size}: must be at least 8 pixels")
    if size > MAX_IMAGE_SIZE:
        raise RetrieveError(
            f"--image-size {size}: at most {MAX_IMAGE_SIZE} pixels (the encoders are trained at 224 to 512)"
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a tensor: grayscale, optional sector crop, resize to a square."""

    image_size: int = 224
    crop_sector: bool = False
    resize: str = "pad"  # "pad": keep aspect ratio, pad with black; "squash": stretch
    ct_window: tuple[float, float] = (-100.0, 400.0)  # HU window for CT DICOM (paper 001)

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
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
    if p.is_dir():
        raise RetrieveError(f"--config {p}: is a folder; give a YAML file")
    if not p.is_file():
        raise RetrieveError(f"--config {p}: file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise RetrieveError(
            f"--config {p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    except yaml.YAMLError as exc:
        raise RetrieveError(f"--config {p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RetrieveError(f"--config {p}: expected a mapping at the top level")
    return raw


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _typed(value: Any, hint: Any, key: str, where: str) -> Any:
    """`value` from a YAML file as the type `hint` of the field `key` asks for, or a one-line error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if hint is Any:
        return value
    if origin is list or origin is tuple:
        n = len(args) if origin is tuple and Ellipsis not in args else None
        if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
            what = f"a list of {n}" if n else "a list"
            raise RetrieveError(f"{where}: {key}: expected {what} ({_TYPE_WORDS.get(args[0], args[0])}), got {value!r}")
        kinds = [args[0] if origin is list or n is None else args[j] for j in range(len(value))]
        items = [_typed(v, t, key, where) for v, t in zip(value, kinds)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise RetrieveError(f"{where}: {key}: expected a mapping, got {value!r}")
        return value
    want = _TYPE_WORDS.get(hint)
    if want is None:
        return value
    ok = False
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    if not ok:
        raise RetrieveError(f"{where}: {key}: expected {want}, got {value!r}")
    return value


def typed_fields(cls: type, raw: dict[str, Any], where: str, section: str = "") -> dict[str, Any]:
    """The values of `raw` (a YAML mapping for the dataclass `cls`) checked and converted to its fields'
    types: `epochs: many` is "WHERE: epochs: expected a whole number, got 'many'", not a TypeError later.
    Unknown keys are left for the caller to report."""
    hints = typing.get_type_hints(cls)
    return {k: _typed(v, hints[k], f"{section}{k}", where) if k in hints else v for k, v in raw.items()}


def _section(raw: dict[str, Any], name: str, p: Path) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise RetrieveError(f"--config {p}: {name}: expected a mapping of options, got {value!r}")
    return value


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read a recipe YAML with optional sections `encoder`, `preprocess`, `index`, `batch_size`."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    unknown = set(raw) - {"encoder", "preprocess", "index", "batch_size"}
    if unknown:
        raise RetrieveError(f"--config {p}: unknown section(s) {', '.join(sorted(unknown))}")
    where = f"--config {p}"
    sections = {}
    for name, cls in (("encoder", EncoderSpec), ("preprocess", PreprocessConfig), ("index", IndexConfig)):
        values = _section(raw, name, p)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise RetrieveError(f"{where}: {name}: unknown option(s) {', '.join(sorted(unknown))}")
        sections[name] = typed_fields(cls, values, where, f"{name}.")
    batch_size = _typed(raw.get("batch_size", 32), int, "batch_size", where)
    if batch_size < 1:
        raise RetrieveError(f"{where}: batch_size {batch_size}: must be at least 1")
    return RecipeConfig(
        encoder=EncoderSpec(**sections["encoder"]),
        preprocess=PreprocessConfig.from_dict(sections["preprocess"]),
        index=IndexConfig(**sections["index"]),
        batch_size=batch_size,
    )


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
