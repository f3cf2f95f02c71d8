"""Query results and index rows as JSON: the one shape shared by `retrieve query --json` and `retrieve serve`."""

from __future__ import annotations

from typing import Any

from indexer.privacy import is_person_name_column
from retrieval.pipeline import QueryResult, _jsonable

__all__ = ["is_person_name_column", "item_json", "query_payload", "result_json"]


def _without_names(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not is_person_name_column(k)}


def result_json(result: QueryResult, search_device: str | None = None) -> dict[str, Any]:
    """One query's answer: {"query", "results": [{rank, id, path, label, patient_id, score, ...}], "vote",
    and "search_device" (cpu, gpu:N) where given}."""
    out = result.to_dict()  # person-name columns are already left out there
    if search_device is not None:
        out["search_device"] = search_device
    return out


def query_payload(
    results: list[QueryResult], n_inputs: int, search_device: str | None = None
) -> dict[str, Any] | list[dict[str, Any]]:
    """What `retrieve query --json` prints: one object for one still image, else a list (one per frame/file)."""
    payload = [result_json(r, search_device) for r in results]
    return payload[0] if n_inputs == 1 and len(payload) == 1 else payload


def item_json(row: dict[str, Any]) -> dict[str, Any]:
    """An index row's metadata as JSON (no vector, no person names)."""
    core = {c: _jsonable(row.get(c)) for c in ("id", "path", "label", "patient_id")}
    extra = {str(k): _jsonable(v) for k, v in row.items() if k not in core and k != "vector"}
    return _without_names({**core, **extra})
