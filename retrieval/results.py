"""Query results and index rows as JSON: the one shape shared by `retrieve query --json` and `retrieve serve`."""

from __future__ import annotations

import re
from typing import Any

from retrieval.pipeline import QueryResult, _jsonable

# Person-name columns a metadata CSV could carry: never shown (the engine itself never stores PatientName).
_NAME_KEYS = {
    "patientname",
    "patientsname",
    "otherpatientnames",
    "patientbirthname",
    "patientmothersbirthname",
    "referringphysicianname",
    "performingphysicianname",
    "operatorsname",
}


def is_person_name_column(column: str) -> bool:
    """True for a column that names a person (PatientName, patient_name, "Patient's Name", ...)."""
    return re.sub(r"[^a-z]", "", column.lower()) in _NAME_KEYS


def _without_names(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not is_person_name_column(k)}


def result_json(result: QueryResult, search_device: str | None = None) -> dict[str, Any]:
    """One query's answer: {"query", "results": [{rank, id, path, label, patient_id, score, ...}], "vote",
    and "search_device" (cpu, gpu:N) where given}."""
    out = result.to_dict()
    out["results"] = [_without_names(r) for r in out["results"]]
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
