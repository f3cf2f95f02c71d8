"""`retrieve benchmark`: parse, call retrieval.training.benchmark, present."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.cli.output import echo_err
from retrieval.errors import RetrieveError


def _yaml_value(text: str, where: str):
    """A command-line value read as YAML (numbers, booleans, lists, mappings); malformed YAML is a one-line error."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RetrieveError(
            f"{where}: not a valid YAML value ({getattr(exc, 'problem', None) or type(exc).__name__})"
        ) from None


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
        "validation split of the training folds (by MAP; clustering methods by NMI + weighted F1)",
    ),
    quiet: bool = opt.Quiet,
):
    """Grouped k-fold comparison of training methods against raw-pixel, random-init and ImageNet baselines."""
    from retrieval.training.benchmark import run_benchmark
    from retrieval.training.benchmark_report import markdown_table, write_outputs

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
            log=lambda m: echo_err(m),
            select=candidates,
            repeats=repeats,
        )
        results.append(r)
        print(markdown_table(r))
    js, md = write_outputs(results, out)
    print(f"results -> {js}, {md}")
