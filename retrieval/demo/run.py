"""`retrieve demo`: synthetic data -> index -> one query -> evaluation report, in one go."""

from __future__ import annotations

import json
import time
from pathlib import Path

from retrieval.config import EncoderSpec, IndexConfig
from retrieval.demo.synthetic import generate_demo_dataset


def run_demo(out: Path, encoder: str, weights: str | None, image_size: int | None, progress: bool = True) -> dict:
    from indexer.index_dir import build_index_dir, open_index_dir
    from retrieval.evaluation.evaluate import EvalSettings, evaluate
    from retrieval.evaluation.report import write_report
    from retrieval.pipeline import embed_dataset, load_encoder, query_files

    out = Path(out)
    t_start = time.perf_counter()
    data_dir, index_dir, report_dir = out / "data", out / "index", out / "report"
    manifest = data_dir / "labels.csv"
    if not manifest.is_file():
        print(
            f"[1/4] generating synthetic liver ultrasound (16 patients x 6 frames, steatosis grades 0-3) -> {data_dir}"
        )
        generate_demo_dataset(data_dir)
    else:
        print(f"[1/4] using the synthetic data already in {data_dir}")

    print(f"[2/4] embedding with {encoder} and building the index -> {index_dir}")
    t0 = time.perf_counter()
    loaded = load_encoder(EncoderSpec(encoder, weights), {"image_size": image_size, "crop_sector": True})
    vs, skipped = embed_dataset(manifest, loaded, progress=progress)
    m = build_index_dir(index_dir, vs, IndexConfig(), overwrite=True)
    print(f"      {m.count} images, {m.dim}-d vectors, {m.kind} index, {time.perf_counter() - t0:.1f} s")

    query_row = vs.rows.iloc[0]
    print(
        f"[3/4] query: {query_row['path']} (patient {query_row['patient_id']}, label {query_row['label']}), "
        "its own patient's images excluded"
    )
    idx = open_index_dir(index_dir)
    results, _ = query_files(idx, loaded, [query_row["path"]], k=5, exclude_patients=[query_row["patient_id"]])
    res = results[0]
    for rank, (hit, row) in enumerate(zip(res.hits, res.rows.to_dict("records")), start=1):
        print(f"      {rank}. {hit.score:.4f}  {row['label']:<9} {row['patient_id']}  {Path(row['path']).name}")
    print(f"      vote: {res.vote.label} ({res.vote.confidence:.0%})")

    print(f"[4/4] evaluating (leave-one-out, same patient excluded) -> {report_dir}")
    result = evaluate(vs.rows, vs.vectors, EvalSettings(), progress=progress)
    paths = write_report(result, vs.rows, vs.vectors, report_dir, "demo (synthetic liver US)", encoder)
    (report_dir / "eval.json").write_text(json.dumps(result, indent=2))
    o = result["overall"]
    print(
        f"      MAP {o['map']:.3f}  MRR {o['mrr']:.3f}  P@1 {o['p@1']:.3f}  kNN accuracy {o['knn_accuracy']:.3f}"
        f"  ({o['n_queries']} queries)"
    )
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s. Next:")
    print(f"  retrieve query {query_row['path']} --index {index_dir} --k 5 --exclude-patient {query_row['patient_id']}")
    print(f"  retrieve index info --index {index_dir}")
    print(f"  report: {paths['summary']}, {paths['pr_curve']}, {paths['embedding_map']}")
    return result
