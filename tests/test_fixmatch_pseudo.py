"""FixMatch's pseudo-label options of run 20 (issue 11): patient-consistent pseudo-labels (the weak view's
probabilities averaged over a group's unlabelled rows) and neighbour-consistent ones (label propagation on
the clean features, Zhou et al. 2004 / Iscen et al. 2019); each against a direct computation on a tiny case
worked by hand, a few training steps, and bad option values."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, run_cli, small_fixmatch_config

from retrieval.errors import RetrieveError
from retrieval.training.config import TrainConfig
from retrieval.training.losses import fixmatch_loss
from retrieval.training.losses.base import Batch, LossContext
from retrieval.training.losses.fixmatch import (
    FixMatchLoss,
    group_mean,
    knn_affinity,
    propagate_labels,
    propagated_labels,
    pseudo_label_mask,
)
from retrieval.training.trainer import train


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _ce(logits, y):
    return -(logits[y] - math.log(sum(math.exp(v) for v in logits)))


def test_group_mean_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.5, 0.5]])
    got = group_mean(p, torch.tensor([1, 0, 1, 1]), 2)
    # slot 0: row 1 alone; slot 1: rows 0, 2, 3 -> (0.9 + 0.2 + 0.5) / 3, (0.1 + 0.8 + 0.5) / 3
    assert got.numpy() == pytest.approx(np.array([[0.3, 0.7], [1.6 / 3, 1.4 / 3]]), abs=1e-6)


def test_pseudo_label_mask_with_propagated_labels_by_hand():
    p = torch.tensor([[0.97, 0.03], [0.02, 0.98], [0.6, 0.4], [0.96, 0.04]])
    pseudo, mask = pseudo_label_mask(p, 0.95)
    assert pseudo.tolist() == [0, 1, 0, 0] and mask.tolist() == [1, 1, 0, 1]
    # propagation says 0, 0, 0, -1: row 1 disagrees, row 3 has no propagated label
    _, mask = pseudo_label_mask(p, 0.95, torch.tensor([0, 0, 0, -1]))
    assert mask.tolist() == [1, 0, 0, 0]


def test_fixmatch_loss_counts_only_agreeing_pseudo_labels():
    lab, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    weak = torch.tensor([[4.0, 0.0], [0.0, 4.0]])  # both confident (0.982): pseudo-labels 0 and 1
    strong = torch.tensor([[0.5, 0.0], [0.2, 0.4]])
    sup = _ce([1.0, 0.0], 0)
    both = fixmatch_loss(lab, y, weak, strong, 0.95)
    assert both.item() == pytest.approx(sup + (_ce([0.5, 0.0], 0) + _ce([0.2, 0.4], 1)) / 2, abs=1e-6)
    got = fixmatch_loss(lab, y, weak, strong, 0.95, propagated=torch.tensor([0, 0]))  # row 1 disagrees
    assert got.item() == pytest.approx(sup + _ce([0.5, 0.0], 0) / 2, abs=1e-6)


# Three unit vectors at 0, 30 and 90 degrees: cos(x0, x1) = 0.866, cos(x1, x2) = 0.5, cos(x0, x2) = 0.
HAND_X = np.array([[2.0, 0.0], [math.cos(math.pi / 6), 0.5], [0.0, 3.0]])  # rows need not be unit length


def test_knn_affinity_by_hand():
    w = knn_affinity(HAND_X, k=1, power=1.0).toarray()
    # nearest neighbour: 0 -> 1 (0.866), 1 -> 0 (0.866), 2 -> 1 (0.5); W = A + A^T
    c = math.cos(math.pi / 6)
    assert w == pytest.approx(np.array([[0, 2 * c, 0], [2 * c, 0, 0.5], [0, 0.5, 0]]), abs=1e-9)
    w3 = knn_affinity(HAND_X, k=1, power=3.0).toarray()
    assert w3 == pytest.approx(np.array([[0, 2 * c**3, 0], [2 * c**3, 0, 0.125], [0, 0.125, 0]]), abs=1e-9)


def test_label_propagation_by_hand():
    codes = np.array([0, -1, 1])
    c = math.cos(math.pi / 6)
    w = np.array([[0, 2 * c, 0], [2 * c, 0, 0.5], [0, 0.5, 0]])
    d = w.sum(1)
    wn = w / np.sqrt(np.outer(d, d))
    want = np.linalg.solve(np.eye(3) - 0.9 * wn, np.array([[1.0, 0], [0, 0], [0, 1.0]]))  # one labelled row per class
    got = propagate_labels(HAND_X, codes, 2, k=1, power=1.0, alpha=0.9)
    assert got == pytest.approx(np.maximum(want, 0), abs=1e-8)
    # row 1 sits on the strong edge to row 0 (class 0): it takes class 0
    assert propagated_labels(got, codes).tolist() == [0, 0, 1]


def test_label_propagation_against_a_dense_solve():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)) + np.repeat(np.eye(6)[:3] * 6, 10, axis=0)
    codes = np.full(30, -1)
    codes[[0, 1, 10, 20, 21, 22]] = [0, 0, 1, 2, 2, 2]
    k, power, alpha = 5, 3.0, 0.99
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    a = np.zeros_like(s)
    for i in range(30):
        order = [j for j in np.argsort(-s[i]) if j != i][:k]
        a[i, order] = np.maximum(s[i, order], 0) ** power
    w = a + a.T
    d = w.sum(1)
    wn = w / np.sqrt(np.outer(d, d))
    y = np.zeros((30, 3))
    for cls in range(3):
        y[codes == cls, cls] = 1.0 / (codes == cls).sum()  # class-balanced, as Iscen et al.
    want = np.maximum(np.linalg.solve(np.eye(30) - alpha * wn, y), 0)
    got = propagate_labels(x, codes, 3, k=k, power=power, alpha=alpha)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    labels = propagated_labels(got, codes)
    assert (labels[codes >= 0] == codes[codes >= 0]).all()
    assert (labels == np.repeat([0, 1, 2], 10)).mean() > 0.9  # three separated blobs


def test_propagated_label_is_minus_one_without_mass():
    z = np.array([[0.0, 0.0], [0.1, 0.3], [0.0, 0.0]])
    assert propagated_labels(z, np.array([-1, -1, 1])).tolist() == [-1, 1, 1]


def _hand_loss(cfg, codes, groups, feats):
    """A FixMatchLoss on 2-d features: identity projection, a classifier that is the identity (logits = features)."""
    ctx = LossContext(
        cfg,
        SimpleNamespace(dim=2),
        2,
        np.array(codes),
        torch.Generator().manual_seed(0),
        True,
        clean_features=lambda: feats,
        classes=["a", "b"],
        groups=None if groups is None else np.array(groups),
    )
    loss = FixMatchLoss(ctx)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.eye(2))
        loss.classifier.bias.zero_()
    return loss


# rows: 0 labelled (a), 1 and 2 unlabelled of one patient, 3 unlabelled alone, 4 labelled (b) of 1 and 2's patient
CODES, GROUPS = [0, -1, -1, -1, 1], [0, 1, 1, 2, 1]
CLEAN = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 4.0], [0.0, 2.0]])


def test_patient_consistent_pseudo_labels_by_hand():
    cfg = TrainConfig(method="fixmatch", fixmatch_pseudo_groups=True)
    loss = _hand_loss(cfg, CODES, GROUPS, CLEAN)
    rows, pseudo, passing = loss.pseudo_labels(lambda f: f, CLEAN)
    assert rows.tolist() == [0, 1, 2, 3, 4]
    # rows 1, 2: the mean of softmax(3, 0) and softmax(0, 1) (row 4 is labelled: left out) -> 0.611 for class a
    patient = [(a + b) / 2 for a, b in zip(_softmax([3, 0]), _softmax([0, 1]))]
    assert patient[0] == pytest.approx(0.6107, abs=1e-4)
    expect_p = [_softmax([2, 0]), patient, patient, _softmax([0, 4]), _softmax([0, 2])]
    assert pseudo.tolist() == [int(np.argmax(p)) for p in expect_p] == [0, 0, 0, 1, 1]
    assert passing.tolist() == [max(p) >= 0.95 for p in expect_p] == [False, False, False, True, False]
    plain = _hand_loss(TrainConfig(method="fixmatch"), CODES, GROUPS, CLEAN)
    _, pseudo, passing = plain.pseudo_labels(lambda f: f, CLEAN)  # row 1 alone is confident (0.953), row 2 not
    assert pseudo.tolist() == [0, 0, 1, 1, 1] and passing.tolist() == [False, True, False, True, False]


def test_patient_consistent_training_step_by_hand():
    """One forward step against the loss computed by hand: labelled rows drawn with the run's generator,
    strong views = clean features + 1 on the first coordinate."""
    cfg = TrainConfig(method="fixmatch", fixmatch_pseudo_groups=True, unlabelled_ratio=5, fixmatch_threshold=0.6)
    loss = _hand_loss(cfg, CODES, GROUPS, CLEAN)
    state = loss.gen.get_state()
    idx = np.array([1, 3, 4])
    batch = Batch(idx, torch.tensor([-1, -1, 1]), lambda r: CLEAN[torch.as_tensor(r)] + torch.tensor([1.0, 0.0]),
                  lambda f: f, lambda r: CLEAN[torch.as_tensor(r)])  # fmt: skip
    got = loss(batch).item()
    replay = torch.Generator()
    replay.set_state(state)
    pick = [[0, 4][i] for i in torch.randint(2, (1,), generator=replay).tolist()]
    strong = {r: [float(CLEAN[r, 0]) + 1, float(CLEAN[r, 1])] for r in range(5)}
    sup = np.mean([_ce(strong[r], CODES[r]) for r in pick])
    # tau 0.6: row 1's patient mean 0.611 passes (class a), row 3 passes (b), row 4 (own, 0.881) passes (b)
    unsup = (_ce(strong[1], 0) + _ce(strong[3], 1) + _ce(strong[4], 1)) / 3
    assert got == pytest.approx(sup + unsup, abs=1e-5)
    assert loss.pass_rate == [1.0]


def test_neighbour_consistent_pseudo_labels_by_hand():
    feats = torch.tensor([[2.0, 0.0], [3.0, 0.3], [0.0, 1.0], [0.2, 4.0], [0.0, 2.0]])
    cfg = TrainConfig(method="fixmatch", fixmatch_propagation="agree")
    loss = _hand_loss(cfg, CODES, None, feats)
    want = propagate_labels(feats.numpy(), np.array(CODES), 2)  # k = 50 capped at 4, power 3, alpha 0.99
    assert loss.propagation == pytest.approx(want)
    prop = propagated_labels(want, np.array(CODES))
    assert prop.tolist() == [0, 0, 1, 1, 1]  # rows near (1, 0) take class a, rows near (0, 1) class b
    assert loss.prop_label.tolist() == prop.tolist()
    _, pseudo, passing = loss.pseudo_labels(lambda f: f, feats)  # softmax(features): only row 3 reaches 0.95
    assert pseudo.tolist() == [0, 0, 1, 1, 1] and passing.tolist() == [False, False, False, True, False]
    # the head: logits = features; row 1 confident a (agrees), row 3 confident b (agrees); now make the head
    # say b for row 1 confidently: it no longer agrees and is dropped
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    _, pseudo, passing = loss.pseudo_labels(lambda f: f, feats)
    p = torch.softmax(feats @ torch.tensor([[0.0, 1.0], [1.0, 0.0]]).T, 1)
    conf, head = p.max(1)
    assert pseudo.tolist() == head.tolist() == [1, 1, 0, 0, 0]
    assert passing.tolist() == ((conf >= 0.95).numpy() & (head.numpy() == prop)).tolist() == [False] * 5


def _grouped_features(seed=0, patients=12, per=4, views=2, dim=512):
    """Generated frozen features: two classes, `per` images per patient (a patient's images share an offset),
    a quarter of the patients labelled."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(0, 1, (2, dim))
    label = np.repeat(np.arange(patients) % 2, per)
    offset = np.repeat(rng.normal(0, 0.7, (patients, dim)), per, axis=0)
    base = protos[label] + offset
    feats = np.stack([base + rng.normal(0, 0.5, base.shape) for _ in range(views + 1)]).astype(np.float32)
    pid = np.repeat([f"P{i:02d}" for i in range(patients)], per)
    shown = pd.Series(np.array(["a", "b"])[label], dtype="string")
    shown[~np.isin(pid, ["P00", "P01", "P02", "P03"])] = pd.NA
    rows = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(label))], "label": shown, "patient_id": pid})
    return rows, torch.as_tensor(np.maximum(feats, 0.0))


