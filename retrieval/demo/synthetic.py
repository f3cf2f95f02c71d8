"""Synthetic B-mode liver ultrasound: speckle in a sector, steatosis grades 0-3, several patients.

Steatosis is rendered as the papers describe its sonographic signs: brighter parenchyma
(hyperechogenicity), stronger attenuation with depth, and vessels and diaphragm that blur and fade.
Each patient has their own gain, depth and sector width; each frame its own speckle, probe tilt and
vessel positions. Burned-in annotation text and a depth scale sit outside the sector, as on scanners.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

GRADE_LABELS = ("normal", "mild", "moderate", "severe")


@dataclass(frozen=True)
class Patient:
    patient_id: str
    grade: int
    gain: float
    depth_cm: float
    half_angle: float  # radians
    seed: int


def _speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fully developed speckle: magnitude of a band-limited complex Gaussian field (Rayleigh)."""
    re = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.8, 1.8))
    im = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.8, 1.8))
    s = np.hypot(re, im)
    return s / s.mean()


def render_frame(p: Patient, frame: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng([p.seed, frame])
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    apex_y, apex_x = -0.08 * h, w / 2 + rng.normal(0, 2)
    r = np.hypot(yy - apex_y, xx - apex_x)
    phi = np.arctan2(xx - apex_x, yy - apex_y) + rng.normal(0, 0.03)
    r0, r1 = 0.16 * h, 0.16 * h + 0.78 * h * (p.depth_cm / 16.0)
    sector = (r > r0) & (r < r1) & (np.abs(phi) < p.half_angle)
    depth = np.clip((r - r0) / (r1 - r0), 0, 1)

    # echogenicity: brighter and more attenuating with grade
    tissue = 0.30 + 0.11 * p.grade + 0.05 * np.sin(3 * phi + rng.uniform(0, 6)) * (1 - depth)
    attenuation = np.exp(-(0.4 + 0.9 * p.grade) * depth)
    # vessels: anechoic ellipses whose walls blur with fat
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.3, 0.8) * h, w / 2 + rng.uniform(-0.25, 0.25) * w
        ry, rx = rng.uniform(4, 10), rng.uniform(6, 16)
        vessel = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        vessel = ndimage.gaussian_filter(vessel.astype(np.float32), 0.6 + 1.2 * p.grade)
        tissue = tissue * (1 - (0.9 - 0.15 * p.grade) * vessel)
    # diaphragm: bright curved band near the far field, fading with fat
    band_r = r0 + (r1 - r0) * rng.uniform(0.82, 0.9)
    diaphragm = np.exp(-(((r - band_r) / 3.0) ** 2)) * (0.9 - 0.2 * p.grade)
    intensity = (tissue * attenuation + diaphragm) * _speckle(rng, (h, w)) * p.gain
    intensity += 0.02 * rng.random((h, w))
    img = np.log1p(6 * np.clip(intensity, 0, None)) / np.log1p(6 * 1.6)
    img = np.where(sector, np.clip(img, 0, 1), 0.0)
    out = (img * 255).astype(np.uint8)
    _burn_annotations(out, rng, p)
    return out


def _burn_annotations(img: np.ndarray, rng: np.random.Generator, p: Patient) -> None:
    """Text-like blocks in the top corners and a depth scale at the right edge, outside the sector."""
    h, w = img.shape
    for x0 in (4, w - 52):
        for line in range(3):
            y = 4 + 7 * line
            for c in range(int(rng.integers(4, 8))):
                xs = x0 + 6 * c
                glyph = rng.random((5, 4)) > 0.45
                img[y : y + 5, xs : xs + 4][glyph] = 220
    for t in range(int(p.depth_cm) + 1):
        y = int(0.08 * h + t * (0.78 * h / 16.0))
        if y < h - 2:
            img[y : y + 1, w - 6 : w - 2] = 200


def demo_patients(n_per_grade: int = 4, seed: int = 0) -> list[Patient]:
    rng = np.random.default_rng(seed)
    patients = []
    for grade in range(len(GRADE_LABELS)):
        for j in range(n_per_grade):
            pid = f"SYN{grade}{j:02d}"
            patients.append(
                Patient(
                    patient_id=pid,
                    grade=grade,
                    gain=float(rng.uniform(0.8, 1.2)),
                    depth_cm=float(rng.uniform(12, 16)),
                    half_angle=float(rng.uniform(0.55, 0.75)),
                    seed=int(rng.integers(0, 2**31)),
                )
            )
    return patients


def generate_demo_dataset(
    out_dir: str | Path, n_per_grade: int = 4, frames: int = 6, size: int = 256, seed: int = 0
) -> Path:
    """Write PNGs in grade sub-folders and `labels.csv` (path,label,patient_id,...). Returns the manifest."""
    out = Path(out_dir)
    records = []
    for p in demo_patients(n_per_grade, seed):
        label = GRADE_LABELS[p.grade]
        (out / label).mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            rel = f"{label}/{p.patient_id}_f{f}.png"
            Image.fromarray(render_frame(p, f, size)).save(out / rel)
            records.append(
                {
                    "path": rel,
                    "label": label,
                    "patient_id": p.patient_id,
                    "steatosis_grade": p.grade,
                    "frame": f,
                    "gain": round(p.gain, 3),
                    "depth_cm": round(p.depth_cm, 1),
                }
            )
    manifest = out / "labels.csv"
    pd.DataFrame.from_records(records).to_csv(manifest, index=False)
    return manifest
