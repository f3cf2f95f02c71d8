"""`retrieve ui`: the work is in ui.launch."""

from __future__ import annotations

from pathlib import Path

import typer


def ui_cmd(
    index: Path | None = typer.Option(
        None, "--index", "-i", help="index folder (default: the demo index, built if missing)"
    ),
    port: int = typer.Option(8501, "--port", help="local port for the browser app"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to listen on; beyond loopback only with --insecure-no-auth"
    ),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="listen beyond loopback although the browser cannot check a token"
    ),
    demo_out: Path = typer.Option(Path("retrieve-demo"), "--demo-out", help="where the demo index lives"),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="where the indexed files are now, if they moved without the index"
    ),
):
    """Open the similar-case browser (Streamlit) on an index."""
    from ui.launch import launch

    code = launch(index, port, demo_out, host, insecure_no_auth, data_root)
    if code:
        raise typer.Exit(code)
