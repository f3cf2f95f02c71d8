"""Training configuration as data: one dataclass, filled from YAML (configs/train/*.yaml) and CLI overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from retrieval.config import check_image_size, read_yaml_mapping, typed_fields
from retrieval.errors import RetrieveError
from retrieval.training.augment import AugmentConfig
from retrieval.training.losses import LOSSES

METHODS = tuple(LOSSES)
LABEL_FREE = tuple(name for name, loss in LOSSES.items() if not loss.needs_labels)
VECTORS_FROM = ("head", "backbone", "concat")


@dataclass
class TrainConfig:
    method: str = "supcon"
    encoder: str = "cnn5"  # any encoder registry name (cnn5, resnet18, imagenet-effnet-lite0, ...)
    weights: str | None = None
    seed: int = 0
    image_size: int = 64
    crop_sector: bool = False
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    temperature: float = 0.1  # NT-Xent / SupCon (paper 001: 0.1)
    margin: float = 1.0  # contrastive / siamese-l1
    beta: float = 0.5  # weak-SimCLR weight of the weak-label cross-entropy (paper 001: 0.5)
    head_dims: list[int] = field(default_factory=lambda: [256, 128])  # projection 512 -> 256 -> 128 (paper 001)
    freeze_backbone: bool = False  # train only the head on cached backbone features (CPU friendly)
    frozen_views: int = 4  # augmented views cached per image when the backbone is frozen
    balanced: bool = False  # class-balanced sampling
    augment_gain: bool = True  # random gain (brightness) in the views; off where brightness is the finding (steatosis)
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentConfig fields to change, e.g. {rotation_deg: 5}
    vectors_from: str = "head"  # "head": the projection is the vector; "backbone": f(x); "concat": both, weighted
    concat_weight: float = 0.5**0.5  # concat: [w * head, (1 - w^2)^0.5 * f(x)/|f(x)|], each part unit (0.5**0.5: equal)
    clusters: int = 10  # pica / lsd / scan: K, the softmax cluster head's size
    overclusters: int = 0  # an over-clustering head (K_over > K) trained jointly; 0: none
    cluster_weight: float = 2.0  # lambda, weight of the cluster-size term (paper 004: 2)
    dirichlet_alpha: float = 1.05  # lsd: alpha = 1 + eps of the symmetric Dirichlet (paper 004 leaves eps open)
    cluster_temperature: float = 0.1  # the cluster head's softmax(W v / T) on the unit vector
    neighbours: int = 20  # scan: mined nearest neighbours per image (SCAN: 20)
    entropy_weight: float = 5.0  # scan: weight of the entropy term (SCAN: 5)
    self_label_epochs: int = 0  # pica / lsd / scan: the last E of `epochs` are SCAN's self-labelling step
    self_label_threshold: float = 0.99  # self-labelling: confidence for a pseudo-label (SCAN: 0.99)
    cluster_init: str = "random"  # pica / lsd / scan: "kmeans" starts the cluster heads from k-means centres
    standardize_features: bool = False  # frozen backbone: train on z-scored features, folded into the head after
    fixmatch_threshold: float = 0.95  # fixmatch: tau, confidence for a pseudo-label (paper: 0.95)
    unlabelled_ratio: int = 7  # fixmatch: mu, unlabelled rows per labelled row in a step (paper: 7)
    unlabelled_weight: float = 1.0  # fixmatch: lambda_u (paper: 1)
    fixmatch_align: bool = False  # fixmatch: distribution alignment of the weak view's probabilities (ReMixMatch)
    fixmatch_thresholds: str = "fixed"  # fixmatch: "fixed" tau, or "flex" (FlexMatch's per-class curriculum)
    fixmatch_multilabel: str = "two-head"  # fixmatch on `a|b` labels: "one-head" (sigmoid) or "two-head" (paper 004)
    fixmatch_val_fraction: float = 0.2  # fixmatch on `a|b` labels: labelled share held out to pick class thresholds
    fixmatch_pseudo_groups: bool = False  # fixmatch: weak-view probabilities averaged over a patient's unlabelled rows
    fixmatch_propagation: str = "none"  # fixmatch: "agree": pseudo-label only where label propagation agrees
    label_fraction: float = 1.0  # benchmark only: keep this stratified fraction of the training labels
    max_steps: int | None = None  # stop early (tests, smoke runs)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RetrieveError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.vectors_from not in VECTORS_FROM:
            raise RetrieveError(f"vectors_from {self.vectors_from!r}: choose one of {', '.join(VECTORS_FROM)}")
        if not 0.0 <= self.concat_weight <= 1.0:
            raise RetrieveError(f"concat_weight {self.concat_weight}: must lie in [0, 1]")
        if not 0.0 <= self.beta <= 1.0:
            raise RetrieveError(f"--beta {self.beta}: must lie in [0, 1]")
        if self.epochs < 1 or self.batch_size < 2:
            raise RetrieveError("epochs must be >= 1 and batch_size >= 2")
        check_image_size(self.image_size)  # before the data are read, not when training starts
        if not self.lr >= 0:  # also NaN; torch's own ValueError came only once training started (0: no step)
            raise RetrieveError(f"--lr {self.lr}: the learning rate must be a number, 0 or more")
        if not self.weight_decay >= 0:
            raise RetrieveError(f"weight_decay {self.weight_decay}: must be 0 or more")
        if self.is_clustering and self.vectors_from != "head":
            raise RetrieveError(f"--method {self.method}: vectors_from must be head (the cluster head sits on it)")
        if self.fixmatch_thresholds not in ("fixed", "flex"):
            raise RetrieveError(f"fixmatch_thresholds {self.fixmatch_thresholds!r}: choose fixed or flex")
        if self.fixmatch_multilabel not in ("one-head", "two-head"):
            raise RetrieveError(f"fixmatch_multilabel {self.fixmatch_multilabel!r}: choose one-head or two-head")
        if self.fixmatch_propagation not in ("none", "agree"):
            raise RetrieveError(f"fixmatch_propagation {self.fixmatch_propagation!r}: choose none or agree")
        if not isinstance(self.fixmatch_pseudo_groups, bool):
            raise RetrieveError(f"fixmatch_pseudo_groups {self.fixmatch_pseudo_groups!r}: choose true or false")
        if not 0.0 < self.fixmatch_val_fraction < 1.0:
            raise RetrieveError(f"fixmatch_val_fraction {self.fixmatch_val_fraction}: must lie in (0, 1)")
        if not 0.0 < self.label_fraction <= 1.0:
            raise RetrieveError(f"label_fraction {self.label_fraction}: must lie in (0, 1]")
        if self.clusters < 2:
            raise RetrieveError(f"--clusters {self.clusters}: at least 2 clusters are needed")
        if self.overclusters and self.overclusters <= self.clusters:
            raise RetrieveError(f"overclusters {self.overclusters}: must exceed clusters ({self.clusters}), or be 0")
        if not 0 <= self.self_label_epochs < self.epochs:
            raise RetrieveError(f"self_label_epochs {self.self_label_epochs}: must lie in [0, epochs {self.epochs})")
        if not 0.0 < self.self_label_threshold < 1.0:
            raise RetrieveError(f"self_label_threshold {self.self_label_threshold}: must lie in (0, 1)")
        if self.standardize_features and not (self.freeze_backbone and self.head_dims):
            raise RetrieveError("standardize_features needs freeze_backbone and a projection head (head_dims)")
        if self.cluster_init not in ("random", "kmeans"):
            raise RetrieveError(f"cluster_init {self.cluster_init!r}: choose random or kmeans")
        if self.dirichlet_alpha < 1.0:
            raise RetrieveError(f"dirichlet_alpha {self.dirichlet_alpha}: must be at least 1 (1 + eps)")
        self.head_dims = [int(d) for d in self.head_dims]
        self.augment_config()  # unknown or malformed augmentation options fail here, not mid-training

    def augment_config(self) -> AugmentConfig:
        """The augmentations of the training views: AugmentConfig defaults, `augment` on top, gain off
        when augment_gain is false."""
        if not isinstance(self.augment, dict):
            raise RetrieveError(f"augment: expected a mapping of augmentation options, got {self.augment!r}")
        known = {f.name: f.default for f in fields(AugmentConfig)}
        unknown = set(self.augment) - set(known)
        if unknown:
            raise RetrieveError(f"augment: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        values = {}
        for key, value in self.augment.items():
            want_pair = isinstance(known[key], tuple)
            if want_pair and not (
                isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
            ):
                raise RetrieveError(f"augment.{key}: expected two numbers [low, high], got {value!r}")
            if not want_pair and not isinstance(value, (int, float)):
                raise RetrieveError(f"augment.{key}: expected a number, got {value!r}")
            values[key] = tuple(float(v) for v in value) if want_pair else float(value)
        aug = AugmentConfig(**values)  # type: ignore[arg-type]  # each value was checked against its field above
        return aug if self.augment_gain else replace(aug, gain=(1.0, 1.0))

    @property
    def needs_labels(self) -> bool:
        return self.method not in LABEL_FREE

    @property
    def is_clustering(self) -> bool:
        """A method that trains a softmax cluster head (pica, lsd, scan)."""
        from retrieval.training.losses.clustering import ClusterLoss

        return issubclass(LOSSES[self.method], ClusterLoss)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML keys are TrainConfig fields; overrides (from the command line) win."""
    raw: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    raw = typed_fields(TrainConfig, raw, f"--config {path}")  # `epochs: many` names file, key and type
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise RetrieveError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainConfig(**raw)
