"""Packaging: one version number, type information shipped for every package."""

import importlib
from importlib.metadata import version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_the_package_metadata():
    import retrieval

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert retrieval.__version__ == version("retrieve") == pyproject["project"]["version"]


@pytest.mark.parametrize("package", ["retrieval", "indexer", "ui"])
def test_every_package_is_marked_typed_and_ships_the_marker(package):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"][package]
    assert (Path(importlib.import_module(package).__file__).parent / "py.typed").is_file()
