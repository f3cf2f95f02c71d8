"""`retrieve clusters`: argument parsing only; the work is in retrieval.training.cluster_report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.errors import RetrieveError


def clusters(
    data: Path | None = typer.Argument(None, help="dataset folder or manifest (instead of --index)"),
    index: Path | None = typer.Option(None, "--index", "-i", help="index folder whose vectors to cluster"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="a checkpoint from `retrieve train --method pica|lsd|scan` (its cluster head)"
    ),
    n_clusters: int | None = typer.Option(
        None, "--clusters", help="without --checkpoint: k-means with this many clusters on the index's vectors"
    ),
    overcluster: bool = typer.Option(False, "--overcluster", help="use the checkpoint's over-clustering head"),
    dev: Path | None = typer.Option(
        None, "--dev", help="small labelled dev set: clusters are matched to its labels (paper 004, Algorithm 1)"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="folder for clusters.csv and a contact sheet per cluster"
    ),
    as_json: bool = typer.Option(False, "--json", help="print sizes, mapping and scores as JSON"),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = opt.Quiet,
):
    """Cluster an index (or dataset): sizes, cluster -> label matching with a dev set, NMI / ARI / F1."""
    from retrieval.training import cluster_report as cr

    if (checkpoint is None) == (n_clusters is None):
        raise RetrieveError("give either --checkpoint CKPT (a trained cluster head) or --clusters K (k-means)")
    if (data is None) == (index is None):
        raise RetrieveError("give either DATA or --index DIR")
    if n_clusters is not None and data is not None:
        raise RetrieveError("--clusters K clusters an index's vectors: give --index DIR")
    if dev is not None and checkpoint is None:
        raise RetrieveError("--dev needs --checkpoint (the dev images are embedded with its encoder)")
    head = "overcluster" if overcluster else "cluster"
    encoder = None
    if checkpoint is not None:
        from retrieval.encoders.checkpoint import load_checkpoint

        encoder = load_checkpoint(checkpoint)
    if index is not None:
        rows, vectors = _index_vectors(index, encoder)
    else:
        assert data is not None  # exactly one of DATA and --index, checked above
        rows, vectors = _embed(data, encoder, quiet)
    if checkpoint is not None:
        assign, prob = cr.assign_with_checkpoint(vectors, str(checkpoint), head)
        k, method = cr.load_cluster_head(str(checkpoint), head).clusters, f"checkpoint {checkpoint} ({head} head)"
    else:
        assert n_clusters is not None  # exactly one of --checkpoint and --clusters, checked above
        assign, prob = cr.assign_with_kmeans(vectors, n_clusters, seed)
        k, method = n_clusters, "k-means"
    dev_pair = None
    if dev is not None:
        dev_rows, dev_vectors = _embed(dev, encoder, quiet)
        dev_labels = dev_rows["label"].astype("string") if "label" in dev_rows else None
        if dev_labels is None or dev_labels.isna().all():
            raise RetrieveError(f"--dev {dev}: no labelled images")
        has = dev_labels.notna().to_numpy()
        dev_assign = cr.assign_with_checkpoint(dev_vectors[has], str(checkpoint), head)[0]
        dev_pair = (dev_assign, dev_labels[has].to_numpy(dtype=str))
    result = cr.score_clusters(rows, assign, prob, k, method, dev_pair)
    if out is not None:
        from indexer.atomic import atomic_path

        out.mkdir(parents=True, exist_ok=True)
        cols = [
            c
            for c in ("path", "frame_index", "label", "patient_id", "cluster", "cluster_probability")
            if c in result.rows
        ]
        with atomic_path(out / "clusters.csv") as tmp:
            result.rows[cols].to_csv(tmp, index=False)
        with atomic_path(out / "clusters.json") as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2))
        cr.contact_sheets(result, out)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n".join(cr.summary_lines(result)))
        if out is not None:
            print(f"assignments -> {out / 'clusters.csv'}; contact sheets -> {out}/cluster_*.png")


def _index_vectors(index: Path, encoder) -> tuple:
    """Rows and vectors of an index; with a checkpoint, the index must have been built with its encoder."""
    from indexer.index_dir import open_index_dir, read_manifest

    m = read_manifest(index)
    if encoder is not None and m.fingerprint.get("weights_sha256") != encoder.weights_sha256():
        raise RetrieveError(
            f"--index {index}: built with another encoder ({m.fingerprint.get('encoder')}); "
            "build it with --encoder CKPT to use that checkpoint's clusters"
        )
    vs = open_index_dir(index, use_gpu=False).vectors  # every live row of every shard
    return vs.rows, vs.vectors


def _embed(data: Path, encoder, quiet: bool) -> tuple:
    from retrieval.data.dataset import load_dataset
    from retrieval.embed import embed_rows
    from retrieval.pipeline import report_skipped

    table = load_dataset(data)
    emb = embed_rows(table.rows, encoder, encoder.default_preprocess, progress=not quiet)
    report_skipped(table.skipped + emb.skipped)
    return emb.rows, emb.vectors
