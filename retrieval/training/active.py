"""Active learning (paper 002, M9): which unlabelled images of an index would help most if a person
labelled them, and a simulation on labelled data that measures whether the choice helps.

Strategies: `entropy`, the entropy of the kNN vote among the labelled images (an image whose neighbours
disagree is one the index cannot place; needs no model); `mc-dropout`, BALD (Houlsby et al. 2011; Gal
et al. 2017) from T stochastic passes of a small classifier head trained on the labelled vectors with
its dropout kept on (the mutual information between the prediction and the head's weights: high where
the passes disagree); `esd`, paper 002's entropy strategy: the entropy of the mean of the same T passes
(the predictive entropy, high also where the passes agree on an uncertain answer); `random`, the baseline
to beat. baal implements these acquisition functions too, but it pulls in Jupyter and ~70 other packages;
the formulas are a few lines here, tested against a direct computation.

A batch taken straight from the top of the scores can be one patient's near-duplicate frames (they score
alike). Two ways to spread it (`spread`, or `STRATEGY+SPREAD` in the simulation): `patients`, at most one
image per patient while other patients remain (round robin in score order), and `kmeans`, the best-scored
image of each of `budget` k-means clusters of the unlabelled images' unit vectors (diverse mini-batch
active learning, Zhdanov 2019, without its weighting).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from retrieval.encoders.base import Encoder
from retrieval.errors import RetrieveError
from retrieval.training.folds import group_ids

log = logging.getLogger(__name__)

STRATEGIES = ("entropy", "mc-dropout", "esd", "random")
DROPOUT_STRATEGIES = ("mc-dropout", "esd")  # scored from T dropout passes of a head: BALD, predictive entropy
SPREADS = ("none", "patients", "kmeans")
AUTO = "auto"  # suggest-labels' default: esd where the index has labelled images of two classes or more, else random
ACQUIRE_FROM = ("head", "index")  # the simulation's dropout passes: the round's head, or suggest-labels' scorer


def entropy_nats(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of probability vectors along `axis`; 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=axis)


def mc_dropout_scores(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From softmax outputs (T passes, N rows, C classes): BALD, H[mean_t p_t] - mean_t H[p_t], and the
    predictive entropy H[mean_t p_t]. BALD is high where the passes disagree with each other, the
    predictive entropy also where they agree on an uncertain answer."""
    probs = np.asarray(probs, dtype=np.float64)
    predictive = entropy_nats(probs.mean(0))
    return predictive - entropy_nats(probs).mean(0), predictive


