"""The `retrieve` command line (typer)."""
