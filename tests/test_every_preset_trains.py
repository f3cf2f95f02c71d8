"""Every shipped training preset runs: a few steps of its method, backbone and options on generated images
at a small size on the CPU. The end-to-end presets are meant for a GPU and have never run at their full
size on this project's machines; this keeps them from breaking unseen (a wrong option, a method that no
longer accepts one of its settings, a head that does not build)."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from retrieval.data.dataset import load_dataset
from retrieval.training.config import load_train_config
from retrieval.training.presets import preset_names, preset_path
from retrieval.training.trainer import train


def small(cfg):
    """The preset at a size that runs in seconds: 32 px, 3 steps, small batches and K; nothing else changed."""
    changes = dict(image_size=32, max_steps=3, epochs=2, batch_size=8, device="cpu")
    if cfg.freeze_backbone:
        changes["frozen_views"] = min(cfg.frozen_views, 1)
    if cfg.is_clustering:
        changes.update(clusters=3, overclusters=5 if cfg.overclusters else 0, neighbours=3)
        changes["self_label_epochs"] = 1 if cfg.self_label_epochs else 0
    return replace(cfg, **changes)


@pytest.mark.slow
@pytest.mark.parametrize("name", preset_names())
def test_preset_trains_a_few_steps(name, demo_data):
    cfg = small(load_train_config(preset_path(name)))
    rows = load_dataset(demo_data).rows.reset_index(drop=True)
    if cfg.method == "fixmatch":  # half of the images unlabelled: what the method is for
        rows = rows.assign(label=rows["label"].where(np.arange(len(rows)) % 2 == 0, pd.NA))
    elif not cfg.needs_labels:
        rows = rows.drop(columns=["label"])
    res = train(rows, cfg, progress=False)
    losses = [s["loss"] for s in res.log["steps"]]
    assert len(losses) >= 1 and np.isfinite(losses).all()
    vectors = res.encoder.eval()(first_images(rows, cfg))
    assert vectors.shape[0] == 4 and np.isfinite(vectors.detach().numpy()).all()


def first_images(rows, cfg):
    from retrieval.config import PreprocessConfig
    from retrieval.training.trainer import load_image_tensors

    images = load_image_tensors(rows.head(4), PreprocessConfig(image_size=cfg.image_size))[0]
    return images.float() / 255
