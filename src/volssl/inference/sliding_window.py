"""Gaussian-weighted sliding-window prediction of a whole volume with a patch-sized network.

The volume is covered by tiles of ``patch_size`` voxels; along each axis the tiles start every
``step = int(patch * (1 - overlap))`` voxels (at least 1) and the last tile is moved back to end
flush with the volume (:func:`tile_starts`). Every tile's logits are weighted by a Gaussian
importance map (:func:`gaussian_importance_map`: sigma = ``sigma_scale`` x patch per axis, 1/8 as in
nnU-Net, clamped below at 1e-3 so that tile borders still count where nothing else covers them),
summed into a preallocated float32 logits buffer, and divided at the end by the summed weights.
A volume smaller than the patch along an axis is zero-padded symmetrically to the patch (the padding
is cropped from the result). Tile positions, weights and padding are exactly those of
``monai.inferers.sliding_window_inference(..., mode="gaussian", sigma_scale=0.125)``, so both give
the same logits (up to float rounding); the difference is the cost around the network:

* the importance map is built once per (patch, sigma, device, dtype) and cached; MONAI rebuilds it
  on every call;
* tile slices are computed once as plain tuples; tiles are gathered with one ``torch.stack`` per
  batch (always a contiguous batch; MONAI hands the network a strided view when
  ``sw_batch_size=1``) and accumulated with one fused ``addcmul_`` per tile (MONAI: per-window
  slice-list building, an in-place multiply of the network output, then a separate add);
* it runs under ``torch.inference_mode`` itself; mirroring TTA folds its ``1 / 2^k`` into the tile
  weight (no extra pass).

With a real network nearly all the time is the network's, so the gain is small (a few per cent on
the CPU; ``volssl bench infer`` measures both).

Mirroring test-time augmentation (``mirror_axes``): each tile batch is also predicted flipped along
every non-empty subset of the axes (``2^k`` forward passes), each output flipped back, and the
**logits averaged** (nnU-Net's choice). Averaging logits is linear, so it commutes with the Gaussian
stitching: the result equals stitching the tile-wise average. Softmax comes after stitching.
"""
from __future__ import annotations

import functools
import itertools
import math
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

Network = Callable[[Tensor], "Tensor | Sequence[Tensor]"]

MIN_WEIGHT = 1e-3  # floor of the importance map (MONAI's), relative to a peak of about 1


# ---------------------------------------------------------------------------------------------- geometry


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis of ``size`` voxels (``size >= patch``).

    ``step = max(1, int(patch * (1 - overlap)))`` (one tile when ``size == patch``); tiles start at
    ``0, step, 2 step, ...`` until one reaches the end, and that last one is moved back so that it
    ends exactly at ``size``. Every voxel is covered.
    """
    size, patch = int(size), int(patch)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if patch < 1 or size < patch:
        raise ValueError(f"tile_starts needs 1 <= patch <= size, got patch {patch}, size {size}")
    if size == patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return [min(i * step, size - patch) for i in range(n)]


def tile_slices(
    shape: Sequence[int], patch_size: Sequence[int], overlap: float | Sequence[float]
) -> list[tuple[slice, ...]]:
    """Spatial slices of every tile covering ``shape`` (each axis ``>= patch``), in C order."""
    overlaps = _per_axis(overlap, len(shape), "overlap")
    starts = [tile_starts(n, p, o) for n, p, o in zip(shape, patch_size, overlaps)]
    return [tuple(slice(s, s + p) for s, p in zip(pos, patch_size)) for pos in itertools.product(*starts)]


@functools.lru_cache(maxsize=16)
def _importance_map(patch: tuple[int, ...], sigma: tuple[float, ...], device: str, dtype: torch.dtype) -> Tensor:
    w = None
    for p, s in zip(patch, sigma):
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        g = np.exp(-(x ** 2) / (2.0 * (s * p) ** 2))
        w = g if w is None else np.multiply.outer(w, g)
    w = np.maximum(w, MIN_WEIGHT)
    with torch.inference_mode(False):  # a normal tensor even when first built under inference mode
        return torch.from_numpy(w.astype(np.float32)).to(device=device, dtype=dtype)


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The tile weight ``(*patch_size)``: a separable Gaussian centred on the tile, peak ~1.

    ``exp(-d^2 / (2 sigma^2))`` per axis with ``d`` the distance (voxels) from the tile centre and
    ``sigma = sigma_scale * patch``, multiplied over the axes, clamped below at 1e-3. Cached: do not
    modify the returned tensor in place.
    """
    patch = tuple(int(p) for p in patch_size)
    sigma = tuple(float(s) for s in _per_axis(sigma_scale, len(patch), "sigma_scale"))
    if any(p < 1 for p in patch) or any(s <= 0 for s in sigma):
        raise ValueError(f"patch sizes and sigma_scale must be positive, got {patch}, {sigma}")
    return _importance_map(patch, sigma, str(torch.device(device)), dtype)


def flip_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``mirror_axes`` (0, 1, 2) as tensor dims of a (B, C, X, Y, Z)
    batch, the empty one (no flip) first: ``2^k`` entries."""
    axes = sorted({int(a) for a in mirror_axes})
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes are spatial axes 0, 1, 2; got {tuple(mirror_axes)}")
    dims = [a + 2 for a in axes]
    return [c for k in range(len(dims) + 1) for c in itertools.combinations(dims, k)]


def _per_axis(value, n: int, what: str) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{what} must be one number or {n} numbers, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- prediction


def _first_output(out) -> Tensor:
    """The full-resolution output of a network (deep supervision: a list, highest resolution first)."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("the network returned an empty list")
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the network must return a tensor (or a list of tensors), got {type(out).__name__}")
    return out


