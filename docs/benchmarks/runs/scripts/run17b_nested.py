"""Nested choice of clustering settings: per outer fold, every candidate trains on the inner-train part of the
training folds and is scored (NMI, weighted F1) on the inner validation part; the best candidate (mean of the
two) is retrained on the whole training folds and scored on the held-out fold. Held-out folds choose nothing."""

import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.training import benchmark as B
from retrieval.training.cluster_eval import fold_cluster_scores, kmeans_assign

torch.set_num_threads(1)
data, out = sys.argv[1], sys.argv[2]
names = sys.argv[3].split(",") if len(sys.argv) > 3 else None
t0 = time.perf_counter()
rows = load_dataset(data).rows
rows = rows[rows["label"].notna()].reset_index(drop=True)
labels = rows["label"].astype(str).to_numpy()
K = len(set(labels))
lsd, scan = (replace(B.resolve_method_config(m), clusters=K) for m in ("lsd", "scan"))
cnn = dict(encoder="cnn5", image_size=64)
sl = dict(epochs=80, self_label_epochs=20)
CANDS = {
    "lsd": lsd,
    "lsd+selflabel": replace(lsd, **sl),
    "lsd+kmeans-init": replace(lsd, cluster_init="kmeans"),
    "lsd+overcluster": replace(lsd, overclusters=3 * K),
    "scan+selflabel": replace(scan, **sl),
    "lsd-cnn5": replace(lsd, **cnn),
    "lsd-cnn5+selflabel": replace(lsd, **cnn, **sl),
    "lsd-cnn5+kmeans-init": replace(lsd, **cnn, cluster_init="kmeans"),
}
if names:
    CANDS = {k: v for k, v in CANDS.items() if k in names}
images = {s: B.load_image_tensors(rows, PreprocessConfig(image_size=s))[0] for s in (64, 224)}
fitter = B.FoldFitter(rows, images, torch.device("cpu"), 0, False, {}, "default")
inputs = {"raw-pixels": B.raw_pixel_vectors(images[224])}
for c in CANDS.values():
    inputs[f"{c.encoder}-{c.image_size}"] = B._unit(fitter.frozen_cache(c)[0].numpy())
print(f"features {time.perf_counter() - t0:.0f}s", flush=True)


def score(assign, fit, ev):
    s = fold_cluster_scores(assign, labels, fit, ev)
    return {k: s[k] for k in ("nmi", "ari", "weighted_f1", "clusters_used")}


res = {"candidates": list(CANDS), "folds": []}
for f, (tr, te) in enumerate(B.make_folds(rows, 5, 0)):
    itr, iva = B.inner_split(rows, tr, f)
    inner = {}
    for name, cfg in CANDS.items():
        inner[name] = score(fitter.fit_clusters(replace(cfg, seed=f), itr)[1], itr, iva)
    for name, vec in inputs.items():
        inner[f"kmeans-{name}"] = score(kmeans_assign(vec, itr, K, 0), itr, iva)
    best = max(CANDS, key=lambda n: inner[n]["nmi"] + inner[n]["weighted_f1"])
    outer = {}
    for name, cfg in CANDS.items():  # every candidate on the held-out fold, for the record (not for choosing)
        outer[name] = score(fitter.fit_clusters(replace(cfg, seed=f), tr)[1], tr, te)
    for name, vec in inputs.items():
        outer[f"kmeans-{name}"] = score(kmeans_assign(vec, tr, K, 0), tr, te)
    outer["nested-choice"] = dict(outer[best], chose=best)
    res["folds"].append({"inner": inner, "outer": outer, "chose": best})
    print(
        f"fold {f}: chose {best}; "
        + ", ".join(f"{n} {inner[n]['nmi']:.3f}/{inner[n]['weighted_f1']:.3f}" for n in inner),
        flush=True,
    )
summary = {}
for n in res["folds"][0]["outer"]:
    summary[n] = {
        k: (
            float(np.mean([fo["outer"][n][k] for fo in res["folds"]])),
            float(np.std([fo["outer"][n][k] for fo in res["folds"]])),
        )
        for k in ("nmi", "ari", "weighted_f1")
    }
res["summary_outer"] = summary
res["wall_s"] = round(time.perf_counter() - t0, 1)
json.dump(res, open(out, "w"), indent=1)
for n, s in summary.items():
    print(f"| {n} | " + " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("nmi", "ari", "weighted_f1")) + " |")
print("chosen:", [fo["chose"] for fo in res["folds"]], "wall", res["wall_s"])
