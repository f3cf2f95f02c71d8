"""Which metadata columns name people: the one test every layer uses (ingest drops them, `where` refuses them,
results and the browser never show them).

A column names a person when its name, lowercased with everything but the letters a-z removed (`Patient's Name`
-> patientsname, `referring_physician` -> referringphysician), is exactly `name` or contains one of PERSON_TOKENS.
The tokens are whole words of a person's name or role, so ordinary columns stay: file_name, series_name,
study_name, organ_name, institution_name, label, patient_id, accession.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PERSON_TOKENS = (
    "patientname",  # PatientName, patient_name, OtherPatientNames
    "patientsname",  # Patient's Name
    "nameofpatient",
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
    "responsibleperson",
    "physician",  # ReferringPhysicianName, PerformingPhysicianName, NameOfPhysiciansReadingStudy
    "operator",  # OperatorsName
    "radiologist",
    "sonographer",
    "technologist",
    "doctor",
)
PERSON_EXACT = ("name",)


def _normalised(column: object) -> str:
    return re.sub(r"[^a-z]", "", str(column).lower())


def is_person_name_column(column: object) -> bool:
    """True for a column that names a person (PatientName, surname, referring_physician, "Patient's Name", ...);
    False for file_name, series_name, label, patient_id and the like."""
    key = _normalised(column)
    return key in PERSON_EXACT or any(token in key for token in PERSON_TOKENS)


def person_name_columns(columns: Iterable[object]) -> list[str]:
    """The person-name columns among `columns`, in their order."""
    return [str(c) for c in columns if is_person_name_column(c)]
