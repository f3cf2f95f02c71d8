"""`retrieve eval`: parse, call retrieval.evaluation, present."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrieval.cli import options as opt


def evaluate_cmd(
    index: Path = typer.Option(..., "--index", "-i"),
    json_out: Path | None = typer.Option(None, "--json", help="write the full results as JSON"),
    report: Path | None = typer.Option(
        None, "--report", help="folder for summary.md, pr_curve.png, confusion.png, embedding_map.png"
    ),
    k: int = typer.Option(10, "--k", "-k", help="neighbours in the kNN vote"),
    vote: str = typer.Option("majority", "--vote", help="majority or similarity"),
    exclude_same_patient: bool = typer.Option(True, "--exclude-same-patient/--include-same-patient"),
    exclude_near_dup: bool = typer.Option(True, "--exclude-near-dup/--include-near-dup"),
    quiet: bool = opt.Quiet,
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV of labels joined by path, sop_uid or accession (an index built without labels)"
    ),
    data_root: Path | None = typer.Option(None, "--data-root", help="where the indexed files are now"),
    multilabel: str = typer.Option(
        "auto",
        "--multilabel",
        help="auto: labels with '|' (liver|kidney) are class sets, relevant = sharing a class; on; off: each "
        "label is one class",
    ),
):
    """Leave-one-out retrieval quality of an index: MAP, MRR, P@k, MAP@R, kNN vote accuracy."""
    from indexer.atomic import atomic_path, check_writable
    from retrieval.evaluation.evaluate import EvalSettings
    from retrieval.evaluation.index_eval import evaluate_index
    from retrieval.evaluation.report import markdown_summary, write_report

    if json_out is not None:  # before the evaluation, not after it
        check_writable(json_out, "--json")
    if report is not None:
        check_writable(report, "--report", folder=True)
    ev = evaluate_index(
        index,
        EvalSettings(k, exclude_same_patient, exclude_near_dup, vote, multilabel),
        progress=not quiet,
        labels=labels,
        data_root=data_root,
    )
    result = ev.result
    print(markdown_summary(result, f"Retrieval evaluation of {index}", ev.encoder).split("\n![")[0].rstrip())
    trained = result.get("encoder_trained_on")
    if trained:
        print(
            f"\nnote: this encoder was trained on {trained['data']} ({trained['images']} images). If the index holds "
            "those images, these figures are in-sample and optimistic; `retrieve benchmark` measures held-out folds."
        )
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"\nresults -> {json_out}")
    if report is not None:
        paths = write_report(result, ev.rows, ev.vectors, report, f"{Path(index).name}", ev.encoder)
        print("report -> " + ", ".join(str(p) for p in paths.values()))
