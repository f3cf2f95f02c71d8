"""Patients' names never appear in output: which columns name people (indexer.privacy), and that `where`
refuses them without naming a value."""

import numpy as np
import pandas as pd
import pytest

from indexer.errors import RetrieveError
from indexer.privacy import is_person_name_column, person_name_columns
from indexer.search import candidate_mask, condition_mask
from retrieval.results import is_person_name_column as results_test
from retrieval.results import item_json

PERSON_NAME_COLUMNS = [
    "PatientName",
    "patient_name",
    "Patient's Name",
    "PATIENTS_NAME",
    "patient_full_name",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "Name of patient",
    "name",
    "Name",
    "surname",
    "patient_surname",
    "first_name",
    "FirstName",
    "last_name",
    "given_name",
    "family_name",
    "full_name",
    "middle_name",
    "maiden_name",
    "physician",
    "referring_physician",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "operator",
    "radiologist",
    "reading_radiologist",
    "sonographer",
    "doctor",
    "ResponsiblePerson",
    # ending in name(s) without being a thing's name, or a role at the end (session 9 review)
    "pt_name",
    "PatName",
    "subject_name",
    "reviewer_name",
    "annotator_name",
    "reader_name",
    "owner_name",
    "mother_name",
    "patient",
    "VerifyingObserverName",
    "ContentCreatorName",
    "operators",
]
ORDINARY_COLUMNS = [
    "file_name",
    "filename",
    "series_name",
    "study_name",
    "organ_name",
    "institution_name",
    "InstitutionName",
    "StationName",
    "ProtocolName",
    "class_name",
    "label",
    "patient_id",
    "PatientID",
    "accession",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesDescription",
    "modality",
    "frame_index",
    "near_dup_group",
    "content_sha256",
    "rel_path",
    "path",
    "id",
    # a column about a role's work, not the person (session 9 review)
    "radiologist_birads",
    "radiologist_assessment",
    "physician_diagnosis",
    "doctor_label",
    "technologist_notes",
    "operator_id",
    "sonographer_id",
    "probe_operator_mode",
    "file_names",
    "lesion_names",
    "view_name",
    "PatientAge",
    "BodyPartExamined",
]


@pytest.mark.parametrize("column", PERSON_NAME_COLUMNS)
def test_person_name_columns_are_recognised(column):
    assert is_person_name_column(column)
    assert results_test(column)  # retrieval.results uses the same test


@pytest.mark.parametrize("column", ORDINARY_COLUMNS)
def test_ordinary_columns_are_not_person_names(column):
    assert not is_person_name_column(column)


def test_person_name_columns_keeps_the_order():
    assert person_name_columns(["id", "surname", "label", "PatientName"]) == ["surname", "PatientName"]


def test_item_json_drops_every_person_name_column():
    row = {"id": "a.png", "path": "a.png", "label": "x", "patient_id": "P1", "surname": "DOE", "physician": "Smith"}
    out = item_json(row)
    assert "surname" not in out and "physician" not in out and out["patient_id"] == "P1"


ROWS = pd.DataFrame(
    {
        "label": ["a", "b", "a"],
        "patient_id": ["p1", "p2", "p3"],
        "PatientName": ["DOE^JOHN", "ROE^JANE", "POE^EDGAR"],
        "surname": ["DOE", "ROE", "POE"],
        "site": ["x", "y", "x"],
    }
)
NAMES = ("DOE", "ROE", "POE", "JOHN", "JANE", "EDGAR")


@pytest.mark.parametrize(
    "where",
    [
        [("PatientName", "DOE^JOHN")],  # a name in the index
        [("PatientName", "NOBODY")],  # a name not in it: the same answer, so a filter is no oracle
        [("PatientName", "=DOE^JOHN")],
        [("surname", "x")],
        [("site", "x"), ("surname", "DOE")],
        [("referring_physician", "x")],  # a column the index lacks: refused the same way
    ],
)
def test_where_on_a_person_name_column_is_refused_without_values(where):
    with pytest.raises(RetrieveError) as err:
        candidate_mask(ROWS, [], where)
    message = str(err.value)
    col = next(c for c, _ in where if is_person_name_column(c))
    assert "\n" not in message and col in message and "person names" in message
    assert not any(name in message for name in (*NAMES, "NOBODY")), message


def test_condition_mask_refuses_a_person_name_column():
    with pytest.raises(RetrieveError, match="person names"):
        condition_mask(ROWS["surname"], "surname", "x")


def test_where_errors_never_list_person_name_columns_or_their_values():
    with pytest.raises(RetrieveError) as err:
        candidate_mask(ROWS, [], [("colour", "red")])  # unknown column: the columns a filter may use
    message = str(err.value)
    assert "site" in message and "PatientName" not in message and "surname" not in message
    with pytest.raises(RetrieveError) as err:
        candidate_mask(ROWS, [], [("site", "zzz")])  # unknown value: the column's own values only
    assert "values in the index: x, y" in str(err.value)
    assert not any(name in str(err.value) for name in NAMES)
    assert np.flatnonzero(candidate_mask(ROWS, [], [("site", "x")])).tolist() == [0, 2]


