"""A real Orthanc server with the DICOMweb plug-in, on a free loopback port, for the DICOMweb tests and
benchmark; and a generated archive to upload to it (several patients, studies and series, a multi-frame
cine). Debian's `orthanc` and `orthanc-dicomweb` packages provide the server (.ci/run installs them);
`orthanc_missing()` says why the tests must skip where they are not installed.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


def _plugin() -> str | None:
    for p in PLUGIN_PATHS:
        if Path(p).exists():
            return p
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")) if Path("/usr/lib/orthanc").is_dir() else []
    return str(found[0]) if found else None


def orthanc_missing() -> str | None:
    """Why an Orthanc server cannot be started here (None when it can)."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; .ci/run does this)"
    if _plugin() is None:
        return "the Orthanc DICOMweb plug-in is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """Orthanc on 127.0.0.1:<free port>, storage in `root`; stop() and start() again keep its data."""

    def __init__(self, root: Path, users: dict[str, str] | None = None):
        self.root = Path(root)
        self.users = users or {}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "retrieve-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpCompressionEnabled": False,
            "Plugins": [_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config_path = self.root / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if data is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def start(self, timeout: float = 30.0) -> OrthancServer:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 (kept open for the process's life)
        self.proc = subprocess.Popen(
            ["Orthanc", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {tail}")
            try:
                self._request("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        """Shut Orthanc down (about 2 s), or `kill` it at once (for a server whose data is thrown away)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def upload(self, dicom_bytes: bytes) -> dict:
        """POST /instances: Orthanc's REST upload of one DICOM file."""
        return json.loads(self._request("/instances", data=dicom_bytes, method="POST"))

    def delete_all(self) -> None:
        for pid in json.loads(self._request("/patients")):
            self._request(f"/patients/{pid}", method="DELETE")

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(kill=True)


# --- a generated archive ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveSeries:
    patient_id: str
    study: int  # index of the study within the archive
    study_date: str
    modality: str
    body_part: str
    instances: int
    frames: int = 1  # > 1: a multi-frame cine per instance


# 3 patients, 4 studies, 6 series; 14 instances, one of them a 6-frame cine (19 frames in all)
ARCHIVE = (
    ArchiveSeries("P001", 0, "20240110", "US", "LIVER", 3),
    ArchiveSeries("P001", 0, "20240110", "US", "LIVER", 1, frames=6),
    ArchiveSeries("P002", 1, "20240601", "CT", "ABDOMEN", 4),
    ArchiveSeries("P002", 2, "20250115", "US", "ABDOMEN", 2),
    ArchiveSeries("P003", 3, "20250301", "US", "LIVER", 2),
    ArchiveSeries("P003", 3, "20250301", "CT", "LIVER", 2),
)


def _uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.9.7777." + ".".join(str(p) for p in parts)


def _pixels(rng: np.random.Generator, frames: int, size: int, ct: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    cy, cx, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.1, 0.3) * size
    for f in range(frames):
        blob = np.exp(-(((yy - cy - 2 * f) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        noise = rng.normal(0, 0.08, (size, size))
        img = np.clip(blob + noise + 0.1, 0, 1)
        out.append((img * 400 - 50) + 1024 if ct else img * 1000)  # CT: stored values, intercept -1024
    return np.asarray(out, dtype=np.uint16)


def archive_datasets(size: int = 64, seed: int = 0, patient_names: bool = True, copies: int = 1) -> list:
    """The ARCHIVE as pydicom datasets (Part-10, explicit VR little endian), in a fixed order.

    `copies` > 1 repeats it with new patients and UIDs (the benchmark's larger archives).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(seed)
    out = []
    described = [
        (
            c,
            s_no + c * len(ARCHIVE),
            replace(
                series, patient_id=f"{series.patient_id}-{c}" if c else series.patient_id, study=series.study + 100 * c
            ),
        )
        for c in range(copies)
        for s_no, series in enumerate(ARCHIVE)
    ]
    for _, s_no, series in described:
        ct = series.modality == "CT"
        sop_class = (
            "1.2.840.10008.5.1.4.1.1.2"
            if ct
            else ("1.2.840.10008.5.1.4.1.1.3.1" if series.frames > 1 else "1.2.840.10008.5.1.4.1.1.6.1")
        )
        for i in range(series.instances):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = _uid(3, s_no, i)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID = _uid(1, series.study)
            ds.SeriesInstanceUID = _uid(2, s_no)
            ds.PatientID = series.patient_id
            if patient_names:
                ds.PatientName = f"Doe^{series.patient_id}"  # must never reach an index or an output
            ds.StudyDate = series.study_date
            ds.StudyTime = "101500"
            ds.AccessionNumber = f"ACC{series.study:04d}"
            ds.StudyID = str(series.study)
            ds.SeriesNumber = s_no + 1
            ds.InstanceNumber = i + 1
            ds.Modality = series.modality
            ds.BodyPartExamined = series.body_part
            pixels = _pixels(rng, series.frames, size, ct)
            ds.Rows, ds.Columns = size, size
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            if ct:
                ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
            if series.frames > 1:
                ds.NumberOfFrames = series.frames
                ds.FrameTime = 33.3
            ds.PixelData = pixels.tobytes() if series.frames > 1 else pixels[0].tobytes()
            out.append(ds)
    return out


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def write_archive(folder: Path, datasets: list) -> list[Path]:
    """The datasets as local .dcm files (the local baseline of the benchmark)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        p.write_bytes(to_bytes(ds))
        paths.append(p)
    return paths
