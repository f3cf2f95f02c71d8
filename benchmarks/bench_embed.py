"""Embedding throughput (images/s) per device and encoder, on generated data, CPU as the baseline.

python benchmarks/bench_embed.py [--images 512] [--encoders imagenet-effnet-lite0,resnet50]
                                 [--image-size 224] [--batch-size 64] [--out benchmarks/results/embed.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.config import EncoderSpec  # noqa: E402
from retrieval.data.dataset import load_dataset  # noqa: E402
from retrieval.demo.synthetic import generate_demo_dataset  # noqa: E402
from retrieval.embed import embed_rows  # noqa: E402
from retrieval.pipeline import load_encoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--encoders", default="imagenet-effnet-lite0,resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embed.json")
    args = ap.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        frames = max(1, args.images // 16)
        generate_demo_dataset(tmp, n_per_grade=4, frames=frames, size=256)
        rows = load_dataset(tmp).rows
        for enc in args.encoders.split(","):
            loaded = load_encoder(EncoderSpec(enc), {"image_size": args.image_size})
            for dev in devices:
                embed_rows(
                    rows.iloc[: args.batch_size], loaded.encoder, loaded.preprocess, args.batch_size, 0, dev, False
                )  # warm-up
                t = time.perf_counter()
                out = embed_rows(rows, loaded.encoder, loaded.preprocess, args.batch_size, args.workers, dev, False)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                sec = time.perf_counter() - t
                results.append(
                    {
                        "encoder": enc,
                        "device": dev.type,
                        "images": len(out.rows),
                        "seconds": round(sec, 3),
                        "images_per_s": round(len(out.rows) / sec, 1),
                    }
                )
    base = {r["encoder"]: r["images_per_s"] for r in results if r["device"] == "cpu"}
    print("| encoder | device | images | seconds | images/s | vs CPU |")
    print("|---|---|---|---|---|---|")
    for r in results:
        r["speedup_vs_cpu"] = round(r["images_per_s"] / base[r["encoder"]], 2)
        print(
            f"| {r['encoder']} | {r['device']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | "
            f"{r['speedup_vs_cpu']:.2f}x |"
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
