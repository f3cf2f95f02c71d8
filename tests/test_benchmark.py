"""The benchmark protocol: grouped folds never split a patient or near-duplicate group; a quick run works."""

import numpy as np
import pandas as pd
import pytest

from retrieval.training.benchmark import group_ids, linear_probe, make_folds, run_benchmark


def test_groups_join_patients_and_near_duplicates():
    rows = pd.DataFrame({"patient_id": ["a", "a", "b", None, None, "c"], "near_dup_group": [None, None, "g", "g", None, None]})
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


def test_quick_benchmark_run(demo_data, tmp_path):
    res = run_benchmark(demo_data, ["supcon"], folds=2, overrides={"epochs": 2, "frozen_views": 1, "image_size": 32},
                        progress=False, log=lambda m: None)
    assert set(res["summary"]) == {"raw-pixels", "random-resnet18", "imagenet-effnet-lite0", "supcon"}
    for name, runs in res["per_fold"].items():
        assert len(runs) == 2 and all(0 <= r["map"] <= 1 for r in runs)
