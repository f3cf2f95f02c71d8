"""k-means (K = classes) on the random CNN5-64 features the lsd variant starts from, plain (unit vectors) and
z-scored with the training folds' mean/std (then unit), on the benchmark's outer folds."""

import sys
from dataclasses import replace

import numpy as np
import torch

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.training import benchmark as B
from retrieval.training.cluster_eval import fold_cluster_scores, kmeans_assign

torch.set_num_threads(1)
rows = load_dataset(sys.argv[1]).rows
rows = rows[rows["label"].notna()].reset_index(drop=True)
labels = rows["label"].astype(str).to_numpy()
K = len(set(labels))
cfg = replace(B.resolve_method_config("lsd"), encoder="cnn5", image_size=64, clusters=K)
images = {64: B.load_image_tensors(rows, PreprocessConfig(image_size=64))[0]}
fitter = B.FoldFitter(rows, images, torch.device("cpu"), 0, False, {}, "default")
f0 = fitter.frozen_cache(cfg)[0].numpy()
out = {"kmeans-cnn5-64": [], "kmeans-cnn5-64-zscored": []}
for tr, te in B.make_folds(rows, 5, 0):
    z = (f0 - f0[tr].mean(0)) / (f0[tr].std(0) + 1e-6)
    for n, v in (("kmeans-cnn5-64", B._unit(f0)), ("kmeans-cnn5-64-zscored", B._unit(z))):
        s = fold_cluster_scores(kmeans_assign(v, tr, K, 0), labels, tr, te)
        out[n].append([s["nmi"], s["ari"], s["weighted_f1"], s["clusters_used"]])
for n, v in out.items():
    a = np.array(v)
    print(
        f"| {n} | "
        + " | ".join(f"{a[:, i].mean():.3f} ± {a[:, i].std():.3f}" for i in range(3))
        + f" | {a[:, 3].astype(int).tolist()} |"
    )
