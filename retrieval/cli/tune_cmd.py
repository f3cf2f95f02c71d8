"""`retrieve index tune`: parse, call indexer.tune, present."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def index_tune(
    index: Path = typer.Option(..., "--index", "-i", help="index folder to tune"),
    recall: float = typer.Option(0.95, "--recall", help="recall@k to reach against exact search"),
    sample: int = typer.Option(1000, "--sample", help="held-out vectors of the index used as queries"),
    k: int = typer.Option(10, "--k", help="neighbours the recall counts"),
    seed: int = typer.Option(0, "--seed", help="seed of the sample"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Pick the cheapest nprobe / efSearch (any ParameterSpace knob) reaching --recall; later queries use it."""
    from indexer.tune import tune_index_dir

    result = tune_index_dir(index, recall=recall, sample=sample, k=k, seed=seed)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"{'setting':<40} {'recall@' + str(k):>10} {'ms/query':>9}")
    for s in result.tried:
        mark = "  <- stored" if s is result.chosen else ""
        print(f"{s.name or '(exact, nothing to tune)':<40} {s.recall:>10.4f} {s.ms_per_query:>9.3f}{mark}")
    print(f"{'exact search (numpy, shard by shard)':<40} {1.0:>10.4f} {result.exact_ms_per_query:>9.3f}")
    chosen = result.chosen.name or "(exact)"
    if result.reached:
        print(
            f"stored {chosen}: recall@{k} {result.chosen.recall:.4f} >= {recall} on {result.queries} held-out "
            f"vectors, {result.chosen.ms_per_query:.3f} ms/query"
        )
    else:
        print(
            f"no setting reaches recall@{k} {recall}; stored the most accurate, {chosen}: "
            f"{result.chosen.recall:.4f}, {result.chosen.ms_per_query:.3f} ms/query"
        )