@pytest.mark.slow
@pytest.mark.parametrize(
    "option",
    [
        {"fixmatch_pseudo_groups": True},
        {"fixmatch_propagation": "agree"},
        {"fixmatch_pseudo_groups": True, "fixmatch_propagation": "agree", "fixmatch_align": True},
    ],
)
def test_fixmatch_with_pseudo_label_options_trains(option):
    rows, feats = _grouped_features()
    res = train(rows, small_fixmatch_config(**option), progress=False, features=feats)
    losses = [s["loss"] for s in res.log["steps"]]
    assert np.isfinite(losses).all() and np.mean(losses[-8:]) < np.mean(losses[:8])
    assert 0.0 <= res.log["pseudo_label_rate_after_training"] <= 1.0
    loss = res.model.loss
    if option.get("fixmatch_pseudo_groups"):  # the trainer handed in the patients: one slot per unlabelled patient
        unl = rows["label"].isna().to_numpy()
        slots = pd.Series(loss.group_of[unl]).groupby(rows["patient_id"][unl].to_numpy()).nunique()
        assert (slots == 1).all() and len(set(loss.group_of[unl])) == 8
        assert len(set(loss.group_of[~unl])) == int((~unl).sum())  # labelled rows stand alone
    if option.get("fixmatch_propagation"):
        assert loss.propagation.shape == (48, 2)
        truth = np.repeat(np.arange(12) % 2, 4)
        assert (loss.prop_label.numpy() == truth).mean() > 0.8


