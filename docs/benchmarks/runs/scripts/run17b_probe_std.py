"""Probe (inner splits only): LSD + k-means init on frozen features standardised with the inner-train rows'
mean and std (the projection MLP then sees centred inputs instead of a narrow cone)."""

import sys
from dataclasses import replace

import numpy as np
import torch

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.training import benchmark as B
from retrieval.training.cluster_eval import fold_cluster_scores
from retrieval.training.trainer import train

torch.set_num_threads(1)
data = sys.argv[1]
rows = load_dataset(data).rows
rows = rows[rows["label"].notna()].reset_index(drop=True)
labels = rows["label"].astype(str).to_numpy()
K = len(set(labels))
lsd = replace(B.resolve_method_config("lsd"), clusters=K, cluster_init="kmeans")
cands = {"lsd-cnn5-std+kmeans-init": replace(lsd, encoder="cnn5", image_size=64), "lsd-effnet-std+kmeans-init": lsd}
images = {s: B.load_image_tensors(rows, PreprocessConfig(image_size=s))[0] for s in (64, 224)}
fitter = B.FoldFitter(rows, images, torch.device("cpu"), 0, False, {}, "default")
out = {n: [] for n in cands}
for f, (tr, _te) in enumerate(B.make_folds(rows, 5, 0)):
    itr, iva = B.inner_split(rows, tr, f)
    for n, cfg in cands.items():
        cache = fitter.frozen_cache(cfg)
        mu, sd = cache[0, itr].mean(0), cache[0, itr].std(0) + 1e-6
        std = (cache - mu) / sd
        train_rows = rows.iloc[itr].reset_index(drop=True).drop(columns=["label"])
        res = train(train_rows, replace(cfg, seed=f), progress=False, features=std[:, itr])
        with torch.no_grad():
            assign = res.model.loss.cluster(res.encoder.head(std[0])).argmax(1).numpy()
        s = fold_cluster_scores(assign, labels, itr, iva)
        out[n].append((s["nmi"], s["weighted_f1"]))
        print(f"fold {f} {n}: inner NMI {s['nmi']:.3f} wF1 {s['weighted_f1']:.3f}", flush=True)
for n, v in out.items():
    print(n, "mean inner NMI {:.3f} wF1 {:.3f}".format(*tuple(np.mean(v, 0))))