def sliding_window_predict(
    network: Network,
    image: Tensor,
    patch_size: Sequence[int],
    overlap: float | Sequence[float] = 0.5,
    sw_batch_size: int = 1,
    mirror_axes: Sequence[int] = (),
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
    out_device: torch.device | str | None = None,
    autocast: bool = False,
) -> Tensor:
    """Logits of ``network`` over a whole volume, stitched from Gaussian-weighted tiles.

    Args:
        network: maps a float batch ``(n, C, *patch_size)`` to logits ``(n, K, *patch_size)`` (or a
            list of outputs, the first one full resolution). Put it in eval mode and on ``device``.
        image: ``(B, C, X, Y, Z)`` or ``(C, X, Y, Z)`` float tensor (any device).
        patch_size: tile size (voxels, 3 numbers).
        overlap: fraction of a tile shared with its neighbour, in [0, 1) (one value or per axis).
        sw_batch_size: tiles per forward pass.
        mirror_axes: spatial axes (subset of 0, 1, 2) for mirroring test-time augmentation; the
            logits of the ``2^k`` flips are averaged. ``()``: off.
        sigma_scale: Gaussian sigma as a fraction of the patch (0.125 = 1/8).
        device: where the network runs (default: the image's device); the image is moved there once.
        out_device: where the logits and weights are accumulated (default: ``device``; "cpu" saves
            accelerator memory for large volumes).
        autocast: run the network under bfloat16 autocast (CUDA only; accumulation stays float32).

    Returns:
        float32 logits ``(B, K, X, Y, Z)`` (or ``(K, X, Y, Z)`` for a 4D input) on ``out_device``.
    """
    if image.ndim not in (4, 5):
        raise ValueError(f"image must be (B, C, X, Y, Z) or (C, X, Y, Z), got shape {tuple(image.shape)}")
    squeeze = image.ndim == 4
    x = image[None] if squeeze else image
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive integers, got {tuple(patch_size)}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    overlaps = _per_axis(overlap, 3, "overlap")
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    flips = flip_combinations(mirror_axes)
    device = torch.device(device) if device is not None else x.device
    out_device = torch.device(out_device) if out_device is not None else device
    use_amp = bool(autocast) and device.type == "cuda"

    with torch.inference_mode():
        x = x.to(device=device, dtype=torch.float32, non_blocking=True)
        # pad a volume smaller than the patch: symmetric zeros (MONAI's split: floor before, rest after)
        size = tuple(int(s) for s in x.shape[2:])
        lo = [max(p - s, 0) // 2 for s, p in zip(size, patch)]
        hi = [max(p - s, 0) - a for s, p, a in zip(size, patch, lo)]
        if any(lo) or any(hi):
            x = torch.nn.functional.pad(x, [v for a in (2, 1, 0) for v in (lo[a], hi[a])])
        padded = tuple(int(s) for s in x.shape[2:])

        slices = tile_slices(padded, patch, overlaps)
        weight = gaussian_importance_map(patch, sigma_scale, out_device)
        wsum = torch.zeros(padded, dtype=torch.float32, device=out_device)
        for s in slices:
            wsum[s] += weight
        amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
        out = _stitch(network, x, slices, weight if len(flips) == 1 else weight / len(flips), flips,
                      sw_batch_size, amp)
        out.div_(wsum)
        if any(lo) or any(hi):
            out = out[(slice(None), slice(None)) + tuple(slice(a, a + n) for a, n in zip(lo, size))]
    return out[0] if squeeze else out


def _stitch(network: Network, x: Tensor, slices: list, tile_weight: Tensor, flips: list[tuple[int, ...]],
            sw_batch_size: int, amp) -> Tensor:
    """The weighted sum ``(B, K, *x.shape[2:])`` (on ``tile_weight``'s device) of the network's logits
    over the tiles ``slices`` of ``x``, ``sw_batch_size`` tiles per pass, each averaged over ``flips``."""
    patch = tuple(int(p) for p in tile_weight.shape)
    out_device = tile_weight.device
    n_batch = x.shape[0]
    jobs = [(b, s) for b in range(n_batch) for s in slices]
    out = None
    for i in range(0, len(jobs), sw_batch_size):
        chunk = jobs[i:i + sw_batch_size]
        tiles = torch.stack([x[(b, slice(None)) + s] for b, s in chunk])
        with amp:
            logits = None
            for dims in flips:
                y = _first_output(network(torch.flip(tiles, dims) if dims else tiles)).float()
                if dims:
                    y = torch.flip(y, dims)
                logits = y if logits is None else logits + y
        if tuple(logits.shape[2:]) != patch or logits.shape[0] != len(chunk):
            raise ValueError(
                f"the network mapped a tile batch {tuple(tiles.shape)} to {tuple(logits.shape)}; "
                f"expected ({len(chunk)}, K, {', '.join(map(str, patch))})"
            )
        logits = logits.to(device=out_device)
        if out is None:
            out = torch.zeros((n_batch, logits.shape[1], *x.shape[2:]), dtype=torch.float32, device=out_device)
        for (b, s), y in zip(chunk, logits):
            out[(b, slice(None)) + s].addcmul_(y, tile_weight)
    return out
