"""The benchmark protocol: grouped folds never split a patient or near-duplicate group; a quick run works."""

import numpy as np
import pandas as pd
import pytest

from retrieval.training.benchmark import run_benchmark
from retrieval.training.folds import group_ids, make_folds
from retrieval.training.scoring import linear_probe, patient_average


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path, monkeypatch):
    """Benchmark runs here write their feature cache into the test's folder, never the user's."""
    monkeypatch.setenv("RETRIEVE_CACHE", str(tmp_path / "cache"))


def test_groups_join_patients_and_near_duplicates():
    rows = pd.DataFrame(
        {"patient_id": ["a", "a", "b", None, None, "c"], "near_dup_group": [None, None, "g", "g", None, None]}
    )
    g = group_ids(rows)
    assert g[0] == g[1] and g[2] == g[3] and len({g[0], g[2], g[4], g[5]}) == 4


def test_folds_never_split_a_group(demo_data):
    from retrieval.data.dataset import load_dataset

    rows = load_dataset(demo_data).rows
    splits = make_folds(rows, 4, seed=0)
    assert sorted(np.concatenate([te for _, te in splits]).tolist()) == list(range(len(rows)))
    for tr, te in splits:
        assert not set(rows.patient_id[tr]) & set(rows.patient_id[te])


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (20, 3)), rng.normal(4, 1, (20, 3))])
    y = np.array(["a"] * 20 + ["b"] * 20)
    idx = rng.permutation(40)
    res = linear_probe(x, y, idx[:30], idx[30:])
    assert res["probe_auc"] == pytest.approx(1.0) and res["probe_balanced_accuracy"] == pytest.approx(1.0)


def test_patient_average_by_hand():
    prob = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]])
    mean, labels = patient_average(
        prob, np.array(["x", "x", "y", "y", "x"]), np.array(["a", "a", "b", "b", "c"], dtype=object)
    )
    assert np.allclose(mean, [[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]]) and labels.tolist() == ["x", "y", "x"]
    # a patient with two labels, or an image without a patient, has no per-patient figure
    assert (
        patient_average(prob, np.array(["x", "y", "y", "y", "x"]), np.array(["a", "a", "b", "b", "c"], dtype=object))
        is None
    )
    assert patient_average(prob, np.array(["x"] * 5), np.array(["a", None, "b", "b", "c"], dtype=object)) is None


