"""`retrieve`: the command table. Each command lives in its own `*_cmd.py` module, which only parses
arguments, calls library functions and presents their results; this module registers them and turns
errors into one-line messages and exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from retrieval.cli import (
    benchmark_cmd,
    clusters_cmd,
    demo_cmd,
    embed_cmd,
    encoders_cmd,
    eval_cmd,
    index_cmd,
    query_cmd,
    relocate_cmd,
    serve_cmd,
    suggest_cmd,
    train_cmd,
    tune_cmd,
    ui_cmd,
)
from retrieval.cli.logs import setup_logging
from retrieval.cli.output import echo_err
from retrieval.errors import RetrieveError, environment_error

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Content-based retrieval of similar liver and abdominal images.",
)
index_app = typer.Typer(no_args_is_help=True, help="Build, extend and inspect a FAISS index folder.")
app.add_typer(index_app, name="index")

# The command table, in the order `retrieve --help` lists it. A new command: its own module, one line here.
app.command("demo")(demo_cmd.demo)
app.command("embed")(embed_cmd.embed)
index_app.command("build")(index_cmd.index_build)
index_app.command("add")(index_cmd.index_add)
index_app.command("remove")(index_cmd.index_remove)
index_app.command("compact")(index_cmd.index_compact)
index_app.command("info")(index_cmd.index_info)
index_app.command("verify")(index_cmd.index_verify)
index_app.command("relocate")(relocate_cmd.index_relocate)
index_app.command("tune")(tune_cmd.index_tune)
app.command("query")(query_cmd.query)
app.command("serve")(serve_cmd.serve)
app.command("eval")(eval_cmd.evaluate_cmd)
app.command("train")(train_cmd.train)
app.command("classify")(train_cmd.classify)
app.command("benchmark")(benchmark_cmd.benchmark)
app.command("clusters")(clusters_cmd.clusters)
app.command("suggest-labels")(suggest_cmd.suggest_labels)
app.command("ui")(ui_cmd.ui_cmd)
app.command("encoders")(encoders_cmd.list_encoders_cmd)


def _internal_error(exc: BaseException) -> int:
    """A bug: say so in one line; the traceback on request."""
    if os.environ.get("RETRIEVE_DEBUG"):
        traceback.print_exc()
    echo_err(f"internal error: {type(exc).__name__}: {exc} (set RETRIEVE_DEBUG=1 for the traceback)")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and a non-zero exit instead of tracebacks."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is contacted unless the user asks for it
    setup_logging()
    try:
        rv = app(args=argv, standalone_mode=False)  # click returns an Exit's code in this mode
        code = rv if isinstance(rv, int) else 0
    except RetrieveError as exc:
        echo_err(f"error: {exc}")
        code = exc.exit_code
    except KeyboardInterrupt:
        echo_err("interrupted")
        code = 130
    except OSError as exc:  # the machine, not the tool: a read-only or full disk, no permission
        err = environment_error(exc)
        if err is None:
            code = _internal_error(exc)
        else:
            echo_err(f"error: {err}")
            code = err.exit_code
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help text was already printed
            code = 0
        elif hasattr(exc, "show") and hasattr(exc, "exit_code"):  # usage errors (typer's click)
            exc.show()
            code = exc.exit_code
        elif type(exc).__name__ == "Abort":
            echo_err("aborted")
            code = 130
        else:
            code = _internal_error(exc)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
