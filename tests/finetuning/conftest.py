"""Shared fixtures (one torch thread per test comes from tests/conftest.py): a tiny brain-phantom dataset (3 channels) raw and preprocessed with
the S3D plan; a tiny S3D pre-training checkpoint (resenc-tiny: 4 stages, total stride 8, so its 32^3 patches
have a 4^3 bottleneck and 64 mask blocks of 8^3 voxels; 2 steps of the real loop)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

PATCH = (32, 32, 32)


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory) -> Path:
    """6 training + 1 test brain phantoms (T1, T2, FLAIR; labels background / lesion), 40^3 voxels (about
    75^3 at 1 mm; 4 of the 6 training cases hold lesions)."""
    from volssl.data.phantoms import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("raw") / "Dataset001_Phantoms", "brain", n=6, n_test=1,
                             seed=0, shape=(40, 40, 40), progress=False)


@pytest.fixture(scope="session")
def preprocessed(raw_dataset, tmp_path_factory) -> Path:
    """The phantoms preprocessed with the S3D plan, as finetune does it."""
    from volssl.data.preprocess import get_plan
    from volssl.finetuning.finetune import prepare_dataset

    out = tmp_path_factory.mktemp("ft")
    return prepare_dataset(raw_dataset, get_plan("s3d").to_dict(), out, out / "pre", progress=False)


@pytest.fixture(scope="session")
def pretrained(preprocessed, tmp_path_factory) -> Path:
    """A tiny S3D pre-training run (single-channel patches, as the paper pre-trains): its final.pt."""
    from volssl.config import resolve
    from volssl.training.trainer import pretrain

    cfg = resolve("s3d-b-tiny", ["train.steps=2", "data.patch_size=32,32,32", "data.num_workers=0",
                                 "train.device=cpu", "train.checkpoint_every=2", "train.preview_every=2"])
    run = tmp_path_factory.mktemp("pretrain")
    torch.set_num_threads(1)
    pretrain(cfg, preprocessed, run, progress=False)
    return run / "checkpoints" / "final.pt"
