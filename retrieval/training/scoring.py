"""Scores of vectors on one fold: retrieval with the held-out fold as queries against the training folds
(MAP, MRR, P@1, MAP@R, kNN accuracy) and a linear probe (logistic regression on frozen vectors, paper 001)
with AUC and balanced accuracy, per image and on predictions averaged per patient."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from retrieval.evaluation.evaluate import EvalSettings, evaluate

RETRIEVAL_KEYS = ("map", "mrr", "p@1", "map@r", "knn_accuracy", "knn_balanced_accuracy")
PROBE_KEYS = ("probe_auc", "probe_balanced_accuracy", "probe_patient_auc", "probe_patient_balanced_accuracy")


def _auc_and_bacc(y: np.ndarray, prob: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """AUC (binary, or macro one-vs-rest when every class is present) and balanced accuracy of argmax."""
    if len(classes) == 2:
        auc = roc_auc_score(y == classes[1], prob[:, 1]) if len(set(y)) == 2 else float("nan")
    else:
        auc = (
            roc_auc_score(y, prob, multi_class="ovr", labels=list(classes)) if set(classes) <= set(y) else float("nan")
        )
    return float(auc), float(balanced_accuracy_score(y, classes[prob.argmax(1)]))


def patient_average(prob: np.ndarray, labels: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean predicted probabilities per patient (paper 001), with each patient's label; None when a
    patient id is missing or a patient holds images of more than one label."""
    ids = pd.Series(patients, dtype=object)
    if ids.isna().any() or (ids.astype(str).str.strip() == "").any():
        return None
    by_patient = pd.Series(labels).groupby(ids.to_numpy(), sort=False)
    if (by_patient.nunique() > 1).any():
        return None
    return pd.DataFrame(prob).groupby(ids.to_numpy(), sort=False).mean().to_numpy(), by_patient.first().to_numpy()


def linear_probe(
    vectors: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    patients: np.ndarray | None = None,
) -> dict[str, float]:
    """Logistic regression on standardised frozen vectors: AUC (macro one-vs-rest) and balanced accuracy
    per image and, where `patients` gives one label per patient, on predictions averaged per patient."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    pipe.fit(vectors[train_idx], labels[train_idx])
    classes = pipe[-1].classes_
    prob = pipe.predict_proba(vectors[test_idx])
    auc, bacc = _auc_and_bacc(labels[test_idx], prob, classes)
    out = {
        "probe_auc": auc,
        "probe_balanced_accuracy": bacc,
        "probe_patient_auc": float("nan"),
        "probe_patient_balanced_accuracy": float("nan"),
    }
    per_patient = (
        None
        if patients is None
        else patient_average(prob, labels[test_idx], np.asarray(patients, dtype=object)[test_idx])
    )
    if per_patient is not None:
        out["probe_patient_auc"], out["probe_patient_balanced_accuracy"] = _auc_and_bacc(
            per_patient[1], per_patient[0], classes
        )
    return out


def score_fold(rows: pd.DataFrame, vectors: np.ndarray, tr: np.ndarray, te: np.ndarray, k: int) -> dict[str, float]:
    test = np.zeros(len(rows), bool)
    test[te] = True
    res = evaluate(rows, vectors, EvalSettings(k=k), progress=False, query_mask=test, gallery_mask=~test)
    out = {key: res["overall"][key] for key in RETRIEVAL_KEYS}
    patients = rows["patient_id"].to_numpy(dtype=object) if "patient_id" in rows else None
    out.update(linear_probe(vectors, rows["label"].astype(str).to_numpy(), tr, te, patients))
    return out
