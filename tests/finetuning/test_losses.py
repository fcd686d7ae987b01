"""Dice + CE (equal to MONAI's), per-sample averaging, deep supervision, label mapping."""
import pytest
import torch
from monai.losses import DiceCELoss

from volssl.finetuning.losses import (
    LabelMap, deep_supervision_loss, deep_supervision_weights, dice_ce_loss, downsample_target,
)


def sample(b=3, k=3, s=(8, 6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, *s, generator=g) * 2
    target = torch.randint(0, k, (b, 1, *s), generator=g)
    return logits, target


def test_equals_monai_dice_ce():
    logits, target = sample()
    ours = dice_ce_loss(logits, target)
    monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)
    torch.testing.assert_close(ours, monai(logits, target), rtol=1e-5, atol=1e-6)
    monai_bg = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)
    torch.testing.assert_close(dice_ce_loss(logits, target, include_background=True), monai_bg(logits, target),
                               rtol=1e-5, atol=1e-6)


def test_mean_of_per_sample_losses_and_near_zero_for_a_perfect_prediction():
    logits, target = sample(b=4)
    each = torch.stack([dice_ce_loss(logits[i:i + 1], target[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(dice_ce_loss(logits, target), each.mean())
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert dice_ce_loss(perfect, target).item() < 1e-4
    assert dice_ce_loss(logits.bfloat16(), target).dtype == torch.float32


def test_deep_supervision_weights_and_targets():
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    logits, target = sample(b=2, k=2, s=(8, 8, 8))
    small = downsample_target(target, (4, 4, 4))
    assert torch.equal(small, target[:, :, ::2, ::2, ::2])
    outs = [logits, logits[:, :, ::2, ::2, ::2], logits[:, :, ::4, ::4, ::4]]
    expected = (2 / 3) * dice_ce_loss(outs[0], target) + (1 / 3) * dice_ce_loss(outs[1], small)
    torch.testing.assert_close(deep_supervision_loss(outs, target), expected)
    torch.testing.assert_close(deep_supervision_loss(logits, target), dice_ce_loss(logits, target))
    with pytest.raises(ValueError, match="does not divide"):
        downsample_target(target, (3, 4, 4))


def test_label_map_uses_sorted_declared_values_and_instance_ids():
    m = LabelMap({"background": 0, "edema": 2, "tumour": 4})
    assert m.n_classes == 3 and m.unknown([0, 2, 3]) == [3]
    assert m(torch.tensor([[0, 4], [2, 2]])).tolist() == [[0, 2], [1, 1]]
    inst = LabelMap({"background": 0, "axon": 1}, instance=True)
    assert inst(torch.tensor([0, 5, 300])).tolist() == [0, 1, 1] and inst.unknown([0, 7]) == []
    with pytest.raises(ValueError, match="region-based"):
        LabelMap({"background": 0, "whole": [1, 2]})
    with pytest.raises(ValueError, match="distinct"):
        LabelMap({"background": 0, "a": 1, "b": 1})
