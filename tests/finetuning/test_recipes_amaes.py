"""The AMAES fine-tuning recipes, and an imported AMAES checkpoint fine-tuned end to end on phantoms."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from volssl.cli import main
from volssl.finetuning.finetune import finetune
from volssl.finetuning.recipes import get_recipe, lr_at_step
from volssl.training.checkpoint import load_checkpoint

_spec = importlib.util.spec_from_file_location(
    "amaes_layout", Path(__file__).parents[1] / "models" / "test_import_amaes.py")
amaes_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(amaes_layout)


def test_amaes_recipe_holds_the_papers_finetuning_values():
    r = get_recipe("amaes")
    assert r.transfer == "encoder" and r.total_steps == 2500 and len(r.stages) == 1
    assert r.stages[0].trainable == "all" and r.stages[0].lr == "decay"
    o = r.optim
    assert (o.name, o.lr, o.weight_decay, o.eps, o.amsgrad, o.schedule) == ("adamw", 1e-4, 3e-5, 1e-8, True, "cosine")
    assert r.n_train == 20 and r.batch_size == 4 and r.plan == "amaes" and r.deep_supervision is False
    assert r.augment.enabled and r.augment.p_rotation == 0.2 and r.augment.p_scale == 0.2
    assert r.augment.scale_range == (0.9, 1.1) and r.augment.p_mirror == 0.0 and r.augment.p_elastic == 0.0
    assert r.intensity.enabled is False  # spatial augmentation only
    assert lr_at_step(r, 0) == 1e-4 and lr_at_step(r, 1250) == 0.5e-4 and lr_at_step(r, 2500) == 0.0


def test_scratch_twin_and_tiny_siblings():
    s = get_recipe("scratch-amaes-schedule")
    a = get_recipe("amaes")
    assert s.transfer == "none" and s.arch == "unet-b" and s.patch_size == (128, 128, 128)
    assert s.stages == a.stages and s.optim == a.optim and s.n_train == 20
    assert s.intensity.enabled and s.augment.p_elastic == 0.33  # the paper's from-scratch runs: all augmentations
    t = get_recipe("scratch-amaes-schedule-tiny")
    assert t.arch == "unet-tiny" and t.total_steps == 300 and t.train.precision == "fp32"  # cpu_regime
    assert get_recipe("amaes-tiny").total_steps == 300


@pytest.mark.slow  # ~15-20 s: preprocesses the phantoms with the amaes plan
def test_imported_amaes_checkpoint_finetunes_with_the_recipe_defaults(raw_dataset, tmp_path, capsys):
    src, ckpt = tmp_path / "unet_tiny_lw_dec_fullaug.pth", tmp_path / "amaes.pt"
    torch.save(amaes_layout.yucca_unet(8), src)
    assert main(["import-checkpoint", "--format", "amaes", str(src), str(ckpt)]) == 0
    summary = finetune(ckpt, raw_dataset, tmp_path / "ft", recipe="amaes-tiny", progress=False, stage_steps=[2],
                       overrides=["patch_size=32,32,32", "num_workers=0", "train.device=cpu",
                                  "train.checkpoint_every=2", "train.val_every=0"])
    assert summary["status"] == "finished" and summary["method"] == "amaes"
    splits = json.loads((tmp_path / "ft" / "splits.json").read_text())
    assert summary["n_train"] == len(splits["folds"][0]["train"]) < 20  # the recipe's 20, capped at the fold's
    moved = summary["transfer"]["moved"] + summary["transfer"]["replicated"]
    final = load_checkpoint(tmp_path / "ft" / "checkpoints" / "final.pt")
    encoder = {k for k in final["network"] if k.startswith("encoder.")}
    assert set(moved) == encoder  # every encoder tensor came from the AMAES checkpoint, unchanged
    # amaes-tiny encodes each of the 3 channels with the one-channel encoder (channel_fusion=features):
    # nothing is replicated, the per-stage fusion convs are new like the decoder
    assert summary["transfer"]["replicated"] == []
    assert all(k.startswith(("decoder.", "fusion.")) for k in summary["transfer"]["new"])
    assert final["model"]["arch"] == "unet-tiny" and final["model"]["in_channels"] == 3
    assert final["model"]["channel_fusion"] == "features"
    assert final["plan"]["name"] == "amaes"
