"""`retrieve`: embed, index, query, evaluate, demo."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import typer

from retrieval.cli import options as opt
from retrieval.cli.clusters_cmd import clusters as clusters_command
from retrieval.cli.suggest_cmd import suggest_labels as suggest_labels_command
from retrieval.errors import RetrieveError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Content-based retrieval of similar liver and abdominal images.",
)
index_app = typer.Typer(no_args_is_help=True, help="Build, extend and inspect a FAISS index folder.")
app.add_typer(index_app, name="index")
app.command("clusters")(clusters_command)
app.command("suggest-labels")(suggest_labels_command)


def _echo_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command()
def embed(
    data: Path = typer.Argument(..., help="dataset folder (class sub-folders) or manifest CSV/Parquet"),
    out: Path = typer.Option(..., "--out", "-o", help="vectors Parquet file to write"),
    encoder: str = opt.Encoder,
    weights: str | None = opt.Weights,
    seed: int = opt.Seed,
    image_size: int | None = opt.ImageSize,
    crop_sector: bool | None = opt.CropSector,
    resize: str | None = opt.Resize,
    ct_window: str | None = opt.CtWindow,
    batch_size: int = opt.BatchSize,
    workers: int | None = opt.Workers,
    gpu: bool = opt.Gpu,
    quiet: bool = opt.Quiet,
):
    """Embed every image of DATA into a Parquet vectors file."""
    from indexer.store import write_vectors
    from retrieval.pipeline import embed_dataset, load_encoder, report_skipped

    if out.is_dir():
        raise RetrieveError(f"--out {out}: is a folder; give the path of a .parquet file to write")
    loaded = load_encoder(
        opt.encoder_spec(encoder, weights, seed), opt.preprocess_overrides(image_size, crop_sector, resize, ct_window)
    )
    t0 = time.perf_counter()
    vs, skipped = embed_dataset(data, loaded, batch_size, workers, gpu, not quiet)
    write_vectors(out, vs)
    report_skipped(skipped)
    print(
        f"embedded {len(vs)} images ({vs.dim}-d, {encoder}) in {time.perf_counter() - t0:.1f} s -> {out}"
        + (f"; skipped {len(skipped)}" if skipped else "")
    )


@index_app.command("build")
def index_build(
    data: Path | None = typer.Argument(None, help="dataset folder or manifest (omit with --vectors)"),
    index: Path = typer.Option(..., "--index", "-i", help="index folder to create"),
    vectors: Path | None = typer.Option(
        None, "--vectors", help="use vectors from `retrieve embed` instead of embedding DATA"
    ),
    kind: str = typer.Option("auto", "--kind", help="auto, flat, hnsw, ivf or ivfpq"),
    config: Path | None = typer.Option(None, "--config", help="YAML recipe (encoder, preprocess, index sections)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing index folder"),
    resume: bool = typer.Option(
        False, "--resume", help="continue an interrupted build, embedding only what is missing"
    ),
    encoder: str = opt.Encoder,
    weights: str | None = opt.Weights,
    seed: int = opt.Seed,
    image_size: int | None = opt.ImageSize,
    crop_sector: bool | None = opt.CropSector,
    resize: str | None = opt.Resize,
    ct_window: str | None = opt.CtWindow,
    batch_size: int = opt.BatchSize,
    workers: int | None = opt.Workers,
    gpu: bool = opt.Gpu,
    quiet: bool = opt.Quiet,
):
    """Embed DATA (or take --vectors) and build a FAISS index folder over cosine similarity."""
    from dataclasses import replace

    from indexer.faiss_index import INDEX_KINDS
    from indexer.index_dir import build_index_dir, check_can_build
    from indexer.store import read_vectors
    from retrieval.config import IndexConfig, load_recipe
    from retrieval.data.dataset import Skipped
    from retrieval.pipeline import build_index_streaming, load_encoder, report_skipped

    if kind != "auto" and kind not in INDEX_KINDS:
        raise RetrieveError(f"--kind {kind}: unknown; choose auto, {', '.join(INDEX_KINDS)}")
    index_cfg = IndexConfig(kind=kind, gpu=gpu)
    spec = opt.encoder_spec(encoder, weights, seed)
    pre = opt.preprocess_overrides(image_size, crop_sector, resize, ct_window)
    if config is not None:
        recipe = load_recipe(config)
        index_cfg = replace(
            recipe.index, kind=kind if kind != "auto" else recipe.index.kind, gpu=gpu and recipe.index.gpu
        )
        if encoder == opt.Encoder.default and weights is None:
            spec = recipe.encoder
        pre = {**recipe.preprocess.to_dict(), **{k: v for k, v in pre.items() if v is not None}}
        pre["ct_window"] = tuple(pre["ct_window"])
        batch_size = recipe.batch_size if batch_size == opt.BatchSize.default else batch_size
    t0 = time.perf_counter()
    if vectors is not None:
        if data is not None:
            raise RetrieveError("give either DATA or --vectors, not both")
        if resume:
            raise RetrieveError("--resume continues embedding DATA; it does not apply to --vectors")
        check_can_build(index, overwrite, data)
        manifest = build_index_dir(index, read_vectors(vectors), index_cfg, overwrite=overwrite)
        skipped: list[Skipped] = []
        resumed = 0
    else:
        if data is None:
            raise RetrieveError("missing DATA (a dataset folder or manifest) or --vectors FILE")
        if not resume:
            check_can_build(index, overwrite, data)  # before the expensive embedding
        loaded = load_encoder(spec, pre)
        manifest, skipped, resumed = build_index_streaming(
            data, loaded, index, index_cfg, batch_size, workers, gpu, not quiet, overwrite, resume
        )
    report_skipped(skipped)
    print(
        f"indexed {manifest.count} images ({manifest.dim}-d, {manifest.kind}, {manifest.params.get('built_on')}) "
        f"in {time.perf_counter() - t0:.1f} s -> {index}"
        + (f"; {resumed} of them embedded by the interrupted run" if resumed else "")
        + (f"; skipped {len(skipped)}" if skipped else "")
    )


@index_app.command("add")
def index_add(
    data: Path = typer.Argument(..., help="dataset folder or manifest with the new images"),
    index: Path = typer.Option(..., "--index", "-i"),
    batch_size: int = opt.BatchSize,
    workers: int | None = opt.Workers,
    gpu: bool = opt.Gpu,
    quiet: bool = opt.Quiet,
    replace: bool = typer.Option(False, "--replace", help="re-embed images already indexed and replace them"),
):
    """Append new images to an index with its own encoder, without a rebuild."""
    from indexer.index_dir import add_to_index_dir, read_manifest
    from retrieval.pipeline import embed_dataset, encoder_for_index, report_skipped

    m = read_manifest(index)
    loaded = encoder_for_index(m.fingerprint, m.encoder_spec, f"--index {index}")
    vs, skipped = embed_dataset(data, loaded, batch_size, workers, gpu, not quiet)
    manifest, added = add_to_index_dir(index, vs, replace=replace)
    report_skipped(skipped)
    print(
        f"added {added} images ({len(vs) - added} already indexed); index now holds {manifest.count}"
        + (f"; skipped {len(skipped)}" if skipped else "")
    )


@index_app.command("remove")
def index_remove(
    index: Path = typer.Option(..., "--index", "-i"),
    ids: list[str] = typer.Option([], "--id", help="an image id as listed in results (repeatable)"),
    paths: list[Path] = typer.Option([], "--path", help="an image file (repeatable; all its frames)"),
    patients: list[str] = typer.Option([], "--patient", help="every image of this patient (repeatable)"),
    where: list[str] = typer.Option([], "--where", help="every image with COLUMN=VALUE (repeatable: all must hold)"),
):
    """Remove images from an index without a rebuild (any kind); `index compact` reclaims the space."""
    import numpy as np

    from indexer.index_dir import remove_from_index_dir
    from indexer.search import candidate_mask, parse_where

    if not (ids or paths or patients or where):
        raise RetrieveError("say what to remove: --id, --path, --patient or --where")
    conditions = parse_where(where)
    wanted_paths = {str(p) for p in paths} | {str(p.expanduser().resolve()) for p in paths}

    def select(idx):
        for col, value in conditions:
            if col not in idx.columns:
                raise RetrieveError(
                    f"--where {col}={value}: unknown column '{col}' (columns: {', '.join(idx.columns)})"
                )
        cols = ["id", "path", "patient_id", *[c for c, _ in conditions]]
        rows = idx.read_columns([c for c in dict.fromkeys(cols) if c in idx.columns])
        mask = rows["id"].astype(str).isin(ids).to_numpy() | rows["path"].astype(str).isin(wanted_paths).to_numpy()
        if patients and "patient_id" in rows:
            mask |= rows["patient_id"].astype("string").isin(patients).fillna(False).to_numpy(dtype=bool)
        if conditions:
            matched = candidate_mask(rows, [], conditions)
            mask |= np.ones(len(rows), dtype=bool) if matched is None else matched
        return mask

    manifest, removed = remove_from_index_dir(index, select)
    later = " (HNSW: skipped by every search now, space reclaimed by `retrieve index compact`)"
    print(
        f"removed {removed} images; index now holds {manifest.count}"
        + (later if manifest.params.get("removal") == "tombstone" else "")
    )


@index_app.command("compact")
def index_compact(index: Path = typer.Option(..., "--index", "-i")):
    """Rewrite the shards without removed images and rebuild the FAISS index over the live ones."""
    from indexer.index_dir import compact_index_dir

    manifest, dropped = compact_index_dir(index)
    print(f"compacted: dropped {dropped} removed rows; {manifest.count} images in {len(manifest.shards)} shard(s)")


@index_app.command("info")
def index_info(index: Path = typer.Option(..., "--index", "-i"), as_json: bool = typer.Option(False, "--json")):
    """Print the index manifest and whether its files are intact (sizes; `index verify` checks content)."""
    from indexer.index_dir import file_problems, read_manifest

    m = read_manifest(index)
    problems = file_problems(Path(index), m)
    if as_json:
        print(json.dumps({**json.loads(m.to_json()), "problems": problems}, indent=2))
    else:
        fp = m.fingerprint
        weights = str(fp.get("weights_sha256", "?"))[:12]
        print(f"index:     {index}")
        print(f"images:    {m.count}  ({', '.join(f'{k} {v}' for k, v in m.labels.items())})")
        print(f"vectors:   {m.dim}-d, {m.metric}")
        print(f"kind:      {m.kind} {json.dumps(m.params)}")
        print(
            f"encoder:   {fp.get('encoder')} (weights sha256 {weights}), preprocess {json.dumps(fp.get('preprocess'))}"
        )
        print(f"created:   {m.created}   updated: {m.updated}   version {m.generation}")
        print("files:     " + ("DAMAGED: " + "; ".join(problems) if problems else "present, sizes as recorded"))
    if problems:
        raise typer.Exit(2)


@index_app.command("verify")
def index_verify(index: Path = typer.Option(..., "--index", "-i")):
    """Check everything: SHA-256 of every file against the manifest, both files load, counts and dims agree."""
    from indexer.index_dir import verify_index_dir

    problems = verify_index_dir(index)
    for p in problems:
        _echo_err(f"problem: {p}")
    if any(not p.startswith("no checksums") for p in problems):
        _echo_err(f"--index {index}: damaged ({len(problems)} problem(s)); rebuild it")
        raise typer.Exit(2)
    print(f"--index {index}: ok (checksums, sizes, counts and dimensions agree)")


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


@app.command()
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
        _echo_err(f"error: {e}")
    if results and results[0].matched is not None and results[0].matched < k:
        _echo_err(f"note: only {results[0].matched} indexed images match the filters, so fewer than {k} results")
    if as_json:
        payload = [r.to_dict() for r in results]
        print(json.dumps(payload[0] if len(images) == 1 and len(payload) == 1 else payload, indent=2))
    else:
        for j, r in enumerate(results):
            if j:
                print()
            _print_result_table(r)
    if errors:
        raise typer.Exit(2)


@app.command("eval")
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


@app.command()
def demo(
    out: Path = typer.Option(Path("retrieve-demo"), "--out", "-o", help="folder for the demo data, index and report"),
    encoder: str = opt.Encoder,
    weights: str | None = opt.Weights,
    image_size: int | None = opt.ImageSize,
    quiet: bool = opt.Quiet,
):
    """Generate synthetic liver ultrasound, index it, query it and evaluate it."""
    from retrieval.demo.run import run_demo

    run_demo(out, encoder, weights, image_size, progress=not quiet)


@app.command()
def train(
    data: Path = typer.Argument(..., help="dataset folder or manifest"),
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        help="siamese, siamese-l1, simclr, supcon, weak-simclr, supervised; label-free clustering: pica, lsd, "
        "scan; few labels (empty label = unlabelled): fixmatch",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="checkpoint to write (.safetensors + .json, plus .log.json and .loss.png)"
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML with training options (configs/train/*.yaml)"),
    encoder: str | None = typer.Option(
        None, "--encoder", "-e", help="backbone: cnn5, resnet18, imagenet-effnet-lite0, any timm name"
    ),
    weights: str | None = opt.Weights,
    epochs: int | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    image_size: int | None = typer.Option(None, "--image-size"),
    temperature: float | None = typer.Option(None, "--temperature"),
    beta: float | None = typer.Option(None, "--beta"),
    margin: float | None = typer.Option(None, "--margin"),
    seed: int | None = typer.Option(None, "--seed"),
    freeze_backbone: bool | None = typer.Option(
        None, "--freeze-backbone/--train-backbone", help="train only the head on cached features"
    ),
    balanced: bool | None = typer.Option(None, "--balanced/--unbalanced", help="class-balanced sampling"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    clusters: int | None = typer.Option(None, "--clusters", help="pica, lsd, scan: number of clusters K"),
    pairs: Path | None = typer.Option(None, "--pairs", help="CSV path_a,path_b,same (1 = similar) for siamese methods"),
    quiet: bool = opt.Quiet,
):
    """Train an encoder; the checkpoint loads straight into `embed` / `index build --encoder`."""
    import pandas as pd

    from retrieval.data.dataset import load_dataset
    from retrieval.encoders.checkpoint import save_checkpoint
    from retrieval.pipeline import report_skipped
    from retrieval.training.config import load_train_config
    from retrieval.training.trainer import train as run_training
    from retrieval.training.trainer import write_training_log

    overrides = dict(
        method=method,
        encoder=encoder,
        weights=weights,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        image_size=image_size,
        temperature=temperature,
        beta=beta,
        margin=margin,
        seed=seed,
        freeze_backbone=freeze_backbone,
        balanced=balanced,
        max_steps=max_steps,
        clusters=clusters,
    )
    cfg = load_train_config(config, overrides)
    table = load_dataset(data)
    pairs_table = None
    if pairs is not None:
        if cfg.method not in ("siamese", "siamese-l1"):
            raise RetrieveError(f"--pairs is for the siamese methods, not {cfg.method}")
        if not pairs.is_file():
            raise RetrieveError(f"--pairs {pairs}: file not found")
        pairs_table = pd.read_csv(pairs)
        base = pairs.resolve().parent
        for col in ("path_a", "path_b"):
            if col in pairs_table:
                pairs_table[col] = [
                    str((base / p).resolve()) if not Path(p).is_absolute() else p for p in pairs_table[col].astype(str)
                ]
    result = run_training(table.rows, cfg, pairs_table, progress=not quiet)
    extra_tensors = result.model.loss.extra_tensors()
    path = save_checkpoint(
        result.encoder,
        out,
        result.encoder.default_preprocess,
        extra={
            "training": cfg.to_dict(),
            "classes": result.classes,
            "trained_on": {"data": str(Path(data).resolve()), "images": result.log["n_images"]},
        },
        extra_tensors=extra_tensors,
    )
    log_path, png_path = write_training_log(result.log, path)
    report_skipped(table.skipped + result.skipped)
    losses = [s["loss"] for s in result.log["steps"]]
    print(
        f"trained {cfg.method} on {result.log['n_images']} images: "
        f"{len(losses)} steps in {result.log['seconds']:.1f} s, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if losses
        else "no steps were run"
    )
    print(f"checkpoint -> {path} (use it as --encoder {path}); log -> {log_path}, {png_path}")


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="image(s) to classify"),
    anchors: Path = typer.Option(
        ..., "--anchors", help="folder or manifest of labelled anchor images (a few per class)"
    ),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="a checkpoint from `retrieve train` (siamese-l1 gives the paper's scorer)"
    ),
    shots: int | None = typer.Option(None, "--shots", help="use at most N anchors per class"),
    as_json: bool = typer.Option(False, "--json"),
):
    """n-shot classification of IMAGE(s) against labelled anchors (paper 000)."""
    from retrieval.config import EncoderSpec
    from retrieval.pipeline import LoadedEncoder, embed_query_image
    from retrieval.training.classify import AnchorClassifier

    clf = AnchorClassifier(str(checkpoint), str(anchors), shots)
    loaded = LoadedEncoder(EncoderSpec(str(checkpoint)), clf.encoder, clf.encoder.default_preprocess, {})
    out: list[dict[str, Any]] = []
    failed = False
    for p in images:
        try:
            names, vecs = embed_query_image(p, loaded)
        except RetrieveError as exc:
            _echo_err(f"error: {exc}")
            failed = True
            continue
        for name, c in zip(names, clf.classify_vectors(vecs)):
            out.append({"image": name, "label": c.label, "scores": c.scores, "scorer": c.scorer})
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
            print(f"{r['image']}: {r['label']}  ({scores}; {r['scorer']})")
    if failed:
        raise typer.Exit(2)


def _yaml_value(text: str, where: str):
    """A command-line value read as YAML (numbers, booleans, lists, mappings); malformed YAML is a one-line error."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RetrieveError(
            f"{where}: not a valid YAML value ({getattr(exc, 'problem', None) or type(exc).__name__})"
        ) from None


