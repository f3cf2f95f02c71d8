"""Embedding pipeline speed over the bare forward pass, measured in the same run at the same batch size.

python benchmarks/bench_embed.py [--data ../shared/data/busi] [--images 256] [--encoder imagenet-effnet-lite0]
    [--image-size 224] [--batch-size 32] [--workers N] [--threads N] [--repeats 3] [--no-gpu]
    [--previous OLD_EMBED_PY] [--out benchmarks/results/embed.json]

Modes, interleaved within every repeat (the machine may be shared; the median over repeats is reported):
  bare-contiguous     the encoder's forward on pre-decoded tensors, NCHW, under torch.inference_mode
  bare-channels-last  the same with model and input in channels_last
  bare-bf16           (CUDA only) channels_last under bf16 autocast
  embed               what `retrieve embed` runs: embed_dataset (decode, preprocess, forward) + write_vectors
  index-build         what `retrieve index build` runs: build_index_streaming (content hashes, shards, FAISS)
  embed-previous      (with --previous FILE) `embed` with embed_rows taken from FILE, an earlier retrieval/embed.py
                      (git show REV:retrieval/embed.py > FILE): before and after in the same run
The ratio that matters (issue 12): pipeline images/s over the fastest bare images/s, paired per repeat.
CPU ms/img counts this process and its reaped worker processes (user + system): the work, whatever the load.
A profile pass (one process, no workers) splits one image's time into decode, preprocess, forward and write.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.config import IndexConfig  # noqa: E402
from indexer.store import VectorSet, write_vectors  # noqa: E402
from retrieval import pipeline  # noqa: E402
from retrieval.config import EncoderSpec  # noqa: E402
from retrieval.data.dataset import FrameDataset, load_dataset  # noqa: E402
from retrieval.data.imageio import read_frame  # noqa: E402
from retrieval.data.preprocess import preprocess_frame, to_tensor  # noqa: E402
from retrieval.embed import default_workers  # noqa: E402
from retrieval.pipeline import annotate_rows, build_index_streaming, embed_dataset, load_encoder  # noqa: E402

BARE = ("bare-contiguous", "bare-channels-last", "bare-bf16")
PIPELINES = ("embed", "index-build", "embed-previous")


def cpu_seconds() -> float:
    """User + system time of this process and of its children that have been reaped (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def subset_manifest(data: Path, n: int, folder: Path) -> Path:
    """The first n images of a dataset as a manifest with absolute paths (labels kept)."""
    table = load_dataset(data)
    rows = table.rows.iloc[:n]
    keep = [c for c in ("path", "label", "patient_id") if c in rows]
    out = folder / "manifest.csv"
    rows[keep].to_csv(out, index=False)
    return out


def bare_runner(
    encoder: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, mode: str
) -> Callable[[], int]:
    """A forward over every pre-decoded batch, in one memory layout / precision."""
    model = copy.deepcopy(encoder).to(device).eval()
    fmt = torch.contiguous_format if mode == "bare-contiguous" else torch.channels_last
    model = model.to(memory_format=fmt)
    on_device = [b.to(device).contiguous(memory_format=fmt) for b in batches]
    autocast = mode == "bare-bf16"

    def run() -> int:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            for b in on_device:
                model(b).float()
        sync(device)
        return sum(len(b) for b in batches)

    return run


def load_previous(path: Path) -> Callable[..., Any]:
    """embed_rows from an earlier copy of retrieval/embed.py."""
    spec = importlib.util.spec_from_file_location("previous_embed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.embed_rows


def pipeline_runner(
    mode: str, manifest: Path, loaded: Any, args: argparse.Namespace, gpu: bool, tmp: Path, last: dict[str, Any]
):
    counter = iter(range(1_000_000))
    previous = load_previous(args.previous) if mode == "embed-previous" else None

    def run() -> int:
        j = next(counter)
        if mode in ("embed", "embed-previous"):
            current = pipeline.embed_rows
            pipeline.embed_rows = previous or current
            try:
                vs, _ = embed_dataset(manifest, loaded, args.batch_size, args.workers, gpu, progress=False)
            finally:
                pipeline.embed_rows = current
            write_vectors(tmp / f"vectors{j}.parquet", vs)
            last[mode] = vs.vectors
            return len(vs)
        manifest_, _, _ = build_index_streaming(
            manifest, loaded, tmp / f"index{j}", IndexConfig(kind="flat"), args.batch_size, args.workers, gpu, False
        )
        return manifest_.count

    return run


def profile(rows: pd.DataFrame, loaded: Any, bare_fastest_s: float, tmp: Path) -> dict[str, float]:
    """One image's time per stage, serially in this process: decode, preprocess, forward, write."""
    pre = loaded.preprocess
    t_dec = t_pre = 0.0
    for path, frame in zip(rows["path"], rows["frame_index"]):
        t = time.perf_counter()
        img = read_frame(path, -1 if pd.isna(frame) else int(frame), pre.ct_window)
        t_dec += time.perf_counter() - t
        t = time.perf_counter()
        to_tensor(preprocess_frame(img, pre))
        t_pre += time.perf_counter() - t
    n = len(rows)
    vectors = torch.zeros(n, loaded.encoder.dim).numpy()
    t = time.perf_counter()
    annotated = annotate_rows(rows, vectors, loaded)  # content hash of every file
    write_vectors(tmp / "profile.parquet", VectorSet(annotated, vectors, loaded.fingerprint, loaded.spec.to_dict()))
    t_write = time.perf_counter() - t
    return {
        "decode_ms": 1000 * t_dec / n,
        "preprocess_ms": 1000 * t_pre / n,
        "forward_ms": 1000 * bare_fastest_s / n,
        "hash_and_write_ms": 1000 * t_write / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "busi")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--encoder", default="imagenet-effnet-lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the pipeline's own)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as torch/OMP_NUM_THREADS set)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default=",".join(BARE + PIPELINES))
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--previous", type=Path, default=None, help="an earlier retrieval/embed.py: adds embed-previous")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.no_gpu
    device = torch.device("cuda" if gpu else "cpu")
    modes = [m for m in args.modes.split(",") if m and (m != "bare-bf16" or gpu)]
    modes = [m for m in modes if m != "embed-previous" or args.previous is not None]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        manifest = subset_manifest(args.data, args.images, tmp)
        rows = load_dataset(manifest).rows
        loaded = load_encoder(EncoderSpec(args.encoder), {"image_size": args.image_size})
        ds = FrameDataset(rows, loaded.preprocess)
        tensors = [t for t, _, err in (ds[i] for i in range(len(ds))) if t is not None]
        batches = [torch.stack(tensors[i : i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
        runners: dict[str, Callable[[], int]] = {}
        last: dict[str, Any] = {}  # each pipeline's latest vectors
        for m in modes:
            if m in BARE:
                runners[m] = bare_runner(loaded.encoder, batches, device, m)
            else:
                runners[m] = pipeline_runner(m, manifest, loaded, args, gpu, tmp, last)
        for m, run in runners.items():  # warm-up: allocator, oneDNN primitives, file cache
            if m in BARE:
                run()
        runners["embed"]() if "embed" in runners else None
        times: dict[str, list[dict[str, float]]] = {m: [] for m in runners}
        for _ in range(args.repeats):
            for m, run in runners.items():
                c, t = cpu_seconds(), time.perf_counter()
                n = run()
                sec, cpu = time.perf_counter() - t, cpu_seconds() - c
                times[m].append({"images": n, "seconds": sec, "cpu_s": cpu})
        bare_modes = [m for m in runners if m in BARE]
        fastest = max(bare_modes, key=lambda m: statistics.median(r["images"] / r["seconds"] for r in times[m]))
        prof = profile(rows, loaded, statistics.median(r["seconds"] for r in times[fastest]), tmp)
    load_after = os.getloadavg()
    diff = None
    if "embed" in last and "embed-previous" in last:
        diff = float(abs(last["embed"] - last["embed-previous"]).max())
        print(f"largest |difference| of a vector component, embed vs embed-previous: {diff:.2e}")
    results = []
    for m, reps in times.items():
        rates = [r["images"] / r["seconds"] for r in reps]
        ratios = [r["images"] / r["seconds"] / (b["images"] / b["seconds"]) for r, b in zip(reps, times[fastest])]
        results.append(
            {
                "mode": m,
                "images": reps[0]["images"],
                "images_per_s": round(statistics.median(rates), 1),
                "images_per_s_all": [round(x, 1) for x in rates],
                "cpu_ms_per_image": round(1000 * statistics.median(r["cpu_s"] / r["images"] for r in reps), 1),
                "vs_fastest_bare": round(statistics.median(ratios), 3),
            }
        )
    print(f"| mode | images | images/s (median of {args.repeats}) | all repeats | CPU ms/img | vs {fastest} |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rates = ", ".join(f"{x:.1f}" for x in r["images_per_s_all"])
        print(
            f"| {r['mode']} | {r['images']} | {r['images_per_s']:.1f} | {rates} | {r['cpu_ms_per_image']:.1f} "
            f"| {r['vs_fastest_bare']:.2f} |"
        )
    print()
    print("| profile, one process (ms/img) | decode | preprocess | forward (" + fastest + ") | hash + Parquet write |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.encoder} | {prof['decode_ms']:.2f} | {prof['preprocess_ms']:.2f} | {prof['forward_ms']:.2f} "
        f"| {prof['hash_and_write_ms']:.2f} |"
    )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
        "workers": args.workers if args.workers is not None else default_workers(args.images),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "data": str(args.data),
        "encoder": args.encoder,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "fastest_bare": fastest,
        "max_abs_diff_vs_previous": diff,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    print(
        f"\nthreads {meta['threads']}, workers {meta['workers']}, cpus {meta['cpus']}, device {meta['device']}, "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results, "profile": prof}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
