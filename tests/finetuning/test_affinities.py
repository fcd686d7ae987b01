"""Affinity targets from instance labels and the class-balanced affinity loss."""
import numpy as np
import pytest
import torch

from volssl.finetuning.affinities import (
    AFFINITY_OFFSETS,
    affinity_loss,
    affinity_targets,
    make_offsets,
)


def _two_objects() -> np.ndarray:
    """(8, 6, 5): object 1 at x 0-3, object 2 at x 4-7 (touching at x 3|4), both for y < 4;
    background for y >= 4."""
    lab = np.zeros((8, 6, 5), dtype=np.uint16)
    lab[:4, :4] = 1
    lab[4:, :4] = 2
    return lab


def _brute_force(lab: np.ndarray, offsets) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((len(offsets), *lab.shape), np.float32)
    valid = np.zeros_like(target)
    for c, off in enumerate(offsets):
        for p in np.ndindex(*lab.shape):
            q = tuple(a + d for a, d in zip(p, off))
            if all(0 <= v < s for v, s in zip(q, lab.shape)):
                valid[(c, *p)] = 1
                target[(c, *p)] = float(lab[p] == lab[q] and lab[p] != 0)
    return target, valid


def test_default_offsets_layout():
    assert len(AFFINITY_OFFSETS) == 12
    # nearest neighbours first, one per axis, pointing backwards (waterz's layout)
    assert AFFINITY_OFFSETS[:3] == ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
    assert AFFINITY_OFFSETS[3 * 3 + 2] == (0, 0, -27)
    assert make_offsets((1, 3, 9, 27)) == AFFINITY_OFFSETS
    with pytest.raises(ValueError, match="distances"):
        make_offsets((0, 1))


def test_two_objects_exact_values():
    lab = _two_objects()
    target, valid = affinity_targets(lab)
    assert target.shape == valid.shape == (12, 8, 6, 5) and target.dtype == np.float32
    # nearest neighbour along x: inside object 1, across the 1|2 face, outside the volume
    assert target[0, 3, 1, 1] == 1 and valid[0, 3, 1, 1] == 1
    assert target[0, 4, 1, 1] == 0 and valid[0, 4, 1, 1] == 1  # (4,1,1) in 2, (3,1,1) in 1
    assert target[0, 0, 1, 1] == 0 and valid[0, 0, 1, 1] == 0  # partner (-1,1,1) outside
    # along y: object / background boundary, and background / background is never affine
    assert target[1, 2, 4, 1] == 0 and valid[1, 2, 4, 1] == 1
    assert target[1, 2, 5, 1] == 0 and valid[1, 2, 5, 1] == 1
    assert target[1, 2, 3, 1] == 1
    # along z, distance 1 and 3
    assert target[2, 6, 2, 4] == 1 and target[5, 6, 2, 4] == 1 and valid[5, 6, 2, 2] == 0
    # distance 3 along x: (5,1,1) pairs with (2,1,1) across the face; (7,1,1) with (4,1,1) inside 2
    assert target[3, 5, 1, 1] == 0 and valid[3, 5, 1, 1] == 1
    assert target[3, 7, 1, 1] == 1
    assert valid[3, 2, 1, 1] == 0
    # distances 9 and 27 exceed every side (8, 6, 5): no valid pair, no positive
    assert valid[6:].sum() == 0 and target[6:].sum() == 0
    assert valid[:6].sum() > 0


def test_matches_brute_force_on_random_labels():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, size=(7, 6, 5)).astype(np.int32)
    offsets = make_offsets((1, 3)) + ((-1, -2, 1),)  # a diagonal one too
    target, valid = affinity_targets(lab, offsets)
    t_ref, v_ref = _brute_force(lab, offsets)
    np.testing.assert_array_equal(target, t_ref)
    np.testing.assert_array_equal(valid, v_ref)