def dropout_acquisition(probs: np.ndarray, strategy: str) -> np.ndarray:
    """The score of a dropout strategy from its passes' softmax outputs (T, N, C): `mc-dropout`, BALD;
    `esd` (paper 002), the entropy of the mean prediction."""
    if strategy not in DROPOUT_STRATEGIES:
        raise RetrieveError(f"--strategy {strategy}: not scored from dropout passes ({', '.join(DROPOUT_STRATEGIES)})")
    return mc_dropout_scores(probs)[DROPOUT_STRATEGIES.index(strategy)]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a head this small gains nothing from more, and on a busy CPU the threads'
    waiting on each other made training ~25 times slower (measured: 74 s against 2.7 s for 300 steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DropoutHead(nn.Module):
    """Linear -> ReLU -> dropout -> linear classifier on frozen vectors; `embed` is the hidden layer."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.hidden(x)))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        return self.hidden(x).numpy()


def train_dropout_head(
    features: torch.Tensor,
    codes: np.ndarray,
    n_classes: int,
    seed: int = 0,
    steps: int = 300,
    batch: int = 64,
    lr: float = 1e-3,
    hidden: int = 256,
    dropout: float = 0.5,
) -> DropoutHead:
    """Train a DropoutHead on labelled features, (N, D) or (V, N, D) views of which each step draws one
    per row; class-weighted cross-entropy, so a rare class counts as much as a common one."""
    x = features if features.dim() == 3 else features.unsqueeze(0)
    codes_t = torch.as_tensor(codes, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DropoutHead(x.shape[2], n_classes, hidden, dropout)
    counts = torch.bincount(codes_t, minlength=n_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # the dropout masks
        for _ in range(steps):
            idx = torch.randint(x.shape[1], (min(batch, x.shape[1]),), generator=gen)
            view = torch.randint(x.shape[0], (len(idx),), generator=gen)
            loss = loss_fn(head(x[view, idx]), codes_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def mc_dropout_probs(head: DropoutHead, x: torch.Tensor, passes: int = 20, seed: int = 0) -> np.ndarray:
    """Softmax outputs (passes, N, C) with dropout kept on."""
    head.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return np.stack([torch.softmax(head(x), 1).numpy() for _ in range(passes)])
    finally:
        head.eval()


def dropout_scores(
    vectors: np.ndarray,
    labelled: np.ndarray,
    labels: np.ndarray,
    strategy: str = "mc-dropout",
    passes: int = 20,
    seed: int = 0,
    rows: np.ndarray | None = None,
    dims: int | None = 128,
    steps: int = 150,
    block: int = 65536,
) -> np.ndarray:
    """BALD (`mc-dropout`) or the predictive entropy (`esd`) of `rows` (positions; default every row) from
    `passes` dropout passes of a head trained on the labelled rows' vectors, projected first on their
    first `dims` principal axes (fitted on every row, or a seeded sample of 50,000): the head and settings
    the simulation measures (runs 14-21), seconds on a CPU even for a large index, scored `block` rows at
    a time."""
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    want = np.arange(len(vectors)) if rows is None else np.asarray(rows, dtype=np.int64)
    project = _principal_axes(np.asarray(vectors), dims, seed)
    with one_thread():
        lab = torch.as_tensor(project(np.asarray(vectors)[np.flatnonzero(labelled)]))
        head = train_dropout_head(lab, codes, len(classes), seed=seed, steps=steps)
        out = [
            dropout_acquisition(
                mc_dropout_probs(head, torch.as_tensor(project(np.asarray(vectors)[part])), passes, seed + i), strategy
            )
            for i, part in enumerate(np.array_split(want, max(1, -(-len(want) // block))))
        ]
    return np.concatenate(out) if out else np.zeros(0)


def _principal_axes(vectors: np.ndarray, dims: int | None, seed: int, sample: int = 50_000):
    """A function projecting rows on the first `dims` principal axes of `vectors` (float32), or the identity
    when `dims` is None or not below the vectors' width."""
    if dims is None or dims >= vectors.shape[1]:
        return lambda x: np.asarray(x, dtype=np.float32)
    from sklearn.decomposition import PCA

    fit_on = vectors
    if len(vectors) > sample:
        fit_on = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), sample, replace=False))]
    pca = PCA(n_components=min(dims, len(fit_on)), random_state=seed).fit(np.asarray(fit_on, dtype=np.float32))
    return lambda x: pca.transform(np.asarray(x, dtype=np.float32)).astype(np.float32)


# --- MC-dropout through a trained head (`suggest-labels --head CKPT`) -------------------------------------


def head_dropout_probs(
    head: nn.Module,
    features: torch.Tensor,
    labelled: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    masks: torch.Tensor,
    temperature: float = 0.1,
) -> np.ndarray:
    """Class probabilities (T, N, C) from T thinned copies of a checkpoint's projection head (Linear/ReLU
    layers): pass t multiplies the input of the head's last Linear layer by `masks[t]` (kept units scaled
    by 1 / keep rate, one mask for every row: one sampled network per pass), normalises the output, and
    scores each class by the cosine to the mean of its labelled rows' outputs (normalised) over `temperature`.
    `labelled` is a boolean mask over the rows and `codes` the class codes of the rows it marks."""
    layers = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    lab_idx = torch.as_tensor(np.flatnonzero(labelled))
    codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    out = []
    with torch.no_grad():
        x = features.float()
        for m in layers[:last]:
            x = m(x)
        for mask in masks:
            z = torch.nn.functional.normalize(layers[last](x * mask), dim=1)
            for m in layers[last + 1 :]:
                z = m(z)
            protos = torch.zeros(n_classes, z.shape[1]).index_add_(0, codes_t, z[lab_idx])
            protos = torch.nn.functional.normalize(protos, dim=1)
            out.append(torch.softmax(z @ protos.T / temperature, dim=1).numpy())
    return np.stack(out)


def dropout_masks(width: int, passes: int, rate: float, seed: int) -> torch.Tensor:
    """(passes, width) inverted-dropout masks: 0 with probability `rate`, else 1 / (1 - rate); seeded."""
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(passes, width, generator=gen) >= rate).float()
    return keep / (1.0 - rate)


