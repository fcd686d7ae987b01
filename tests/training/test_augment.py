"""Batched spatial augmentation: shapes, determinism, exact flips, geometry, global-batch rows, elastic."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from volssl.config import AugmentConfig
from volssl.training.augment import (
    _coarse_smoothing_matrices,
    apply_spatial,
    draw_spatial_params,
    elastic_block_size,
    elastic_displacement,
    spatial_augment,
)


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


# --------------------------------------------------------------------------- elastic deformation
def _ramps(shape=(20, 18, 16)):
    """(1, 3, X, Y, Z): channel a holds the voxel index along axis a (trilinear sampling is exact on it)."""
    t = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return torch.stack(t)[None]


def test_p_elastic_zero_draws_and_returns_exactly_the_old_stream():
    cfg = AugmentConfig(p_rotation=0.5, p_scale=0.5, p_mirror=0.5)
    assert cfg.p_elastic == 0.0
    g = torch.Generator().manual_seed(7)
    p = draw_spatial_params(6, cfg, g)
    ref = torch.Generator().manual_seed(7)
    torch.rand(6, 9, generator=ref, dtype=torch.float64)  # the old layout: nothing else is drawn
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))
    assert set(p) == {"matrix", "resample", "flip"}
    # with elastic on, the rotation/scale/mirror draws come first and are unchanged
    q = draw_spatial_params(6, AugmentConfig(p_rotation=0.5, p_scale=0.5, p_mirror=0.5, p_elastic=0.5),
                            torch.Generator().manual_seed(7))
    assert all(torch.equal(p[k], q[k]) for k in p)
    x = _batch(n=6)
    old = spatial_augment(x, cfg, torch.Generator().manual_seed(7))
    new = spatial_augment(x, dataclasses.replace(cfg, p_elastic=0.5), torch.Generator().manual_seed(7))
    undeformed = ~q["elastic"]
    assert 0 < int(undeformed.sum()) < 6
    assert torch.equal(new[undeformed], old[undeformed]) and not torch.equal(new[~undeformed], old[~undeformed])


def test_elastic_displacement_is_added_before_the_affine_part():
    x = _ramps()
    shape = tuple(x.shape[2:])
    centre = torch.tensor([(n - 1) / 2 for n in shape]).view(1, 3, 1, 1, 1)
    cfg = AugmentConfig(p_rotation=0.0, p_scale=0.0, p_mirror=0.0, p_elastic=1.0, elastic_alpha=(60.0, 60.0),
                        elastic_sigma=(4.0, 6.0))
    params = draw_spatial_params(1, cfg, torch.Generator().manual_seed(1))
    d = elastic_displacement(shape, params["elastic_alpha"], params["elastic_sigma"], params["elastic_seed"],
                             int(params["elastic_block"][0]))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # sampled inside the patch
    assert d[inner].abs().max() < 3.5 and d[inner].abs().mean() > 0.1
    torch.testing.assert_close((apply_spatial(x, params) - x)[inner], d[inner], rtol=0, atol=1e-4)
    # with a rotation and a scaling: the input is sampled at M (p - c + d(p)) + c
    m = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) / 1.1
    params = dict(params, matrix=m[None], resample=torch.tensor([True]))
    expected = torch.einsum("ab,rbxyz->raxyz", m.float(), x - centre + d) + centre
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(4, -4))
    torch.testing.assert_close(apply_spatial(x, params)[inner], expected[inner], rtol=0, atol=1e-4)


def test_elastic_displacement_scales_with_alpha():
    x = _ramps()
    out = {}
    for alpha in (50.0, 100.0, 200.0):
        cfg = AugmentConfig(p_rotation=0.0, p_scale=0.0, p_mirror=0.0, p_elastic=1.0, elastic_alpha=(alpha, alpha),
                            elastic_sigma=(5.0, 5.0))
        out[alpha] = spatial_augment(x, cfg, torch.Generator().manual_seed(2)) - x
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    mags = {a: out[a][inner].norm(dim=1).mean().item() for a in out}
    assert mags[50.0] > 0.2
    assert mags[100.0] / mags[50.0] == pytest.approx(2.0, rel=1e-3)
    assert mags[200.0] / mags[50.0] == pytest.approx(4.0, rel=1e-3)


def test_elastic_labels_stay_integer_and_images_keep_dtype():
    x = _batch(n=3, shape=(12, 12, 12))[:, :1]
    labels = (x > 0).long() + (x > 1).long()
    cfg = AugmentConfig(p_rotation=0.5, p_scale=0.0, p_mirror=0.0, p_elastic=1.0, elastic_sigma=(3.0, 4.0),
                        elastic_alpha=(300.0, 600.0))
    img, lab = spatial_augment(x, cfg, torch.Generator().manual_seed(4), labels=labels)
    assert img.dtype == x.dtype and lab.dtype == torch.long and set(lab.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(lab, labels) and not torch.equal(img, x)
    whole = spatial_augment(x, cfg, torch.Generator().manual_seed(4))
    parts = [spatial_augment(x[o:o + 1], cfg, torch.Generator().manual_seed(4), sample_offset=o, global_batch=3)
             for o in range(3)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def test_voxel_level_smoothing_weights_equal_scipy_gaussian_filter():
    """Block 1: the smoothing matrix is scipy's ``gaussian_filter1d(mode="constant")`` applied to impulses."""
    from scipy.ndimage import gaussian_filter1d

    n = 40
    for sigma in (3.0, 12.5):
        k = _coarse_smoothing_matrices(n, 1, torch.tensor([sigma]))[0]
        ref = gaussian_filter1d(np.eye(n), sigma, axis=0, mode="constant")  # column j: response to e_j
        np.testing.assert_allclose(k.numpy(), ref, rtol=0, atol=1e-12)


