"""Shared fixtures: generated data only (the real datasets are read from ../shared/data in place)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.cli.main import main
from retrieval.demo.synthetic import generate_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FAST = ["--encoder", "imagenet-effnet-lite0", "--image-size", "64", "--quiet"]


def small_fixmatch_config(**overrides):
    """A FixMatch configuration that trains in a second on generated frozen features (the FixMatch tests)."""
    from retrieval.training.config import TrainConfig

    base = dict(
        method="fixmatch",
        encoder="cnn5",
        freeze_backbone=True,
        frozen_views=2,
        batch_size=16,
        lr=3e-3,
        head_dims=[32, 16],
        unlabelled_ratio=3,
        fixmatch_threshold=0.7,
        max_steps=40,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def faiss_one_thread():
    """FAISS's OpenMP threads spin on a loaded 2-core machine; one thread keeps index tests quick.
    Use it for a whole module with `pytestmark = pytest.mark.usefixtures("faiss_one_thread")`."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """8 synthetic patients (2 per grade) x 3 frames, 128 px: folder with labels.csv."""
    root = tmp_path_factory.mktemp("demo_data")
    generate_demo_dataset(root, n_per_grade=2, frames=3, size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def multilabel_demo_index(tmp_path_factory, demo_data) -> Path:
    """demo_data labelled as sets (every fatty grade also names `steatosis`), indexed once with intensity-stats
    vectors (read-only for tests that use it)."""
    import pandas as pd

    root = tmp_path_factory.mktemp("ml_idx")
    table = pd.read_csv(demo_data / "labels.csv")
    table["label"] = [lab if lab == "normal" else f"{lab}|steatosis" for lab in table["label"]]
    table[["path", "label"]].to_csv(root / "labels.csv", index=False)
    index = root / "idx"
    args = ["index", "build", str(demo_data), "--index", str(index), "--labels", str(root / "labels.csv")]
    assert main([*args, "--encoder", "intensity-stats", "--quiet"]) == 0
    return index


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory, demo_data) -> Path:
    """An index over demo_data, built once through the CLI (read-only for tests that use it)."""
    index = tmp_path_factory.mktemp("idx") / "demo"
    assert main(["index", "build", str(demo_data), "--index", str(index), *FAST]) == 0
    return index


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `retrieve ARGS` in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    """Bad input: a single 'error:' line naming what is wrong, and no traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) >= 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims width x height (a decompression bomb, as far as the header goes)."""
    write_png(path, np.zeros((8, 8), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def write_dicom(
    path: Path,
    frames: np.ndarray,
    modality: str = "US",
    patient_id: str | None = "PAT1",
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
) -> Path:
    """A minimal valid DICOM file with (n, H, W) or (H, W) 16-bit pixels, written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = np.asarray(frames)
    n = 1 if frames.ndim == 2 else frames.shape[0]
    signed = frames.dtype.kind == "i"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.3.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    if n > 1:
        ds.NumberOfFrames = n
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = frames.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path
