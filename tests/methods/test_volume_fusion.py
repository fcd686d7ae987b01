"""VolumeFusion: the fusion target on hand-made inputs, the box painting, the pairs, Dice + CE,
data-parallel rows, a tiny pre-training on brain phantoms whose loss decreases, and a checkpoint
that fine-tuning accepts."""

import numpy as np
import pytest
import torch

from volssl.config import ModelConfig, get_preset, resolve
from volssl.methods import MethodOutput, build_method
from volssl.methods.volume_fusion import VolumeFusion, VolumeFusionConfig, dice_ce_loss
from volssl.models.registry import build_model
from baseline_helpers import phantom_batches, shown_appendix_a_preset  # tests/methods/ (see conftest.py)

PATCH = (32, 32, 32)


def make(**kw) -> VolumeFusion:
    torch.manual_seed(0)
    cfg = VolumeFusionConfig(**kw)
    return VolumeFusion(build_model(ModelConfig(arch="resenc-tiny", out_channels=cfg.levels)), cfg)


def test_the_target_is_the_class_of_the_coefficient_used_at_each_voxel():
    vf = make()
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 5, (2, *PATCH), generator=gen)
    ones = torch.ones(2, 1, *PATCH)
    assert torch.equal(vf.fuse(ones, 0 * ones, levels)[:, 0], torch.linspace(0, 1, 5)[levels])  # x1 = 1, x2 = 0
    x1, x2 = (torch.randn(2, 1, *PATCH, generator=gen, dtype=torch.float64) for _ in range(2))
    fused = vf.fuse(x1, x2, levels)
    a = (fused - x2) / (x1 - x2)  # the coefficient each voxel was fused with
    torch.testing.assert_close(a[:, 0], torch.linspace(0, 1, 5, dtype=torch.float64)[levels])
    k = 2
    torch.testing.assert_close(fused[levels.unsqueeze(1) == k], (0.5 * x1 + 0.5 * x2)[levels.unsqueeze(1) == k])
    assert torch.equal(fused[levels.unsqueeze(1) == 0], x2[levels.unsqueeze(1) == 0])  # level 0: x2 only
    assert torch.equal(fused[levels.unsqueeze(1) == 4], x1[levels.unsqueeze(1) == 4])  # level K-1: x1 only


def test_levels_are_painted_boxes_of_the_configured_sizes():
    vf = make(boxes=(1, 1), levels=5)  # one box per sample: its footprint is visible unless its level is 0
    torch.manual_seed(3)
    levels = vf.draw_levels(64, PATCH)
    assert levels.dtype == torch.long and levels.shape == (64, *PATCH)
    lo, hi = vf.box_range(32)
    assert (lo, hi) == (8, 20)  # 8 .. 62.5% of the side
    seen = 0
    for lv in levels:
        nz = lv.nonzero()
        if len(nz) == 0:
            continue
        seen += 1
        first, last = nz.min(0).values, nz.max(0).values
        size = last - first + 1
        assert bool(((size >= lo) & (size <= hi)).all())
        box = lv[first[0]:last[0] + 1, first[1]:last[1] + 1, first[2]:last[2] + 1]
        assert len(box.unique()) == 1 and int(lv.count_nonzero()) == box.numel()  # one filled box, one level
    assert seen > 40  # level 0 is one of 5: about 51 of 64 boxes are visible
    whole = make(boxes=(1, 1), box_min=32, box_max_fraction=1.0)  # one box covering the patch
    torch.manual_seed(4)
    lv = whole.draw_levels(200, PATCH)
    per_sample = lv.flatten(1)
    assert bool((per_sample == per_sample[:, :1]).all())
    counts = torch.bincount(per_sample[:, 0], minlength=5)
    assert bool((counts > 20).all())  # every level, uniformly
    none = make(boxes=(0, 0))
    assert none.draw_levels(2, PATCH).count_nonzero() == 0  # no box: background level 0


def test_boxes_are_painted_in_order_later_ones_overwriting_earlier_ones():
    vf = make(boxes=(10, 40))
    torch.manual_seed(0)
    levels = vf.draw_levels(3, PATCH)
    torch.manual_seed(0)  # the documented draws: counts (G,), sizes and starts (G, 40, 3), levels (G, 40)
    counts = torch.randint(10, 41, (3,))
    sizes = 8 + (torch.rand(3, 40, 3, dtype=torch.float64) * 13).floor().long()
    starts = (torch.rand(3, 40, 3, dtype=torch.float64) * (32 - sizes + 1)).floor().long()
    values = torch.randint(0, 5, (3, 40))
    want = np.zeros((3, *PATCH), dtype=np.int64)
    for b in range(3):
        for m in range(int(counts[b])):
            (x, y, z), (sx, sy, sz) = starts[b, m].tolist(), sizes[b, m].tolist()
            want[b, x:x + sx, y:y + sy, z:z + sz] = int(values[b, m])
    assert np.array_equal(levels.numpy(), want)
    assert all(len(lv.unique()) >= 3 for lv in levels)


def test_pairs_are_neighbouring_rows():
    x = torch.arange(5.0).view(5, 1, 1, 1, 1).expand(5, 1, 2, 2, 2)
    assert VolumeFusion.partners(x)[:, 0, 0, 0, 0].tolist() == [1.0, 0.0, 3.0, 2.0, 3.0]
    one = torch.arange(8.0).view(1, 1, 2, 2, 2)
    assert torch.equal(VolumeFusion.partners(one), one.flip((2, 3, 4)))


