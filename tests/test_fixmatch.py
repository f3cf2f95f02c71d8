"""FixMatch: the loss against a direct computation, training on partly labelled data, bad input."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from retrieval.data.dataset import load_dataset
from retrieval.errors import RetrieveError
from retrieval.training.config import TrainConfig
from retrieval.training.folds import keep_label_fraction
from retrieval.training.losses import fixmatch_loss
from retrieval.training.trainer import train


def _ce(logits, y):
    return -(logits[y] - math.log(sum(math.exp(v) for v in logits)))


def test_fixmatch_loss_by_hand():
    lab_logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    weak = torch.tensor([[5.0, 0.0], [0.2, 0.0], [0.0, 4.0]])  # p max: 0.993, 0.55, 0.982
    strong = torch.tensor([[1.0, 0.5], [0.0, 3.0], [0.3, 0.1]])
    sup = (_ce([2.0, 0.0], 0) + _ce([0.0, 1.0], 1)) / 2
    # tau 0.95: row 0 (pseudo-label 0) and row 2 (pseudo-label 1) pass, row 1 does not; mean over all 3
    unsup = (_ce([1.0, 0.5], 0) + _ce([0.3, 0.1], 1)) / 3
    got = fixmatch_loss(lab_logits, y, weak, strong, threshold=0.95, unlabelled_weight=2.0)
    assert got.item() == pytest.approx(sup + 2.0 * unsup, abs=1e-6)
    # tau above every confidence: only the supervised term
    assert fixmatch_loss(lab_logits, y, weak, strong, 0.999).item() == pytest.approx(sup, abs=1e-6)


@pytest.fixture(scope="module")
def partly_labelled(demo_data):
    rows = load_dataset(demo_data).rows
    return keep_label_fraction(rows, 0.25, seed=0)


def test_keep_label_fraction_is_stratified_by_patient(partly_labelled, demo_data):
    full = load_dataset(demo_data).rows
    kept = partly_labelled["label"].dropna()
    # 2 patients x 3 frames per grade: 25% of 6 images is 1.5, one whole patient (3 images) per grade
    assert kept.value_counts().to_dict() == {c: 3 for c in full["label"].unique()}
    assert (kept == full.loc[kept.index, "label"]).all()
    labelled = partly_labelled["label"].notna()
    assert full.groupby("patient_id").apply(lambda g: labelled[g.index].nunique() == 1).all()  # whole patients
    again = keep_label_fraction(full, 0.25, seed=0)
    assert again["label"].isna().equals(partly_labelled["label"].isna())  # seeded
    other = [keep_label_fraction(full, 0.25, seed=s)["label"].notna().tolist() for s in range(1, 6)]
    assert any(o != labelled.tolist() for o in other)


def test_keep_label_fraction_takes_groups_closest_to_the_fraction():
    # class a: 10 groups of 2 images; 30% of 20 images = 6 -> 3 groups; class b: 4 groups of 5 -> 1 group (5)
    rows = pd.DataFrame(
        {
            "patient_id": [f"a{i // 2}" for i in range(20)] + [f"b{i // 5}" for i in range(20)],
            "label": ["a"] * 20 + ["b"] * 20,
        }
    )
    for seed in range(5):
        kept = keep_label_fraction(rows, 0.3, seed)["label"].dropna()
        assert kept.value_counts().to_dict() == {"a": 6, "b": 5}


@pytest.mark.slow
def test_fixmatch_trains_on_partly_labelled_rows(partly_labelled):
    cfg = TrainConfig(
        method="fixmatch",
        encoder="cnn5",
        image_size=32,
        batch_size=12,
        lr=3e-3,
        max_steps=40,
        freeze_backbone=True,
        frozen_views=2,
        unlabelled_ratio=3,
        fixmatch_threshold=0.5,
    )
    res = train(partly_labelled, cfg, progress=False)
    losses = [s["loss"] for s in res.log["steps"]]
    assert len(losses) == 40 and np.isfinite(losses).all() and np.mean(losses[-8:]) < np.mean(losses[:8])
    assert res.classes == ["mild", "moderate", "normal", "severe"]


def test_fixmatch_refuses_a_fully_unlabelled_manifest(demo_data, tmp_path, capsys):
    rows = load_dataset(demo_data).rows
    with pytest.raises(RetrieveError, match="needs some labelled images"):
        train(rows.drop(columns=["label"]), TrainConfig(method="fixmatch", max_steps=1), progress=False)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": rows["path"], "label": ""}).to_csv(manifest, index=False)
    code, _, err = run_cli(
        capsys, "train", manifest, "--method", "fixmatch", "--out", tmp_path / "f", "--image-size", "32", "-q"
    )
    assert code == 2
    assert_one_line_error(err, "--method fixmatch needs some labelled images")