def test_torch_batch_matches_numpy_per_sample():
    rng = np.random.default_rng(1)
    labs = rng.integers(0, 4, size=(2, 1, 9, 8, 7))
    target, valid = affinity_targets(torch.from_numpy(labs))
    assert isinstance(target, torch.Tensor) and target.shape == (2, 12, 9, 8, 7) and target.dtype == torch.float32
    assert valid.shape == target.shape
    for b in range(2):
        t_np, v_np = affinity_targets(labs[b, 0])
        np.testing.assert_array_equal(target[b].numpy(), t_np)
        np.testing.assert_array_equal(valid[b].numpy(), v_np)
    # numpy (B, 1, ...) input gives the batched layout too
    t_b, _ = affinity_targets(labs)
    assert t_b.shape == (2, 12, 9, 8, 7)


def test_label_validation():
    with pytest.raises(ValueError, match=r"\(B, 1"):
        affinity_targets(torch.zeros(2, 3, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-integer"):
        affinity_targets(torch.full((1, 1, 4, 4, 4), 0.5))
    with pytest.raises(ValueError, match="3 integers"):
        affinity_targets(np.zeros((4, 4, 4), np.int32), [(-1, 0)])


def test_loss_zero_for_perfect_prediction_and_balanced_weights():
    lab = _two_objects()
    target, valid = affinity_targets(torch.from_numpy(lab.astype(np.int64))[None, None])
    assert affinity_loss(target, target, valid, logits=False).item() == 0.0
    # predicting "all affine" costs exactly 1/2 per channel with both classes (negatives all wrong,
    # positives all right), whatever the class imbalance: the classes weigh equally
    pred = torch.ones_like(target)
    pos = (target * valid).sum((0, 2, 3, 4))
    neg = ((1 - target) * valid).sum((0, 2, 3, 4))
    both = (pos > 0) & (neg > 0)
    only_neg = (pos == 0) & (neg > 0)
    used = both | only_neg
    expected = (0.5 * both.float() + 1.0 * only_neg.float()).sum() / used.sum()
    assert affinity_loss(pred, target, valid, logits=False).item() == pytest.approx(expected.item())
    # unbalanced MSE would be the fraction of negatives instead
    assert expected.item() != pytest.approx(((pred - target) ** 2 * valid).sum().item() / valid.sum().item())


def test_loss_hand_computed_and_mask():
    target = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 4, 1, 1)
    pred = torch.tensor([0.5, 1.0, 1.0, 0.5]).reshape(1, 1, 4, 1, 1)
    # positives: mean((0.5)^2, 0, 0) = 1/12; negatives: 0.25 -> (1/12 + 1/4) / 2 = 1/6
    assert affinity_loss(pred, target, logits=False).item() == pytest.approx(1 / 6)
    # an invalid pair does not count, however wrong
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 4, 1, 1)
    assert affinity_loss(pred, target, valid, logits=False).item() == pytest.approx(1 / 12)


def test_loss_is_mean_of_per_sample_losses_and_takes_logits():
    torch.manual_seed(0)
    labs = torch.randint(0, 3, (3, 1, 6, 6, 6))
    target, valid = affinity_targets(labs)
    logits = torch.randn(target.shape, requires_grad=True)
    loss = affinity_loss(logits, target, valid)
    per = [affinity_loss(logits[i:i + 1], target[i:i + 1], valid[i:i + 1]) for i in range(3)]
    assert loss.item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(affinity_loss(torch.sigmoid(logits), target, valid, logits=False).item())
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        affinity_loss(logits[:, :3], target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_gpu():
    labs = torch.randint(0, 3, (2, 1, 8, 8, 8), device="cuda")
    target, valid = affinity_targets(labs)
    assert target.device.type == "cuda"
    loss = affinity_loss(torch.zeros_like(target), target, valid)
    cpu = affinity_loss(torch.zeros(target.shape), target.cpu(), valid.cpu())
    assert loss.item() == pytest.approx(cpu.item(), rel=1e-5)