def test_linear_probe_per_patient_matches_sklearn():
    """Per-patient AUC/balanced accuracy equal sklearn's on probabilities averaged per patient by a plain loop."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    patients = np.repeat([f"p{i}" for i in range(12)], 4).astype(object)
    y = np.repeat(np.array(["a", "b"] * 6), 4)
    x = rng.normal(0, 1, (48, 4)) + (y == "b")[:, None] * 0.8 + rng.normal(0, 1, (12, 4)).repeat(4, axis=0)
    tr, te = np.arange(24), np.arange(24, 48)
    res = linear_probe(x, y, tr, te, patients)
    sc = StandardScaler().fit(x[tr])
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(sc.transform(x[tr]), y[tr])
    prob = clf.predict_proba(sc.transform(x[te]))[:, 1]
    pp, py = [], []
    for pid in dict.fromkeys(patients[te]):
        sel = patients[te] == pid
        pp.append(prob[sel].mean())
        py.append(y[te][sel][0])
    pp, py = np.array(pp), np.array(py)
    assert res["probe_patient_auc"] == pytest.approx(roc_auc_score(py == "b", pp))
    assert res["probe_patient_balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(py, np.where(pp > 0.5, "b", "a"))
    )
    assert np.isnan(linear_probe(x, y, tr, te)["probe_patient_auc"])


@pytest.mark.slow
def test_repeated_folds(demo_data):
    res = run_benchmark(demo_data, [], folds=2, repeats=2, progress=False, log=lambda m: None)
    from retrieval.data.dataset import load_dataset

    rows = load_dataset(demo_data).rows
    first, second = make_folds(rows, 2, 0), make_folds(rows, 2, 1)
    assert any(set(a[1]) != set(b[1]) for a, b in zip(first, second))  # the repeat is another split
    for name, runs in res["per_fold"].items():
        assert len(runs) == 4
        s = res["summary"][name]["map"]
        maps = np.array([r["map"] for r in runs])
        assert s["mean"] == pytest.approx(maps.mean()) and s["repeat_std"] == pytest.approx(
            maps.reshape(2, 2).mean(1).std()
        )


@pytest.mark.slow
def test_quick_benchmark_run(demo_data, tmp_path):
    res = run_benchmark(
        demo_data,
        ["supcon"],
        folds=2,
        overrides={"epochs": 2, "frozen_views": 1, "image_size": 32},
        progress=False,
        log=lambda m: None,
    )
    assert set(res["summary"]) == {"raw-pixels", "random-resnet18", "imagenet-effnet-lite0", "supcon"}
    for runs in res["per_fold"].values():
        assert len(runs) == 2 and all(0 <= r["map"] <= 1 for r in runs)


@pytest.mark.slow
def test_nested_selection_uses_only_training_folds(tmp_path, monkeypatch):
    """Every candidate is fitted on inner-train rows and scored on inner-validation rows, both inside
    the training folds; the held-out fold is touched only by the final fit's scoring."""
    import retrieval.training.benchmark as bm
    import retrieval.training.scoring as scoring

    calls = []
    real_evaluate = bm.evaluate

    def spy(rows, vectors, settings, progress=False, query_mask=None, gallery_mask=None):
        calls.append((query_mask.copy(), gallery_mask.copy()))
        return real_evaluate(
            rows, vectors, settings, progress=progress, query_mask=query_mask, gallery_mask=gallery_mask
        )

    from retrieval.demo.synthetic import generate_demo_dataset

    demo_data = tmp_path / "d"
    generate_demo_dataset(demo_data, n_per_grade=4, frames=2, size=64, seed=2)
    monkeypatch.setattr(bm, "evaluate", spy)  # the inner selection's scores
    monkeypatch.setattr(scoring, "evaluate", spy)  # every fold's score (score_fold)
    res = bm.run_benchmark(
        demo_data,
        ["supervised"],
        folds=2,
        overrides={"epochs": 1, "frozen_views": 1, "image_size": 32},
        progress=False,
        log=lambda m: None,
        select={"lr": [0.001, 0.01]},
    )
    picks = res["selection"]["chosen_per_fold"]["supervised"]
    assert len(picks) == 2 and all(p["lr"] in (0.001, 0.01) and p["inner_val_map"] is not None for p in picks)
    from retrieval.data.dataset import load_dataset

    rows = load_dataset(demo_data).rows
    splits = make_folds(rows, 2, 0)
    method_calls = calls[-(2 * 3) :]  # per fold: 2 candidates + 1 final (after the 3 baselines' calls)
    for f, (_tr, te) in enumerate(splits):
        for q, g in method_calls[3 * f : 3 * f + 2]:
            assert not q[te].any() and not g[te].any()  # selection never sees the held-out fold
        q, g = method_calls[3 * f + 2]
        assert q[te].all() and not g[te].any()


@pytest.mark.slow
def test_methods_on_random_init_backbones_get_that_backbone_at_init_as_baseline(demo_data):
    res = run_benchmark(
        demo_data,
        ["simclr"],
        folds=2,
        overrides={"max_steps": 1, "image_size": 32, "batch_size": 8},
        progress=False,
        log=lambda m: None,
    )
    assert set(res["summary"]) == {
        "raw-pixels",
        "random-resnet18",
        "imagenet-effnet-lite0",
        "random-cnn5-32px",
        "simclr",
    }
    from retrieval.training.benchmark_report import markdown_table

    assert "| random-cnn5-32px (baseline) |" in markdown_table(res)
    # a head on frozen random-init features is compared with those features; ImageNet features get no such row
    res = run_benchmark(
        demo_data,
        ["simclr", "supcon"],
        folds=2,
        progress=False,
        log=lambda m: None,
        overrides={
            "max_steps": 1,
            "image_size": 32,
            "batch_size": 8,
            "freeze_backbone": True,
            "frozen_views": 1,
            "simclr.encoder": "cnn5",
            "supcon.encoder": "imagenet-effnet-lite0",
        },
    )
    assert set(res["summary"]) == {
        "raw-pixels",
        "random-resnet18",
        "imagenet-effnet-lite0",
        "random-cnn5-32px",
        "simclr",
        "supcon",
    }


