"""Indexing from a PACS (Orthanc over DICOMweb) against indexing the same DICOM files from local disk.

Both in the same run, on the same generated archive (tests/dicomweb_fixture.py: patients, studies,
series, a multi-frame cine per 14 instances), with the same encoder, batch size and one process
(DataLoader workers 0 for both). Orthanc runs on loopback with the DICOMweb plug-in, so the figures
are the cost of the protocol (QIDO-RS search, WADO-RS fetch, multipart parsing, the temporary file),
not of a network.

python benchmarks/bench_pacs.py [--copies 10] [--size 256] [--encoders intensity-stats,imagenet-effnet-lite0]
                                [--image-size 224] [--batch-size 32] [--out benchmarks/results/pacs.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dicomweb_fixture import OrthancServer, archive_datasets, orthanc_missing, to_bytes, write_archive  # noqa: E402

from indexer.config import IndexConfig  # noqa: E402
from indexer.index_dir import open_index_dir  # noqa: E402
from retrieval.config import EncoderSpec  # noqa: E402
from retrieval.data.dicomweb import DicomWebSource, Filters, server_config  # noqa: E402
from retrieval.pacs import SyncOptions, sync_dicomweb  # noqa: E402
from retrieval.pipeline import build_index_streaming, load_encoder  # noqa: E402


def _local(folder: Path, index: Path, loaded: Any, batch_size: int) -> dict[str, Any]:
    t = time.perf_counter()
    manifest, skipped, _ = build_index_streaming(
        folder, loaded, index, IndexConfig(kind="flat"), batch_size, workers=0, use_gpu=False, progress=False
    )
    sec = time.perf_counter() - t
    return {"seconds": sec, "rows": manifest.count, "skipped": len(skipped)}


def _pacs(server: OrthancServer, index: Path, loaded: Any, batch_size: int) -> dict[str, Any]:
    with DicomWebSource(server_config(server.dicomweb, env={})) as src:
        fetch_seconds = 0.0
        original = src.fetch

        def timed(*args: Any, **kwargs: Any) -> bytes:
            nonlocal fetch_seconds
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                fetch_seconds += time.perf_counter() - t0

        src.fetch = timed  # type: ignore[method-assign]
        opts = SyncOptions(batch_size=batch_size, use_gpu=False)
        start = t = time.perf_counter()
        search_done = None
        result = None
        for ev in sync_dicomweb(
            src, Filters(), index, loaded, create=True, index_cfg=IndexConfig(kind="flat"), opts=opts
        ):
            if ev.stage == "searched":
                search_done = time.perf_counter()
            result = ev.result or result
        sec = time.perf_counter() - t
        assert result is not None and search_done is not None
        search_seconds = search_done - start
        t = time.perf_counter()
        again = None
        for ev in sync_dicomweb(src, Filters(), index, loaded, opts=opts):
            again = ev.result or again
        resync = time.perf_counter() - t
        assert again is not None and again.fetched == 0
    return {
        "seconds": sec,
        "search_seconds": search_seconds,
        "fetch_seconds": fetch_seconds,  # summed over the requests (several are in flight at once)
        "rows": result.rows,
        "instances": result.indexed,
        "skipped": len(result.skipped),
        "resync_seconds": resync,
    }


def _same_vectors(local: Path, pacs: Path) -> bool:
    """Every frame has the same vector whether read from a local file or fetched from the PACS."""
    a, b = open_index_dir(local, use_gpu=False).vectors, open_index_dir(pacs, use_gpu=False).vectors
    key_a = a.rows["id"].str.replace(".dcm", "", regex=False).tolist()
    order = {k: i for i, k in enumerate(b.rows["id"].tolist())}
    if sorted(key_a) != sorted(order):
        return False
    return bool(np.allclose(a.vectors, b.vectors[[order[k] for k in key_a]], atol=1e-5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10, help="copies of the 14-instance archive")
    ap.add_argument("--size", type=int, default=256, help="pixels per side of the generated images")
    ap.add_argument("--encoders", default="intensity-stats,imagenet-effnet-lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pacs.json")
    args = ap.parse_args()
    missing = orthanc_missing()
    if missing:
        sys.exit(f"error: {missing}")
    datasets = archive_datasets(size=args.size, copies=args.copies)
    instances = len(datasets)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "local"
        write_archive(folder, datasets)
        server = OrthancServer(tmp / "orthanc").start()
        try:
            t = time.perf_counter()
            for ds in datasets:
                server.upload(to_bytes(ds))
            upload = time.perf_counter() - t
            for enc in args.encoders.split(","):
                loaded = load_encoder(EncoderSpec(enc), {"image_size": args.image_size})
                local = _local(folder, tmp / f"local-{enc}", loaded, args.batch_size)
                pacs = _pacs(server, tmp / f"pacs-{enc}", loaded, args.batch_size)
                same = _same_vectors(tmp / f"local-{enc}", tmp / f"pacs-{enc}")
                results.append(
                    {
                        "encoder": enc,
                        "instances": instances,
                        "rows": local["rows"],
                        "local_seconds": round(local["seconds"], 3),
                        "local_instances_per_s": round(instances / local["seconds"], 1),
                        "pacs_seconds": round(pacs["seconds"], 3),
                        "pacs_instances_per_s": round(pacs["instances"] / pacs["seconds"], 1),
                        "pacs_vs_local": round(local["seconds"] / pacs["seconds"], 2),
                        "search_seconds": round(pacs["search_seconds"], 3),
                        "fetch_seconds": round(pacs["fetch_seconds"], 3),
                        "fetch_ms_per_request": round(1000 * pacs["fetch_seconds"] / instances, 1),
                        "resync_nothing_new_seconds": round(pacs["resync_seconds"], 3),
                        "pacs_rows": pacs["rows"],
                        "same_vectors": same,
                        "skipped": local["skipped"] + pacs["skipped"],
                    }
                )
                print(f"done: {enc}", file=sys.stderr)
        finally:
            server.stop()
    print(
        f"\n{instances} instances ({results[0]['rows'] if results else '?'} frames), {args.size} px, "
        f"upload to Orthanc {upload:.1f} s\n"
    )
    print(
        "| encoder | local: instances/s | PACS: instances/s | PACS / local | WADO-RS request, mean (ms) "
        "| re-sync, nothing new (s) | same vectors |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['encoder']} | {r['local_instances_per_s']} | {r['pacs_instances_per_s']} | {r['pacs_vs_local']} "
            f"| {r['fetch_ms_per_request']} | {r['resync_nothing_new_seconds']} | {r['same_vectors']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["python", "benchmarks/bench_pacs.py", *sys.argv[1:]]),
        "machine": platform.platform(),
        "upload_seconds": round(upload, 3),
    }
    args.out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