def head_dropout_scores(
    head: nn.Module,
    features: torch.Tensor,
    labelled: np.ndarray,
    labels: np.ndarray,
    passes: int = 20,
    rate: float = 0.5,
    temperature: float = 0.1,
    seed: int = 0,
    strategy: str = "mc-dropout",
) -> np.ndarray:
    """BALD (`mc-dropout`) or the predictive entropy (`esd`) of every row from `passes` dropout-thinned copies
    of a trained projection head (head_dropout_probs)."""
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    layers = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if not linears:
        raise RetrieveError("--head: the checkpoint has no projection head (train one with head_dims)")
    masks = dropout_masks(linears[-1].in_features, passes, rate, seed)
    probs = head_dropout_probs(head, features, labelled, codes, len(classes), masks, temperature)
    return dropout_acquisition(probs, strategy)


def vote_entropy(
    vectors: np.ndarray,
    labelled: np.ndarray,
    labels: np.ndarray,
    k: int,
    rows: np.ndarray | None = None,
    block_elems: int = 1 << 24,
) -> np.ndarray:
    """Entropy (nats) of the majority vote of each row's k most similar labelled rows (cosine, itself
    excluded); `labelled` is a boolean mask and `labels` the labels of the rows it marks. `rows` (positions)
    limits the work to those rows (default: every row). Rows go in blocks of about `block_elems`
    similarities, so memory stays bounded on an archive with many labelled images; the neighbours are those
    a stable sort would give (equal similarities: the labelled row that comes first)."""
    lab_idx = np.flatnonzero(labelled)
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    want = np.arange(len(vectors)) if rows is None else np.asarray(rows, dtype=np.int64)
    lab_v = _unit(np.asarray(vectors, dtype=np.float32)[lab_idx])
    onehot = np.eye(len(classes), dtype=np.float32)[codes]
    k = min(k, len(lab_idx))
    slot = np.full(len(vectors), -1, dtype=np.int64)
    slot[lab_idx] = np.arange(len(lab_idx))  # a labelled row's column, so that it never votes for itself
    out = np.empty(len(want))
    step = max(1, block_elems // max(len(lab_idx), 1))
    for start in range(0, len(want), step):
        block = want[start : start + step]
        sims = _unit(np.asarray(vectors[block], dtype=np.float32)) @ lab_v.T
        own = slot[block] >= 0
        sims[np.flatnonzero(own), slot[block][own]] = -np.inf
        votes = _top_k_mask(sims, k) & (sims > -np.inf)  # with k = every labelled row, still not itself
        counts = (votes.astype(np.float32) @ onehot).astype(np.float64)  # exact small integers
        # in float64 from the counts, as the earlier whole-matrix code did: the vote's entropies tie often, and
        # the order of tied rows (which the budget cuts) must not move with rounding
        out[start : start + step] = entropy_nats(counts / np.maximum(counts.sum(1, keepdims=True), 1))
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _top_k_mask(sims: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each row's k largest entries, ties at the k-th value taken in column order (the set
    `np.argsort(-sims, kind="stable")[:, :k]` gives, without sorting whole rows)."""
    n = sims.shape[1]
    kth = np.partition(sims, n - k, axis=1)[:, n - k : n - k + 1]
    above = sims > kth
    ties = sims == kth
    need = k - above.sum(1, keepdims=True)
    return above | (ties & (np.cumsum(ties, axis=1) <= need))


def spread_over_groups(scores: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Positions of `n` rows, highest score first but at most one per group while other groups remain: each
    group's best row (groups in the order of their best scores), then each group's second best, and so on.
    Equal scores keep the rows' order."""
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    order = np.argsort(-scores, kind="stable")
    seen: dict[Any, int] = {}
    turn = np.empty(len(order), dtype=np.int64)  # 0 for a group's best row, 1 for its second, ...
    for j, i in enumerate(order):
        turn[j] = seen.get(groups[i], 0)
        seen[groups[i]] = turn[j] + 1
    return order[np.lexsort((np.arange(len(order)), turn))][:n]


def top_per_cluster(
    scores: np.ndarray, vectors: np.ndarray, n: int, seed: int = 0, sample: int = 100_000
) -> np.ndarray:
    """Positions of the best-scored row of each of `n` k-means clusters of the rows' unit vectors (scikit-learn
    KMeans in float32, k-means++ start, 3 restarts, seeded; fitted on a seeded sample of `sample` rows when
    there are more, then every row assigned to its nearest centre), best first; every row when there are no
    more than `n`."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) <= n:
        return np.argsort(-scores, kind="stable")
    from sklearn.cluster import KMeans

    v = _unit(np.asarray(vectors, dtype=np.float32))
    sample = max(sample, n)  # k-means needs at least as many rows as clusters
    fit_on = v if len(v) <= sample else v[np.sort(np.random.default_rng(seed).choice(len(v), sample, replace=False))]
    with warnings.catch_warnings():  # duplicate points: fewer distinct clusters than asked is handled below
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(fit_on)
    assign = (
        km.labels_
        if fit_on is v
        else np.concatenate([km.predict(part) for part in np.array_split(v, -(-len(v) // sample))])
    )
    order = np.lexsort((np.arange(len(scores)), -scores, assign))  # by cluster, best first, ties: first row
    firsts = order[np.r_[True, assign[order][1:] != assign[order][:-1]]]  # each non-empty cluster's best row
    return firsts[np.argsort(-scores[firsts], kind="stable")]


def pick_batch(
    scores: np.ndarray,
    n: int,
    spread: str = "none",
    groups: np.ndarray | None = None,
    vectors: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Positions of the `n` rows to label next among candidates with these scores (higher: sooner)."""
    if spread == "none":
        return np.argsort(-np.asarray(scores), kind="stable")[:n]
    if spread == "patients":
        if groups is None:
            raise RetrieveError("--spread patients needs the images' patients (a patient_id column)")
        return spread_over_groups(scores, groups, n)
    if spread == "kmeans":
        if vectors is None:
            raise RetrieveError("--spread kmeans needs the images' vectors")
        return top_per_cluster(scores, vectors, n, seed)
    raise RetrieveError(f"--spread {spread}: choose one of {', '.join(SPREADS)}")


def parse_strategy(name: str) -> tuple[str, str]:
    """`entropy` -> (entropy, none); `entropy+patients` -> (entropy, patients)."""
    base, _, spread = name.partition("+")
    if base not in STRATEGIES or (spread or "none") not in SPREADS:
        raise RetrieveError(
            f"--strategies {name}: choose from {', '.join(STRATEGIES)}, each optionally +{'|+'.join(SPREADS[1:])}"
        )
    return base, spread or "none"


def suggest_labels(
    rows: pd.DataFrame,
    vectors: np.ndarray,
    budget: int,
    strategy: str = AUTO,
    k: int = 10,
    seed: int = 0,
    spread: str = "none",
    scorer: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    name_files: Callable[[pd.DataFrame], pd.Series] | None = None,
) -> pd.DataFrame:
    """The `budget` unlabelled rows to label next, most useful first, with an empty `label` column to fill in.
    `name_files(chosen rows)` gives the `path` column written out (default: the rows' own `path`); it sees
    only the chosen rows, so it costs nothing per row of a large index.
    `spread`: `patients` (at most one image per patient while others remain; patients and near-duplicate
    groups as the benchmark's folds, `group_ids`) or `kmeans` (the best image of
    each of `budget` k-means clusters of the unlabelled vectors). `scorer(labelled mask, their labels)`
    replaces the dropout head `mc-dropout` and `esd` train (e.g. a checkpoint's head, `suggest_for_index`)."""
    if strategy not in (AUTO, *STRATEGIES):
        raise RetrieveError(f"--strategy {strategy}: choose one of {', '.join((AUTO, *STRATEGIES))}")
    if spread not in SPREADS:
        raise RetrieveError(f"--spread {spread}: choose one of {', '.join(SPREADS)}")
    if budget < 1:
        raise RetrieveError(f"--budget {budget}: must be at least 1")
    lab = rows["label"].astype("string") if "label" in rows else pd.Series(pd.NA, index=rows.index, dtype="string")
    labelled = lab.notna().to_numpy()
    pool = np.flatnonzero(~labelled)
    if not len(pool):
        raise RetrieveError("every image of the index has a label: nothing to suggest")
    if strategy == AUTO:
        strategy = "esd" if labelled.sum() >= 2 and lab[labelled].nunique() >= 2 else "random"
    if strategy == "random":
        score = np.random.default_rng(seed).random(len(pool))
    else:
        if labelled.sum() < 2 or lab[labelled].nunique() < 2:
            raise RetrieveError(f"--strategy {strategy} needs labelled images of at least two classes in the index")
        known = lab[labelled].to_numpy(dtype=str)
        if strategy == "entropy":
            score = vote_entropy(vectors, labelled, known, k, rows=pool)
        elif scorer is not None:
            score = scorer(labelled, known)[pool]
        else:
            score = dropout_scores(vectors, labelled, known, strategy, seed=seed, rows=pool)
    groups = group_ids(rows.iloc[pool]) if spread == "patients" else None
    best = pick_batch(score, budget, spread, groups, np.asarray(vectors)[pool] if spread == "kmeans" else None, seed)
    chosen = rows.iloc[pool[best]]
    if name_files is not None:
        chosen = chosen.assign(path=name_files(chosen))
    keep = [c for c in ("path", "frame_index", "patient_id") if c in rows]
    out = chosen[keep].reset_index(drop=True)
    out["score"] = np.round(score[best], 4)
    out["label"] = ""
    out.attrs["strategy"] = strategy  # what `auto` chose
    return out


def suggest_for_index(
    index_dir: str | Path,
    budget: int,
    strategy: str = AUTO,
    k: int = 10,
    seed: int = 0,
    spread: str = "none",
    head: str | Path | None = None,
    data_root: str | Path | None = None,
    passes: int = 20,
    progress: bool = False,
) -> pd.DataFrame:
    """`retrieve suggest-labels`: suggest_labels over an index's rows and vectors, each `path` relative to the
    index's data root (manifest_paths). With `head` (a checkpoint from `retrieve train` with a projection head;
    mc-dropout and esd), the dropout passes come from thinned copies of that head (head_dropout_scores) on the
    backbone features of the indexed images, computed again from the files, instead of from a head trained
    here. The index must be built with that checkpoint or with its backbone alone."""
    from indexer.index_dir import open_index_dir

    if head is not None and strategy == AUTO:
        strategy = "esd"
    if head is not None and strategy not in DROPOUT_STRATEGIES:
        raise RetrieveError(f"--head is for --strategy {' or '.join(DROPOUT_STRATEGIES)}, not {strategy}")
    idx = open_index_dir(index_dir, use_gpu=False)
    vs = idx.vectors
    scorer = None
    if head is not None:
        scorer = _checkpoint_scorer(idx, Path(head), data_root, passes, seed, progress, strategy)

    def name_files(chosen: pd.DataFrame) -> pd.Series:
        return manifest_paths(chosen, idx.manifest.data_root, f"--index {idx.path}")

    return suggest_labels(vs.rows, vs.vectors, budget, strategy, k, seed, spread, scorer, name_files)


def manifest_paths(rows: pd.DataFrame, data_root: str | None, where: str = "--index") -> pd.Series:
    """Each row's file as a path relative to the data root (POSIX separators): what a manifest in that folder,
    or `index build DATA --labels CSV`, takes. The stored `rel_path` where the row has one; a file outside
    the root gets a `../` path to it; a relative stored path stays as it is. Absolute paths are never given
    out (patients' data): an index that records no data root but stores absolute paths is a one-line error."""
    from retrieval.relocate import REL_PATH

    rel = rows[REL_PATH].astype("string") if REL_PATH in rows else pd.Series(pd.NA, index=rows.index, dtype="string")
    out = []
    for stored, path in zip(rel, rows["path"].astype(str)):
        if not pd.isna(stored):
            out.append(str(stored))
        elif not Path(path).is_absolute():
            out.append(Path(path).as_posix())
        elif data_root is None:
            raise RetrieveError(
                f"{where} stores absolute paths and no data root (built before relocatable indexes); rebuild it so "
                "that suggestions can name files relative to its data"
            )
        else:
            out.append(Path(os.path.relpath(path, data_root)).as_posix())
    return pd.Series(out, index=rows.index, dtype=object)


class BackboneFeatures(Encoder):
    """An encoder whose vectors are its backbone's features as they are (the input a projection head trained
    on), not normalised; its fingerprint is that of the backbone alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _checkpoint_scorer(
    idx: Any, head: Path, data_root: str | Path | None, passes: int, seed: int, progress: bool, strategy: str
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    from indexer.fingerprint import fingerprint_difference
    from retrieval.config import PreprocessConfig
    from retrieval.embed import embed_rows
    from retrieval.encoders.checkpoint import load_checkpoint, load_checkpoint_extras
    from retrieval.relocate import resolve_data_root, resolve_paths

    enc = load_checkpoint(head)
    if not enc.head_dims:
        raise RetrieveError(f"--head {head}: the checkpoint has no projection head (train one with head_dims)")

    arch = enc.arch
    backbone = BackboneFeatures(
        enc.backbone, enc.feature_dim, enc.base_arch, in_chans=enc.in_chans, mean=tuple(arch["mean"]),
        std=tuple(arch["std"]), default_preprocess=enc.default_preprocess, source=enc.source,
    )  # fmt: skip
    fp = idx.manifest.fingerprint
    pre = PreprocessConfig.from_dict(fp.get("preprocess") or {})
    differs = fingerprint_difference(fp, enc.fingerprint(pre, str(head)))
    if differs and fingerprint_difference(fp, backbone.fingerprint(pre, str(head))):
        raise RetrieveError(
            f"--head {head}: --index {idx.path} was built with encoder {fp.get('encoder')}, neither this checkpoint "
            f"nor its backbone ({differs})"
        )
    training = load_checkpoint_extras(head)[0].get("training") or {}
    temperature = float(training.get("temperature") or 0.1)

    def scorer(labelled: np.ndarray, known: np.ndarray) -> np.ndarray:
        rows = resolve_paths(idx.vectors.rows, resolve_data_root(idx, data_root))
        emb = embed_rows(rows, backbone, pre, progress=progress, desc="backbone features")
        if emb.skipped:
            raise RetrieveError(
                f"--head: {len(emb.skipped)} indexed image(s) could not be read again for their backbone features, "
                f"e.g. {emb.skipped[0].path}: {emb.skipped[0].reason} (--data-root names where the files are now)"
            )
        with one_thread():
            return head_dropout_scores(
                enc.head, torch.as_tensor(emb.vectors), labelled, known, passes, 0.5, temperature, seed, strategy
            )

    return scorer


# --- simulation on labelled data -------------------------------------------------------------------------


@dataclass
class SimulationSettings:
    """Start with `start_per_class` random labels per class of the pool; each round label `batch` more
    (default: 2% of the pool) for `rounds` rounds; repeat for each seed (a new held-out split and start)."""

    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2)
    start_per_class: int = 2
    rounds: int = 12
    batch: int | None = None
    test_folds: int = 5  # the held-out set is one fold of a grouped, stratified k-fold split
    k: int = 10  # kNN vote (entropy strategy)
    passes: int = 20  # MC-dropout passes
    head_steps: int = 150
    pca_dims: int | None = 128  # the head sits on a PCA of the features, fitted on the pool's clean views
    # where `mc-dropout` and `esd` get their passes: `head`, the round's head (trained on the augmented views;
    # runs 14-20b); `index`, `suggest-labels`' own scorer (dropout_scores) on the pool's unit clean vectors, as
    # an index stores them: a head of its own trained on the clean labelled vectors only
    acquire_from: str = "head"
    extra: dict[str, Any] = field(default_factory=dict)


def retrieval_scores(queries: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray) -> dict:
    """MAP, MRR and P@1 of cosine retrieval, relevant = same label (queries without a relevant item skipped)."""
    from retrieval.evaluation.metrics import average_precision, pessimistic_order, reciprocal_rank

    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sims = q @ g.T
    aps, rrs, p1 = [], [], []
    for i in range(len(q)):
        rel = g_labels == q_labels[i]
        if not rel.any():
            continue
        aps.append(average_precision(sims[i], rel))
        ranked = pessimistic_order(sims[i], rel)
        rrs.append(reciprocal_rank(ranked))
        p1.append(float(ranked[0]))
    return {"map": float(np.mean(aps)), "mrr": float(np.mean(rrs)), "p@1": float(np.mean(p1))}


def _reduce(features: torch.Tensor, pool: np.ndarray, dims: int | None, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Features (V, N, D) projected on the first `dims` principal axes of the pool's clean views (no labels
    read; a 10x smaller head, which is what makes the simulation fit a busy 2-core CPU), and their view 0."""
    feats = features if features.dim() == 3 else features.unsqueeze(0)
    if dims is not None and dims < feats.shape[2]:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(dims, len(pool)), random_state=seed).fit(feats[0, pool].numpy())
        flat = pca.transform(feats.reshape(-1, feats.shape[2]).numpy()).astype(np.float32)
        feats = torch.as_tensor(flat).reshape(feats.shape[0], feats.shape[1], -1)
    return feats, feats[0].numpy()


