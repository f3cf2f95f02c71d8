"""What the CLI writes besides results: one-line messages on stderr."""

from __future__ import annotations

import sys


def echo_err(msg: str) -> None:
    """One line on stderr, flushed at once (errors, notes, progress of long work)."""
    print(msg, file=sys.stderr, flush=True)
