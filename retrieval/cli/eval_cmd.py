"""`retrieve eval`: parse, call retrieval.evaluation, present."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.errors import RetrieveError


def evaluate_cmd(
    index: Path = typer.Option(..., "--index", "-i"),
    json_out: Path | None = typer.Option(None, "--json", help="write the full results as JSON"),
    report: Path | None = typer.Option(None, "--report", help="folder for summary.md, pr_curve.png, embedding_map.png"),
    k: int = typer.Option(10, "--k", "-k", help="neighbours in the kNN vote"),
    vote: str = typer.Option("majority", "--vote", help="majority or similarity"),
    exclude_same_patient: bool = typer.Option(True, "--exclude-same-patient/--include-same-patient"),
    exclude_near_dup: bool = typer.Option(True, "--exclude-near-dup/--include-near-dup"),
    quiet: bool = opt.Quiet,
):
    """Leave-one-out retrieval quality of an index: MAP, MRR, P@k, MAP@R, kNN vote accuracy."""
    from indexer.index_dir import open_index_dir, read_manifest
    from retrieval.evaluation.evaluate import EvalSettings, evaluate
    from retrieval.evaluation.report import markdown_summary, write_report
    from retrieval.vote import VOTE_WEIGHTINGS

    if vote not in VOTE_WEIGHTINGS:
        raise RetrieveError(f"--vote {vote}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    if k < 1:
        raise RetrieveError(f"--k {k}: must be at least 1")
    m = read_manifest(index)
    vs = open_index_dir(index, use_gpu=False).vectors
    t0 = time.perf_counter()
    result = evaluate(
        vs.rows, vs.vectors, EvalSettings(k, exclude_same_patient, exclude_near_dup, vote), progress=not quiet
    )
    result["index"] = str(index)
    result["encoder"] = m.fingerprint.get("encoder")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(
        markdown_summary(result, f"Retrieval evaluation of {index}", str(m.fingerprint.get("encoder")))
        .split("\n![")[0]
        .rstrip()
    )
    trained = _trained_on(m.encoder_spec.get("name", ""))
    if trained:
        result["encoder_trained_on"] = trained
        print(
            f"\nnote: this encoder was trained on {trained['data']} ({trained['images']} images). If the index holds "
            "those images, these figures are in-sample and optimistic; `retrieve benchmark` measures held-out folds."
        )
    if json_out is not None:
        from indexer.atomic import atomic_path

        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"\nresults -> {json_out}")
    if report is not None:
        paths = write_report(
            result, vs.rows, vs.vectors, report, f"{Path(index).name}", str(m.fingerprint.get("encoder"))
        )
        print("report -> " + ", ".join(str(p) for p in paths.values()))


def _trained_on(encoder_name: str) -> dict | None:
    """What a checkpoint encoder was trained on (from its JSON), or None for other encoders."""
    from retrieval.encoders.checkpoint import checkpoint_paths

    if not encoder_name.endswith((".safetensors", ".json")):
        return None
    meta_path = checkpoint_paths(encoder_name)[1]
    try:
        return json.loads(meta_path.read_text()).get("trained_on")
    except (OSError, json.JSONDecodeError):
        return None