def _acquire(
    strategy: str,
    raw_clean: np.ndarray,
    clean: np.ndarray,
    pool: np.ndarray,
    labelled: np.ndarray,
    labels: np.ndarray,
    head: DropoutHead,
    settings: SimulationSettings,
    rng: np.random.Generator,
    seed: int,
) -> np.ndarray:
    """Scores of the unlabelled pool rows (higher: label sooner)."""
    rest = pool[~labelled[pool]]
    if strategy == "random":
        return rng.random(len(rest))
    if strategy == "entropy":
        sub = np.concatenate([pool[labelled[pool]], rest])
        mask = np.zeros(len(sub), bool)
        mask[: labelled[pool].sum()] = True
        return vote_entropy(raw_clean[sub], mask, labels[sub[mask]], settings.k)[~mask]
    if settings.acquire_from == "index":
        in_pool = labelled[pool]
        return dropout_scores(
            _unit(raw_clean[pool]), in_pool, labels[pool[in_pool]], strategy, settings.passes, seed,
            rows=np.flatnonzero(~in_pool), dims=settings.pca_dims, steps=settings.head_steps,
        )  # fmt: skip
    probs = mc_dropout_probs(head, torch.as_tensor(clean[rest]), settings.passes, seed)
    return dropout_acquisition(probs, strategy)