@pytest.mark.slow
def test_benchmark_cli_writes_strict_json_with_repeats(demo_data, tmp_path, capsys):
    import json

    from conftest import run_cli

    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        capsys,
        "benchmark",
        demo_data,
        "--methods",
        "supervised",
        "--folds",
        "2",
        "--repeats",
        "2",
        "--epochs",
        "1",
        "--set",
        "image_size=32",
        "--set",
        "frozen_views=1",
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err

    def no_nan(value):
        raise AssertionError(f"non-standard JSON constant {value}")

    result = json.loads((out / "benchmark.json").read_text(), parse_constant=no_nan)[0]
    assert result["repeats"] == 2 and len(result["per_fold"]["supervised"]) == 4
    assert result["summary"]["supervised"]["probe_patient_auc"]["mean"] is not None  # demo patients have one grade each
    md = (out / "benchmark.md").read_text()
    assert "2 folds x 2 repeats" in md and "probe AUC per patient" in md and "Std of the 2 repeats' MAP means" in md


def test_benchmark_cli_reads_yaml_values_and_candidate_lists(demo_data, tmp_path, capsys, monkeypatch):
    """--set takes YAML mappings (augment), --select a YAML list whose items hold commas; bad YAML is one line."""
    from conftest import run_cli

    import retrieval.training.benchmark as bm

    seen = {}

    def fake_run(data, methods, folds, seed, overrides=None, select=None, **kw):
        seen.update(overrides=overrides, select=select)
        raise bm.RetrieveError("stop here")

    monkeypatch.setattr(bm, "run_benchmark", fake_run)
    code, _, err = run_cli(
        capsys,
        "benchmark",
        demo_data,
        "--methods",
        "simclr",
        "--set",
        "augment={zoom: [0.9, 1.1]}",
        "--select",
        "augment=[{}, {crop_scale: [0.3, 1.0], shift: 0.1}]",
        "--select",
        "lr=0.001,0.01",
    )
    assert code != 0 and "stop here" in err
    assert seen["overrides"] == {"augment": {"zoom": [0.9, 1.1]}}
    assert seen["select"] == {"augment": [{}, {"crop_scale": [0.3, 1.0], "shift": 0.1}], "lr": [0.001, 0.01]}
    code, _, err = run_cli(capsys, "benchmark", demo_data, "--set", "augment={zoom: [0.9")
    assert code != 0 and "--set augment={zoom: [0.9: not a valid YAML value" in err and "Traceback" not in err


def test_benchmark_cli_select_checks_keys_and_values_before_any_work(demo_data, capsys, monkeypatch):
    """--select with a key that is no training option, or a candidate value the options refuse: a one-line error
    naming it, exit 2, before a single image is loaded or an encoder built."""
    from conftest import assert_one_line_error, run_cli

    import retrieval.training.benchmark as bm

    def no_work(*a, **kw):
        raise AssertionError("work started before --select was checked")

    monkeypatch.setattr(bm, "load_image_tensors", no_work)
    monkeypatch.setattr(bm, "create_encoder", no_work)
    code, _, err = run_cli(capsys, "benchmark", demo_data, "--methods", "supcon", "--select", "nosuch=1,2")
    assert code == 2
    assert_one_line_error(err, "--select nosuch: not a training option")
    code, _, err = run_cli(capsys, "benchmark", demo_data, "--methods", "supcon", "--select", "concat_weight=0.5,3")
    assert code == 2
    assert_one_line_error(err, "concat_weight 3: must lie in [0, 1]")


@pytest.mark.slow
def test_clustering_methods_scored_next_to_kmeans(demo_data, monkeypatch):
    """pica/lsd get K = classes, never see a label, and their held-out clusters sit next to k-means baselines."""
    import retrieval.training.benchmark as bm
    from retrieval.training.benchmark_report import markdown_table

    seen = []
    real_train = bm.train

    def spy(rows, cfg, **kw):
        seen.append((cfg.method, cfg.clusters, "label" in rows))
        return real_train(rows, cfg, **kw)

    monkeypatch.setattr(bm, "train", spy)
    res = run_benchmark(
        demo_data,
        ["lsd"],
        folds=2,
        overrides={"max_steps": 2, "frozen_views": 1, "image_size": 32},
        progress=False,
        log=lambda m: None,
    )
    assert seen == [("lsd", 4, False)] * 2  # four grades in the demo data; the label column is dropped
    clusters = res["clustering"]["per_fold"]
    # the preset's ImageNet features at 32 px (image_size set for all) differ from the 224 px baseline's
    assert set(clusters) == {
        "kmeans-raw-pixels",
        "kmeans-imagenet-effnet-lite0",
        "kmeans-imagenet-effnet-lite0-32px",
        "lsd",
    }
    assert res["clustering"]["own_input_kmeans"] == {"lsd": ["kmeans-imagenet-effnet-lite0-32px"]}
    for runs in clusters.values():
        assert len(runs) == 2 and all(-1 <= r["ari"] <= 1 and 0 <= r["weighted_f1"] <= 1 for r in runs)
    assert "| kmeans-raw-pixels |" in markdown_table(res) and "lsd" in res["summary"]


