"""Bad input is refused cheaply with one line and exit 2: never a traceback, exit 1 or an unbounded allocation."""

import json
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAST, assert_one_line_error, png_claiming, run_cli, write_dicom, write_png
from dicom_factory import set_frames_claim
from test_index import _vs

from indexer.config import IndexConfig
from indexer.index_dir import build_index_dir, open_index_dir
from indexer.search import candidate_mask, search
from indexer.store import VectorSet, read_vectors, write_vectors
from retrieval.data.dataset import Skipped, load_dataset
from retrieval.data.imageio import read_frames
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.pipeline import QueryResult
from retrieval.vote import knn_vote


def test_dicom_claiming_billions_of_frames_is_refused_before_decoding(tmp_path):
    p = set_frames_claim(write_dicom(tmp_path / "bomb.dcm", np.zeros((2, 16, 16), np.uint16)), b"2147483647")
    tracemalloc.start()
    with pytest.raises(UnreadableImageError, match="claims 2147483647 frames, over the limit"):
        read_frames(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50_000_000  # refused from the header: nothing of the claimed size is allocated


def test_dicom_frame_claim_is_checked_against_the_pixel_data(tmp_path, monkeypatch):
    p = set_frames_claim(write_dicom(tmp_path / "liar.dcm", np.zeros((2, 16, 16), np.uint16)), b"1000")
    with pytest.raises(UnreadableImageError, match="claims 1000 frame.*holds 1024 bytes"):
        read_frames(p)
    monkeypatch.setenv("RETRIEVE_MAX_FRAMES", "1")
    ok = write_dicom(tmp_path / "clip.dcm", np.zeros((2, 16, 16), np.uint16))
    with pytest.raises(UnreadableImageError, match="over the limit of 1 per file"):
        read_frames(ok)


@pytest.mark.slow
def test_dicom_with_an_invalid_header_value_is_skipped_and_the_rest_indexed(tmp_path, capsys):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for j in range(3):
        write_png(data / "a" / f"img{j}.png", rng.integers(0, 255, (48, 48), dtype=np.uint8))
    set_frames_claim(write_dicom(data / "a" / "bad.dcm", np.zeros((2, 16, 16), np.uint16)), b"1A")
    code, out, err = run_cli(capsys, "index", "build", data, "--index", tmp_path / "idx", *FAST)
    assert code == 0, err
    assert "indexed 3 images" in out and "skipped 1" in out
    warnings = [ln for ln in err.splitlines() if "bad.dcm" in ln]
    assert len(warnings) == 1 and "invalid DICOM NumberOfFrames '1A'" in warnings[0]


def test_decompression_bomb_png_is_a_one_line_error(tmp_path, capsys, demo_index):
    bomb = png_claiming(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(UnreadableImageError, match="over the (pixel )?limit"):
        read_frames(bomb)
    big = png_claiming(tmp_path / "big.png", 9000, 9000)  # under PIL's own bomb threshold, over ours
    with pytest.raises(UnreadableImageError, match="9000 x 9000 pixels, over the limit of 64000000"):
        read_frames(big)
    code, _, err = run_cli(capsys, "query", bomb, "--index", demo_index)
    assert code == 2
    assert_one_line_error(err, "bomb.png", "over the limit")


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    p = write_png(tmp_path / "x.png", np.zeros((100, 100), np.uint8))
    monkeypatch.setenv("RETRIEVE_MAX_PIXELS", "5000")
    with pytest.raises(UnreadableImageError, match="over the limit of 5000"):
        read_frames(p)
    monkeypatch.setenv("RETRIEVE_MAX_PIXELS", "lots")
    with pytest.raises(RetrieveError, match="RETRIEVE_MAX_PIXELS='lots'"):
        read_frames(p)


@pytest.mark.parametrize("column", ["vector", "score", "rank", "id"])
def test_reserved_manifest_columns_are_refused(tmp_path, column):
    write_png(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
    pd.DataFrame({"path": ["a.png"], "label": ["x"], column: [1]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(RetrieveError, match=f"column '{column}' is reserved"):
        load_dataset(tmp_path / "m.csv")


def test_metadata_can_never_overwrite_score_or_rank_in_json():
    rows = pd.DataFrame({"id": ["a"], "path": ["/a.png"], "label": ["x"], "patient_id": ["p"], "score": [99.0]})
    from indexer.search import Hit

    d = QueryResult("q", [Hit(0, 0.5)], rows, knn_vote(["x"], [0.5], "majority")).to_dict()
    assert d["results"][0]["score"] == 0.5 and d["results"][0]["rank"] == 1


@pytest.mark.parametrize("value", ["abc", "1e23", "-1", "1.5"])
def test_bad_frame_index_in_a_manifest_skips_the_row(tmp_path, value):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name, np.zeros((16, 16), np.uint8))
    pd.DataFrame({"path": ["a.png", "b.png"], "frame_index": [value, ""]}).to_csv(tmp_path / "m.csv", index=False)
    t = load_dataset(tmp_path / "m.csv")
    assert t.rows["path"].str.endswith("b.png").all() and len(t.rows) == 1
    assert "is not a frame number" in str(t.skipped[0])


def test_manifest_that_is_not_utf8_or_lacks_path(tmp_path, capsys, demo_index):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("path,label\nimage\xe9.png,st\xe9atose\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "index", "add", bad, "--index", demo_index)
    assert code == 2
    assert_one_line_error(err, "not UTF-8")
    nopath = tmp_path / "nopath.csv"
    nopath.write_text("file,label\na.png,x\n")
    code, _, err = run_cli(capsys, "embed", nopath, "--out", tmp_path / "v.parquet", *FAST)
    assert code == 2
    assert_one_line_error(err, "missing the required column 'path'")


def test_embed_out_at_a_folder_is_refused_up_front(tmp_path, capsys, demo_data):
    code, _, err = run_cli(capsys, "embed", demo_data, "--out", tmp_path, *FAST)
    assert code == 2
    assert_one_line_error(err, "is a folder")


def test_vectors_file_with_the_wrong_dimension_is_refused(tmp_path, capsys):
    vs = _vs(10)
    vs.fingerprint = {**vs.fingerprint, "dim": 32}
    write_vectors(tmp_path / "v.parquet", vs)
    with pytest.raises(RetrieveError, match="16-d but their encoder fingerprint says 32-d"):
        read_vectors(tmp_path / "v.parquet")
    code, _, err = run_cli(capsys, "index", "build", "--vectors", tmp_path / "v.parquet", "--index", tmp_path / "i")
    assert code == 2 and not (tmp_path / "i").exists()


def test_parquet_metadata_of_any_type_prints_as_json(tmp_path):
    vs = _vs(4)
    rows = vs.rows.copy()
    rows["when"] = pd.to_datetime(["2024-01-02", "2024-03-04", None, "2025-05-06"])
    rows["raw"] = [b"\x00\x01", b"", None, b"\xff"]
    rows["tags"] = [["a", "b"], [], None, ["c"]]
    write_vectors(tmp_path / "v.parquet", VectorSet(rows, vs.vectors, vs.fingerprint, vs.encoder_spec))
    back = read_vectors(tmp_path / "v.parquet")
    from indexer.search import Hit

    res = QueryResult("q", [Hit(j, 0.1) for j in range(4)], back.rows, knn_vote([None] * 4, [0.1] * 4, "majority"))
    text = json.dumps(res.to_dict())  # must not raise
    first = json.loads(text)["results"][0]
    assert first["when"].startswith("2024-01-02") and first["raw"] == "0001" and first["tags"] == ["a", "b"]


def test_filtered_query_returns_k_whenever_k_match_even_on_hnsw(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(600), IndexConfig(kind="hnsw", hnsw_ef_search=16))
    idx = open_index_dir(d, use_gpu=False)
    allowed = candidate_mask(idx.rows, [], [("label", "a")])
    for q in idx.vectors.vectors[[1, 2, 3]]:  # label b and c rows: their own neighbours are mostly filtered out
        hits = search(idx, q[None], 10, allowed)[0]
        assert len(hits) == 10 and all(idx.rows.label[h.position] == "a" for h in hits)
    few = candidate_mask(idx.rows, [], [("patient_id", "p3")])  # 5 images
    assert len(search(idx, idx.vectors.vectors[:1], 10, few)[0]) == 5


def test_query_says_when_fewer_than_k_match(tmp_path, capsys, demo_data, demo_index):
    img = next(demo_data.rglob("*.png"))
    code, out, err = run_cli(capsys, "query", img, "--index", demo_index, "--k", "10", "--where", "patient_id=SYN000")
    assert code == 0, err
    assert "only 3 indexed images match the filters" in err


def test_skip_messages_are_one_line():
    s = Skipped("/data/x.dcm", "first line\nsecond line\n" + "z" * 500)
    assert "\n" not in str(s) and len(str(s)) < 260


def test_unreadable_image_error_carries_path_and_reason():
    exc = UnreadableImageError("/a/b.png", "corrupt\nimage")
    assert exc.path == "/a/b.png" and exc.reason == "corrupt image" and str(exc) == "/a/b.png: corrupt image"


def test_corrupt_parquet_vector_column_is_a_clean_error(tmp_path):
    table = pa.table({"id": ["a"], "path": ["p"], "vector": [[0.1, 0.2]]})  # a list, not fixed_size_list
    table = table.replace_schema_metadata({b"retrieve.fingerprint": b"{}"})
    pq.write_table(table, tmp_path / "v.parquet")
    with pytest.raises(RetrieveError, match="fixed_size_list"):
        read_vectors(tmp_path / "v.parquet")


def _checkpoint(tmp_path):
    from retrieval.config import PreprocessConfig
    from retrieval.encoders import create_encoder, save_checkpoint

    enc = create_encoder("cnn5", None, 0)
    return save_checkpoint(enc, tmp_path / "ck", PreprocessConfig(image_size=32))


def _edit_meta(ck, change):
    meta_path = ck.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))


def test_checkpoint_without_arch_is_a_one_line_error(tmp_path, capsys):
    ck = _checkpoint(tmp_path)
    _edit_meta(ck, lambda m: m.pop("arch"))
    code, _, err = run_cli(capsys, "embed", tmp_path, "--out", tmp_path / "v.parquet", "--encoder", str(ck))
    assert code == 2
    assert_one_line_error(err, "no architecture description")


def test_checkpoint_naming_a_model_hub_never_touches_the_network(tmp_path, capsys, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    ck = _checkpoint(tmp_path)
    _edit_meta(ck, lambda m: m["arch"].update(type="timm", model="hf-hub:timm/resnet18.a1_in1k"))
    code, _, err = run_cli(capsys, "embed", tmp_path, "--out", tmp_path / "v.parquet", "--encoder", str(ck))
    assert code == 2
    assert_one_line_error(err, "model hubs are never contacted")


@pytest.mark.slow
def test_an_indexed_image_and_its_copies_are_not_their_own_neighbours(tmp_path, capsys, demo_data, demo_index):
    import shutil

    img = next(demo_data.rglob("*.png"))
    copy = tmp_path / "renamed-copy.png"
    shutil.copy(img, copy)  # the same bytes under another name: found by content hash
    for query in (img, copy):
        code, out, err = run_cli(capsys, "query", query, "--index", demo_index, "--k", "3", "--json")
        assert code == 0, err
        paths = [r["path"] for r in json.loads(out)["results"]]
        assert str(img.resolve()) not in paths and len(paths) == 3
