"""`retrieve encoders`: list the encoder registry."""

from __future__ import annotations


def list_encoders_cmd():
    """List the named encoders (any timm model name also works)."""
    from retrieval.encoders.registry import list_encoders

    for name in list_encoders():
        print(name)
    print("(any timm model name, e.g. resnet18, resnet50, efficientnet_b0; or a checkpoint .safetensors)")