def test_bad_pseudo_label_options(tmp_path, capsys, demo_data):
    with pytest.raises(RetrieveError, match="fixmatch_propagation 'nearest': choose none or agree"):
        TrainConfig(method="fixmatch", fixmatch_propagation="nearest")
    with pytest.raises(RetrieveError, match="fixmatch_pseudo_groups"):
        TrainConfig(method="fixmatch", fixmatch_pseudo_groups="patient")  # type: ignore[arg-type]
    rows, feats = _grouped_features()
    with pytest.raises(RetrieveError, match="needs a patient_id or near_dup_group column"):
        train(
            rows.drop(columns=["patient_id"]),
            small_fixmatch_config(fixmatch_pseudo_groups=True),
            progress=False,
            features=feats,
        )
    multi = rows.assign(label=rows["label"].str.replace("b", "a|b"))
    with pytest.raises(RetrieveError, match="need a softmax head, not one-head"):
        train(
            multi,
            small_fixmatch_config(fixmatch_multilabel="one-head", fixmatch_propagation="agree"),
            progress=False,
            features=feats,
        )
    config = tmp_path / "fm.yaml"
    config.write_text("method: fixmatch\nfixmatch_propagation: nearest\n")
    code, _, err = run_cli(capsys, "train", demo_data, "--config", config, "--out", tmp_path / "f", "-q")
    assert code == 2
    assert_one_line_error(err, "fixmatch_propagation 'nearest'")


