"""Mask generation for masked image modelling. Every mask is 1 = visible, 0 = masked.

* :func:`block_mask` (S3D): a random mask on the coarse grid of ``block``-sized cubes, upsampled to
  the patch. With ``block`` = the encoder's total stride the grid is the bottleneck (160^3 patch,
  stride 32: a 5^3 grid of 32^3 blocks), so masked regions align with every stage of the encoder.
* :func:`token_mask` (AMAES): the same on 4^3-voxel tokens with a masking probability of 0.6.

The masked count per sample is exact: ``round(ratio * n_cells)`` cells, chosen by ranking uniform
noise (argsort), with no host synchronisation. Randomness comes from the global torch RNG unless a
``generator`` is given. For data parallelism every random quantity is drawn for the whole global
batch (``global_batch`` samples, in an order and shape independent of the local batch) and rows
``[sample_offset, sample_offset + batch)`` are kept, so W processes draw exactly the masks one does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Ratio = float | tuple[float, float] | Sequence[float]


def _rows(batch: int, sample_offset: int, global_batch: int | None) -> tuple[int, int]:
    g = batch if global_batch is None else int(global_batch)
    if batch < 1 or sample_offset < 0 or sample_offset + batch > g:
        raise ValueError(f"mask rows [{sample_offset}, {sample_offset + batch}) do not fit a global batch of {g}")
    return g, sample_offset


def sample_ratios(batch: int, ratio: Ratio, device: torch.device | str | None = None,
                  generator: torch.Generator | None = None, sample_offset: int = 0,
                  global_batch: int | None = None) -> Tensor:
    """Masking ratio per sample, ``(batch,)`` float32: ``ratio`` itself, or U[lo, hi] per sample
    (drawn for ``global_batch`` samples; rows ``[sample_offset, sample_offset + batch)`` kept)."""
    if isinstance(ratio, (int, float)):
        lo = hi = float(ratio)
    else:
        if len(ratio) != 2:
            raise ValueError(f"mask ratio range must be (lo, hi), got {ratio!r}")
        lo, hi = float(ratio[0]), float(ratio[1])
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"mask ratio must satisfy 0 <= lo <= hi <= 1, got {ratio!r}")
    g, o = _rows(batch, sample_offset, global_batch)
    if lo == hi:
        return torch.full((batch,), lo, device=device)
    u = torch.rand(g, device=device, generator=generator)[o:o + batch]
    return lo + (hi - lo) * u


def grid_mask(batch: int, grid: Sequence[int], ratio: Ratio, device: torch.device | str | None = None,
              generator: torch.Generator | None = None, sample_offset: int = 0,
              global_batch: int | None = None) -> Tensor:
    """Random cell mask ``(batch, 1, *grid)`` float32 with exactly ``round(r_b * n_cells)`` zeros in row b.

    Ratios, then noise, are drawn for ``global_batch`` samples (default ``batch``) and rows
    ``[sample_offset, sample_offset + batch)`` are kept.
    """
    grid = tuple(int(g) for g in grid)
    n = 1
    for g in grid:
        n *= g
    if batch < 1 or n < 1:
        raise ValueError(f"grid_mask: need batch >= 1 and a non-empty grid, got batch {batch}, grid {grid}")
    g, o = _rows(batch, sample_offset, global_batch)
    ratios = sample_ratios(batch, ratio, device, generator, sample_offset, global_batch)
    n_masked = torch.round(ratios * n).to(torch.long).unsqueeze(1)  # (B, 1)
    noise = torch.rand(g, n, device=device, generator=generator)[o:o + batch]
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each cell's noise within its row
    visible = (rank >= n_masked).to(torch.float32)  # the n_masked lowest-noise cells are masked
    return visible.view(batch, 1, *grid)


def upsample_mask(mask: Tensor, block: int | Sequence[int]) -> Tensor:
    """Nearest upsampling of a ``(B, 1, *grid)`` mask by integer ``block`` per axis -> ``(B, 1, *grid*block)``."""
    blocks = (int(block),) * (mask.ndim - 2) if isinstance(block, int) else tuple(int(b) for b in block)
    out = mask
    for axis, b in enumerate(blocks, start=2):
        if b != 1:
            out = out.repeat_interleave(b, dim=axis)
    return out


def block_mask(batch: int, patch_size: Sequence[int], block: int, ratio: Ratio,
               device: torch.device | str | None = None, generator: torch.Generator | None = None,
               sample_offset: int = 0, global_batch: int | None = None) -> Tensor:
    """S3D block mask ``(batch, 1, *patch_size)`` float32, 1 = visible.

    Args:
        batch: samples.
        patch_size: spatial patch shape in voxels; every side must be divisible by ``block``.
        block: side of one masked cube in voxels (S3D: the encoder's total stride, 32 for ResEncL).
        ratio: masked fraction, a float (static) or ``(lo, hi)`` drawn per sample from U[lo, hi].
        device, generator: where and from which RNG to draw (default: the global torch RNG).
        sample_offset, global_batch: this process's rows of the global batch (data parallelism).
    """
    patch_size = tuple(int(p) for p in patch_size)
    if block < 1 or any(p % block for p in patch_size):
        raise ValueError(f"block_mask: patch {patch_size} is not divisible by the mask block size {block}")
    grid = tuple(p // block for p in patch_size)
    return upsample_mask(grid_mask(batch, grid, ratio, device, generator, sample_offset, global_batch), block)


def token_mask(batch: int, patch_size: Sequence[int], token: int = 4, ratio: Ratio = 0.6,
               device: torch.device | str | None = None, generator: torch.Generator | None = None,
               sample_offset: int = 0, global_batch: int | None = None) -> Tensor:
    """AMAES token mask ``(batch, 1, *patch_size)``: ``token``^3-voxel tokens, an exact ``ratio`` masked."""
    return block_mask(batch, patch_size, token, ratio, device, generator, sample_offset, global_batch)
