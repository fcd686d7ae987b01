"""`volssl export --format nnunet` against nnU-Net v2's own loader and dynamic-network-architectures' own network.

nnunetv2 and dynamic-network-architectures are installed without their dependencies by `make` (pinned in the
Makefile); where they are missing this test is skipped and tests/models/test_export.py's reproduction of the
loading rule still runs."""
import json
import pydoc

import pytest
import torch

from training_standins import write_tiny_dataset
from volssl.config import ModelConfig, resolve
from volssl.models.registry import build_model
from volssl.training.checkpoint import load_checkpoint
from volssl.training.export import export_run

load_weights = pytest.importorskip("nnunetv2.run.load_pretrained_weights").load_pretrained_weights
ResidualEncoderUNet = pytest.importorskip("dynamic_network_architectures.architectures.unet").ResidualEncoderUNet


def test_nnunet_loads_the_export_into_its_own_network_and_the_encoder_computes_the_same(tmp_path):
    from volssl.training.trainer import pretrain

    torch.set_num_threads(1)
    data = write_tiny_dataset(tmp_path / "data", n_cases=2, shape=(40, 40, 40))
    cfg = resolve("s3d-b-tiny", ["train.steps=2", "data.patch_size=32,32,32", "data.num_workers=0",
                                 "train.device=cpu", "train.checkpoint_every=2", "train.preview_every=2"])
    pretrain(cfg, data, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "nn", "nnunet")
    plans = json.loads((tmp_path / "nn" / "nnunet_plans.json").read_text())
    arch = plans.get("configuration", plans)["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for k in arch.get("_kw_requires_import", []):  # nnU-Net's plans name classes as strings
        if kwargs.get(k) is not None:
            kwargs[k] = pydoc.locate(kwargs[k])
    theirs = ResidualEncoderUNet(input_channels=1, num_classes=3, deep_supervision=False, **kwargs)
    load_weights(theirs, str(tmp_path / "nn" / "nnunet_pretrained_weights.pth"))  # asserts every key and shape
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    ours = build_model(ModelConfig(**{**ck["model"], "out_channels": 1}))
    ours.load_state_dict(ck["network"], strict=False)  # the reconstruction heads are not in a transfer payload
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours.eval().encoder(x), theirs.eval().encoder(x)):
            assert torch.equal(a, b)
