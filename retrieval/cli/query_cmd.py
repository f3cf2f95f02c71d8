"""`retrieve query`: parse, call retrieval.pipeline (or retrieval.batch for a folder), present."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.cli.output import echo_err
from retrieval.errors import RetrieveError


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None or value != value else str(value)  # None or NaN


def _print_result_table(res) -> None:
    print(f"query: {res.query}" + (f" (cases by {res.group_by})" if res.group_by else ""))
    if res.cases is not None:
        print(f"{'rank':>4}  {'similarity':>10}  {'images':>6}  {'label':<14} {'patient':<14} case / best image")
        for rank, (case, hit, row) in enumerate(zip(res.cases, res.hits, res.rows.to_dict("records")), start=1):
            label, pid = _cell(row, "label"), _cell(row, "patient_id")
            print(f"{rank:>4}  {hit.score:>10.4f}  {case.images:>6}  {label:<14} {pid:<14} {case.case}")
            print(f"{'':>4}  {'':>10}  {'':>6}  {'':<14} {'':<14} {row['path']}")
    else:
        print(f"{'rank':>4}  {'similarity':>10}  {'label':<14} {'patient':<14} path")
        for rank, (hit, row) in enumerate(zip(res.hits, res.rows.to_dict("records")), start=1):
            print(
                f"{rank:>4}  {hit.score:>10.4f}  {_cell(row, 'label'):<14} {_cell(row, 'patient_id'):<14} {row['path']}"
            )
    v = res.vote
    if v.label is None:
        print(f"vote: none ({v.note or 'no labelled neighbours'})")
    else:
        shares = ", ".join(f"{k} {w:.2f}" for k, w in v.votes.items())
        if v.labels is not None:  # multi-label: a set of classes
            print(f"vote: {v.label} (classes with at least half of the vote; shares: {shares})")
        else:
            print(f"vote: {v.label} ({v.confidence:.0%} of the votes; {shares})")


def query(
    images: list[Path] = typer.Argument(
        ..., help="query image file(s) (PNG, JPEG, BMP, TIFF, DICOM), or one folder or manifest of query images"
    ),
    index: Path = typer.Option(..., "--index", "-i"),
    k: int = typer.Option(10, "--k", "-k", help="number of similar images (or cases, with --group-by)"),
    exclude_patient: list[str] = typer.Option(
        [], "--exclude-patient", help="leave out this patient's images (repeatable)"
    ),
    where: list[str] = typer.Option(
        [],
        "--where",
        help="only candidates with COLUMN=VALUE (repeatable); on multi-label labels (a|b), label=liver keeps "
        "every image whose label names liver, label=kidney|liver those naming both, label==liver those labelled "
        "exactly liver; other columns: exact text",
    ),
    vote: str = typer.Option("majority", "--vote", help="majority or similarity (weighted)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    include_self: bool = typer.Option(
        False, "--include-self", help="keep the query image itself (same bytes) and its near-duplicates if indexed"
    ),
    group_by: str | None = typer.Option(
        None, "--group-by", help="answer with cases: study, series or patient (image hits aggregated)"
    ),
    agg: str = typer.Option("max", "--agg", help="a case's score from its images' similarities: max or mean"),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="where the indexed files are now (default: where the index recorded them)"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="write one row per query and rank, with the vote, to a .csv or .parquet file"
    ),
    encoder: str | None = typer.Option(
        None, "--encoder", "-e", help="refuse unless the index was built with this encoder"
    ),
    viewer_url: str | None = typer.Option(
        None,
        "--viewer-url",
        help="for an index built from DICOMweb: rebuild each hit's viewer link from this template "
        "({base} {origin} {study} {series} {instance}), instead of the one stored at indexing",
    ),
    weights: str | None = opt.Weights,
    seed: int = opt.Seed,
    batch_size: int = opt.BatchSize,
    workers: int | None = opt.Workers,
    gpu: bool = opt.Gpu,
    quiet: bool = opt.Quiet,
):
    """Find the indexed images (or cases) most similar to IMAGE(s), with a kNN vote on the label."""
    from indexer.atomic import check_writable
    from indexer.index_dir import open_index_dir, read_manifest
    from indexer.search import check_k, parse_where
    from retrieval.batch import OUT_SUFFIXES, is_query_source, query_source, results_table, write_results
    from retrieval.cases import case_column, check_aggregation
    from retrieval.config import EncoderSpec
    from retrieval.data.dicomweb import check_viewer_template
    from retrieval.pacs import relink_results
    from retrieval.pipeline import encoder_for_index, query_files, report_skipped
    from retrieval.results import result_json
    from retrieval.vote import VOTE_WEIGHTINGS

    opt.check_workers(workers)
    if vote not in VOTE_WEIGHTINGS:
        raise RetrieveError(f"--vote {vote}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    if group_by is not None:
        case_column(group_by)
    check_aggregation(agg)
    if out is not None:
        if out.suffix.lower() not in OUT_SUFFIXES:
            raise RetrieveError(f"--out {out}: give a .csv or .parquet file")
        if not out.parent.is_dir():
            raise RetrieveError(f"--out {out}: no folder {out.parent}")
        check_writable(out, "--out")
    conditions = parse_where(where)
    if viewer_url is not None:
        check_viewer_template(viewer_url)
    m = read_manifest(index)
    check_k(k, m.count)
    source = images[0] if len(images) == 1 and is_query_source(images[0]) else None
    if source is None and any(is_query_source(p) for p in images):
        raise RetrieveError("give one folder or manifest of query images, or image files, not both")
    requested = EncoderSpec(encoder, weights, seed) if encoder else None
    loaded = encoder_for_index(m.fingerprint, m.encoder_spec, f"--index {index}", requested)
    idx = open_index_dir(index, use_gpu=gpu)
    errors: list[str] = []
    query_labels = None
    if source is not None:
        answer = query_source(
            idx, loaded, source, k, exclude_patient, conditions, vote, include_self,
            group_by=group_by, agg=agg, data_root=data_root,
            batch_size=batch_size, workers=workers, use_gpu=gpu, progress=not quiet,
        )  # fmt: skip
        results, query_labels = answer.results, answer.query_labels
        report_skipped(answer.skipped)
    else:
        results, errors = query_files(
            idx, loaded, [str(p) for p in images], k, exclude_patient, conditions, vote, include_self,
            group_by=group_by, agg=agg, data_root=data_root,
        )  # fmt: skip
    if viewer_url is not None:
        relink_results(results, viewer_url)
    for e in errors:
        echo_err(f"error: {e}")
    if results and results[0].matched is not None and results[0].matched < k:
        echo_err(f"note: only {results[0].matched} indexed images match the filters, so fewer than {k} results")
    if out is not None:
        table = results_table(results, query_labels)
        write_results(table, out)
        print(f"{len(results)} queries, {len(table)} rows -> {out}")
    elif as_json:
        payload = [result_json(r, idx.search_device) for r in results]  # the JSON `retrieve serve` answers with
        print(
            json.dumps(payload[0] if len(images) == 1 and len(payload) == 1 and source is None else payload, indent=2)
        )
    else:
        for j, r in enumerate(results):
            if j:
                print()
            _print_result_table(r)
    if errors:
        raise typer.Exit(2)
