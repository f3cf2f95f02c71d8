"""Streaming index build: chunks land as part shards, an interrupted build resumes with --resume."""

import numpy as np
import pytest
from conftest import FAST, run_cli

import retrieval.pipeline as pipeline
from indexer.index_dir import open_index_dir, read_manifest, verify_index_dir
from retrieval.errors import RetrieveError


def _by_id(index):
    vs = open_index_dir(index, use_gpu=False).vectors
    return {i: v for i, v in zip(vs.rows["id"], vs.vectors)}


@pytest.mark.slow
def test_interrupted_build_resumes_and_embeds_only_what_is_missing(tmp_path, capsys, monkeypatch, demo_data):
    monkeypatch.setattr(pipeline, "STREAM_CHUNK", 5)  # 24 images -> 5 chunks
    calls = []
    real = pipeline.embed_rows

    def interrupted(rows, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(rows))
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(pipeline, "embed_rows", interrupted)
    index = tmp_path / "idx"
    code, _, err = run_cli(capsys, "index", "build", demo_data, "--index", index, *FAST)
    assert code == 130 and calls == [5, 5, 5]
    assert len(list(index.glob("part-*.parquet"))) == 3
    with pytest.raises(RetrieveError, match="interrupted"):
        read_manifest(index)

    monkeypatch.setattr(pipeline, "embed_rows", lambda rows, *a, **k: calls.append(len(rows)) or real(rows, *a, **k))
    calls.clear()
    code, out, err = run_cli(capsys, "index", "build", demo_data, "--index", index, "--resume", *FAST)
    assert code == 0, err
    assert calls == [5, 4] and "15 of them embedded by the interrupted run" in out
    assert verify_index_dir(index) == [] and not (index / "build.json").exists()
    m = read_manifest(index)
    assert m.count == 24 and len(m.shards) == 5 and m.next_id == 24

    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "index", "build", demo_data, "--index", fresh, *FAST)[0] == 0
    a, b = _by_id(index), _by_id(fresh)
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


@pytest.mark.slow
def test_resume_with_another_encoder_is_refused(tmp_path, capsys, monkeypatch, demo_data):
    monkeypatch.setattr(pipeline, "STREAM_CHUNK", 10)
    real = pipeline.embed_rows
    calls = []

    def stop_after_one(rows, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(pipeline, "embed_rows", stop_after_one)
    index = tmp_path / "idx"
    assert run_cli(capsys, "index", "build", demo_data, "--index", index, *FAST)[0] == 130
    other = ["--encoder", "cnn5", "--image-size", "64", "--quiet"]
    code, _, err = run_cli(capsys, "index", "build", demo_data, "--index", index, "--resume", *other)
    assert code == 2 and "the interrupted build used encoder imagenet-effnet-lite0" in err
    monkeypatch.setattr(pipeline, "embed_rows", real)
    code, _, err = run_cli(capsys, "index", "build", demo_data, "--index", index, *other)  # starts over
    assert code == 0, err
    m = read_manifest(index)
    assert m.fingerprint["encoder"] == "cnn5"
    assert {p.name for p in index.glob("part-*")} == {s["name"] for s in m.shards}  # the old run's parts are gone