def test_unknown_training_option_is_named(demo_data):
    from retrieval.errors import RetrieveError

    with pytest.raises(RetrieveError, match="--set bogus_option: not a training option"):
        run_benchmark(
            demo_data, ["supcon"], folds=2, overrides={"epochs": 1, "supcon.bogus_option": 3}, log=lambda m: None
        )


def test_method_spec_label_fraction():
    from retrieval.errors import RetrieveError
    from retrieval.training.benchmark import parse_method_spec

    assert parse_method_spec("supcon") == ("supcon", None)
    assert parse_method_spec("fixmatch@0.1") == ("fixmatch", 0.1)
    assert parse_method_spec("fixmatch@25%") == ("fixmatch", 0.25)
    for bad in ("fixmatch@0", "fixmatch@1.5", "fixmatch@ten"):
        with pytest.raises(RetrieveError, match="label fraction"):
            parse_method_spec(bad)


@pytest.mark.slow
def test_label_fraction_methods_share_one_labelled_subset(tmp_path):
    """supcon@F trains on the labelled groups alone, fixmatch@F on the same groups plus the rest unlabelled;
    METHOD@F.KEY overrides reach that spec only; a clustering method refuses a fraction."""
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.errors import RetrieveError

    demo_data = tmp_path / "demo"
    generate_demo_dataset(demo_data, n_per_grade=4, frames=2, size=64, seed=2)  # 2 patients per grade per fold
    res = run_benchmark(
        demo_data,
        ["supcon@0.5", "fixmatch@50%"],
        folds=2,
        overrides={"epochs": 2, "frozen_views": 1, "image_size": 32, "fixmatch@50%.fixmatch_threshold": 0.5},
        progress=False,
        log=lambda m: None,
    )
    assert res["methods"]["supcon@0.5"]["label_fraction"] == 0.5
    assert res["methods"]["fixmatch@50%"]["fixmatch_threshold"] == 0.5
    assert res["methods"]["supcon@0.5"]["fixmatch_threshold"] == 0.95
    a = [r["labelled_fraction"] for r in res["per_fold"]["supcon@0.5"]]
    b = [r["labelled_fraction"] for r in res["per_fold"]["fixmatch@50%"]]
    assert a == b and all(0 < f < 1 for f in a)
    with pytest.raises(RetrieveError, match="reads no labels"):
        run_benchmark(demo_data, ["lsd@0.1"], folds=2, progress=False, log=lambda m: None)


