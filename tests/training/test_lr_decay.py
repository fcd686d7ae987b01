"""Layer-wise lr decay: layer ids, and each parameter's effective lr in the optimiser the scheduler drives."""
import pytest
import torch

from volssl.config import ModelConfig, OptimConfig
from volssl.models.registry import build_model
from volssl.training.lr_decay import layer_id, layer_scales, param_groups_lrd
from volssl.training.optim import StepSchedule, build_optimizer


def test_layer_ids():
    L = 12
    assert layer_id("encoder.patch_embed.proj.weight", L) == 0
    assert layer_id("encoder.pos_embed", L) == 0
    assert layer_id("encoder.blocks.0.attn.qkv.weight", L) == 1
    assert layer_id("encoder.blocks.11.mlp.linear2.bias", L) == 12
    assert layer_id("encoder.norm.weight", L) == 13  # after the blocks
    assert layer_id("decoder.bottom.0.conv.weight", L) == 13 and layer_id("decoder.seg_layers.0.weight", L) == 13
    assert layer_id("blocks.3.norm1.weight", L, encoder_prefix="") == 4  # a bare encoder
    with pytest.raises(ValueError, match="block 12"):
        layer_id("encoder.blocks.12.norm1.weight", L)
    assert layer_scales(2, 0.5) == [0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="layer_decay"):
        layer_scales(2, 0.0)


def test_each_parameters_lr_is_the_peak_times_decay_to_the_layer_distance():
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="vit-unetr-tiny", out_channels=2))
    depth, decay, peak = 4, 0.75, 1e-3
    cfg = OptimConfig(name="adamw", lr=peak, weight_decay=0.05, schedule="constant")
    optimizer = build_optimizer(param_groups_lrd(net, cfg.weight_decay, decay), cfg)
    schedule = StepSchedule(optimizer, 10, cfg)
    schedule.set_step(3)
    lr_of, wd_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)], wd_of[id(p)] = group["lr"], group["weight_decay"]
    named = dict(net.named_parameters())
    assert len(lr_of) == len(named)  # every parameter exactly once
    for name, p in named.items():
        expected = peak * decay ** (depth + 1 - layer_id(name, depth))
        assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
        assert wd_of[id(p)] == (0.0 if p.ndim == 1 else 0.05), name
    assert lr_of[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(peak * decay ** 5)
    assert lr_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(peak * decay ** 4)
    assert lr_of[id(named["encoder.blocks.3.mlp.linear1.weight"])] == pytest.approx(peak * decay)
    assert lr_of[id(named["decoder.seg_layers.0.weight"])] == pytest.approx(peak)
    # the scales follow the schedule: at a cosine step the ratios stay the same
    cos = OptimConfig(name="adamw", lr=peak, schedule="cosine", warmup_steps=2)
    schedule = StepSchedule(build_optimizer(param_groups_lrd(net, 0.0, decay), cos), 10, cos, step=5)
    groups = schedule.optimizer.param_groups
    assert [g["lr"] / schedule.last_lr for g in groups] == pytest.approx([decay ** (5 - g["layer_id"]) for g in groups])


def test_groups_are_deterministic_and_can_be_restricted():
    net = build_model(ModelConfig(arch="vit-unetr-tiny", out_channels=2))
    a = param_groups_lrd(net, 0.05, 0.9)
    b = param_groups_lrd(net, 0.05, 0.9)
    assert [(g["layer_id"], g["weight_decay"], len(g["params"])) for g in a] == \
           [(g["layer_id"], g["weight_decay"], len(g["params"])) for g in b]
    assert [g["layer_id"] for g in a] == sorted(g["layer_id"] for g in a)
    only = {"encoder.blocks.1.attn.qkv.weight", "decoder.seg_layers.0.bias"}
    groups = param_groups_lrd(net, 0.05, 0.9, names=only)
    assert sum(len(g["params"]) for g in groups) == 2 and {g["layer_id"] for g in groups} == {2, 5}
    net.encoder.blocks[0].requires_grad_(False)  # by default frozen parameters are left out
    assert sum(len(g["params"]) for g in param_groups_lrd(net, 0.05, 0.9)) < sum(len(g["params"]) for g in a)
    with pytest.raises(ValueError, match="no parameters named"):
        param_groups_lrd(net, 0.05, 0.9, names={"encoder.nope"})


def test_a_network_without_transformer_blocks_is_refused():
    net = build_model(ModelConfig(arch="resenc-tiny"))
    with pytest.raises(ValueError, match="transformer encoder"):
        param_groups_lrd(net, 0.0, 0.75)
