"""Encoders: a registry of backbones that map (B, 1, H, W) images in [0, 1] to L2-normalised vectors."""

from retrieval.encoders.base import Encoder
from retrieval.encoders.checkpoint import load_checkpoint, save_checkpoint
from retrieval.encoders.registry import create_encoder, list_encoders, register_encoder

__all__ = ["Encoder", "create_encoder", "list_encoders", "register_encoder", "load_checkpoint", "save_checkpoint"]