def simulate_active_learning(
    features: torch.Tensor,
    labels: np.ndarray,
    groups: np.ndarray,
    settings: SimulationSettings = SimulationSettings(),
) -> dict[str, Any]:
    """Label-efficiency curves on frozen features (V, N, D): view 0 the clean image, others augmented
    views the head trains on. Per seed: a held-out grouped fold (never labelled, never in the gallery);
    the rest is the pool. At each round a DropoutHead is trained on the labelled pool rows (the same
    head for every strategy, so only the choice of labels differs) and scored on the held-out fold:
    MAP, MRR and P@1 of its hidden-layer vectors against the whole pool as gallery (relevance from the
    ground truth, so the gallery is the same at every round), and the balanced accuracy of its
    predictions. Then the strategy picks the next `batch` unlabelled pool rows (`entropy+patients`: at
    most one per group of `groups`; `entropy+kmeans`: one per k-means cluster of the features as they
    are, the space of the kNN vote). A last point with every pool label shows the ceiling."""
    with one_thread():
        return _simulate(features, labels, groups, settings)


def _simulate(
    features: torch.Tensor, labels: np.ndarray, groups: np.ndarray, settings: SimulationSettings
) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold

    parsed = {s: parse_strategy(s) for s in settings.strategies}
    if settings.acquire_from not in ACQUIRE_FROM:
        raise RetrieveError(f"--acquire-from {settings.acquire_from}: choose one of {', '.join(ACQUIRE_FROM)}")
    labels = np.asarray(labels).astype(str)
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise RetrieveError("active-learning simulation needs labels of at least two classes")
    feats = features if features.dim() == 3 else features.unsqueeze(0)
    raw_clean = feats[0].numpy()  # the kNN vote of `entropy` runs on the features as they are
    curves: dict[str, list[list[dict[str, float]]]] = {s: [] for s in settings.strategies}
    ceiling: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def score(
        head: DropoutHead, clean: np.ndarray, pool: np.ndarray, test: np.ndarray, labelled: np.ndarray
    ) -> dict[str, float]:
        emb_test, emb_pool = head.embed(torch.as_tensor(clean[test])), head.embed(torch.as_tensor(clean[pool]))
        out = retrieval_scores(emb_test, labels[test], emb_pool, labels[pool])
        pred = head(torch.as_tensor(clean[test])).argmax(1).detach().numpy()
        with warnings.catch_warnings():  # a class predicted but absent from a small held-out fold is fine
            warnings.simplefilter("ignore", UserWarning)
            out["balanced_accuracy"] = float(balanced_accuracy_score(codes[test], pred))
        n_lab = int(labelled[pool].sum())
        out.update(labelled=n_lab, fraction=n_lab / len(pool))
        return out

    for seed in settings.seeds:
        split = StratifiedGroupKFold(n_splits=settings.test_folds, shuffle=True, random_state=seed)
        pool, test = next(split.split(np.zeros(len(labels)), labels, groups))
        feats, clean = _reduce(features, pool, settings.pca_dims, seed)
        batch = settings.batch or max(1, math.ceil(0.02 * len(pool)))
        rng = np.random.default_rng(seed)
        start = np.zeros(len(labels), bool)
        for c in range(len(classes)):
            members = pool[codes[pool] == c]
            start[rng.permutation(members)[: settings.start_per_class]] = True
        for strategy in settings.strategies:
            labelled = start.copy()
            srng = np.random.default_rng([seed, 1])
            points = []
            for r in range(settings.rounds + 1):
                lab = pool[labelled[pool]]
                head = train_dropout_head(
                    feats[:, lab], codes[lab], len(classes), seed=seed * 1000 + r, steps=settings.head_steps
                )
                points.append(score(head, clean, pool, test, labelled))
                rest = pool[~labelled[pool]]
                if r == settings.rounds or not len(rest):
                    break
                base, spread = parsed[strategy]
                gain = _acquire(base, raw_clean, clean, pool, labelled, labels, head, settings, srng, seed * 1000 + r)
                pick = pick_batch(gain, batch, spread, groups[rest], raw_clean[rest], seed * 1000 + r)
                labelled[rest[pick]] = True
            curves[strategy].append(points)
            log.info(
                "seed %d %s: MAP %.3f -> %.3f (%.0f s)",
                seed,
                strategy,
                points[0]["map"],
                points[-1]["map"],
                time.perf_counter() - t0,
            )
        everything = np.zeros(len(labels), bool)
        everything[pool] = True
        head = train_dropout_head(feats[:, pool], codes[pool], len(classes), seed=seed, steps=settings.head_steps)
        ceiling.append(score(head, clean, pool, test, everything))
    return {
        "settings": asdict(settings),
        "classes": classes.tolist(),
        "images": len(labels),
        "curves": curves,
        "all_labels": ceiling,
        "summary": summarise_curves(curves, ceiling),
        "seconds": round(time.perf_counter() - t0, 1),
    }