@app.command()
def benchmark(
    data: list[Path] = typer.Argument(..., help="dataset folder(s) or manifest(s) with labels"),
    methods: str = typer.Option(
        "supcon,supervised,weak-simclr,siamese,siamese-l1,simclr", "--methods", help="comma-separated training methods"
    ),
    folds: int = typer.Option(5, "--folds", min=2),
    repeats: int = typer.Option(
        1,
        "--repeats",
        min=1,
        help="repeat the k-fold split with seeds SEED, SEED+1, ... (steadier means on small archives)",
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(
        Path("benchmark-results"), "--out", "-o", help="folder for benchmark.json and benchmark.md"
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="override every preset's epochs (quick runs)"),
    set_: list[str] = typer.Option(
        [], "--set", help="override a preset: KEY=VALUE for all methods, METHOD.KEY=VALUE for one (YAML values)"
    ),
    select: list[str] = typer.Option(
        [],
        "--select",
        help="KEY=V1,V2 or KEY=[V1, V2] (YAML list, for mappings): candidates chosen per fold on an inner "
        "validation split of the training folds",
    ),
    quiet: bool = opt.Quiet,
):
    """Grouped k-fold comparison of training methods against raw-pixel, random-init and ImageNet baselines."""
    from retrieval.training.benchmark import markdown_table, run_benchmark, write_outputs

    names = [m.strip() for m in methods.split(",") if m.strip()]
    overrides = {"epochs": epochs} if epochs else {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise RetrieveError(f"--set {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        overrides[key.strip()] = _yaml_value(value, f"--set {item}")
    candidates = {}
    for item in select:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise RetrieveError(f"--select {item!r}: expected KEY=VALUE1,VALUE2")
        if values.lstrip().startswith("["):  # a YAML list, whose items may hold commas ({zoom: [0.9, 1.1]})
            parsed = _yaml_value(values, f"--select {item}")
            if not isinstance(parsed, list) or not parsed:
                raise RetrieveError(f"--select {item!r}: expected a non-empty list of candidates")
            candidates[key.strip()] = parsed
        else:
            candidates[key.strip()] = [_yaml_value(v, f"--select {item}") for v in values.split(",")]
    results = []
    for d in data:
        r = run_benchmark(
            d,
            names,
            folds,
            seed,
            overrides=overrides,
            progress=not quiet,
            log=lambda m: _echo_err(m),
            select=candidates,
            repeats=repeats,
        )
        results.append(r)
        print(markdown_table(r))
    js, md = write_outputs(results, out)
    print(f"results -> {js}, {md}")


@app.command("ui")
def ui_cmd(
    index: Path | None = typer.Option(
        None, "--index", "-i", help="index folder (default: the demo index, built if missing)"
    ),
    port: int = typer.Option(8501, "--port", help="local port for the browser app"),
    demo_out: Path = typer.Option(Path("retrieve-demo"), "--demo-out", help="where the demo index lives"),
):
    """Open the similar-case browser (Streamlit) on an index."""
    from ui.launch import launch

    code = launch(index, port, demo_out)
    if code:
        raise typer.Exit(code)


@app.command("encoders")
def list_encoders_cmd():
    """List the named encoders (any timm model name also works)."""
    from retrieval.encoders.registry import list_encoders

    for name in list_encoders():
        print(name)
    print("(any timm model name, e.g. resnet18, resnet50, efficientnet_b0; or a checkpoint .safetensors)")


class _CliLogFormat(logging.Formatter):
    """Library log records as the CLI's own lines: 'warning: ...', 'note: ...'."""

    def format(self, record: logging.LogRecord) -> str:
        level = {"INFO": "note", "WARNING": "warning", "ERROR": "error"}.get(record.levelname, record.levelname.lower())
        return f"{level}: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (tests and the UI swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_CliLogFormat())
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings are folded into one line per file
    for ours in ("retrieval", "indexer", "ui"):  # our notes (logging.INFO) are for the user; others' stay quiet
        if logging.getLogger(ours).level == logging.NOTSET:
            logging.getLogger(ours).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and a non-zero exit instead of tracebacks."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is contacted unless the user asks for it
    _setup_logging()
    try:
        rv = app(args=argv, standalone_mode=False)  # click returns an Exit's code in this mode
        code = rv if isinstance(rv, int) else 0
    except RetrieveError as exc:
        _echo_err(f"error: {exc}")
        code = exc.exit_code
    except KeyboardInterrupt:
        _echo_err("interrupted")
        code = 130
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help text was already printed
            code = 0
        elif hasattr(exc, "show") and hasattr(exc, "exit_code"):  # usage errors (typer's click)
            exc.show()
            code = exc.exit_code
        elif type(exc).__name__ == "Abort":
            _echo_err("aborted")
            code = 130
        else:  # a bug: say so in one line; the traceback on request
            if os.environ.get("RETRIEVE_DEBUG"):
                traceback.print_exc()
            _echo_err(f"internal error: {type(exc).__name__}: {exc} (set RETRIEVE_DEBUG=1 for the traceback)")
            code = 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
