"""`retrieve eval` as one library call: leave-one-out evaluation of everything an index holds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from indexer.index_dir import open_index_dir, read_manifest
from retrieval.encoders.checkpoint import trained_on
from retrieval.errors import RetrieveError
from retrieval.evaluation.evaluate import EvalSettings, evaluate
from retrieval.labels import check_multilabel_mode, join_labels
from retrieval.relocate import resolve_data_root, resolve_paths
from retrieval.vote import VOTE_WEIGHTINGS


@dataclass
class IndexEvaluation:
    """The evaluation's figures (`result`, JSON-ready) and the rows and vectors they were computed on."""

    result: dict[str, Any]
    rows: pd.DataFrame
    vectors: np.ndarray
    encoder: str


def evaluate_index(
    index: str | Path,
    settings: EvalSettings,
    progress: bool = True,
    labels: str | Path | None = None,
    data_root: str | Path | None = None,
) -> IndexEvaluation:
    """Every indexed image queries all the others (its own patient and near-duplicates left out by default).

    The result records the index, its encoder, the seconds taken and, for a trained checkpoint, what it was
    trained on (figures on those same images are in-sample)."""
    if settings.vote not in VOTE_WEIGHTINGS:
        raise RetrieveError(f"--vote {settings.vote}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    if settings.k < 1:
        raise RetrieveError(f"--k {settings.k}: must be at least 1")
    check_multilabel_mode(settings.multilabel)
    m = read_manifest(index)
    idx = open_index_dir(index, use_gpu=False)
    vs = idx.vectors
    rows = vs.rows
    root = resolve_data_root(idx, data_root) if labels is not None or data_root is not None else None  # checks it
    if labels is not None:  # labels joined from a CSV (by path under the data root, sop_uid or accession)
        rows, _ = join_labels(resolve_paths(rows, root), labels, root)
    t0 = time.perf_counter()
    result = evaluate(rows, vs.vectors, settings, progress=progress)
    encoder = str(m.fingerprint.get("encoder"))
    result["index"] = str(index)
    result["encoder"] = m.fingerprint.get("encoder")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    trained = trained_on(str(m.encoder_spec.get("name", "")))
    if trained:
        result["encoder_trained_on"] = trained
    return IndexEvaluation(result, rows, vs.vectors, encoder)
