"""Gaussian sliding window: tiling, agreement with MONAI, padding, mirroring TTA."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from volssl.inference.sliding_window import (
    flip_combinations,
    gaussian_importance_map,
    sliding_window_predict,
    tile_slices,
    tile_starts,
)


def conv_net(cin=1, cout=3, k=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(cin, 4, k, padding=k // 2), nn.Tanh(), nn.Conv3d(4, cout, k, padding=k // 2)).eval()


class Ones(nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 2, *x.shape[2:])


def monai(x, net, patch, overlap, batch):
    with torch.inference_mode():
        return sliding_window_inference(x, patch, batch, net, overlap=overlap, mode="gaussian", sigma_scale=0.125)


@pytest.mark.parametrize("size,patch,overlap", [(64, 16, 0.5), (37, 16, 0.5), (37, 16, 0.25), (16, 16, 0.5),
                                                (100, 24, 0.6), (17, 16, 0.0)])
def test_tile_starts_cover_flush_and_match_monai(size, patch, overlap):
    starts = tile_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] + patch == size
    assert all(0 < b - a <= patch for a, b in zip(starts, starts[1:]))  # no gap, increasing
    interval = _get_scan_interval((size,), (patch,), 1, (overlap,))
    ref = [s[0].start for s in dense_patch_slices((size,), (patch,), interval)]
    assert starts == ref


def test_tile_slices_cover_every_voxel():
    shape, patch = (30, 21, 16), (16, 8, 16)
    count = np.zeros(shape, dtype=int)
    for s in tile_slices(shape, patch, 0.5):
        assert tuple(sl.stop - sl.start for sl in s) == patch
        count[s] += 1
    assert count.min() >= 1


def test_importance_map_is_monais_gaussian():
    for patch in [(16, 16, 16), (8, 12, 5)]:
        ours = gaussian_importance_map(patch)
        ref = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        assert float(ours.min()) >= 1e-3 and float(ours.max()) <= 1.0
        centre = tuple(p // 2 for p in patch)
        assert ours[centre] == ours.max() or all(p % 2 == 0 for p in patch)


@pytest.mark.parametrize("shape,patch,overlap,batch", [
    ((37, 50, 29), (16, 24, 16), 0.5, 3),
    ((37, 50, 29), (16, 24, 16), 0.25, 1),
    ((12, 40, 9), (16, 16, 16), 0.5, 2),  # smaller than the patch along two axes: padded
    ((5, 6, 7), (16, 16, 16), 0.5, 1),  # smaller along all axes
])
def test_agrees_with_monai(shape, patch, overlap, batch):
    net = conv_net(cin=2, cout=3)
    x = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(1))
    ours = sliding_window_predict(net, x, patch, overlap=overlap, sw_batch_size=batch)
    ref = monai(x, net, patch, overlap, batch)
    assert ours.shape == ref.shape == (2, 3, *shape) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 33, 17), (16, 16, 16), (7, 30, 3)])
@pytest.mark.parametrize("mirror", [(), (0, 2)])
def test_constant_model_gives_ones_everywhere(shape, mirror):
    x = torch.randn(1, 1, *shape)
    out = sliding_window_predict(Ones(), x, (16, 16, 16), overlap=0.5, sw_batch_size=4, mirror_axes=mirror)
    assert out.shape == (1, 2, *shape)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-6)


def test_four_d_input_and_identity_network():
    x = torch.randn(3, 21, 18, 10)
    out = sliding_window_predict(nn.Identity(), x, (8, 8, 8), overlap=0.5)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)  # weights sum to one at every voxel


def test_mirroring_of_a_flip_equivariant_network_changes_nothing():
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 2, 3, padding=1)
    with torch.no_grad():  # a kernel symmetric under flips of every axis
        w = conv.weight
        conv.weight.copy_((w + w.flip(2) + w.flip(3) + w.flip(4) + w.flip(2, 3) + w.flip(2, 4) + w.flip(3, 4)
                           + w.flip(2, 3, 4)) / 8)
    x = torch.randn(1, 1, 30, 27, 20)
    plain = sliding_window_predict(conv, x, (16, 16, 16), overlap=0.5)
    tta = sliding_window_predict(conv, x, (16, 16, 16), overlap=0.5, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_the_logits_of_every_flip():
    net = conv_net(cout=2)
    dims = [(), (2,), (4,), (2, 4)]

    class Averaged(nn.Module):
        def forward(self, x):
            return sum(torch.flip(net(torch.flip(x, d)), d) if d else net(x) for d in dims) / len(dims)

    x = torch.randn(1, 1, 30, 27, 20)
    tta = sliding_window_predict(net, x, (16, 16, 16), overlap=0.5, mirror_axes=(2, 0), sw_batch_size=2)
    ref = sliding_window_predict(Averaged(), x, (16, 16, 16), overlap=0.5, sw_batch_size=2)
    plain = sliding_window_predict(net, x, (16, 16, 16), overlap=0.5)
    torch.testing.assert_close(tta, ref, rtol=1e-5, atol=1e-5)
    assert float((tta - plain).abs().max()) > 1e-3  # the augmentation did something


def test_flip_combinations():
    assert flip_combinations(()) == [()]
    combos = flip_combinations((0, 1, 2))
    assert len(combos) == 8 and combos[0] == () and set(combos) == {
        c for k in range(4) for c in itertools.combinations((2, 3, 4), k)}
    with pytest.raises(ValueError, match="spatial axes"):
        flip_combinations((3,))


def test_deep_supervision_list_uses_the_first_output():
    net = conv_net(cout=2)

    class DeepSup(nn.Module):
        def forward(self, x):
            y = net(x)
            return [y, y[:, :, ::2, ::2, ::2]]

    x = torch.randn(1, 1, 20, 20, 20)
    torch.testing.assert_close(sliding_window_predict(DeepSup(), x, (16, 16, 16)),
                               sliding_window_predict(net, x, (16, 16, 16)))


def test_bad_arguments():
    x = torch.randn(1, 1, 20, 20, 20)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(nn.Identity(), x, (8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_predict(nn.Identity(), x, (8, 8))
    with pytest.raises(ValueError, match="shape"):
        sliding_window_predict(nn.Identity(), torch.randn(20, 20, 20), (8, 8, 8))

    class Shrinks(nn.Module):
        def forward(self, x):
            return x[:, :, 1:]

    with pytest.raises(ValueError, match="expected"):
        sliding_window_predict(Shrinks(), x, (8, 8, 8))
