"""MAE-XNT fine-tuning: the recipes (supplement Table 7), and a tiny MAE-XNT checkpoint fine-tuned end to end
with layer-wise lr decay (each parameter group's lr in the real run)."""
import json

import pytest
import torch

import volssl.finetuning.finetune as ft
from volssl.finetuning.recipes import get_recipe, resolve_recipe, tiny_optim
from volssl.training.lr_decay import layer_id


def test_the_mae_xnt_recipes_hold_table_7s_values():
    r = get_recipe("mae-xnt")
    assert r.transfer == "encoder" and r.layer_decay == 0.75 and not r.deep_supervision
    assert r.optim.name == "adamw" and r.optim.lr == 1e-5 and r.optim.weight_decay == 1e-4
    assert r.optim.schedule == "cosine" and r.optim.min_lr == 1e-6 and r.optim.grad_clip is None
    assert [(s.trainable, s.lr) for s in r.stages] == [("all", "decay")] and r.total_steps == 25_000
    assert r.arch is None and r.patch_size is None  # the checkpoint's network and crop
    s = get_recipe("scratch-mae-xnt-schedule")
    assert s.transfer == "none" and s.layer_decay is None and s.arch == "vit-b-unetr"
    assert (s.optim.lr, s.optim.weight_decay, s.total_steps) == (1e-4, 1e-5, r.total_steps)
    t = get_recipe("scratch-mae-xnt-schedule-tiny")
    assert t.arch == "vit-unetr-tiny" and t.batch_size == 2 and t.total_steps == 250
    assert resolve_recipe("mae-xnt", ["layer_decay=0.9"]).layer_decay == 0.9
    assert resolve_recipe("mae-xnt", ["layer_decay=none"]).layer_decay is None
    with pytest.raises(ValueError, match="layer_decay"):
        resolve_recipe("mae-xnt", ["layer_decay=1.5"])


@pytest.fixture(scope="module")
def mae_checkpoint(preprocessed, tmp_path_factory):
    """A tiny MAE-XNT pre-training run (2 steps of the real loop, 32^3 single-channel crops)."""
    from volssl.config import resolve
    from volssl.training.trainer import pretrain

    cfg = resolve("mae-xnt-tiny", ["train.steps=2", "data.num_workers=0", "train.device=cpu",
                                   "train.checkpoint_every=2", "train.preview_every=2"])
    run = tmp_path_factory.mktemp("mae-pretrain")
    torch.set_num_threads(1)
    pretrain(cfg, preprocessed, run, progress=False)
    return run / "checkpoints" / "final.pt"


def test_finetune_a_mae_xnt_checkpoint_with_layer_decay(mae_checkpoint, preprocessed, tmp_path, monkeypatch):
    built = {}
    real = ft.build_optimizer

    def spy(params, cfg):
        built["optimizer"] = opt = real(params, cfg)
        return opt

    monkeypatch.setattr(ft, "build_optimizer", spy)
    summary = ft.finetune(mae_checkpoint, preprocessed, tmp_path, recipe="mae-xnt-tiny", stage_steps=[2],
                          overrides=["num_workers=0", "train.device=cpu", "train.log_every=1",
                                     "train.checkpoint_every=2"], progress=False)
    assert summary["status"] == "finished" and summary["step"] == 2
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["method"] == "mae-xnt" and run["pretrained"]
    transfer = summary["transfer"]
    assert transfer["replicated"] == ["encoder.patch_embed.proj.weight"]  # 1 -> 3 channels (T1, T2, FLAIR)
    assert all(k.startswith("encoder.") for k in transfer["moved"]) and transfer["moved"]
    assert all(k.startswith("decoder.") for k in transfer["new"])
    # every parameter of the network sits in the group of its layer, at peak * 0.75 ** (L + 1 - layer)
    opt = built["optimizer"]
    groups = opt.param_groups
    ckpt = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert len({id(p) for g in groups for p in g["params"]}) == len(ckpt["network"])  # all, once (no buffers)
    depth = 4
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - g["layer_id"]))
    # the scheduler set each group's lr (last step: the cosine end, min_lr) times its scale; the -tiny
    # recipe's min_lr is the real one (1e-6) scaled with its peak lr (1e-5 x 25k/250 steps -> 1e-3): 1e-4
    tiny = tiny_optim(get_recipe("mae-xnt"), get_recipe("mae-xnt-tiny").total_steps)
    assert (tiny.name, tiny.lr, tiny.min_lr) == ("adamw", pytest.approx(1e-3), pytest.approx(1e-4))
    for g in groups:
        assert g["lr"] == pytest.approx(tiny.min_lr * g["lr_scale"], rel=1e-6)
    assert {g["layer_id"] for g in groups} == set(range(depth + 2))
    assert layer_id("encoder.blocks.3.norm1.weight", depth) == 4