def test_dice_ce_loss_by_hand():
    target = torch.tensor([[0, 0, 1, 1]]).view(1, 2, 2, 1)
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 40.0
    assert dice_ce_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-5)
    logits = torch.zeros(1, 3, 2, 2, 1)  # uniform probabilities 1/3
    ce = np.log(3.0)
    dice = 2 * (2 / 3) / (4 / 3 + 2)  # classes 0 and 1 (present): 2 sum(p t) / (sum p + sum t); class 2 absent
    assert dice_ce_loss(logits, target).item() == pytest.approx(ce + 1 - dice, rel=1e-5)
    assert dice_ce_loss(logits, target, dice_weight=0.0).item() == pytest.approx(ce, rel=1e-5)
    two = torch.cat([logits, perfect]), torch.cat([target, target])
    assert dice_ce_loss(*two).item() == pytest.approx((ce + 1 - dice) / 2, rel=1e-4)  # mean of per-sample losses


def test_forward_loss_previews_and_gradients():
    vf = make()
    x = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = vf(x)
    assert isinstance(out, MethodOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.previews) == {"input", "masked", "reconstruction", "target"}
    torch.manual_seed(2)
    levels = vf.draw_levels(2, PATCH)
    torch.testing.assert_close(out.previews["target"][:, 0], torch.linspace(0, 1, 5)[levels])
    torch.testing.assert_close(out.previews["masked"], vf.fuse(x, x[[1, 0]], levels))
    out.loss.backward()
    assert [n for n, p in vf.named_parameters() if p.requires_grad and p.grad is None] == []


def test_data_parallel_rows_draw_and_lose_exactly_as_one_process():
    vf = make()
    x = torch.randn(4, 1, *PATCH, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    whole_levels = vf.draw_levels(4, PATCH)
    torch.manual_seed(7)
    whole = vf(x).loss
    halves = []
    for o in (0, 2):
        torch.manual_seed(7)
        assert torch.equal(vf.draw_levels(2, PATCH, o, 4), whole_levels[o:o + 2])
        torch.manual_seed(7)
        halves.append(vf(x[o:o + 2], sample_offset=o, global_batch=4).loss)
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)  # same pairs, mean of per-sample losses
    with pytest.raises(ValueError, match="do not fit a global batch of 4"):
        vf(x[:2], sample_offset=3, global_batch=4)


def test_config_checks_and_transfer_state_dict():
    with pytest.raises(ValueError, match="predict 5 classes"):
        VolumeFusion(build_model(ModelConfig(arch="resenc-tiny")), VolumeFusionConfig())
    with pytest.raises(ValueError, match="boxes must be"):
        make(boxes=(5, 2))
    vf = make()
    with pytest.raises(ValueError, match="divisible by the encoder's total stride 8"):
        vf(torch.zeros(1, 1, 32, 32, 36))
    sd = vf.transfer_state_dict()
    assert set(sd) == {k for k in vf.network.state_dict() if not k.startswith("decoder.seg_layers.")}


def test_preset_values_on_the_command_line(capsys):
    cfg = shown_appendix_a_preset(capsys, "volume-fusion", (160, 160, 160), 6)
    m = cfg["method"]
    assert (m["name"], m["levels"], m["boxes"], m["box_min"], m["box_max_fraction"]) == (
        "volume-fusion", 5, [10, 40], 8, 0.625)
    assert int(160 * m["box_max_fraction"]) == 100  # the paper's [8, 100] voxels
    tiny = get_preset("volume-fusion-tiny")
    method = build_method(tiny)
    assert isinstance(method, VolumeFusion) and method.network.decoder.out_channels == 5


def test_tiny_pretraining_loss_decreases_and_the_checkpoint_fine_tunes(tmp_path):
    from volssl.finetuning.finetune import load_source
    from volssl.finetuning.recipes import resolve_recipe
    from volssl.finetuning.transfer import transfer_weights
    from volssl.training.logging import read_scalars
    from volssl.training.trainer import pretrain

    cfg = resolve("volume-fusion-tiny", ["train.steps=40", "data.patch_size=32,32,32", "train.device=cpu",
                                         "data.num_workers=0", "train.log_every=1", "train.checkpoint_every=40",
                                         "train.preview_every=40"])
    summary = pretrain(cfg, None, tmp_path / "run", batches=phantom_batches(2, (32, 32, 32)), progress=False)
    assert summary["status"] == "finished"
    loss = [r["loss"] for r in read_scalars(tmp_path / "run" / "scalars.csv")]
    assert len(loss) == 40 and np.mean(loss[-8:]) < 0.9 * np.mean(loss[:8])
    source = load_source(tmp_path / "run")
    assert source.method == "volume-fusion"
    recipe = resolve_recipe("s3d-tiny")
    net = build_model(ModelConfig(arch=source.model.arch, in_channels=1, out_channels=2))
    report = transfer_weights(net, source.network, recipe.transfer)
    assert any(k.startswith("decoder.stages.") for k in report.moved)  # encoder AND decoder move
    assert all(k.startswith("decoder.seg_layers.") for k in report.new)  # K=5 heads stay behind
    assert not any(k.startswith("decoder.seg_layers.") for k in source.network)