# a bigger hand case: row 0 labelled (a), rows 1-7 unlabelled of one patient, row 8 labelled (b)
BIG_CODES, BIG_GROUPS = [0] + [-1] * 7 + [1], [0] + [1] * 7 + [2]
BIG_CLEAN = torch.tensor([[2.0, 0.0], [3, 0], [0, 1], [1, 1], [0, 2], [2, 1], [1, 3], [0.5, 0], [0, 2]])


def _spy_rows(calls):
    def clean_rows(r):
        calls.append(np.asarray(r).tolist())
        return BIG_CLEAN[torch.as_tensor(r)]

    return clean_rows


def test_group_mean_caps_a_large_group_and_keeps_the_row():
    """A group larger than m: the step averages m of its rows, the batch's own row always among them, the
    others drawn with the run's generator; a group of at most m uses every row and draws nothing."""
    cfg = TrainConfig(method="fixmatch", fixmatch_pseudo_groups=True)
    loss = _hand_loss(cfg, BIG_CODES, BIG_GROUPS, BIG_CLEAN)
    loss.max_members = 3
    state = loss.gen.get_state()
    calls = []
    got = loss._weak_probs(np.array([4]), None, lambda f: f, _spy_rows(calls))
    replay = torch.Generator()
    replay.set_state(state)
    others = [1, 2, 3, 5, 6, 7]  # the group without row 4
    drawn = [others[i] for i in torch.randperm(6, generator=replay)[:2].tolist()]
    assert calls == [[4, *drawn]] and len(set(drawn)) == 2
    want = np.mean([_softmax(BIG_CLEAN[r].tolist()) for r in [4, *drawn]], axis=0)
    assert got.numpy() == pytest.approx(want[None], abs=1e-6)
    # more batch rows of the group than m: those rows, nothing drawn; a labelled row stays alone
    state = loss.gen.get_state()
    calls.clear()
    got = loss._weak_probs(np.array([1, 2, 3, 5, 8]), None, lambda f: f, _spy_rows(calls))
    assert sorted(calls[0]) == [1, 2, 3, 5, 8] and torch.equal(loss.gen.get_state(), state)
    want = np.mean([_softmax(BIG_CLEAN[r].tolist()) for r in [1, 2, 3, 5]], axis=0)
    assert got[:4].numpy() == pytest.approx(np.tile(want, (4, 1)), abs=1e-6)
    assert got[4].numpy() == pytest.approx(_softmax([0.0, 2.0]), abs=1e-6)
    # m = 16 (the default) covers the group of 7: every row, no draw
    loss.max_members = 16
    calls.clear()
    got = loss._weak_probs(np.array([4]), None, lambda f: f, _spy_rows(calls))
    assert sorted(calls[0]) == list(range(1, 8)) and torch.equal(loss.gen.get_state(), state)
    want = np.mean([_softmax(BIG_CLEAN[r].tolist()) for r in range(1, 8)], axis=0)
    assert got.numpy() == pytest.approx(want[None], abs=1e-6)


