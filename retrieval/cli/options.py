"""Options shared by several commands."""

from __future__ import annotations

import typer

from retrieval.config import DEFAULT_ENCODER, EncoderSpec
from retrieval.errors import RetrieveError

Encoder = typer.Option(
    DEFAULT_ENCODER,
    "--encoder",
    "-e",
    help="imagenet-effnet-lite0, cnn5, a timm name (resnet18, resnet50, efficientnet_b0, ...) "
    "or a checkpoint .safetensors",
)
Weights = typer.Option(
    None,
    "--weights",
    help="local weights file (timm/torchvision state_dict, .pth or .safetensors) or hub snapshot folder",
)
Seed = typer.Option(0, "--seed", help="seed for random-init encoders")
ImageSize = typer.Option(
    None, "--image-size", help="square input size in pixels, 8 to 4096 (default: the encoder's, 224)"
)
CropSector = typer.Option(
    None, "--crop-sector/--no-crop-sector", help="crop to the ultrasound sector, dropping margins and annotation bands"
)
Resize = typer.Option(None, "--resize", help="pad (keep aspect ratio) or squash")
CtWindow = typer.Option(None, "--ct-window", help="CT window in HU as LOW,HIGH (default -100,400)")
BatchSize = typer.Option(32, "--batch-size", min=1)
Workers = typer.Option(None, "--workers", help="DataLoader worker processes (default: automatic)")
Gpu = typer.Option(True, "--gpu/--no-gpu", help="use CUDA for the encoder and FAISS when available")
Quiet = typer.Option(False, "--quiet", "-q", help="no progress bars")


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 0:
        raise RetrieveError(f"--workers {workers}: must be 0 (decode in this process) or more")


def encoder_spec(encoder: str, weights: str | None, seed: int) -> EncoderSpec:
    return EncoderSpec(name=encoder, weights=weights, seed=seed)


def preprocess_overrides(
    image_size: int | None, crop_sector: bool | None, resize: str | None, ct_window: str | None
) -> dict:
    window = None
    if ct_window is not None:
        try:
            lo, hi = (float(v) for v in ct_window.split(","))
        except ValueError:
            raise RetrieveError(f"--ct-window {ct_window!r}: expected LOW,HIGH in HU, e.g. -100,400") from None
        window = (lo, hi)
    return {"image_size": image_size, "crop_sector": crop_sector, "resize": resize, "ct_window": window}
