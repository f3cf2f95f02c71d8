"""How library log records reach the user: one 'note:' / 'warning:' line each on stderr."""

from __future__ import annotations

import logging
import sys


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


def setup_logging() -> None:
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
