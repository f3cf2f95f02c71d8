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


def test_nested_selection_uses_only_training_folds(tmp_path, monkeypatch):
    """Every candidate is fitted on inner-train rows and scored on inner-validation rows, both inside
    the training folds; the held-out fold is touched only by the final fit's scoring."""
    import retrieval.training.benchmark as bm

    calls = []
    real_evaluate = bm.evaluate

    def spy(rows, vectors, settings, progress=False, query_mask=None, gallery_mask=None):
        calls.append((query_mask.copy(), gallery_mask.copy()))
        return real_evaluate(rows, vectors, settings, progress=progress, query_mask=query_mask, gallery_mask=gallery_mask)

    from retrieval.demo.synthetic import generate_demo_dataset

    demo_data = tmp_path / "d"
    generate_demo_dataset(demo_data, n_per_grade=4, frames=2, size=64, seed=2)
    monkeypatch.setattr(bm, "evaluate", spy)
    res = bm.run_benchmark(demo_data, ["supervised"], folds=2, overrides={"epochs": 1, "frozen_views": 1, "image_size": 32},
                           progress=False, log=lambda m: None, select={"lr": [0.001, 0.01]})
    picks = res["selection"]["chosen_per_fold"]["supervised"]
    assert len(picks) == 2 and all(p["lr"] in (0.001, 0.01) and p["inner_val_map"] is not None for p in picks)
    from retrieval.data.dataset import load_dataset

    rows = load_dataset(demo_data).rows
    splits = bm.make_folds(rows, 2, 0)
    method_calls = calls[-(2 * 3):]  # per fold: 2 candidates + 1 final (after the 3 baselines' calls)
    for f, (tr, te) in enumerate(splits):
        for q, g in method_calls[3 * f : 3 * f + 2]:
            assert not q[te].any() and not g[te].any()  # selection never sees the held-out fold
        q, g = method_calls[3 * f + 2]
        assert q[te].all() and not g[te].any()