def test_block_smoothing_keeps_the_fields_variance_and_correlation():
    """Per axis, the covariance of the block-grid field between block centres (analytic) matches the
    voxel-level filter's to 1% (AMAES sigma 25, blocks of 5); sampled fields have the analytic std."""
    n, sigma = 64, 25.0
    block = elastic_block_size(20.0)
    assert block == 5
    exact = _coarse_smoothing_matrices(n, 1, torch.tensor([sigma]))[0]  # (n, n) voxel-level weights
    cov_exact = exact @ exact.T  # per unit noise variance
    nb = -(-n // block)
    coarse = _coarse_smoothing_matrices(nb, block, torch.tensor([sigma]))[0]
    counts = torch.full((nb,), float(block))
    counts[-1] = n - block * (nb - 1)
    cov_coarse = (coarse * counts) @ coarse.T  # block sums have variance count x unit
    for i, j in ((0, 0), (3, 3), (6, 6), (6, 8), (6, 10), (10, 12), (12, 12)):
        pi, pj = block * i + 2, block * j + 2
        assert cov_coarse[i, j].item() == pytest.approx(cov_exact[pi, pj].item(), rel=0.01), (i, j)
    r = 200
    field = elastic_displacement((24, 24, 24), torch.ones(r), torch.full((r,), 8.0), torch.arange(r), 2)
    var_axis = (_coarse_smoothing_matrices(24, 1, torch.tensor([8.0]))[0][12] ** 2).sum().item()
    analytic = math.sqrt(var_axis ** 3 / 3)  # uniform [-1, 1] noise: variance 1/3
    assert field[:, :, 12, 12, 12].std().item() == pytest.approx(analytic, rel=0.1)


def test_elastic_settings_are_validated():
    for kw, name in (({"p_elastic": 1.5}, "p_elastic"), ({"elastic_alpha": (600.0, 200.0)}, "elastic_alpha"),
                     ({"elastic_sigma": (0.0, 3.0)}, "elastic_sigma")):
        with pytest.raises(ValueError, match=rf"augment\.{name}"):
            draw_spatial_params(2, AugmentConfig(**kw))