def test_where_errors_never_list_file_paths():
    """A path can name a person's folder: an unknown id or path is refused without listing the index's."""
    rows = pd.DataFrame({"id": ["/archive/DOE_JOHN/a.png"], "path": ["/archive/DOE_JOHN/a.png"], "site": ["x"]})
    for col in ("id", "path"):
        with pytest.raises(RetrieveError) as err:
            candidate_mask(rows, [], [(col, "nope.png")])
        assert "DOE_JOHN" not in str(err.value) and "no indexed image has it" in str(err.value)


def test_query_results_drop_person_name_columns_an_older_index_holds():
    """QueryResult.to_dict (query --json/--out, clusters, the server) drops name columns a row still carries."""
    from indexer.search import Hit
    from retrieval.pipeline import QueryResult
    from retrieval.vote import no_label_vote

    rows = pd.DataFrame({"id": ["a"], "path": ["a.png"], "label": ["x"], "PatientName": ["DOE^JOHN"], "site": ["y"]})
    result = QueryResult("q.png", [Hit(0, 0.9)], rows, no_label_vote())
    got = result.to_dict()["results"][0]
    assert "PatientName" not in got and got["site"] == "y" and "DOE" not in str(result.to_dict())


# --- end to end: a manifest with names, indexed, queried by the CLI and the HTTP server -------------------


@pytest.fixture(scope="module")
def named_index(tmp_path_factory):
    """5 PNGs, a link to a file outside the data folder, and a manifest with PatientName, surname and physician
    columns, indexed with cnn5."""
    from conftest import write_png

    from retrieval.cli.main import main

    root = tmp_path_factory.mktemp("named")
    data = root / "data"
    rng = np.random.default_rng(0)
    names = ["DOE^JOHN", "ROE^JANE", "POE^EDGAR", "X^Y", "DOE^JOHN", "X^Y"]
    for j in range(5):
        write_png(data / f"img{j}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    secret = write_png(root / "outside" / "secret_DOE.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    (data / "link.png").symlink_to(secret)
    pd.DataFrame(
        {
            "path": [f"img{j}.png" for j in range(5)] + ["link.png"],
            "label": ["a", "b", "a", "b", "a", "b"],
            "patient_id": [f"P{j}" for j in range(6)],
            "PatientName": names,
            "surname": [n.split("^")[0] for n in names],
            "physician": ["Smith^Anna"] * 6,
            "site": ["x", "y", "x", "y", "x", "y"],
        }
    ).to_csv(data / "labels.csv", index=False)
    index = root / "index"
    build = ["index", "build", str(data), "--index", str(index), "--encoder", "cnn5", "--image-size", "64", "--quiet"]
    assert main(build) == 0
    return data, index


SECRETS = ("DOE", "ROE", "POE", "X^Y", "Smith", "outside", "PatientName", "surname", "physician")


def test_an_index_from_a_named_manifest_holds_no_name(named_index, capsys):
    from conftest import run_cli

    from indexer.index_dir import open_index_dir

    data, index = named_index
    idx = open_index_dir(index, use_gpu=False)
    assert not person_name_columns(idx.columns) and "site" in idx.columns
    code, out, _ = run_cli(capsys, "query", data / "img0.png", "--index", index, "--k", "6", "--json")
    assert code == 0 and not any(s in out for s in SECRETS), out
    code, _, err = run_cli(
        capsys, "query", data / "img0.png", "--index", index, "--k", "2", "--where", "PatientName=DOE^JOHN"
    )
    assert code != 0 and "PatientName" in err and "DOE" not in err


def test_the_server_answers_without_names(named_index):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app
    from retrieval.server.config import ServeConfig
    from retrieval.server.engine import load_engine

    data, index = named_index
    client = TestClient(create_app(load_engine(index, data, use_gpu=False), ServeConfig(index, data_root=data)))
    png = (data / "img1.png").read_bytes()
    answers = [
        client.post("/query", files={"file": ("q.png", png)}, data={"k": "6"}),
        client.get("/items/img0.png"),
        client.get("/items/link.png"),  # the link's own path, not its target outside the data root
    ]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert "link.png" in [x["id"] for x in answers[0].json()["results"]]
    assert client.get("/items/link.png/thumbnail").status_code == 403  # the target is still refused
    for where in ("PatientName=DOE^JOHN", "PatientName=NOBODY", "surname=x", "site=zzz", "path=x", "id=x"):
        r = client.post("/query", files={"file": ("q.png", png)}, data={"k": "2", "where": where})
        assert r.status_code == 400, r.text
        answers.append(r)
    for r in answers:
        assert not any(s in r.text for s in SECRETS if not s.startswith(("Patient", "surname"))), r.text
    assert "PatientName" not in answers[0].text and "surname" not in answers[1].text
