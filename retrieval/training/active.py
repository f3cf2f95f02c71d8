"""Active learning (paper 002, M9): which unlabelled images of an index would help most if a person
labelled them, and a simulation on labelled data that measures whether the choice helps.

Strategies: `entropy`, the entropy of the kNN vote among the labelled images (an image whose neighbours
disagree is one the index cannot place; needs no model); `mc-dropout`, BALD (Houlsby et al. 2011; Gal
et al. 2017) from T stochastic passes of a small classifier head trained on the labelled vectors with
its dropout kept on (the mutual information between the prediction and the head's weights: high where
the passes disagree); `random`, the baseline to beat. baal implements these acquisition functions too,
but it pulls in Jupyter and ~70 other packages; the formulas are a few lines here, tested against a
direct computation.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

STRATEGIES = ("entropy", "mc-dropout", "random")


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


def bald_scores(
    vectors: np.ndarray, labelled: np.ndarray, labels: np.ndarray, passes: int = 20, seed: int = 0
) -> np.ndarray:
    """BALD of every row from a dropout head trained on the labelled rows' vectors (seconds on a CPU)."""
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    with one_thread():
        head = train_dropout_head(x[torch.as_tensor(np.flatnonzero(labelled))], codes, len(classes), seed=seed)
        return mc_dropout_scores(mc_dropout_probs(head, x, passes, seed))[0]


def vote_entropy(vectors: np.ndarray, labelled: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Entropy (nats) of the majority vote of each row's k most similar labelled rows (cosine, itself
    excluded); `labelled` is a boolean mask and `labels` the labels of the rows it marks."""
    lab_idx = np.flatnonzero(labelled)
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = v @ v[lab_idx].T
    sims[lab_idx, np.arange(len(lab_idx))] = -np.inf  # a labelled row never votes for itself
    k = min(k, len(lab_idx))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    counts = np.zeros((len(v), len(classes)))
    np.add.at(counts, (np.repeat(np.arange(len(v)), k), codes[top].ravel()), 1.0)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def suggest_labels(
    rows: pd.DataFrame, vectors: np.ndarray, budget: int, strategy: str = "entropy", k: int = 10, seed: int = 0
) -> pd.DataFrame:
    """The `budget` unlabelled rows to label next, most useful first, with an empty `label` column to fill in."""
    if strategy not in STRATEGIES:
        raise RetrieveError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise RetrieveError(f"--budget {budget}: must be at least 1")
    lab = rows["label"].astype("string") if "label" in rows else pd.Series(pd.NA, index=rows.index, dtype="string")
    labelled = lab.notna().to_numpy()
    pool = np.flatnonzero(~labelled)
    if not len(pool):
        raise RetrieveError("every image of the index has a label: nothing to suggest")
    if strategy == "random":
        score = np.random.default_rng(seed).random(len(pool))
    else:
        if labelled.sum() < 2 or lab[labelled].nunique() < 2:
            raise RetrieveError(f"--strategy {strategy} needs labelled images of at least two classes in the index")
        known = lab[labelled].to_numpy(dtype=str)
        if strategy == "entropy":
            score = vote_entropy(vectors, labelled, known, k)[pool]
        else:
            score = bald_scores(vectors, labelled, known, seed=seed)[pool]
    best = np.argsort(-score, kind="stable")[:budget]
    keep = [c for c in ("id", "path", "frame_index", "patient_id") if c in rows]
    out = rows.iloc[pool[best]][keep].reset_index(drop=True)
    out["score"] = np.round(score[best], 4)
    out["label"] = ""
    return out


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
    probs = mc_dropout_probs(head, torch.as_tensor(clean[rest]), settings.passes, seed)
    return mc_dropout_scores(probs)[0]


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
    predictions. Then the strategy picks the next `batch` unlabelled pool rows. A last point with every
    pool label shows the ceiling."""
    with one_thread():
        return _simulate(features, labels, groups, settings)


def _simulate(
    features: torch.Tensor, labels: np.ndarray, groups: np.ndarray, settings: SimulationSettings
) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold

    for s in settings.strategies:
        if s not in STRATEGIES:
            raise RetrieveError(f"--strategies {s}: choose from {', '.join(STRATEGIES)}")
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
                gain = _acquire(
                    strategy, raw_clean, clean, pool, labelled, labels, head, settings, srng, seed * 1000 + r
                )
                labelled[rest[np.argsort(-gain, kind="stable")[:batch]]] = True
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
