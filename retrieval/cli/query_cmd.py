"""`retrieve query`: parse, call retrieval.pipeline, present."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.cli.output import echo_err
from retrieval.errors import RetrieveError


def _print_result_table(res) -> None:
    print(f"query: {res.query}")
    print(f"{'rank':>4}  {'similarity':>10}  {'label':<14} {'patient':<14} path")
    for rank, (hit, row) in enumerate(zip(res.hits, res.rows.to_dict("records")), start=1):
        label = "-" if row.get("label") is None or row.get("label") != row.get("label") else str(row["label"])
        pid = (
            "-"
            if row.get("patient_id") is None or row.get("patient_id") != row.get("patient_id")
            else str(row["patient_id"])
        )
        print(f"{rank:>4}  {hit.score:>10.4f}  {label:<14} {pid:<14} {row['path']}")
    v = res.vote
    if v.label is None:
        print("vote: no labelled neighbours")
    else:
        shares = ", ".join(f"{k} {w:.2f}" for k, w in v.votes.items())
        print(f"vote: {v.label} ({v.confidence:.0%} of the votes; {shares})")


def query(
    images: list[Path] = typer.Argument(..., help="query image file(s): PNG, JPEG, BMP, TIFF or DICOM"),
    index: Path = typer.Option(..., "--index", "-i"),
    k: int = typer.Option(10, "--k", "-k", help="number of similar cases"),
    exclude_patient: list[str] = typer.Option(
        [], "--exclude-patient", help="leave out this patient's images (repeatable)"
    ),
    where: list[str] = typer.Option([], "--where", help="only candidates with COLUMN=VALUE (repeatable)"),
    vote: str = typer.Option("majority", "--vote", help="majority or similarity (weighted)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    include_self: bool = typer.Option(
        False, "--include-self", help="keep the query image itself (same bytes) and its near-duplicates if indexed"
    ),
    encoder: str | None = typer.Option(
        None, "--encoder", "-e", help="refuse unless the index was built with this encoder"
    ),
    weights: str | None = opt.Weights,
    seed: int = opt.Seed,
    gpu: bool = opt.Gpu,
):
    """Find the indexed images most similar to IMAGE(s), with a kNN vote on the label."""
    from indexer.index_dir import open_index_dir, read_manifest
    from indexer.search import parse_where
    from retrieval.config import EncoderSpec
    from retrieval.pipeline import encoder_for_index, query_files
    from retrieval.results import result_json
    from retrieval.vote import VOTE_WEIGHTINGS

    if vote not in VOTE_WEIGHTINGS:
        raise RetrieveError(f"--vote {vote}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    conditions = parse_where(where)
    m = read_manifest(index)
    if k > m.count:
        raise RetrieveError(f"--k {k}: larger than the {m.count} images in the index")
    requested = EncoderSpec(encoder, weights, seed) if encoder else None
    loaded = encoder_for_index(m.fingerprint, m.encoder_spec, f"--index {index}", requested)
    idx = open_index_dir(index, use_gpu=gpu)
    results, errors = query_files(
        idx, loaded, [str(p) for p in images], k, exclude_patient, conditions, vote, include_self
    )
    for e in errors:
        echo_err(f"error: {e}")
    if results and results[0].matched is not None and results[0].matched < k:
        echo_err(f"note: only {results[0].matched} indexed images match the filters, so fewer than {k} results")
    if as_json:
        payload = [result_json(r) for r in results]  # the JSON `retrieve serve` answers with, too
        print(json.dumps(payload[0] if len(images) == 1 and len(payload) == 1 else payload, indent=2))
    else:
        for j, r in enumerate(results):
            if j:
                print()
            _print_result_table(r)
    if errors:
        raise typer.Exit(2)
