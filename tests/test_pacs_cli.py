"""The command line around a PACS: `query --viewer-url`, `serve`'s PACS flags and `embed --dicomweb`.

The PACS is a real Orthanc server on loopback (tests/dicomweb_fixture.py); the tests that need it skip,
saying why, where Orthanc is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, assert_one_line_error, run_cli
from dicomweb_fixture import archive_datasets, orthanc_missing, to_bytes, write_archive

from retrieval.data.dicomweb import PASSWORD_ENV, USER_ENV
from retrieval.pipeline import QueryResult
from retrieval.vote import Vote

MISSING = orthanc_missing()
needs_orthanc = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
USER, PASSWORD = "carol", "pw-Cli-5q"
TEMPLATE = "https://viewer.example/v?s={study}&se={series}&i={instance}"


def test_relink_results_rebuilds_links_of_remote_rows_only() -> None:
    from retrieval.pacs import relink_results

    rows = pd.DataFrame(
        {
            "id": ["a", "b"],
            "path": ["dicomweb://x", "local/b.png"],
            "source_url": ["https://pacs.example/dicom-web", None],
            "study_uid": ["1.2", None],
            "series_uid": ["1.2.3", None],
            "sop_uid": ["1.2.3.4", None],
            "viewer_url": ["https://old.example/1.2", None],
        }
    )
    res = QueryResult("q", [], rows, Vote(None, 0.0))
    relink_results([res], TEMPLATE)
    assert res.rows["viewer_url"][0] == "https://viewer.example/v?s=1.2&se=1.2.3&i=1.2.3.4"
    assert pd.isna(res.rows["viewer_url"][1])  # a local file has no viewer link
    assert rows["viewer_url"][0] == "https://old.example/1.2"  # the caller's frame is not changed
    local = QueryResult("q", [], pd.DataFrame({"id": ["c"], "path": ["c.png"]}), Vote(None, 0.0))
    relink_results([local], TEMPLATE)
    assert "viewer_url" not in local.rows.columns


def _served_config(monkeypatch, capsys, index: Path, *extra: str):
    """Run `retrieve serve` up to the server's start; returns (exit code, its ServeConfig or None, stderr)."""
    import retrieval.server.run as run

    seen = []
    monkeypatch.setattr(run, "serve", seen.append)
    code, _, err = run_cli(capsys, "serve", "--index", index, *extra)
    return code, (seen[0] if seen else None), err


def test_serve_pacs_flags_reach_the_config(tmp_path: Path, monkeypatch, capsys) -> None:
    from retrieval.server.config import PacsSettings

    code, cfg, err = _served_config(monkeypatch, capsys, tmp_path / "idx")
    assert code == 0, err
    assert cfg.pacs == PacsSettings()  # no flag: the defaults
    thumbs = tmp_path / "thumbs"
    code, cfg, err = _served_config(
        monkeypatch, capsys, tmp_path / "idx",
        "--pacs-timeout", "2.5", "--pacs-retries", "0", "--thumbnail-cache", thumbs,
        "--thumbnail-cache-mb", "3", "--viewer-url", TEMPLATE,
    )  # fmt: skip
    assert code == 0, err
    assert cfg.pacs == PacsSettings(
        timeout=2.5, retries=0, thumbnail_cache=thumbs, thumbnail_cache_bytes=3 << 20, viewer_template=TEMPLATE
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--viewer-url", "https://v.example/{study}/{nope}"], "--viewer-url"),
        (["--pacs-timeout", "0"], "--pacs-timeout"),
        (["--thumbnail-cache-mb", "-1"], "--thumbnail-cache-mb"),
    ],
)
def test_serve_bad_pacs_flags_are_one_line_errors(tmp_path: Path, monkeypatch, capsys, extra, needle) -> None:
    code, cfg, err = _served_config(monkeypatch, capsys, tmp_path / "idx", *extra)
    assert code == 2 and cfg is None
    assert_one_line_error(err, needle)


def test_serve_thumbnail_cache_that_is_a_file_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "f").write_text("x")
    code, cfg, err = _served_config(monkeypatch, capsys, tmp_path / "idx", "--thumbnail-cache", tmp_path / "f")
    assert code == 2 and cfg is None
    assert_one_line_error(err, "--thumbnail-cache")


# --- against Orthanc ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with the generated archive, and an index built from it with `index build --dicomweb`."""
    from _pytest.monkeypatch import MonkeyPatch
    from dicomweb_fixture import OrthancServer

    from retrieval.cli.main import main

    if MISSING:
        pytest.skip(MISSING)
    root = tmp_path_factory.mktemp("pacs-cli")
    server = OrthancServer(root / "orthanc", {USER: PASSWORD}).start()
    mp = MonkeyPatch()
    try:
        for ds in archive_datasets():
            server.upload(to_bytes(ds))
        mp.setenv(USER_ENV, USER)
        mp.setenv(PASSWORD_ENV, PASSWORD)
        code = main(["index", "build", "--dicomweb", server.dicomweb, "--index", str(root / "index"), *FAST])
        assert code == 0
        yield server, root
    finally:
        mp.undo()
        server.stop(kill=True)