def test_inner_selection_score_depends_on_the_method_kind():
    """Vectors that retrieve perfectly (MAP 1) but clusters that mix the labels: a retrieval method is scored
    by MAP, a clustering method by NMI + weighted F1 (matched on inner-train, scored on inner-validation)."""
    from dataclasses import replace

    from sklearn.metrics import f1_score, normalized_mutual_info_score

    from retrieval.training.benchmark import inner_selection_score, resolve_method_config

    labels = np.array(["a", "b", "c"] * 8)
    rows = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(labels))], "label": labels})
    codes = np.searchsorted(["a", "b", "c"], labels)
    vectors = np.eye(3)[codes] + 0.01 * np.random.default_rng(0).normal(size=(len(labels), 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assign = np.array([0, 0, 1, 1, 2, 2] * 4)  # clusters cut across the labels
    itr, iva = np.arange(12), np.arange(12, 24)
    lsd = replace(resolve_method_config("lsd"), clusters=3)
    supervised = resolve_method_config("supervised")
    assert inner_selection_score(supervised, vectors, None, rows, itr, iva, 5)["score"] == pytest.approx(1.0)
    got = inner_selection_score(lsd, vectors, assign, rows, itr, iva, 5)
    # direct computation: each cluster maps to its most common inner-train label (ties: first by name)
    mapping = {}
    for c in range(3):
        vals, counts = np.unique(labels[itr][assign[itr] == c], return_counts=True)
        mapping[c] = vals[counts.argmax()]
    pred = np.array([mapping[c] for c in assign[iva]])
    nmi = normalized_mutual_info_score(labels[iva], assign[iva])
    wf1 = f1_score(labels[iva], pred, average="weighted", zero_division=0)
    assert got["nmi"] == pytest.approx(nmi) and got["weighted_f1"] == pytest.approx(wf1)
    assert got["score"] == pytest.approx(nmi + wf1) and got["score"] < 1.0


def test_own_input_kmeans_matches_sklearn():
    """k-means on a method's own features, plain and z-scored with the training folds' mean/std, scored on
    the held-out fold, equals scikit-learn's KMeans fitted directly (independent NMI / ARI)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from retrieval.training.benchmark import own_input_kmeans

    rng = np.random.default_rng(3)
    labels = np.repeat(["x", "y", "z"], 20)
    feats = rng.normal(size=(60, 8)) * np.array([1, 1, 1, 20, 20, 20, 20, 20]) + 3 * (labels == "x")[:, None]
    splits = [(np.arange(0, 60, 2), np.arange(1, 60, 2)), (np.arange(1, 60, 2), np.arange(0, 60, 2))]
    for standardize in (False, True):
        got = own_input_kmeans(feats, labels, splits, 3, 0, standardize)
        for (tr, te), g in zip(splits, got):
            x = (feats - feats[tr].mean(0)) / (feats[tr].std(0) + 1e-6) if standardize else feats
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            pred = KMeans(n_clusters=3, n_init=10, random_state=0).fit(x[tr]).predict(x[te])
            assert g["nmi"] == pytest.approx(normalized_mutual_info_score(labels[te], pred))
            assert g["ari"] == pytest.approx(adjusted_rand_score(labels[te], pred))


@pytest.mark.slow
def test_clustering_method_gets_own_input_kmeans_and_is_selected_by_clustering_score(tmp_path, monkeypatch):
    """lsd on frozen random CNN5 features at 32 px, z-scored: the run holds k-means on those very features
    (plain and z-scored), equal to KMeans on independently computed features; `--select` for lsd chooses by
    the inner NMI + weighted F1, never by retrieval MAP, and says so in the JSON and markdown."""
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    import retrieval.training.benchmark as bm
    from retrieval.config import PreprocessConfig
    from retrieval.data.dataset import load_dataset
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.encoders.registry import create_encoder
    from retrieval.training.benchmark_report import markdown_table
    from retrieval.training.trainer import cached_features, load_image_tensors

    demo_data = tmp_path / "d"
    generate_demo_dataset(demo_data, n_per_grade=4, frames=2, size=64, seed=2)
    inner_maps = []
    monkeypatch.setattr(bm, "evaluate", lambda *a, **kw: inner_maps.append(1) or {"overall": {"map": 0.5}})
    scored = []
    real_score = bm.inner_selection_score

    def spy(cfg, *a):
        out = real_score(cfg, *a)
        scored.append((cfg.lr, out))
        return out

    monkeypatch.setattr(bm, "inner_selection_score", spy)
    res = bm.run_benchmark(
        demo_data,
        ["lsd"],
        folds=2,
        overrides={
            "max_steps": 3,
            "frozen_views": 1,
            "lsd.encoder": "cnn5",
            "lsd.image_size": 32,
            "lsd.standardize_features": True,
        },
        progress=False,
        log=lambda m: None,
        select={"lr": [0.001, 0.01]},
    )
    clustering = res["clustering"]
    assert clustering["own_input_kmeans"] == {"lsd": ["kmeans-cnn5-32px", "kmeans-cnn5-32px-zscored"]}
    assert {"kmeans-raw-pixels", "kmeans-imagenet-effnet-lite0", "lsd"} < set(clustering["per_fold"])
    rows = load_dataset(demo_data).rows
    rows = rows[rows["label"].notna()].reset_index(drop=True)
    labels = rows["label"].astype(str).to_numpy()
    images = load_image_tensors(rows, PreprocessConfig(image_size=32))[0]
    feats = cached_features(create_encoder("cnn5", None, 0), images, 0, torch.Generator(), "cpu", progress=False)
    feats = feats[0].numpy()
    for f, (tr, te) in enumerate(make_folds(rows, 2, 0)):
        z = (feats - feats[tr].mean(0)) / (feats[tr].std(0) + 1e-6)
        for name, x in (("kmeans-cnn5-32px", feats), ("kmeans-cnn5-32px-zscored", z)):
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            pred = KMeans(n_clusters=4, n_init=10, random_state=0).fit(x[tr]).predict(x[te])
            assert clustering["per_fold"][name][f]["nmi"] == pytest.approx(
                normalized_mutual_info_score(labels[te], pred)
            )
    # selection: the clustering score alone, the candidate with the highest inner NMI + weighted F1
    assert res["selection"]["criterion"] == {"lsd": "nmi+weighted_f1"}
    assert not inner_maps  # no retrieval MAP computed on the inner split
    picks = res["selection"]["chosen_per_fold"]["lsd"]
    assert len(picks) == 2 and len(scored) == 4
    for f, p in enumerate(picks):
        cands = scored[2 * f : 2 * f + 2]
        best = max(cands, key=lambda c: c[1]["score"])
        assert p["lr"] == best[0] and p["inner_val_score"] == pytest.approx(best[1]["score"], abs=1e-4)
        assert p["inner_val_score"] == pytest.approx(p["inner_val_nmi"] + p["inner_val_weighted_f1"], abs=2e-4)
        assert "inner_val_map" not in p
    md = markdown_table(res)
    assert "| kmeans-cnn5-32px-zscored |" in md and "lsd (chosen by inner NMI + weighted F1)" in md


def test_kmeans_input_rows_name_each_input():
    """The k-means rows of a configuration's own input: plain features, then their z-scores when the head trains
    on z-scores (the last row is what the head sees); K other than the classes is named; end to end: none."""
    from dataclasses import replace

    from retrieval.training.benchmark import kmeans_input_rows, resolve_method_config

    lsd = replace(resolve_method_config("lsd"), clusters=4)
    assert kmeans_input_rows(lsd, 4) == [("kmeans-imagenet-effnet-lite0", False)]
    cnn5 = replace(lsd, encoder="cnn5", image_size=64, standardize_features=True)
    assert kmeans_input_rows(cnn5, 4) == [("kmeans-cnn5-64px", False), ("kmeans-cnn5-64px-zscored", True)]
    assert kmeans_input_rows(replace(cnn5, clusters=6), 4)[-1] == ("kmeans-cnn5-64px-k6-zscored", True)
    assert kmeans_input_rows(replace(lsd, freeze_backbone=False), 4) == []
    assert kmeans_input_rows(resolve_method_config("supcon"), 4) == []


def test_head_to_head_line_counts_folds_against_the_chosen_input():
    """The report's line: the method's mean against the mean of each fold's chosen k-means row, and in how many
    folds the method is higher; with z-scored inputs also against the same features before z-scoring."""
    from retrieval.training.benchmark_report import cluster_table

    def fold(nmi, f1):
        return {"nmi": nmi, "ari": 0.0, "hungarian_accuracy": 0.0, "weighted_f1": f1}

    per_fold = {
        "lsd": [fold(0.5, 0.6), fold(0.7, 0.2)],
        "kmeans-a": [fold(0.4, 0.9), fold(0.9, 0.9)],
        "kmeans-a-zscored": [fold(0.1, 0.1), fold(0.8, 0.1)],
        "kmeans-b": [fold(0.9, 0.9), fold(0.6, 0.3)],
    }
    result = {
        "clustering": {
            "per_fold": per_fold,
            "summary": {},
            "chosen_input_kmeans": {"lsd": ["kmeans-a-zscored", "kmeans-b"]},
        }
    }
    result["clustering"]["summary"] = {
        n: {k: {"mean": 0.0, "std": 0.0} for k in ("nmi", "ari", "hungarian_accuracy", "weighted_f1")} for n in per_fold
    }
    line = [ln for ln in cluster_table(result) if ln.startswith("- lsd against")][0]
    # chosen: fold 1 a-zscored (0.1 / 0.1), fold 2 b (0.6 / 0.3); lsd 0.5 / 0.6 and 0.7 / 0.2
    assert "kmeans-a-zscored x1, kmeans-b x1" in line
    assert "NMI 0.600 vs 0.350 (lsd higher in 2 of 2 folds)" in line
    assert "weighted F1 0.400 vs 0.200 (lsd higher in 1 of 2 folds)" in line
    # before z-scoring: fold 1 kmeans-a (0.4 / 0.9), fold 2 kmeans-b
    assert "before z-scoring: NMI 0.600 vs 0.500 (lsd higher in 2 of 2 folds); weighted F1 0.400 vs 0.600" in line


@pytest.mark.slow
def test_select_candidates_that_change_the_input_get_their_own_kmeans(tmp_path, monkeypatch):
    """--select over image_size and standardize_features: each distinct input gets its k-means rows once (equal to
    KMeans on independently computed features), and the chosen-input row follows each fold's chosen candidate."""
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import f1_score, normalized_mutual_info_score

    import retrieval.training.benchmark as bm
    from retrieval.config import PreprocessConfig
    from retrieval.data.dataset import load_dataset
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.encoders.registry import create_encoder
    from retrieval.training.benchmark_report import markdown_table
    from retrieval.training.trainer import cached_features, load_image_tensors

    demo_data = tmp_path / "d"
    generate_demo_dataset(demo_data, n_per_grade=4, frames=2, size=64, seed=2)
    kmeans_calls = []
    real_kmeans = bm.own_input_kmeans

    def count(*a, **kw):
        kmeans_calls.append(a[3:])  # clusters, seed, standardize
        return real_kmeans(*a, **kw)

    monkeypatch.setattr(bm, "own_input_kmeans", count)
    # force different picks per fold (fold 1: 48 px z-scored, fold 2: 32 px plain) through the inner score
    favourite = [(48, True), (32, False)]
    n_scored = []

    def score(cfg, *a):
        f = len(n_scored) // 4
        n_scored.append(1)
        hit = (cfg.image_size, cfg.standardize_features) == favourite[f]
        return {"score": 2.0 if hit else 0.5, "nmi": 1.0 if hit else 0.25, "weighted_f1": 1.0 if hit else 0.25}

    monkeypatch.setattr(bm, "inner_selection_score", score)
    res = bm.run_benchmark(
        demo_data,
        ["lsd"],
        folds=2,
        overrides={"max_steps": 2, "frozen_views": 1, "lsd.encoder": "cnn5"},
        progress=False,
        log=lambda m: None,
        select={"image_size": [32, 48], "standardize_features": [False, True]},
    )
    assert {"random-cnn5-32px", "random-cnn5-48px"} <= set(res["summary"])  # each candidate's backbone untouched
    clustering = res["clustering"]
    names = ["kmeans-cnn5-32px", "kmeans-cnn5-32px-zscored", "kmeans-cnn5-48px", "kmeans-cnn5-48px-zscored"]
    assert clustering["own_input_kmeans"] == {"lsd": names}
    assert len(kmeans_calls) == 4  # once per distinct input (each call covers every fold)
    picks = res["selection"]["chosen_per_fold"]["lsd"]
    assert [(p["image_size"], p["standardize_features"]) for p in picks] == favourite
    assert clustering["chosen_input_kmeans"] == {"lsd": ["kmeans-cnn5-48px-zscored", "kmeans-cnn5-32px"]}
    chosen_row = clustering["per_fold"]["kmeans-chosen-input-lsd"]
    rows = load_dataset(demo_data).rows
    rows = rows[rows["label"].notna()].reset_index(drop=True)
    labels = rows["label"].astype(str).to_numpy()
    splits = make_folds(rows, 2, 0)
    for size in (32, 48):
        images = load_image_tensors(rows, PreprocessConfig(image_size=size))[0]
        enc = create_encoder("cnn5", None, 0)
        feats = cached_features(enc, images, 0, torch.Generator(), "cpu", progress=False)[0].numpy()
        for f, (tr, te) in enumerate(splits):
            z = (feats - feats[tr].mean(0)) / (feats[tr].std(0) + 1e-6)
            for name, x in ((f"kmeans-cnn5-{size}px", feats), (f"kmeans-cnn5-{size}px-zscored", z)):
                x = x / np.linalg.norm(x, axis=1, keepdims=True)
                km = KMeans(n_clusters=4, n_init=10, random_state=0).fit(x[tr])
                pred, fit = km.predict(x[te]), km.labels_
                got = clustering["per_fold"][name][f]
                assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels[te], pred))
                # matching on the training folds: each cluster's most common training label (ties: first by name)
                mapping = {}
                for c in range(4):
                    vals, counts = np.unique(labels[tr][fit == c], return_counts=True)
                    mapping[c] = vals[counts.argmax()] if len(vals) else sorted(set(labels))[0]
                wf1 = f1_score(labels[te], [mapping[c] for c in pred], average="weighted", zero_division=0)
                assert got["weighted_f1"] == pytest.approx(wf1)
                if name == clustering["chosen_input_kmeans"]["lsd"][f]:
                    assert chosen_row[f]["nmi"] == pytest.approx(normalized_mutual_info_score(labels[te], pred))
                    assert chosen_row[f]["weighted_f1"] == pytest.approx(wf1)
    md = markdown_table(res)
    assert "| kmeans-chosen-input-lsd |" in md
    assert "- lsd against k-means on the input it trained on, per fold (row kmeans-chosen-input-lsd)" in md


