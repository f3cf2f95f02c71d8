"""`suggest-labels` on a large generated index: time and peak memory of suggest_labels at N rows.

    OMP_NUM_THREADS=1 python benchmarks/suggest_scale.py 200000 256 5000 esd

N unit vectors of d dims around 50 centres, L of them labelled (two classes), a budget of 50 spread over k-means
clusters. The kNN vote before session 9 held an N x L float64 similarity matrix (8 GB at 200,000 x 5,000).
"""

import sys, time, resource, numpy as np, pandas as pd
from retrieval.training.active import suggest_labels
n, d, lab, strategy = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
centres = rng.normal(size=(50, d)).astype(np.float32)
which = rng.integers(0, 50, n)
v = centres[which] + rng.normal(size=(n, d)).astype(np.float32)
v /= np.linalg.norm(v, axis=1, keepdims=True)
labels = pd.array([None] * n, dtype="string")
idx = rng.choice(n, lab, replace=False)
labels[idx] = np.where(which[idx] % 2 == 0, "a", "b")
rows = pd.DataFrame({"path": [f"p{i}.png" for i in range(n)], "label": labels})
t = time.perf_counter()
out = suggest_labels(rows, v, 50, strategy, spread="kmeans")
print(f"{n} x {d}, {lab} labelled, {strategy}+kmeans: {time.perf_counter()-t:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB, {len(out)} picked ({out.attrs['strategy']})")
