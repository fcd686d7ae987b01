"""AMAES intensity artifacts: library equivalence (MONAI, TorchIO, scipy), ranges, rows, identity, dtypes."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from volssl.data.intensity_artifacts import (
    ArtifactConfig,
    apply_artifacts,
    artifact_augment,
    bias_field_rows,
    draw_artifact_params,
    gamma_rows,
    gaussian_blur_rows,
    gibbs_ringing_rows,
    motion_ghosting_rows,
    simulate_low_res_rows,
)

_ALL_ON = {f.name: 1.0 for f in dataclasses.fields(ArtifactConfig) if f.name.startswith("p_")
           and f.name != "p_gamma_invert"}


def _none_params(b: int, c: int, cfg: ArtifactConfig | None = None) -> dict[str, torch.Tensor]:
    """Parameters with every coin off (values drawn, so every key is present)."""
    p = draw_artifact_params(b, cfg or ArtifactConfig(), torch.Generator().manual_seed(0), channels=c)
    for k, v in p.items():
        if v.dtype == torch.bool:
            p[k] = torch.zeros_like(v)
    return p


def _volume(shape=(16, 12, 10), seed=0, offset=0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + offset


# --------------------------------------------------------------------------- library equivalence
@pytest.mark.parametrize("invert", [False, True])
def test_gamma_matches_monai_adjust_contrast(invert):
    from monai.transforms import AdjustContrast

    x = torch.stack([_volume(seed=1), _volume(seed=2) * 3 + 1])
    gamma = torch.tensor([0.6, 1.7], dtype=torch.float64)
    ours = gamma_rows(x, gamma, torch.tensor([invert, invert]))
    for r in range(2):
        ref = AdjustContrast(gamma=float(gamma[r]), invert_image=invert)(x[r:r + 1])
        # Yucca's per-channel formula multiplies back by (range + 1e-7), MONAI by range: ~1e-7 relative
        torch.testing.assert_close(ours[r], torch.as_tensor(ref)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reps,axis", [(2, 0), (4, 1), (8, 2)])
def test_motion_ghosting_matches_torchio_when_the_planes_coincide(reps, axis):
    """Yucca scales the unshifted k-space planes 0, r, 2r, ... (< N - 1); TorchIO the fftshift-ed planes
    0, r, 2r, ... and restores the centre. For even N with r dividing N/2 and ``restore=0`` both sets
    are all multiples of r, so the two agree (``intensity = 1 - alpha``); on a positive image Yucca's
    magnitude equals TorchIO's real part. Other r differ by design (Yucca's set is not symmetric)."""
    import torchio as tio

    x = torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(3)) + 1.0
    alpha = 0.9
    ours = motion_ghosting_rows(x[None], torch.tensor([alpha]), torch.tensor([reps]), torch.tensor([axis]))[0]
    ref = tio.Ghosting(num_ghosts=reps, axis=axis, intensity=1 - alpha, restore=0.0)(x[None])[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - x).abs().max() > 1e-3  # it did something


def test_motion_ghosting_alpha_one_is_identity_and_negative_images_are_shifted():
    x = _volume(seed=4)  # negative minimum: shifted to 0 and back
    same = motion_ghosting_rows(x[None], torch.tensor([1.0]), torch.tensor([3]), torch.tensor([1]))[0]
    torch.testing.assert_close(same, x, rtol=0, atol=1e-5)
    ghost = motion_ghosting_rows(x[None], torch.tensor([0.85]), torch.tensor([3]), torch.tensor([1]))[0]
    assert ghost.min() >= x.min() - 1e-5  # |.| of the shifted image, shifted back: never below the minimum


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gibbs_ringing_matches_monai_gibbs_noise_on_a_one_axis_image(axis):
    """MONAI truncates k-space to a ball around ``(N - 1) / 2`` of the fftshift-ed spectrum, Yucca to a
    band along one axis: on an image that varies along that axis only (spectrum on one line) a radius
    keeping the same lines makes them equal. Yucca takes the magnitude, MONAI the real part; far from
    zero (offset 20) the band's unpaired line adds an imaginary part of ~1e-2, i.e. |.| - Re ~ 1e-6."""
    from monai.transforms import GibbsNoise

    n = 32
    profile = (torch.arange(n) >= 11).float() + 0.5 * (torch.arange(n) >= 23).float() + 20.0
    view = [1, 1, 1]
    view[axis] = n
    x = profile.view(view).expand(n, n, n).contiguous()
    k = 12  # kept lines [16 - 6, 16 + 6) of the shifted spectrum
    ours = gibbs_ringing_rows(x[None], torch.tensor([k / n]), torch.tensor([axis]))[0]
    # MONAI keeps shifted index i on the line where (i - 15.5)^2 + 2 * 0.25 <= r^2: i in [10, 21] for r = 6.3
    alpha = 1 - 6.3 / (n * math.sqrt(2) / 2)
    ref = torch.as_tensor(GibbsNoise(alpha=alpha)(x[None]))[0]
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-4)
    assert (ours - x).abs().max() > 0.05  # ringing at the edges


