"""The training presets shipped in the package (`retrieval/presets/train/*.yaml`; `configs/train` in a checkout
is a link to them), found by name: `retrieve train --preset lsd-cnn5-cpu`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from retrieval.errors import RetrieveError

PRESETS = Path(str(files("retrieval") / "presets" / "train"))  # shipped in the wheel (package data)


def preset_names(preset_dir: Path = PRESETS) -> list[str]:
    """Every shipped training preset's name (its file name without .yaml)."""
    return sorted(p.stem for p in preset_dir.glob("*.yaml"))


def preset_path(name: str, preset_dir: Path = PRESETS) -> Path:
    """The YAML file of preset `name` (`lsd-cnn5-cpu` or `lsd-cnn5-cpu.yaml`); a one-line error naming the
    shipped presets when there is none."""
    stem = name.removesuffix(".yaml")
    path = preset_dir / f"{stem}.yaml"
    if "/" in stem or "\\" in stem or not path.is_file():
        names = ", ".join(preset_names(preset_dir))
        raise RetrieveError(f"--preset {name}: no such training preset (choose from {names})")
    return path