def test_head_to_head_leaves_out_folds_without_an_input():
    """A fold whose chosen setup trained end to end has no input (None): it is left out on both sides, and the
    other folds keep their own rows (fold 2 against fold 2's k-means, never fold 1's)."""
    from retrieval.training.benchmark_report import head_to_head

    def fold(nmi, f1):
        return {"nmi": nmi, "ari": 0.0, "hungarian_accuracy": 0.0, "weighted_f1": f1}

    per_fold = {
        "lsd": [fold(0.9, 0.9), fold(0.3, 0.6), fold(0.5, 0.1)],
        "kmeans-a": [fold(0.1, 0.1), fold(0.2, 0.8), fold(0.7, 0.7)],
        "kmeans-a-zscored": [fold(0.0, 0.0), fold(0.4, 0.5), fold(0.6, 0.0)],
    }
    result = {"clustering": {"per_fold": per_fold}}
    line = head_to_head(result, "lsd", [None, "kmeans-a-zscored", "kmeans-a"])
    # folds 2 and 3: lsd 0.3 / 0.6 and 0.5 / 0.1; chosen 0.4 / 0.5 (a-zscored) and 0.7 / 0.7 (a)
    assert "kmeans-a-zscored x1, kmeans-a x1 (1 of 3 folds trained end to end, no fixed input: left out)" in line
    assert "NMI 0.400 vs 0.550 (lsd higher in 0 of 2 folds)" in line
    assert "weighted F1 0.350 vs 0.600 (lsd higher in 1 of 2 folds)" in line
    # before z-scoring: kmeans-a on folds 2 and 3 (0.2 / 0.8, 0.7 / 0.7)
    assert "before z-scoring: NMI 0.400 vs 0.450 (lsd higher in 1 of 2 folds); weighted F1 0.350 vs 0.750" in line
    # an older file that listed only the folds with an input cannot be paired: said so, no wrong pairing
    assert "not paired" in head_to_head(result, "lsd", ["kmeans-a-zscored", "kmeans-a"])


