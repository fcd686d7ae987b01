"""nnU-Net-like intensity augmentation (training/augment.py, used by the scratch recipes)."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from volssl.training.augment import IntensityConfig, _gamma, gaussian_blur, intensity_augment

ALL = IntensityConfig(enabled=True, p_noise=1, p_blur=1, p_blur_channel=1, p_brightness=1, p_contrast=1,
                      p_low_res=1, p_low_res_channel=1, p_gamma_inverted=1, p_gamma=1)


def images(b=4, c=2, s=16, seed=0):
    return torch.randn(b, c, s, s, s, generator=torch.Generator().manual_seed(seed))


def test_disabled_is_the_identity():
    x = images()
    assert intensity_augment(x, IntensityConfig(enabled=False)) is x
    off = IntensityConfig(enabled=True, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_low_res=0,
                          p_gamma_inverted=0, p_gamma=0)
    assert torch.equal(intensity_augment(x, off, torch.Generator().manual_seed(0)), x)


def test_rows_of_a_global_batch_are_augmented_as_one_process_does():
    x = images()
    full = intensity_augment(x, ALL, torch.Generator().manual_seed(3))
    rows = intensity_augment(x[2:], ALL, torch.Generator().manual_seed(3), sample_offset=2, global_batch=4)
    torch.testing.assert_close(rows, full[2:], rtol=0, atol=0)
    assert (full - x).abs().mean() > 0.05
    again = intensity_augment(x, ALL, torch.Generator().manual_seed(3))
    assert torch.equal(again, full)


def test_blur_equals_scipy_and_gamma_keeps_mean_and_std():
    v = torch.randn(10, 12, 9, dtype=torch.float64)
    ref = ndi.gaussian_filter(v.numpy(), (0.6, 1.0, 0.8), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur(v, (0.6, 1.0, 0.8)).numpy(), ref, rtol=0, atol=1e-12)
    for invert in (False, True):
        y = _gamma(v, 1.4, invert)
        assert not torch.allclose(y, v)
        assert y.mean().item() == pytest.approx(v.mean().item(), abs=1e-9)
        assert y.std().item() == pytest.approx(v.std().item(), rel=1e-7)


def test_contrast_stays_in_the_channel_range_and_bad_settings_are_refused():
    x = images(b=2, c=1)
    only_contrast = IntensityConfig(enabled=True, p_noise=0, p_blur=0, p_brightness=0, p_contrast=1,
                                    contrast_range=(1.5, 1.5), p_low_res=0, p_gamma_inverted=0, p_gamma=0)
    y = intensity_augment(x, only_contrast, torch.Generator().manual_seed(0))
    for i in range(2):
        assert y[i].min() >= x[i].min() and y[i].max() <= x[i].max() and y[i].std() > x[i].std()
    with pytest.raises(ValueError, match="intensity.p_noise"):
        intensity_augment(x, IntensityConfig(enabled=True, p_noise=1.5))
    with pytest.raises(ValueError, match="low_res_zoom"):
        intensity_augment(x, IntensityConfig(enabled=True, low_res_zoom=(0.5, 2.0)))
