"""Fixed 3D sine-cosine position embeddings for vision transformers on volumes (MAE-XNT, no class token).

The embedding of the token at grid position ``(i, j, k)`` concatenates, per axis, ``D / 6`` sines and
``D / 6`` cosines of that axis' coordinate at geometrically spaced frequencies::

    omega_f = temperature ** (-f / (D / 6)),   f = 0 .. D/6 - 1
    row = [sin(i omega), cos(i omega), sin(j omega), cos(j omega), sin(k omega), cos(k omega)]

Rows are in C order of the grid (first axis slowest), the order of ``conv(x).flatten(2)`` for a
patch-embedding convolution, so row ``n`` belongs to the token at ``unravel_index(n, grid)``.
The embedding is a pure function of the grid: nothing is learned or stored in checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def sincos_pos_embed_3d(grid: int | Sequence[int], dim: int, temperature: float = 10_000.0,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The fixed 3D sin-cos position embedding of a token grid.

    Args:
        grid: tokens along each axis, ``(gx, gy, gz)`` (an int: a cube).
        dim: embedding width ``D``; must be a positive multiple of 6 (a sine and a cosine per axis).
        temperature: the longest wavelength's scale (10000, as in the Transformer and MAE).
        device, dtype: of the result (computed in float64, then cast).

    Returns:
        ``(gx * gy * gz, D)`` tensor; row ``n`` is the token at ``unravel_index(n, grid)``.
    """
    sizes = (int(grid),) * 3 if isinstance(grid, int) else tuple(int(g) for g in grid)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sincos_pos_embed_3d: grid must be three positive sizes, got {grid!r}")
    if dim < 6 or dim % 6:
        raise ValueError(f"sincos_pos_embed_3d: dim must be a positive multiple of 6 (a sine and a cosine per "
                         f"axis), got {dim}")
    if not temperature > 0:
        raise ValueError(f"sincos_pos_embed_3d: temperature must be > 0, got {temperature}")
    n_freq = dim // 6
    omega = float(temperature) ** (-torch.arange(n_freq, dtype=torch.float64) / n_freq)  # (D/6,)
    coords = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in sizes), indexing="ij")
    parts = []
    for axis in coords:
        angle = axis.reshape(-1, 1) * omega  # (N, D/6)
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).to(device=device, dtype=dtype)
