"""Generated DICOM files for the archive tests: identity tags, windows, VOI LUTs, no preamble, no pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_dicom(
    path: Path,
    frames: np.ndarray,
    patient_id: str = "PAT1",
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "US",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    voi_lut: tuple[int, np.ndarray] | None = None,
    rescale: tuple[float, float] | None = None,
    accession: str | None = None,
    bits_stored: int = 12,
    preamble: bool = True,
    pixels: bool = True,
) -> Path:
    """A DICOM file of unsigned 16-bit pixels (n, H, W) or (H, W), with a PatientName that must never leak.

    `voi_lut` is (first value mapped, LUT data); `rescale` is (slope, intercept); `preamble=False`
    writes a bare dataset (implicit VR, no file meta), as old archives hold.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = np.asarray(frames)
    n = 1 if frames.ndim == 2 else frames.shape[0]
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1" if n > 1 else "1.2.840.10008.5.1.4.1.1.6.1"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "Doe^Jane"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality, ds.StudyDate, ds.BodyPartExamined = modality, "20240131", "ABDOMEN"
    if accession is not None:
        ds.AccessionNumber = accession
    if pixels:
        ds.Rows, ds.Columns = frames.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        if n > 1:
            ds.NumberOfFrames = n
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if voi_lut is not None:
            first, data = voi_lut
            item = Dataset()
            item.add_new(0x00283002, "US", [len(data), int(first), 16])  # LUTDescriptor
            item.add_new(0x00283006, "US", [int(v) for v in data])  # LUTData
            ds.VOILUTSequence = Sequence([item])
        ds.PixelData = frames.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not preamble:
        pydicom.dcmwrite(str(path), ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)
    return path


def make_pacs_tree(root: Path) -> dict[str, Path]:
    """3 patients, 4 studies, 6 series, suffix-less files: a multi-frame clip, a MONOCHROME1, a VOI LUT,
    a window, a preamble-less file, and a structured report without pixels (to be skipped).

    The images of a series share a pattern (so they are each other's neighbours) and differ by noise.
    """
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:48]
    patterns = {
        "stripes": (np.sin(xx / 3.0) + 1) * 1500,
        "rings": (np.sin(np.hypot(yy - 24, xx - 24) / 2.5) + 1) * 1500,
        "ramp": xx * 60.0 + yy * 20.0,
        "blobs": (np.cos(yy / 4.0) * np.cos(xx / 5.0) + 1) * 1500,
    }

    def img(name: str) -> np.ndarray:
        return np.clip(patterns[name] + rng.normal(0, 60, (48, 48)), 0, 4095).astype(np.uint16)

    files: dict[str, Path] = {}
    layout = [  # patient, study, series, pattern, accession
        ("PAT001", "STUDY1", "SERIES1", "stripes", "ACC1"),
        ("PAT001", "STUDY1", "SERIES2", "rings", "ACC1"),
        ("PAT001", "STUDY2", "SERIES1", "stripes", "ACC2"),
        ("PAT002", "STUDY1", "SERIES1", "rings", "ACC3"),
        ("PAT002", "STUDY1", "SERIES2", "ramp", "ACC3"),
        ("PAT003", "STUDY1", "SERIES1", "blobs", "ACC4"),
    ]
    studies: dict[tuple[str, str], str] = {}
    for pat, study, series, pattern, acc in layout:
        st = studies.setdefault((pat, study), generate_uid())
        se = generate_uid()
        folder = root / pat / study / series
        for j in range(3):
            files[f"{pat}/{study}/{series}/IM{j + 1:04d}"] = make_dicom(
                folder / f"IM{j + 1:04d}", img(pattern), pat, st, se, accession=acc, window=(1500, 3000)
            )
    # special files in their series
    st = studies[("PAT001", "STUDY1")]
    files["clip"] = make_dicom(
        root / "PAT001/STUDY1/SERIES3/IM0001", np.stack([img("ramp") for _ in range(3)]), "PAT001", st, accession="ACC1"
    )
    files["mono1"] = make_dicom(
        root / "PAT002/STUDY1/SERIES3/IM0001",
        4095 - img("blobs"),
        "PAT002",
        studies[("PAT002", "STUDY1")],
        photometric="MONOCHROME1",
        accession="ACC3",
    )
    se = generate_uid()
    files["voi"] = make_dicom(
        root / "PAT003/STUDY1/SERIES2/IM0001",
        img("blobs"),
        "PAT003",
        studies[("PAT003", "STUDY1")],
        se,
        voi_lut=(0, np.linspace(0, 65535, 4096)),
        accession="ACC4",
    )
    files["bare"] = make_dicom(
        root / "PAT003/STUDY1/SERIES2/IM0002",
        img("blobs"),
        "PAT003",
        studies[("PAT003", "STUDY1")],
        se,
        preamble=False,
    )
    files["report"] = make_dicom(root / "PAT003/STUDY1/SR/SR0001", img("ramp"), "PAT003", pixels=False)
    return files


def make_deflated_dicom(
    path: Path, frame: np.ndarray | None = None, pixel_bytes: int | None = None, preamble: bool = True
) -> Path:
    """A Deflated Explicit VR Little Endian file (1.2.840.10008.1.2.1.99) of one 8-bit frame, NumberOfFrames 1.

    `pixel_bytes`: PixelData of that many zero bytes instead of the frame, deflated as it is written (never
    held whole), so 64 MiB make a file of about 64 KB: a decompression bomb. `preamble=False` leaves out
    the 128-byte preamble and 'DICM' (the file starts with its file meta group).
    """
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    frame = np.zeros((8, 8), np.uint8) if frame is None else np.asarray(frame, np.uint8)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.6.1", generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "DEFL1", "Doe^Jane", "US"
    ds.Rows, ds.Columns = frame.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = frame.size if pixel_bytes is None else pixel_bytes
    n += n % 2
    pixel_header = b"\xe0\x7f\x10\x00OB\x00\x00" + n.to_bytes(4, "little")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        if preamble:
            fh.write(b"\0" * 128 + b"DICM")
        fh.write(head.getvalue())
        fh.write(deflate.compress(body.getvalue() + pixel_header))
        if pixel_bytes is None:
            fh.write(deflate.compress(frame.tobytes() + b"\0" * (n - frame.size)))
        else:
            zeros = bytes(1 << 20)
            for start in range(0, n, len(zeros)):
                fh.write(deflate.compress(zeros[: min(len(zeros), n - start)]))
        fh.write(deflate.flush())
    return path


def set_frames_claim(path: Path, claim: bytes) -> Path:
    """Rewrite the NumberOfFrames (0028,0008) IS value in place, as a damaged or hostile file would hold it."""
    raw = path.read_bytes()
    i = raw.find(b"\x28\x00\x08\x00IS")
    assert i > 0
    length = int.from_bytes(raw[i + 6 : i + 8], "little")
    value = claim + (b" " if len(claim) % 2 else b"")
    path.write_bytes(raw[: i + 6] + len(value).to_bytes(2, "little") + value + raw[i + 8 + length :])
    return path
