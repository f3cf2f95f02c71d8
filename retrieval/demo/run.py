"""`retrieve demo`: synthetic data -> index -> one query -> evaluation report, in one go."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from retrieval.config import EncoderSpec, IndexConfig
from retrieval.demo.synthetic import generate_demo_dataset

logger = logging.getLogger(__name__)


def run_demo(
    out: Path,
    encoder: str,
    weights: str | None,
    image_size: int | None,
    progress: bool = True,
    say: Callable[[str], None] = logger.info,
) -> dict:
    """Generate (or reuse) the synthetic data in OUT/data, index it, run one query, evaluate; `say` gets each
    step's line (the CLI prints them; library callers get log records). Returns the evaluation result."""
    from indexer.atomic import atomic_path
    from indexer.index_dir import build_index_dir, open_index_dir
    from retrieval.evaluation.evaluate import EvalSettings, evaluate
    from retrieval.evaluation.report import write_report
    from retrieval.pipeline import embed_dataset, load_encoder, query_files

    out = Path(out)
    t_start = time.perf_counter()
    data_dir, index_dir, report_dir = out / "data", out / "index", out / "report"
    manifest = data_dir / "labels.csv"
    if not manifest.is_file():
        say(f"[1/4] generating synthetic liver ultrasound (16 patients x 6 frames, steatosis grades 0-3) -> {data_dir}")
        generate_demo_dataset(data_dir)
    else:
        say(f"[1/4] using the synthetic data already in {data_dir}")

    say(f"[2/4] embedding with {encoder} and building the index -> {index_dir}")
    t0 = time.perf_counter()
    loaded = load_encoder(EncoderSpec(encoder, weights), {"image_size": image_size, "crop_sector": True})
    vs, skipped = embed_dataset(manifest, loaded, progress=progress)
    m = build_index_dir(index_dir, vs, IndexConfig(), overwrite=True)
    say(f"      {m.count} images, {m.dim}-d vectors, {m.kind} index, {time.perf_counter() - t0:.1f} s")

    query_row = vs.rows.iloc[0]
    say(
        f"[3/4] query: {query_row['path']} (patient {query_row['patient_id']}, label {query_row['label']}), "
        "its own patient's images excluded"
    )
    idx = open_index_dir(index_dir)
    results, _ = query_files(idx, loaded, [query_row["path"]], k=5, exclude_patients=[query_row["patient_id"]])
    res = results[0]
    for rank, (hit, row) in enumerate(zip(res.hits, res.rows.to_dict("records")), start=1):
        say(f"      {rank}. {hit.score:.4f}  {row['label']:<9} {row['patient_id']}  {Path(row['path']).name}")
    say(f"      vote: {res.vote.label} ({res.vote.confidence:.0%})")

    say(f"[4/4] evaluating (leave-one-out, same patient excluded) -> {report_dir}")
    result = evaluate(vs.rows, vs.vectors, EvalSettings(), progress=progress)
    paths = write_report(result, vs.rows, vs.vectors, report_dir, "demo (synthetic liver US)", encoder)
    with atomic_path(report_dir / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    o = result["overall"]
    say(
        f"      MAP {o['map']:.3f}  MRR {o['mrr']:.3f}  P@1 {o['p@1']:.3f}  kNN accuracy {o['knn_accuracy']:.3f}"
        f"  ({o['n_queries']} queries)"
    )
    say(f"done in {time.perf_counter() - t_start:.0f} s. Next:")
    say(f"  retrieve query {query_row['path']} --index {index_dir} --k 5 --exclude-patient {query_row['patient_id']}")
    say(f"  retrieve index info --index {index_dir}")
    say(f"  report: {paths['summary']}, {paths['pr_curve']}, {paths['embedding_map']}")
    return result
