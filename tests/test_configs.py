"""Every shipped recipe loads; bad recipes give one-line errors."""

from pathlib import Path

import pytest

from retrieval.config import load_recipe
from retrieval.errors import RetrieveError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "index").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.encoder.name and recipe.preprocess.image_size >= 8


def test_bad_recipes(tmp_path):
    (tmp_path / "a.yaml").write_text("encoder: [1, 2\n")
    with pytest.raises(RetrieveError, match="not valid YAML"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("encoder:\n  name: cnn5\nsurprise: 1\n")
    with pytest.raises(RetrieveError, match="unknown section"):
        load_recipe(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("preprocess:\n  image_sise: 64\n")
    with pytest.raises(RetrieveError, match="image_sise"):
        load_recipe(tmp_path / "c.yaml")
    with pytest.raises(RetrieveError, match="not found"):
        load_recipe(tmp_path / "none.yaml")


TRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_training_recipes_load(path):
    from retrieval.training.config import load_train_config

    cfg = load_train_config(path)
    variants = {"lsd-cnn5-cpu": "lsd"}  # a second preset of one method, found by name (`retrieve train --preset`)
    assert variants.get(path.stem, path.stem.removesuffix("-cpu")) == cfg.method


def test_presets_ship_inside_the_package_and_a_missing_one_is_an_error(tmp_path):
    from importlib.resources import files

    from retrieval.errors import RetrieveError
    from retrieval.training.benchmark import resolve_method_config

    shipped = files("retrieval") / "presets" / "train" / "supcon-cpu.yaml"
    assert shipped.is_file()
    with pytest.raises(RetrieveError, match="preset .* is missing"):
        resolve_method_config("supcon", tmp_path)
