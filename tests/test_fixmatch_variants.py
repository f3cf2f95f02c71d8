"""FixMatch variants (issue 11): distribution alignment, FlexMatch thresholds, per-class thresholds, and
the one-head and two-head multi-label losses of paper 004; each against a direct computation, and a few
training steps on generated features."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_fixmatch_config
from sklearn.metrics import f1_score

from retrieval.errors import RetrieveError
from retrieval.training.config import TrainConfig
from retrieval.training.losses import fixmatch_loss
from retrieval.training.losses.fixmatch import (
    align_distribution,
    f1_thresholds,
    flex_thresholds,
    multilabel_fixmatch_loss,
    split_label_names,
)
from retrieval.training.trainer import train


def _ce(logits, y):
    return -(logits[y] - math.log(sum(math.exp(v) for v in logits)))


def _bce(logit, target):
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_align_distribution_by_hand():
    p = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    got = align_distribution(p, p_model=torch.tensor([0.75, 0.25]), p_target=torch.tensor([0.5, 0.5]))
    # row 0: 0.6 * 0.5/0.75 = 0.4, 0.4 * 0.5/0.25 = 0.8 -> 1/3, 2/3; row 1: 0.6, 0.2 -> 0.75, 0.25
    assert got.numpy() == pytest.approx(np.array([[1 / 3, 2 / 3], [0.75, 0.25]]), abs=1e-6)


def test_flex_thresholds_by_hand():
    learned = torch.tensor([0, 0, 1, -1, -1, -1, -1, -1])
    # sigma = [2, 1, 0], unused 5 > max sigma: beta = [0.4, 0.2, 0]; M(x) = x / (2 - x)
    got = flex_thresholds(learned, 3, tau=0.9)
    assert got.numpy() == pytest.approx([0.9 * 0.4 / 1.6, 0.9 * 0.2 / 1.8, 0.0], abs=1e-6)
    # after warm-up (no unused rows) the most learned class gets tau itself
    got = flex_thresholds(torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]), 3, tau=0.9)
    assert got.numpy() == pytest.approx([0.9, 0.9 * 0.5 / 1.5, 0.9 * 0.5 / 1.5], abs=1e-6)


def test_fixmatch_loss_with_per_class_thresholds_and_aligned_probabilities():
    lab, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    weak = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # p max 0.881 (class 0), 0.731 (class 1)
    strong = torch.tensor([[0.5, 0.0], [0.2, 0.4]])
    sup = _ce([1.0, 0.0], 0)
    # class 0 needs 0.9 (row 0 fails), class 1 needs 0.7 (row 1 passes)
    got = fixmatch_loss(lab, y, weak, strong, threshold=torch.tensor([0.9, 0.7]))
    assert got.item() == pytest.approx(sup + _ce([0.2, 0.4], 1) / 2, abs=1e-6)
    # given probabilities replace softmax(weak): row 0 now confident in class 1
    probs = torch.tensor([[0.05, 0.95], [0.5, 0.5]])
    got = fixmatch_loss(lab, y, weak, strong, threshold=0.95, weak_probs=probs)
    assert got.item() == pytest.approx(sup + _ce([0.5, 0.0], 1) / 2, abs=1e-6)


def test_one_head_multilabel_loss_by_hand():
    lab = torch.tensor([[1.0, -1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    weak = torch.tensor([[4.0, 0.1, -3.0], [0.2, -0.2, 0.0]])  # sigmoid max 0.982 (passes 0.95), 0.55 (fails)
    strong = torch.tensor([[0.3, -0.4, 0.1], [1.0, 1.0, 1.0]])
    sup = (_bce(1.0, 1) + _bce(-1.0, 0) + _bce(0.5, 1)) / 3
    # row 0's pseudo-label: sigmoid >= 0.5 -> [1, 1, 0]; row 1 masked; mean over the 2 unlabelled rows
    unsup = (_bce(0.3, 1) + _bce(-0.4, 1) + _bce(0.1, 0)) / 3 / 2
    got = multilabel_fixmatch_loss(lab, targets, weak, strong, threshold=0.95, unlabelled_weight=2.0)
    assert got.item() == pytest.approx(sup + 2.0 * unsup, abs=1e-6)


@pytest.mark.slow
def test_f1_thresholds_by_hand_and_against_sklearn():
    probs = np.array([[0.9, 0.2], [0.6, 0.3], [0.4, 0.1], [0.3, 0.8]])
    targets = np.array([[1, 0], [1, 0], [0, 0], [1, 0]])
    # class 0: t=0.3 predicts all -> F1 = 6/7; t=0.6 -> TP 2, F1 = 4/5; t=0.9 -> 2/3. Class 1: no positive -> 0.5
    assert f1_thresholds(probs, targets).tolist() == pytest.approx([0.3, 0.5])
    rng = np.random.default_rng(0)
    probs = rng.random((40, 4))
    targets = (probs + rng.normal(0, 0.3, probs.shape)) > 0.6
    got = f1_thresholds(probs, targets)
    for c in range(4):
        best = max(f1_score(targets[:, c], probs[:, c] >= t) for t in np.unique(probs[:, c]))
        assert f1_score(targets[:, c], probs[:, c] >= got[c]) == pytest.approx(best)


def test_split_label_names():
    atoms, matrix = split_label_names(["kidney", "kidney|liver", "liver", "liver|spleen"])
    assert atoms == ["kidney", "liver", "spleen"]
    assert matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1]]


def _multilabel_features(n_per=12, views=2, dim=512, seed=0):
    """Generated frozen features: each row is the sum of its classes' prototypes plus noise; a third of the
    rows unlabelled."""
    rng = np.random.default_rng(seed)
    protos = {a: rng.normal(0, 1, dim) for a in ("kidney", "liver", "spleen")}
    combos = ["kidney", "liver", "spleen", "kidney|liver", "liver|spleen"]
    labels = [c for c in combos for _ in range(n_per)]
    base = np.stack([sum(protos[a] for a in c.split("|")) for c in labels])
    feats = np.stack([base + rng.normal(0, 0.6, base.shape) for _ in range(views + 1)]).astype(np.float32)
    shown = pd.Series(labels, dtype="string")
    shown[rng.random(len(labels)) < 1 / 3] = pd.NA
    rows = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(labels))], "label": shown})
    return rows, torch.as_tensor(np.maximum(feats, 0.0)), labels


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one-head", "two-head"])
def test_multilabel_fixmatch_trains_and_picks_thresholds_on_validation_rows(mode):
    rows, feats, _ = _multilabel_features()
    res = train(rows, small_fixmatch_config(fixmatch_multilabel=mode), progress=False, features=feats)
    losses = [s["loss"] for s in res.log["steps"]]
    assert np.isfinite(losses).all() and np.mean(losses[-8:]) < np.mean(losses[:8])
    info = res.log["multilabel"]
    assert info["mode"] == mode and info["classes"] == ["kidney", "liver", "spleen"]
    loss = res.model.loss
    labelled = np.flatnonzero(rows["label"].notna().to_numpy())
    assert info["validation_rows"] == round(0.2 * len(labelled)) == len(loss.val_rows)
    assert set(loss.val_rows) <= set(labelled) and not set(loss.val_rows) & set(loss.labelled)
    assert len(loss.labelled) + len(loss.val_rows) == len(labelled)
    unlabelled_term = loss._unlabelled_rows(np.arange(len(rows)))  # nor the unlabelled term
    assert unlabelled_term.tolist() == sorted(set(range(len(rows))) - set(loss.val_rows))
    # independent recomputation: the trained sigmoid head on the validation rows' clean features
    with torch.no_grad():
        z = res.encoder.head(feats[0, loss.val_rows])
        head = loss.classifier if mode == "one-head" else loss.multilabel_head
        probs = torch.sigmoid(head(z)).numpy()
    truth = np.array([[a in str(rows["label"][i]).split("|") for a in info["classes"]] for i in loss.val_rows])
    assert info["thresholds"] == pytest.approx(f1_thresholds(probs, truth).tolist(), abs=1e-4)
    assert res.model.loss.extra_tensors()["multilabel_thresholds"].tolist() == pytest.approx(
        info["thresholds"], abs=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("option", [{"fixmatch_align": True}, {"fixmatch_thresholds": "flex"}])
def test_single_label_fixmatch_with_alignment_or_flex_thresholds_trains(option):
    rows, feats, labels = _multilabel_features()
    single = rows.assign(label=rows["label"].str.split("|").str[0])  # one class per row
    res = train(single, small_fixmatch_config(**option), progress=False, features=feats)
    losses = [s["loss"] for s in res.log["steps"]]
    assert np.isfinite(losses).all() and np.mean(losses[-8:]) < np.mean(losses[:8])
    assert "multilabel" not in res.log
    assert 0.0 <= res.log["pseudo_label_rate_last_steps"] <= 1.0
    if "fixmatch_thresholds" in option:  # FlexMatch starts with low thresholds: most rows pass early on
        assert res.log["pseudo_label_rate_first_epoch_steps"] > 0.5


def test_bad_fixmatch_options():
    with pytest.raises(RetrieveError, match="fixmatch_thresholds"):
        TrainConfig(method="fixmatch", fixmatch_thresholds="adaptive")
    with pytest.raises(RetrieveError, match="fixmatch_multilabel"):
        TrainConfig(method="fixmatch", fixmatch_multilabel="three-head")
    with pytest.raises(RetrieveError, match="fixmatch_val_fraction"):
        TrainConfig(method="fixmatch", fixmatch_val_fraction=1.0)
    rows, feats, _ = _multilabel_features()
    with pytest.raises(RetrieveError, match="one-head"):
        train(
            rows,
            small_fixmatch_config(fixmatch_multilabel="one-head", fixmatch_align=True),
            progress=False,
            features=feats,
        )


@pytest.mark.slow
def test_multilabel_checkpoint_keeps_the_thresholds(demo_data, tmp_path):
    from safetensors.torch import load_file

    from retrieval.data.dataset import load_dataset
    from retrieval.training.run import train_to_checkpoint

    rows = load_dataset(demo_data).rows
    combos = {"normal": "liver", "mild": "liver|kidney", "moderate": "kidney", "severe": ""}  # severe: unlabelled
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": rows["path"], "label": rows["label"].map(combos)}).to_csv(manifest, index=False)
    cfg = small_fixmatch_config(image_size=32, frozen_views=1, batch_size=8, max_steps=6, fixmatch_val_fraction=0.3)
    outcome = train_to_checkpoint(manifest, cfg, tmp_path / "enc", progress=False)
    info = outcome.log["multilabel"]
    assert info["classes"] == ["kidney", "liver"] and info["mode"] == "two-head"
    tensors = load_file(str(outcome.checkpoint))
    assert tensors["extra.multilabel_thresholds"].tolist() == pytest.approx(info["thresholds"], abs=1e-4)
    assert tuple(tensors["extra.multilabel_head.weight"].shape) == (2, 16)
