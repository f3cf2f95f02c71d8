"""Which metadata columns name people: the one test every layer uses (ingest drops them, `where` refuses them,
results and the browser never show them).

A column's name is lowercased with everything but the letters a-z removed (`Patient's Name` -> patientsname,
`referring_physician` -> referringphysician). It names a person when it
- is one of PERSON_EXACT (`name`, `patient`, ...) or starts with `nameof` (NameOfPhysiciansReadingStudy);
- contains a word of a person's name (NAME_TOKENS: surname, firstname, patientname, ...);
- ends in `name`/`names` (reviewer_name, pt_name, VerifyingObserverName), unless what ends it is the name of a
  thing (THING_NAMES: file_name, series_name, institution_name, ...);
- ends in a person's role (ROLES, or its plural: referring_physician, reading_radiologist, operators), so that a
  column about a role's work stays (radiologist_birads, physician_diagnosis, operator_id).
When in doubt it errs on the side of a name: the warning at ingest names the dropped columns, so a column
dropped by mistake can be renamed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

PERSON_EXACT = ("name", "names", "patient", "person")  # `patient` alone may hold a name: erring on that side
NAME_TOKENS = (
    "patientname",  # PatientName, patient_name, OtherPatientNames
    "patientsname",  # Patient's Name
    "surname",
    "firstname",
    "lastname",
    "givenname",
    "familyname",
    "fullname",
    "middlename",
    "birthname",  # PatientBirthName, PatientMotherBirthName
    "maidenname",
    "nickname",
    "personname",
)
THING_NAMES = (
    "file", "series", "study", "protocol", "institution", "station", "organ", "bodypart", "model", "manufacturer",
    "device", "class", "label", "dataset", "site", "hospital", "department", "scanner", "probe", "sequence",
    "column", "image", "folder", "path", "host", "disease", "diagnosis", "finding", "structure", "region", "code",
    "software", "tag", "field", "variable", "drug", "procedure", "exam", "test", "center", "centre", "vendor",
    "instrument", "type", "group", "category", "organization", "organisation", "ward", "unit", "room", "view",
    "plane", "lesion", "tissue", "sample", "task", "project", "collection", "source", "format", "window",
)  # fmt: skip
ROLES = (
    "physician", "operator", "radiologist", "sonographer", "technologist", "technician", "doctor", "observer",
    "reviewer", "annotator", "reader", "nurse", "resident", "surgeon", "clinician", "author", "creator",
    "responsibleperson", "referrer", "requester",
)  # fmt: skip


def _normalised(column: object) -> str:
    return re.sub(r"[^a-z]", "", str(column).lower())


@functools.lru_cache(maxsize=4096)  # called per column of every answered row: a column name is parsed once
def is_person_name_column(column: object) -> bool:
    """True for a column that names a person (PatientName, surname, referring_physician, reviewer_name, ...);
    False for file_name, series_name, label, patient_id, radiologist_birads and the like."""
    key = _normalised(column)
    if key in PERSON_EXACT or key.startswith("nameof") or any(token in key for token in NAME_TOKENS):
        return True
    stem = key.removesuffix("s").removesuffix("name")
    if stem != key.removesuffix("s") and not stem.endswith(THING_NAMES):  # ends in name(s), not a thing's
        return True
    return key.endswith(ROLES) or key.removesuffix("s").endswith(ROLES)


def person_name_columns(columns: Iterable[object]) -> list[str]:
    """The person-name columns among `columns`, in their order."""
    return [str(c) for c in columns if is_person_name_column(c)]
