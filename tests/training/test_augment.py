"""Batched spatial augmentation: shapes, determinism, exact flips, geometry, global-batch rows."""
import math

import pytest
import torch

from volssl.config import AugmentConfig
from volssl.training.augment import apply_spatial, draw_spatial_params, spatial_augment


def _batch(n=4, shape=(12, 10, 8)):
    return torch.randn(n, 2, *shape, generator=torch.Generator().manual_seed(0))


def test_shapes_dtype_and_determinism_under_a_seed():
    x = _batch()
    cfg = AugmentConfig(p_rotation=0.5, p_scale=0.5, p_mirror=0.5)
    a = spatial_augment(x, cfg, torch.Generator().manual_seed(5))
    b = spatial_augment(x, cfg, torch.Generator().manual_seed(5))
    c = spatial_augment(x, cfg, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(spatial_augment(x, AugmentConfig(enabled=False)), x)


def test_mirroring_alone_is_an_exact_flip():
    x = _batch(n=1)
    out = spatial_augment(x, AugmentConfig(p_rotation=0, p_scale=0, p_mirror=1.0))
    assert torch.equal(out, torch.flip(x, dims=(2, 3, 4)))


def test_rotation_and_scaling_move_a_point_where_expected():
    x = torch.zeros(1, 1, 9, 9, 9)
    x[0, 0, 6, 4, 4] = 1.0  # +2 voxels along X from the centre
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    params = {"matrix": quarter, "resample": torch.tensor([True]), "flip": torch.zeros(1, 3, dtype=torch.bool)}
    out = apply_spatial(x, params)
    assert out[0, 0, 4, 2, 4] == pytest.approx(1.0, abs=1e-5)  # now at -2 along Y
    params["matrix"] = torch.eye(3, dtype=torch.float64)[None] / 2.0  # factor 2: content enlarged
    assert apply_spatial(x, params)[0, 0, 8, 4, 4] == pytest.approx(1.0, abs=1e-5)


def test_drawn_parameters_follow_the_config():
    n = 4000
    cfg = AugmentConfig(p_rotation=0.2, rotation_deg=30.0, p_scale=0.3, scale_range=(0.7, 1.4), p_mirror=0.5)
    p = draw_spatial_params(n, cfg, torch.Generator().manual_seed(0))
    assert abs(p["resample"].double().mean().item() - (1 - 0.8 * 0.7)) < 0.03
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.03
    det = torch.linalg.det(p["matrix"])  # rotation det 1, so det = factor^-3
    factors = det.pow(-1 / 3)
    assert factors.min() >= 0.7 - 1e-9 and factors.max() <= 1.4 + 1e-9
    # rotation angle of each matrix (scale removed) stays within the configured range per axis
    rot = p["matrix"] * factors[:, None, None]
    angle = torch.arccos(((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    assert angle.max() <= math.radians(30.0) * math.sqrt(3) + 1e-6


def test_rows_of_a_global_batch_match_one_process():
    x = _batch(n=4)
    cfg = AugmentConfig(p_rotation=0.5, p_scale=0.5, p_mirror=0.5)
    whole = spatial_augment(x, cfg, torch.Generator().manual_seed(3))
    halves = [spatial_augment(x[r * 2:(r + 1) * 2], cfg, torch.Generator().manual_seed(3), sample_offset=r * 2,
                              global_batch=4) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    with pytest.raises(ValueError, match="outside a global batch"):
        spatial_augment(x, cfg, sample_offset=2, global_batch=4)


def test_labels_are_resampled_with_nearest_neighbour():
    x = _batch(n=3, shape=(8, 8, 8))[:, :1]
    labels = (x > 0).long() + (x > 1).long()
    img, lab = spatial_augment(x, AugmentConfig(p_rotation=1.0, p_scale=1.0, p_mirror=0.5),
                               torch.Generator().manual_seed(1), labels=labels)
    assert lab.dtype == torch.long and set(lab.unique().tolist()) <= {0, 1, 2}
    assert img.shape == x.shape and lab.shape == labels.shape
