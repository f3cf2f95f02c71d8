"""Training presets found by name (`retrieve train --preset`): the label-free LSD variant on z-scored CNN5
features trains on a folder without labels and its checkpoint builds an index."""

import json
import shutil

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from retrieval.training.config import load_train_config
from retrieval.training.presets import PRESETS, preset_names, preset_path


def test_lsd_cnn5_preset_is_lsd_cpu_on_zscored_cnn5_features():
    """The variant differs from the lsd-cpu preset in its input and the head's start alone."""
    from dataclasses import replace

    cnn5 = load_train_config(preset_path("lsd-cnn5-cpu"))
    base = load_train_config(PRESETS / "lsd-cpu.yaml")
    assert cnn5 == replace(base, encoder="cnn5", image_size=64, standardize_features=True, cluster_init="kmeans")
    assert preset_path("lsd-cnn5-cpu.yaml") == preset_path("lsd-cnn5-cpu")
    assert {"lsd-cpu", "lsd-cnn5-cpu", "supcon-cpu"} <= set(preset_names())


def test_unknown_preset_and_preset_with_config_are_one_line_errors(tmp_path, capsys, demo_data):
    code, _, err = run_cli(capsys, "train", demo_data, "--preset", "lsd-nope", "--out", tmp_path / "m")
    assert code == 2
    assert_one_line_error(err, "--preset lsd-nope", "lsd-cnn5-cpu")
    code, _, err = run_cli(capsys, "train", demo_data, "--preset", "../lsd-cpu", "--out", tmp_path / "m")
    assert code == 2
    assert_one_line_error(err, "no such training preset")
    cfg = PRESETS / "lsd-cpu.yaml"
    code, _, err = run_cli(capsys, "train", demo_data, "--preset", "lsd-cpu", "--config", cfg, "--out", tmp_path / "m")
    assert code == 2
    assert_one_line_error(err, "--preset and --config")


@pytest.mark.slow
def test_lsd_cnn5_preset_trains_on_a_folder_without_labels_and_builds_an_index(tmp_path, capsys):
    from indexer.index_dir import open_index_dir
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.training.cluster_eval import load_cluster_head

    generate_demo_dataset(tmp_path / "demo", n_per_grade=2, frames=2, size=64, seed=1)
    flat = tmp_path / "flat"  # images only: no labels.csv, no class folders
    flat.mkdir()
    for png in (tmp_path / "demo").rglob("*.png"):
        shutil.copy(png, flat / png.name)
    out = tmp_path / "lsd"
    code, stdout, err = run_cli(
        capsys, "train", flat, "--preset", "lsd-cnn5-cpu", "--clusters", "3", "--epochs", "3", "--out", out, "--quiet"
    )
    assert code == 0, err
    assert "trained lsd on 16 images" in stdout
    ckpt = out.with_suffix(".safetensors")
    training = json.loads(out.with_suffix(".json").read_text())["training"]
    assert (training["encoder"], training["image_size"]) == ("cnn5", 64)
    assert training["standardize_features"] is True and training["cluster_init"] == "kmeans"
    index = tmp_path / "index"
    code, _, err = run_cli(capsys, "index", "build", flat, "--index", index, "--encoder", ckpt, "--quiet")
    assert code == 0, err
    vs = open_index_dir(index, use_gpu=False).vectors
    assert len(vs.rows) == 16 and vs.vectors.shape[1] == 128
    prob = load_cluster_head(str(ckpt)).probabilities(vs.vectors)
    assert prob.shape == (16, 3)
    assert vs.rows["cluster"].tolist() == prob.argmax(1).tolist()
    np.testing.assert_allclose(vs.rows["cluster_probability"], prob.max(1), atol=1e-4)
