"""`retrieve train` and `retrieve classify`: parse, call retrieval.training, present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from retrieval.cli import options as opt
from retrieval.cli.output import echo_err
from retrieval.errors import RetrieveError


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
    preset: str | None = typer.Option(
        None, "--preset", help="a shipped training preset by name (e.g. lsd-cpu, lsd-cnn5-cpu); options override it"
    ),
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
    from indexer.atomic import check_writable
    from retrieval.encoders.checkpoint import checkpoint_paths
    from retrieval.pipeline import report_skipped
    from retrieval.training.config import load_train_config
    from retrieval.training.presets import preset_path
    from retrieval.training.run import train_to_checkpoint

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
    if preset is not None and config is not None:
        raise RetrieveError("--preset and --config: give one of them")
    cfg = load_train_config(preset_path(preset) if preset is not None else config, overrides)
    check_writable(checkpoint_paths(out)[0], "--out")
    done = train_to_checkpoint(data, cfg, out, pairs, progress=not quiet)
    report_skipped(done.skipped)
    losses = [s["loss"] for s in done.log["steps"]]
    print(
        f"trained {cfg.method} on {done.log['n_images']} images: "
        f"{len(losses)} steps in {done.log['seconds']:.1f} s, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if losses
        else "no steps were run"
    )
    print(
        f"checkpoint -> {done.checkpoint} (use it as --encoder {done.checkpoint}); "
        f"log -> {done.log_json}, {done.loss_png}"
    )


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

    if shots is not None and shots < 1:
        raise RetrieveError(f"--shots {shots}: must be at least 1 (leave it out to use every anchor)")
    clf = AnchorClassifier(str(checkpoint), str(anchors), shots)
    loaded = LoadedEncoder(EncoderSpec(str(checkpoint)), clf.encoder, clf.encoder.default_preprocess, {})
    out: list[dict[str, Any]] = []
    failed = False
    for p in images:
        try:
            names, vecs = embed_query_image(p, loaded)
        except RetrieveError as exc:
            echo_err(f"error: {exc}")
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