def test_gibbs_ringing_keeping_everything_is_identity():
    x = _volume(seed=5)
    out = gibbs_ringing_rows(x[None], torch.tensor([1.0]), torch.tensor([2]))[0]
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_low_resolution_matches_monai_on_all_axes():
    from monai.transforms import RandSimulateLowResolution

    x = torch.stack([_volume(seed=6), _volume(seed=7)])
    zooms = [0.5, 0.73]
    ours = simulate_low_res_rows(x, torch.tensor(zooms, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool))
    for r, z in enumerate(zooms):
        t = RandSimulateLowResolution(prob=1.0, downsample_mode="nearest-exact", upsample_mode="trilinear",
                                      zoom_range=(z, z))
        ref = torch.as_tensor(t(x[r:r + 1]))[0]
        torch.testing.assert_close(ours[r], ref, rtol=1e-5, atol=1e-5)


def test_low_resolution_on_some_axes_equals_interpolate():
    import torch.nn.functional as F

    x = _volume(shape=(16, 12, 10), seed=8)
    out = simulate_low_res_rows(x[None], torch.tensor([0.5], dtype=torch.float64), torch.tensor([[True, False, True]]))
    low = F.interpolate(x[None, None], size=(8, 12, 5), mode="nearest-exact")
    ref = F.interpolate(low, size=(16, 12, 10), mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    none = simulate_low_res_rows(x[None], torch.tensor([0.5], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(none[0], x)


def test_blur_matches_scipy_gaussian_filter():
    """Yucca blurs with ``scipy.ndimage.gaussian_filter(image, sigma)`` (mode "reflect", truncate 4)."""
    from scipy.ndimage import gaussian_filter

    x = torch.stack([_volume(shape=(12, 9, 3), seed=s) for s in (9, 10, 11)]).double()
    sig = torch.tensor([0.3, 0.8, 1.0], dtype=torch.float64)  # radius 1, 3 and 4 (longer than the 3-voxel axis)
    ours = gaussian_blur_rows(x, sig)
    for r in range(3):
        ref = gaussian_filter(x[r].numpy(), float(sig[r]))
        np.testing.assert_allclose(ours[r].numpy(), ref, rtol=0, atol=1e-12)
    assert torch.equal(gaussian_blur_rows(x[:1], torch.tensor([0.05])), x[:1])  # radius 0: identity


def test_bias_field_is_yuccas_quadratic_with_its_centre_at_one():
    """Yucca's field ``1 - sum_a ((t_a - c_a) / N_a)^2`` is not MONAI's (the exponential of a Legendre
    polynomial, RandBiasField): no parameters make them equal, so the field itself is checked."""
    shape = (10, 8, 6)
    centre = torch.tensor([[0.35, 0.99, 0.0]], dtype=torch.float64)  # voxel (3, 7, 0)
    field = bias_field_rows(torch.ones(1, *shape), centre)[0].double()
    t = [torch.arange(n, dtype=torch.float64) for n in shape]
    ref = 1 - ((t[0][:, None, None] - 3) / 10) ** 2 - ((t[1][None, :, None] - 7) / 8) ** 2 - (t[2][None, None] / 6) ** 2
    torch.testing.assert_close(field, ref, rtol=0, atol=1e-6)
    assert field[3, 7, 0] == pytest.approx(1.0) and field.max() == pytest.approx(1.0)
    x = _volume(shape=shape, seed=12)
    torch.testing.assert_close(bias_field_rows(x[None], centre)[0].double(), x.double() * ref, rtol=0, atol=1e-5)


def test_noise_fields_have_the_drawn_standard_deviation():
    """MONAI's RandGaussianNoise draws from NumPy's generator, ours from torch's on the device: the same
    law, not the same numbers, so the residuals' statistics are checked (2.5e5 voxels: ~0.3% error)."""
    x = _volume(shape=(64, 64, 64), seed=13, offset=5.0)[None, None]
    p = _none_params(1, 1)
    p["noise"][:] = True
    p["noise_sigma"][:] = 0.01
    res = apply_artifacts(x, p) - x
    assert res.std().item() == pytest.approx(0.01, rel=0.02) and abs(res.mean().item()) < 1e-4
    p = _none_params(1, 1)
    p["mult_noise"][:] = True
    p["mult_noise_sigma"][:] = 0.02
    rel = (apply_artifacts(x, p) - x) / x
    assert rel.std().item() == pytest.approx(0.02, rel=0.02) and abs(rel.mean().item()) < 2e-4


# --------------------------------------------------------------------------- drawing
def test_drawn_parameters_respect_ranges_and_probabilities():
    n, c = 10_000, 2
    cfg = ArtifactConfig()
    p = draw_artifact_params(n, cfg, torch.Generator().manual_seed(0), channels=c)
    assert all(v.shape[:1] == (n,) for v in p.values())

    def rate(mask: torch.Tensor, expected: float) -> None:
        m = mask.double().mean().item()
        tol = 4 * math.sqrt(expected * (1 - expected) / mask.numel()) + 1e-9  # 4 binomial sigmas
        assert abs(m - expected) <= tol, (m, expected)

    rate(p["noise"], 0.2)
    rate(p["mult_noise"], 0.2)
    rate(p["ghosting"], 0.2)
    rate(p["gibbs"], 0.2)
    rate(p["bias"], 0.33)
    rate(p["blur"], 0.2 * 0.5)  # the paper's Table 5 value 0.1
    rate(p["low_res"], 0.2 * 0.5)
    rate(p["low_res_axes"], 0.33)
    rate(p["gamma"][:, 0], 0.2)
    rate(p["gamma"][:, 0] & p["gamma_invert"][:, 0], 0.2 * 0.05)  # the paper's 0.01
    assert torch.equal(p["gamma"][:, 0], p["gamma"][:, 1])  # per-sample coins
    assert torch.equal(p["blur_sigma"][:, 0], p["blur_sigma"][:, 1])

    def within(key: str, lo: float, hi: float) -> None:
        v = p[key]
        assert v.min() >= lo and v.max() <= hi, (key, v.min(), v.max())
        assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo), key  # spans the range

    within("noise_sigma", 1e-4, 1e-3)
    within("mult_noise_sigma", 1e-4, 1e-3)
    within("blur_sigma", 0.0, 1.0)
    within("ghosting_alpha", 0.85, 0.95)
    within("gibbs_keep", 0.75, 1.0)
    within("low_res_zoom", 0.5, 1.0)
    within("bias_centre", 0.0, 1.0)
    within("gamma_value", 0.5, 2.0)
    assert set(p["ghosting_reps"].unique().tolist()) == set(range(2, 11))
    assert set(p["ghosting_axis"].unique().tolist()) == {0, 1, 2} == set(p["gibbs_axis"].unique().tolist())
    rate(p["gamma_value"] < 1, 0.5)  # batchgenerators: gamma below 1 half of the time


@pytest.mark.parametrize("field,value", [
    ("p_noise", 1.5), ("p_blur_channel", -0.1), ("noise_sigma", (1e-3, 1e-4)), ("blur_sigma", (-1.0, 1.0)),
    ("ghosting_alpha", (0.5, 1.5)), ("ghosting_reps", (1, 4)), ("ghosting_reps", (2.5, 4)), ("gibbs_keep", (0.0, 1.0)),
    ("low_res_zoom", (0.5, 1.2)), ("gamma_range", (0.0, 2.0)), ("p_gamma_invert", True), ("gamma_range", (1.0,)),
])
def test_invalid_settings_name_the_field(field, value):
    cfg = dataclasses.replace(ArtifactConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"intensity\.{field}"):
        draw_artifact_params(2, cfg)
    with pytest.raises(ValueError, match=rf"intensity\.{field}"):
        artifact_augment(torch.zeros(1, 1, 4, 4, 4), cfg)


# --------------------------------------------------------------------------- batches
def test_rows_of_a_global_batch_match_one_process():
    x = torch.randn(4, 2, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    cfg = ArtifactConfig(**_ALL_ON, p_gamma_invert=0.5)
    whole = artifact_augment(x, cfg, torch.Generator().manual_seed(3))
    parts = [artifact_augment(x[o:o + 2], cfg, torch.Generator().manual_seed(3), sample_offset=o, global_batch=4)
             for o in (0, 2)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)
    single = artifact_augment(x[3:], cfg, torch.Generator().manual_seed(3), sample_offset=3, global_batch=4)
    torch.testing.assert_close(single, whole[3:], rtol=0, atol=1e-6)
    again = artifact_augment(x, cfg, torch.Generator().manual_seed(3))
    other = artifact_augment(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(again, whole) and not torch.allclose(other, whole)
    with pytest.raises(ValueError, match="outside a global batch"):
        artifact_augment(x, cfg, sample_offset=1, global_batch=4)


def test_disabled_config_is_identity_and_unselected_volumes_are_untouched():
    x = torch.randn(3, 2, 8, 8, 8)
    assert artifact_augment(x, ArtifactConfig(enabled=False)) is x
    p = _none_params(3, 2)
    assert torch.equal(apply_artifacts(x, p), x)
    p["ghosting"][1, 0] = True
    p["bias"][2, 1] = True
    out = apply_artifacts(x, p)
    changed = (out != x).flatten(2).any(-1)
    assert changed.tolist() == [[False, False], [True, False], [False, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_are_preserved(dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cfg = ArtifactConfig(**_ALL_ON)
    for dev in devices:
        x = torch.randn(2, 1, 10, 8, 6, device=dev).to(dtype)
        out = artifact_augment(x, cfg, torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
        assert bool(torch.isfinite(out.float()).all()) and not torch.equal(out, x)


def test_the_transforms_run_in_the_papers_order():
    """Gamma (last) sees the bias field's output: the order changes the result, and ours is the paper's."""
    x = _volume(shape=(8, 8, 8), seed=14)[None, None]
    p = _none_params(1, 1)
    p["bias"][:] = True
    p["gamma"][:] = True
    p["gamma_value"][:] = 0.5
    both = apply_artifacts(x, p)
    gamma_then_bias = bias_field_rows(gamma_rows(x[0], p["gamma_value"][0], p["gamma_invert"][0]), p["bias_centre"][0])
    bias_then_gamma = gamma_rows(bias_field_rows(x[0], p["bias_centre"][0]), p["gamma_value"][0], p["gamma_invert"][0])
    torch.testing.assert_close(both[0], bias_then_gamma, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(both[0], gamma_then_bias, atol=1e-3)
