"""Ultrasound-appropriate augmentations on (N, 1, H, W) tensors in [0, 1], one random draw per image.

Rotation, shear, zoom, shift (affine), horizontal flip, random resized crop, gain (brightness) and
blur: the geometric and acoustic changes between scans. No colour jitter on grayscale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 15.0
    shear_deg: float = 8.0
    zoom: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.08  # fraction of the image size
    flip_p: float = 0.5
    crop_scale: tuple[float, float] = (0.7, 1.0)
    gain: tuple[float, float] = (0.8, 1.2)
    blur_p: float = 0.3


def augment(
    x: torch.Tensor, cfg: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random affine + crop (one sampling grid per image), flip, gain and blur; output like input."""
    n, _, h, w = x.shape
    g = generator

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    angle = torch.deg2rad(u(-cfg.rotation_deg, cfg.rotation_deg))
    shear = torch.deg2rad(u(-cfg.shear_deg, cfg.shear_deg))
    scale = u(*cfg.zoom) * torch.sqrt(u(*cfg.crop_scale))  # zoom and crop both shrink the field of view
    flip = torch.where(torch.rand(n, generator=g) < cfg.flip_p, -1.0, 1.0)
    tx, ty = u(-cfg.shift, cfg.shift) * 2, u(-cfg.shift, cfg.shift) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # inverse map from output to input coordinates: rotate, shear, scale (theta acts on output grid)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip * scale
    theta[:, 0, 1] = (-sin + cos * torch.tan(shear)) * scale
    theta[:, 1, 0] = sin * flip * scale
    theta[:, 1, 1] = (cos + sin * torch.tan(shear)) * scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = u(*cfg.gain).to(x.device).view(n, 1, 1, 1)
    out = out * gain
    blur = (torch.rand(n, generator=g) < cfg.blur_p).to(x.device)
    if blur.any():
        k = _gaussian_kernel(1.0, x.device, x.dtype)
        blurred = F.conv2d(F.pad(out[blur], (2, 2, 2, 2), mode="reflect"), k)
        out = out.clone()
        out[blur] = blurred
    return out.clamp_(0.0, 1.0)


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=dtype, device=device)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    return (k1[:, None] * k1[None, :]).view(1, 1, 5, 5)