@pytest.mark.slow
def test_select_between_frozen_and_end_to_end_pairs_kmeans_with_its_own_fold(tmp_path, monkeypatch):
    """--select freeze_backbone=true,false choosing end to end on fold 1 and frozen on fold 2: the per-fold
    input list has None for fold 1, no chosen-input row is written (it would cover one fold of two), and the
    report compares fold 2 with fold 2's k-means on the frozen input."""
    import retrieval.training.benchmark as bm
    from retrieval.demo.synthetic import generate_demo_dataset
    from retrieval.training.benchmark_report import markdown_table

    demo_data = tmp_path / "d"
    generate_demo_dataset(demo_data, n_per_grade=4, frames=2, size=64, seed=2)
    favourite = [False, True]  # fold 1: end to end, fold 2: frozen
    n_scored = []

    def score(cfg, *a):
        f = len(n_scored) // 2
        n_scored.append(1)
        hit = cfg.freeze_backbone == favourite[f]
        return {"score": 2.0 if hit else 0.5, "nmi": 1.0 if hit else 0.25, "weighted_f1": 1.0 if hit else 0.25}

    monkeypatch.setattr(bm, "inner_selection_score", score)
    res = bm.run_benchmark(
        demo_data,
        ["lsd"],
        folds=2,
        overrides={"max_steps": 2, "frozen_views": 1, "lsd.encoder": "cnn5", "lsd.image_size": 32},
        progress=False,
        log=lambda m: None,
        select={"freeze_backbone": [True, False]},
    )
    picks = res["selection"]["chosen_per_fold"]["lsd"]
    assert [p["freeze_backbone"] for p in picks] == favourite
    clustering = res["clustering"]
    assert clustering["chosen_input_kmeans"] == {"lsd": [None, "kmeans-cnn5-32px"]}
    assert "kmeans-chosen-input-lsd" not in clustering["per_fold"]
    lsd, km = clustering["per_fold"]["lsd"][1], clustering["per_fold"]["kmeans-cnn5-32px"][1]
    line = [ln for ln in markdown_table(res).splitlines() if ln.startswith("- lsd against")][0]
    assert "kmeans-cnn5-32px x1 (1 of 2 folds trained end to end, no fixed input: left out)" in line
    assert f"NMI {lsd['nmi']:.3f} vs {km['nmi']:.3f} (lsd higher in {int(lsd['nmi'] > km['nmi'])} of 1 folds)" in line