@needs_orthanc
@pytest.mark.slow
def test_query_viewer_url_rebuilds_links_at_query_time(pacs, tmp_path: Path, capsys, monkeypatch) -> None:
    server, root = pacs
    local = write_archive(tmp_path / "local", archive_datasets())
    args = ["query", local[0], "--index", root / "index", "--json", "--include-self", "--k", "3"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    stored = json.loads(out)["results"]
    assert stored[0]["viewer_url"] == f"{server.base}/viewer?StudyInstanceUIDs={stored[0]['study_uid']}"
    code, out, err = run_cli(capsys, *args, "--viewer-url", TEMPLATE)
    assert code == 0, err
    hits = json.loads(out)["results"]
    assert [h["id"] for h in hits] == [h["id"] for h in stored]
    for h in hits:
        assert h["viewer_url"] == TEMPLATE.format(study=h["study_uid"], series=h["series_uid"], instance=h["sop_uid"])
    code, out, err = run_cli(capsys, *args, "--viewer-url", "https://v.example/{study}/{nope}")
    assert code == 2 and out == ""
    assert_one_line_error(err, "--viewer-url", "nope")
    assert PASSWORD not in out + err


@needs_orthanc
@pytest.mark.slow
def test_server_viewer_template_rebuilds_links(pacs, monkeypatch) -> None:
    from retrieval.server.config import PacsSettings
    from retrieval.server.engine import load_engine

    server, root = pacs
    ds = archive_datasets()[0]
    ref = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    stored = load_engine(root / "index", use_gpu=False).query_reference(*ref, k=3)
    settings = PacsSettings(viewer_template=TEMPLATE)
    relinked = load_engine(root / "index", use_gpu=False, pacs=settings).query_reference(*ref, k=3)
    assert isinstance(stored, dict) and isinstance(relinked, dict)
    assert [h["id"] for h in stored["results"]] == [h["id"] for h in relinked["results"]]
    for before, h in zip(stored["results"], relinked["results"]):
        assert before["viewer_url"].startswith(server.base)
        assert h["viewer_url"] == TEMPLATE.format(study=h["study_uid"], series=h["series_uid"], instance=h["sop_uid"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--out", "v.parquet"], "--dicomweb"),  # neither DATA nor --dicomweb
        (["data", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--out", "v.parquet"], "--dicomweb"),  # both
        (["data", "--since", "2025-01-01", "--out", "v.parquet"], "need --dicomweb"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--engine", "ray", "--out", "v.parquet"], "--engine ray"),
    ],
)
def test_embed_source_options_are_one_line_errors(tmp_path: Path, capsys, monkeypatch, args, needle) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "embed", *args)
    assert code == 2 and out == ""
    assert_one_line_error(err, needle)
    assert not (tmp_path / "v.parquet").exists()


@needs_orthanc
@pytest.mark.slow
def test_embed_dicomweb_equals_what_the_sync_indexes(pacs, tmp_path: Path, capsys, monkeypatch) -> None:
    import numpy as np

    from indexer.index_dir import open_index_dir
    from indexer.store import read_vectors
    from retrieval.pacs import IDENTITY_COLUMNS, LINK_COLUMNS

    server, root = pacs
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    out_file = tmp_path / "pacs.parquet"
    code, out, err = run_cli(capsys, "embed", "--dicomweb", server.dicomweb, "--out", out_file, *FAST)
    assert code == 0, err
    n_instances = len(archive_datasets())
    assert f"fetched {n_instances}, embedded {n_instances}" in out
    assert PASSWORD not in out + err
    vs = read_vectors(out_file)
    stored = open_index_dir(root / "index", use_gpu=False).vectors
    assert len(vs) == len(stored) == sum(int(getattr(d, "NumberOfFrames", 1)) for d in archive_datasets())
    assert vs.fingerprint == stored.fingerprint
    mine = vs.rows.set_index("id")
    theirs = stored.rows.set_index("id").loc[mine.index]
    for col in ["path", "frame_index", *IDENTITY_COLUMNS, *LINK_COLUMNS]:
        assert (
            mine[col].astype("string").fillna("<NA>").tolist() == theirs[col].astype("string").fillna("<NA>").tolist()
        )
    order = stored.rows.reset_index().set_index("id").loc[mine.index, "index"].to_numpy()
    np.testing.assert_allclose(vs.vectors, stored.vectors[order], atol=1e-5)
    # the vectors file builds an index of its own, which answers with the PACS identity columns
    code, out, err = run_cli(capsys, "index", "build", "--vectors", out_file, "--index", tmp_path / "idx", "--quiet")
    assert code == 0, err
    local = write_archive(tmp_path / "local", archive_datasets())
    code, out, err = run_cli(
        capsys, "query", local[0], "--index", tmp_path / "idx", "--json", "--include-self", "--k", "2"
    )
    assert code == 0, err
    top = json.loads(out)["results"][0]
    assert top["sop_uid"] == local[0].stem and top["viewer_url"].startswith(server.base)
