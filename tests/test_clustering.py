"""Deep clustering (pica, lsd, scan): loss terms worked by hand, cluster matching and scores on known
answers, label-free training, checkpoints that reload to the same vectors and clusters."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from retrieval.data.dataset import load_dataset
from retrieval.encoders import load_checkpoint, save_checkpoint
from retrieval.errors import RetrieveError
from retrieval.training.cluster_eval import (
    cluster_scores,
    hungarian_accuracy,
    load_cluster_head,
    match_clusters,
)
from retrieval.training.config import TrainConfig
from retrieval.training.losses.clustering import dirichlet_prior, negative_entropy, pui_cross_entropy, pui_matrix
from retrieval.training.losses.scan import mine_neighbours, scan_loss
from retrieval.training.trainer import train


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_pui_matrix_and_cross_entropy_by_hand():
    p_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    p_tilde = torch.tensor([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    cols_hat, cols_tilde = [[1, 0, 1], [0, 1, 0]], [[0.5, 0, 1], [0.5, 1, 0]]
    expected = [[_cos(cols_hat[i], cols_tilde[j]) for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(pui_matrix(p_hat, p_tilde).numpy(), expected, atol=1e-6)
    ce = sum(-math.log(math.exp(expected[j][j]) / sum(math.exp(m) for m in expected[j])) for j in range(2)) / 2
    assert pui_cross_entropy(p_hat, p_tilde).item() == pytest.approx(ce, abs=1e-6)
    # identical one-hot views: M is the identity, L_CE = log(1 + e^-1)
    assert pui_cross_entropy(p_hat, p_hat).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_cluster_size_terms_by_hand():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # column mass 2.5, 1.5 -> z = .625, .375
    z = [0.625, 0.375]
    assert negative_entropy(p).item() == pytest.approx(math.log(2) + sum(v * math.log(v) for v in z), abs=1e-6)
    for alpha in (1.05, 2.0):
        expected = -(alpha - 1) * sum(math.log(v) for v in z) / math.log(2)
        assert dirichlet_prior(p, alpha).item() == pytest.approx(expected, abs=1e-6)
    even = torch.full((4, 2), 0.5)
    assert negative_entropy(even).item() == pytest.approx(0.0, abs=1e-6)
    assert dirichlet_prior(even, 1.0).item() == 0.0  # alpha = 1: a flat prior, no pull at all


def test_scan_loss_and_neighbours_by_hand():
    pa = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    pn = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    consistency = -(math.log(0.9 * 0.8 + 0.1 * 0.2) + math.log(0.2 * 0.5 + 0.8 * 0.5)) / 2
    mean = [0.55, 0.45]
    entropy_term = math.log(2) + sum(v * math.log(v) for v in mean)
    assert scan_loss(pa, pn, 5.0).item() == pytest.approx(consistency + 5 * entropy_term, abs=1e-6)
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    nb = mine_neighbours(feats, 2)
    z = feats / feats.norm(dim=1, keepdim=True)
    sim = (z @ z.T).numpy()
    np.fill_diagonal(sim, -np.inf)
    assert nb.tolist() == np.argsort(-sim, axis=1, kind="stable")[:, :2].tolist()
    assert mine_neighbours(feats, 20).shape == (5, 4)  # never more than N - 1


def test_matching_and_scores_on_a_known_answer():
    labels = np.array(["liver"] * 4 + ["kidney"] * 4 + ["spleen"] * 2)
    perfect = np.array([2] * 4 + [0] * 4 + [1] * 2)  # a relabelling of the truth
    mapping = match_clusters(perfect, labels, ["kidney", "liver", "spleen"], 3)
    assert mapping == {0: "kidney", 1: "spleen", 2: "liver"}
    s = cluster_scores(perfect, labels, mapping)
    assert s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)
    assert s["hungarian_accuracy"] == 1.0 and s["weighted_f1"] == pytest.approx(1.0)
    # one kidney image in the liver cluster; two clusters of liver (over-clustering); an empty cluster 4
    assign = np.array([0, 0, 3, 3, 1, 1, 1, 0, 2, 2])
    mapping = match_clusters(assign, labels, ["kidney", "liver", "spleen"], 5)
    assert mapping == {0: "liver", 1: "kidney", 2: "spleen", 3: "liver", 4: "kidney"}  # 4: most common (tie: first)
    s = cluster_scores(assign, labels, mapping)
    # predictions: 9 of 10 right; liver P 4/5 R 1, kidney P 1 R 3/4, spleen 1
    f1 = {"liver": 2 * 0.8 / 1.8, "kidney": 2 * 0.75 / 1.75, "spleen": 1.0}
    assert s["per_class_f1"] == pytest.approx(f1)
    assert s["weighted_f1"] == pytest.approx((4 * f1["liver"] + 4 * f1["kidney"] + 2) / 10)
    # one-to-one: cluster 0 -> liver (2), 1 -> kidney (3), 2 -> spleen (2): 7 of 10
    assert hungarian_accuracy(assign, labels) == pytest.approx(0.7)


@pytest.fixture(scope="module")
def unlabelled(demo_data):
    rows = load_dataset(demo_data).rows
    return rows.drop(columns=["label"]).reset_index(drop=True)


@pytest.mark.parametrize("method", ["pica", "lsd", "scan"])
@pytest.mark.slow
def test_label_free_training_and_checkpoint(unlabelled, method, tmp_path):
    """No label column at all; the over-clustering head trains too; the checkpoint reloads to the same
    vectors, and its cluster head to the same probabilities."""
    cfg = TrainConfig(
        method=method,
        encoder="cnn5",
        image_size=32,
        batch_size=12,
        lr=1e-3,
        max_steps=30,
        freeze_backbone=True,
        frozen_views=2,
        clusters=3,
        overclusters=5,
        neighbours=3,
    )
    res = train(unlabelled, cfg, progress=False)
    losses = [s["loss"] for s in res.log["steps"]]
    assert len(losses) == 30 and np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
    extras = res.model.loss.extra_tensors()
    assert extras["cluster.weight"].shape[0] == 3 and extras["overcluster.weight"].shape[0] == 5
    path = save_checkpoint(res.encoder, tmp_path / "c", extra={"training": cfg.to_dict()}, extra_tensors=extras)
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v, v2 = res.encoder.eval()(x), load_checkpoint(path)(x)
        p = res.model.loss.cluster(res.encoder.head(res.encoder.features(x)))
    assert torch.equal(v, v2)
    head = load_cluster_head(str(path))
    assert head.clusters == 3 and load_cluster_head(str(path), "overcluster").clusters == 5
    np.testing.assert_allclose(head.probabilities(v2.numpy()), p.numpy(), atol=1e-5)


def test_clusters_bad_input(unlabelled):
    with pytest.raises(RetrieveError, match="--clusters 1"):
        TrainConfig(method="lsd", clusters=1)
    with pytest.raises(RetrieveError, match="overclusters"):
        TrainConfig(method="lsd", clusters=4, overclusters=3)
    cfg = TrainConfig(method="pica", encoder="cnn5", image_size=32, clusters=500, max_steps=1)
    with pytest.raises(RetrieveError, match="more clusters than training images"):
        train(unlabelled, cfg, progress=False)


@pytest.mark.slow
def test_train_cli_clusters_without_labels(tmp_path, capsys, demo_data):
    rows = load_dataset(demo_data).rows
    manifest = tmp_path / "unlabelled.csv"
    pd.DataFrame({"path": rows["path"]}).to_csv(manifest, index=False)
    out = tmp_path / "lsd"
    args = ["train", manifest, "--method", "lsd", "--out", out, "--encoder", "cnn5", "--image-size", "32"]
    code, stdout, err = run_cli(capsys, *args, "--clusters", "3", "--max-steps", "3", "--quiet")
    assert code == 0, err
    assert load_cluster_head(str(out.with_suffix(".safetensors"))).clusters == 3
    code, _, err = run_cli(capsys, *args, "--clusters", "1", "--quiet")
    assert code == 2
    assert_one_line_error(err, "--clusters 1")


@pytest.fixture(scope="module")
def cluster_index(tmp_path_factory, demo_data):
    """An lsd checkpoint (CNN5, 32 px, K = 4) and an index built with it through the CLI."""
    from retrieval.cli.main import main

    root = tmp_path_factory.mktemp("clusters")
    rows = load_dataset(demo_data).rows.drop(columns=["label"])
    cfg = TrainConfig(method="lsd", encoder="cnn5", image_size=32, batch_size=12, lr=1e-3, max_steps=5, clusters=4)
    res = train(rows, cfg, progress=False)
    ckpt = save_checkpoint(
        res.encoder, root / "lsd", extra={"training": cfg.to_dict()}, extra_tensors=res.model.loss.extra_tensors()
    )
    index = root / "index"
    assert main(["index", "build", str(demo_data), "--index", str(index), "--encoder", str(ckpt), "--quiet"]) == 0
    return ckpt, index


@pytest.mark.slow
def test_clusters_cli_with_dev_set(cluster_index, demo_data, tmp_path, capsys):
    from sklearn.metrics import normalized_mutual_info_score

    from indexer.index_dir import open_index_dir

    ckpt, index = cluster_index
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "clusters", "--index", index, "--checkpoint", ckpt, "--dev", demo_data, "--out", out, "--json", "-q"
    )
    assert code == 0, err
    report = json.loads(stdout)
    vs = open_index_dir(index, use_gpu=False).vectors
    expected = load_cluster_head(str(ckpt)).probabilities(vs.vectors).argmax(1)
    table = pd.read_csv(out / "clusters.csv")
    assert table["cluster"].tolist() == expected.tolist()
    nmi = normalized_mutual_info_score(vs.rows["label"].astype(str), expected)
    assert report["scores"]["nmi"] == pytest.approx(nmi) and 0 <= report["scores"]["weighted_f1"] <= 1
    assert set(report["mapping"].values()) <= {"normal", "mild", "moderate", "severe"}
    assert sorted(p.name for p in out.glob("cluster_*.png")) == [f"cluster_0{k}.png" for k in range(4)]


@pytest.mark.slow
def test_clusters_cli_bad_input_and_kmeans(cluster_index, demo_data, tmp_path, capsys):
    ckpt, index = cluster_index
    for n, needle in (("1", "--clusters 1: at least 2"), ("100", "more clusters than images (24)")):
        code, _, err = run_cli(capsys, "clusters", "--index", index, "--clusters", n)
        assert code == 2
        assert_one_line_error(err, needle)
    dev = tmp_path / "dev.csv"
    rows = load_dataset(demo_data).rows.head(4).assign(label="cirrhosis")
    rows[["path", "label"]].to_csv(dev, index=False)
    code, _, err = run_cli(capsys, "clusters", "--index", index, "--checkpoint", ckpt, "--dev", dev, "-q")
    assert code == 2
    assert_one_line_error(err, "--dev: label(s) cirrhosis do not occur")
    code, stdout, err = run_cli(capsys, "clusters", "--index", index, "--clusters", "4", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert sum(report["sizes"].values()) == 24 and report["method"] == "k-means"


def test_clusters_without_labels_give_sizes_and_sheets(tmp_path, demo_data):
    """No labels anywhere: sizes and one contact sheet per cluster, no scores."""
    from retrieval.training.cluster_report import contact_sheets, score_clusters

    rows = load_dataset(demo_data).rows.drop(columns=["label"]).head(6)
    assign, prob = np.array([0, 0, 1, 1, 1, 2]), np.full(6, 0.9)
    result = score_clusters(rows, assign, prob, 3, "k-means")
    assert result.sizes() == {0: 2, 1: 3, 2: 1} and result.scores == {} and result.mapping is None
    sheets = contact_sheets(result, tmp_path, thumb=16)
    from PIL import Image

    assert [Image.open(p).size for p in sheets] == [(36, 36), (36, 36), (18, 18)]  # 2x2, 2x2, 1x1 tiles


@pytest.mark.slow
def test_index_built_with_cluster_checkpoint_stores_cluster_columns(cluster_index, demo_data, capsys):
    """Each indexed image carries its cluster and that cluster's probability from the checkpoint's head,
    and queries can filter on them."""
    from indexer.index_dir import open_index_dir

    ckpt, index = cluster_index
    vs = open_index_dir(index, use_gpu=False).vectors
    prob = load_cluster_head(str(ckpt)).probabilities(vs.vectors)
    assert vs.rows["cluster"].tolist() == prob.argmax(1).tolist()
    np.testing.assert_allclose(vs.rows["cluster_probability"], prob.max(1), atol=1e-4)
    biggest = int(vs.rows["cluster"].value_counts().idxmax())
    query = vs.rows["path"].iloc[0]
    code, stdout, err = run_cli(capsys, "query", query, "--index", index, "--k", "3", "--where", f"cluster={biggest}")
    assert code == 0, err
    hits = json.loads(
        run_cli(capsys, "query", query, "--index", index, "--k", "3", "--json", "--where", f"cluster={biggest}")[1]
    )["results"]
    assert hits and all(h["cluster"] == biggest for h in hits)


def test_self_label_loss_against_numpy():
    """SCAN's self-labelling: confident rows of the weak view (p_max > 0.99) are pseudo-labels; class-balanced
    cross-entropy of the strong view, computed directly with numpy."""
    from retrieval.training.losses.selflabel import self_label_loss

    weak = torch.tensor([[9.0, 0.0, 0.0], [0.0, 8.0, 0.0], [1.0, 0.5, 0.0], [7.0, 0.0, 1.0], [0.0, 0.0, 0.5]])
    strong = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.1, 0.3], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.0, 0.9]])
    w, s = weak.numpy().astype(np.float64), strong.numpy().astype(np.float64)
    pw = np.exp(w) / np.exp(w).sum(1, keepdims=True)
    keep = pw.max(1) > 0.99  # rows 0, 1, 3
    assert keep.tolist() == [True, True, False, True, False]
    target = pw.argmax(1)[keep]  # 0, 1, 0
    logp = s[keep] - np.log(np.exp(s[keep]).sum(1, keepdims=True))
    nll = -logp[np.arange(len(target)), target]
    weight = {0: 3 / 2, 1: 3 / 1}  # 1 / share of the confident rows
    wt = np.array([weight[t] for t in target])
    expected = (wt * nll).sum() / wt.sum()
    loss, n = self_label_loss(weak, strong, 0.99)
    assert n == 3 and loss.item() == pytest.approx(expected, abs=1e-6)
    plain, _ = self_label_loss(weak, strong, 0.99, balance=False)
    assert plain.item() == pytest.approx(nll.mean(), abs=1e-6)
    none, n0 = self_label_loss(torch.zeros(4, 3), strong[:4].requires_grad_(), 0.99)
    assert n0 == 0 and none.item() == 0.0 and none.requires_grad


def test_self_label_loss_goes_down_in_a_few_steps():
    from retrieval.training.losses.clustering import ClusterHead
    from retrieval.training.losses.selflabel import self_label_loss

    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3] * 3
    z = torch.cat([c + 0.3 * torch.randn(20, 4, generator=gen) for c in centres])
    head = ClusterHead(4, 3, temperature=0.1)
    head.init_from_kmeans(z, seed=0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        strong = z + 0.5 * torch.randn(z.shape, generator=gen)
        loss, n = self_label_loss(head.logits(z).detach(), head.logits(strong), 0.99)
        assert n > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_kmeans_init_gives_the_nearest_centre():
    from sklearn.cluster import KMeans

    from retrieval.training.losses.clustering import ClusterHead

    z = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    head = ClusterHead(5, 4)
    head.init_from_kmeans(z, seed=0)
    unit = torch.nn.functional.normalize(z, dim=1).numpy()
    km = KMeans(n_clusters=4, n_init=10, random_state=0).fit(unit)
    assert head(z).argmax(1).tolist() == km.labels_.tolist()  # k-means' own assignment
    # vectors crowded into a narrow cone (as a random projection's are): the same argmax, weights kept short
    crowded = torch.ones(40, 5) * 10 + z
    head.init_from_kmeans(crowded, seed=0)
    km = KMeans(n_clusters=4, n_init=10, random_state=0).fit(torch.nn.functional.normalize(crowded, dim=1).numpy())
    assert head(crowded).argmax(1).tolist() == km.labels_.tolist()
    assert head.linear.weight.norm(dim=1).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("method", ["scan", "lsd"])
@pytest.mark.slow
def test_self_labelling_stage_trains_after_the_cluster_stage(unlabelled, method):
    """z-scored features, kmeans init, then the method's loss, then self-labelling for the last epochs; labels
    never read."""
    cfg = TrainConfig(
        method=method,
        encoder="cnn5",
        image_size=32,
        batch_size=12,
        lr=1e-3,
        epochs=6,
        self_label_epochs=3,
        self_label_threshold=0.5,
        freeze_backbone=True,
        frozen_views=2,
        clusters=3,
        neighbours=3,
        cluster_init="kmeans",
        standardize_features=True,  # random-CNN features crowd into a cone; z-scored, the k-means head starts sharp
    )
    res = train(unlabelled, cfg, progress=False)
    loss = res.model.loss
    steps = len(res.log["steps"])
    assert steps == 6 * math.ceil(len(unlabelled) / 12)
    assert len(loss.confident) == steps // 2 and max(loss.confident) > 0
    assert np.isfinite([s["loss"] for s in res.log["steps"]]).all()
    with pytest.raises(RetrieveError, match="self_label_epochs"):
        TrainConfig(method=method, epochs=5, self_label_epochs=5)
    with pytest.raises(RetrieveError, match="cluster_init"):
        TrainConfig(method=method, cluster_init="spectral")


def test_standardised_features_fold_into_the_head():
    """Training on z-scored frozen features, then folding the z-scoring into the head's first layer: the head on
    raw features gives what it gave on z-scored ones."""
    from retrieval.encoders.base import build_head
    from retrieval.training.trainer import fold_standardisation

    gen = torch.Generator().manual_seed(0)
    f = torch.rand(7, 6, generator=gen) * 5 + 3
    shift, scale = f.mean(0), f.std(0) + 1e-6
    head = build_head(6, [4, 3])
    with torch.no_grad():
        before = head((f - shift) / scale)
        fold_standardisation(head, shift, scale)
        np.testing.assert_allclose(head(f).numpy(), before.numpy(), atol=1e-5)
    with pytest.raises(RetrieveError, match="standardize_features"):
        TrainConfig(method="lsd", standardize_features=True)  # no frozen backbone