def test_group_members_go_through_the_head_in_chunks(monkeypatch):
    """The clean views pass the head at most FORWARD_CHUNK at a time, with the same probabilities as one pass."""
    import retrieval.training.losses.fixmatch as fm

    loss = _hand_loss(TrainConfig(method="fixmatch", fixmatch_pseudo_groups=True), BIG_CODES, BIG_GROUPS, BIG_CLEAN)
    whole = loss.pseudo_labels(lambda f: f, BIG_CLEAN)
    p_whole = loss._weak_probs(np.arange(9), None, lambda f: f, _spy_rows([]), cap=False)
    monkeypatch.setattr(fm, "FORWARD_CHUNK", 3)
    calls = []
    p_chunked = loss._weak_probs(np.arange(9), None, lambda f: f, _spy_rows(calls), cap=False)
    assert [len(c) for c in calls] == [3, 3, 3] and sorted(sum(calls, [])) == list(range(9))
    assert p_chunked.numpy() == pytest.approx(p_whole.numpy(), abs=1e-7)
    for a, b in zip(loss.pseudo_labels(lambda f: f, BIG_CLEAN), whole):
        assert np.array_equal(a, b)


def test_pseudo_groups_without_groups_is_an_error(tmp_path, capsys):
    """fixmatch_pseudo_groups where no group holds two unlabelled rows (every image its own group, as a folder
    without patient ids) would be plain FixMatch: a one-line error, exit 2, instead."""
    from conftest import write_png

    cfg = TrainConfig(method="fixmatch", fixmatch_pseudo_groups=True)
    with pytest.raises(RetrieveError, match="fixmatch_pseudo_groups: no patient or near-duplicate group holds two"):
        _hand_loss(cfg, CODES, [0, 1, 2, 3, 4], CLEAN)
    rows, feats = _grouped_features()
    with pytest.raises(RetrieveError, match="the option needs patient ids"):
        train(
            rows.assign(patient_id=None),
            small_fixmatch_config(fixmatch_pseudo_groups=True),
            progress=False,
            features=feats,
        )
    # through the CLI: a manifest without patient ids (load_dataset adds an empty patient_id column)
    rng = np.random.default_rng(0)
    data = tmp_path / "plain"
    lines = ["path,label"]
    for i in range(8):
        write_png(data / f"im{i}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        lines.append(f"im{i}.png,{['a', 'b', '', ''][i % 4]}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    config = tmp_path / "fm.yaml"
    config.write_text(
        "method: fixmatch\nencoder: cnn5\nfreeze_backbone: true\nimage_size: 32\nhead_dims: [8]\nmax_steps: 1\n"
        "frozen_views: 1\nbatch_size: 4\nfixmatch_pseudo_groups: true\n"
    )
    code, _, err = run_cli(capsys, "train", data, "--config", config, "--out", tmp_path / "f", "-q")
    assert code == 2
    assert_one_line_error(err, "fixmatch_pseudo_groups: no patient or near-duplicate group", "needs patient ids")


def test_trainer_reads_groups_only_for_pseudo_groups(monkeypatch):
    """group_ids (a loop over the rows) runs only when fixmatch_pseudo_groups is on."""
    import retrieval.training.trainer as tr

    calls = []
    real = tr.group_ids
    monkeypatch.setattr(tr, "group_ids", lambda rows: calls.append(len(rows)) or real(rows))
    rows, feats = _grouped_features()
    res = train(rows, small_fixmatch_config(max_steps=1), progress=False, features=feats)
    assert calls == [] and res.model.loss.group_of is None
    res = train(rows, small_fixmatch_config(max_steps=1, fixmatch_pseudo_groups=True), progress=False, features=feats)
    assert calls == [48] and len(set(res.model.loss.group_of)) == 8 + 16  # 8 unlabelled patients, 16 labelled rows