CURVE_KEYS = ("map", "mrr", "p@1", "balanced_accuracy")


def summarise_curves(curves: dict[str, list[list[dict]]], ceiling: list[dict]) -> dict[str, Any]:
    """Per strategy and round: mean and std over seeds of each metric and of the labelled fraction; the
    area under each mean curve (mean over rounds); and the same for the all-labels ceiling."""
    out: dict[str, Any] = {}
    for strategy, runs in curves.items():
        n = min(len(r) for r in runs)
        per_round = []
        for j in range(n):
            pts = [r[j] for r in runs]
            entry = {"fraction": float(np.mean([p["fraction"] for p in pts]))}
            for key in CURVE_KEYS:
                vals = np.array([p[key] for p in pts])
                entry[key] = float(vals.mean())
                entry[f"{key}_std"] = float(vals.std())
            per_round.append(entry)
        out[strategy] = {
            "rounds": per_round,
            "mean_over_rounds": {key: float(np.mean([e[key] for e in per_round])) for key in CURVE_KEYS},
        }
    out["all_labels"] = {key: float(np.mean([c[key] for c in ceiling])) for key in CURVE_KEYS}
    return out


def plot_curves(results: list[dict[str, Any]], path) -> None:
    """One row per dataset, MAP and balanced accuracy against the labelled fraction of the pool."""
    from indexer.atomic import atomic_path
    from retrieval.evaluation.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), dpi=110, squeeze=False)
    for row, res in zip(axes, results):
        for ax, key, name in zip(row, ("map", "balanced_accuracy"), ("MAP", "balanced accuracy")):
            for strategy, s in res["summary"].items():
                if strategy == "all_labels":
                    ax.axhline(s[key], color="grey", ls="--", lw=1, label="all pool labels")
                    continue
                x = [e["fraction"] for e in s["rounds"]]
                y = np.array([e[key] for e in s["rounds"]])
                sd = np.array([e[f"{key}_std"] for e in s["rounds"]])
                ax.plot(x, y, marker="o", ms=3, label=strategy)
                ax.fill_between(x, y - sd, y + sd, alpha=0.15)
            ax.set(xlabel="fraction of the pool labelled", ylabel=name, title=f"{res.get('dataset', '')}: {name}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
