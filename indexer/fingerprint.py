"""Encoder fingerprints: which vectors may share an index (same architecture, weights, dim, preprocessing)."""

from __future__ import annotations

from typing import Any

FINGERPRINT_KEYS = ("arch", "weights_sha256", "dim", "preprocess")


def fingerprint_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """None when two fingerprints are compatible, else a short description of the first difference."""
    for key in FINGERPRINT_KEYS:
        if a.get(key) != b.get(key):
            if key == "preprocess":
                pa, pb = a.get(key) or {}, b.get(key) or {}
                diffs = [f"{k} {pa.get(k)} vs {pb.get(k)}" for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
                return "preprocessing differs (" + "; ".join(diffs) + ")"
            if key == "weights_sha256":
                return "weights differ"
            return f"{key} differs ({a.get(key)} vs {b.get(key)})"
    return None
