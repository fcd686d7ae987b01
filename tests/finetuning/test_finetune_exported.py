"""Fine-tuning from an exported safetensors folder (and from hf://, through a stand-in for
huggingface_hub.snapshot_download) is fine-tuning from the checkpoint it was exported from; a
fine-tuned run exports and loads for prediction with the same outputs."""
from __future__ import annotations

import json

import pytest
import torch

import volssl.finetuning.finetune as ft
from volssl.cli import main as cli
from volssl.inference.model import load_finetuned
from volssl.training.checkpoint import load_checkpoint
from volssl.training.export import export_run
from volssl.training.logging import read_scalars

# as tests/finetuning/test_finetune.py (channel_fusion=stem: a plain ResEnc U-Net, so nnunet export applies)
SMALL = ["patch_size=32,32,32", "num_workers=0", "train.log_every=1", "train.device=cpu", "train.checkpoint_every=2",
         "channel_fusion=stem"]


@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    """The tiny S3D pre-training (tests/finetuning/conftest.py) exported as a safetensors folder."""
    out = tmp_path_factory.mktemp("exported")
    export_run(pretrained, out, "safetensors")
    return out


@pytest.fixture(scope="module")
def from_checkpoint(pretrained, preprocessed, tmp_path_factory):
    """s3d-tiny fine-tuning (1 + 1 + 1 steps) from the pre-training's final.pt."""
    out = tmp_path_factory.mktemp("ft_pt")
    ft.finetune(pretrained, preprocessed, out, recipe="s3d-tiny", stage_steps=[1, 1, 1], overrides=SMALL,
                progress=False)
    return out


def test_finetuning_from_the_hub_folder_equals_finetuning_from_the_checkpoint(
        exported, from_checkpoint, preprocessed, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, **kw: calls.append((repo_id, revision)) or str(exported))
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", "hf://lab/s3d-tiny@v1", "--dataset", str(preprocessed), "--out", str(out),
            "--recipe", "s3d-tiny", "--stage-steps", "1,1,1", "--no-progress"]
    assert cli(args + [a for o in SMALL for a in ("--set", o)]) == 0
    assert calls and calls[0] == ("lab/s3d-tiny", "v1")
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["checkpoint"] == "hf://lab/s3d-tiny@v1" and run_json["method"] == "s3d"
    key = lambda r: (r["step"], r["loss"], r["lr"])  # noqa: E731
    assert [key(r) for r in read_scalars(out / "scalars.csv")] == \
        [key(r) for r in read_scalars(from_checkpoint / "scalars.csv")]
    a = load_checkpoint(out / "checkpoints" / "final.pt")
    b = load_checkpoint(from_checkpoint / "checkpoints" / "final.pt")
    assert a["pretrained"]["method"] == b["pretrained"]["method"] == "s3d" and a["pretrained"]["step"] == 2
    assert all(torch.equal(a["network"][k], b["network"][k]) for k in b["network"])


def test_a_fine_tuned_run_exports_and_predicts_the_same(from_checkpoint, tmp_path):
    export_run(from_checkpoint, tmp_path / "st", "safetensors")
    original, exported = load_finetuned(from_checkpoint), load_finetuned(tmp_path / "st")
    assert (exported.labels, exported.channels, exported.patch_size) == (original.labels, original.channels,
                                                                         original.patch_size)
    x = torch.randn(1, 3, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original.network(x), exported.network(x))
    card = (tmp_path / "st" / "README.md").read_text()
    assert "(fine-tuned)" in card and "volssl predict --model" in card and "3 steps" in card
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["kind"] == "finetune" and config["finetune"]["labels"] == {"background": 0, "lesion": 1}
    assert not any(isinstance(v, str) and v.startswith("/") for v in config["config"].values())  # no local paths
    result = export_run(from_checkpoint, tmp_path / "nn", "nnunet")
    assert result.plans["input_channels"] == 3 and len(result.plans["configuration"]["normalization_schemes"]) == 3
    weights = torch.load(tmp_path / "nn" / "nnunet_pretrained_weights.pth", weights_only=True)["network_weights"]
    assert torch.equal(weights["decoder.encoder.stem.convs.0.all_modules.0.weight"],
                       original.network.state_dict()["encoder.stem.convs.0.conv.weight"])
