"""Block-sparse encoding: compute a block-masked ResEnc encoder on the visible blocks only.

S3D masks whole blocks of ``unit`` voxels (the encoder's total stride, or a multiple of it). The
masked-dense encoder (:meth:`~volssl.models.resenc_unet.ResidualEncoder.forward` with a mask)
convolves every voxel and zeroes the masked ones after each conv; here the visible blocks of the
whole batch are gathered once into a batch of cubes ``(N, C, s, s, s)`` (``s`` = the block's side
at a stage's resolution) and every conv / masked instance norm / LeakyReLU / pooling of the
block-sparse stages runs on that batch:

* a 3^3 conv needs a one-voxel halo around each cube: :class:`Halo` copies it from the cube's
  visible neighbours (a masked neighbour or the patch border gives zeros, exactly what the
  masked-dense path reads there), then the conv runs without padding;
* norm statistics per (sample, channel) are sums over that sample's cubes (:class:`BlockNormAct`,
  the fused masked norm of :class:`~volssl.models.resenc_unet.MaskedNormAct` with every voxel
  visible and per-sample segment sums);
* each stage's output is scattered into a zero dense tensor once (:class:`BlocksToDense`) because
  the decoder needs dense skips; stages whose cubes would be a few voxels wide stay dense (the
  masked-dense path continues from the last block-sparse stage's output).

The result equals the masked-dense encoder's (outputs and gradients; only the summation order of
the norm statistics differs). Finding the visible blocks is one ``nonzero()``: one host
synchronisation per step on a GPU, which the masked-dense path does not have.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from volssl.models.resenc_unet import LEAKY_SLOPE, BasicBlockD, ConvNormAct, _acc_dtype, norm_grad_coefficients

if TYPE_CHECKING:
    from volssl.models.resenc_unet import ResidualEncoder


class BlockGrid:
    """The visible blocks of a block-aligned mask and their neighbours.

    Args:
        mask: ``(B, 1, X, Y, Z)`` 0/1, 1 = visible, constant on aligned cubes of ``unit`` voxels.
        unit: the side of a block in voxels of ``mask``'s resolution.

    Attributes: ``sample, ix, iy, iz`` (N,) long: the batch row and grid position of each visible
    block, in row-major order (blocks of one sample are consecutive); ``n``: N; ``blocks_per_sample``
    (B,) float32; ``grid``: (nx, ny, nz); ``batch``: B.
    """

    def __init__(self, mask: Tensor, unit: int):
        if mask.ndim != 5 or mask.shape[1] != 1:
            raise ValueError(f"BlockGrid: mask must be (B, 1, X, Y, Z), got {tuple(mask.shape)}")
        if unit < 1 or any(d % unit for d in mask.shape[2:]):
            raise ValueError(f"BlockGrid: mask shape {tuple(mask.shape[2:])} is not divisible by the block {unit}")
        cells = mask[:, 0, ::unit, ::unit, ::unit] > 0.5  # (B, nx, ny, nz)
        self.batch, self.grid, self.unit = int(cells.shape[0]), tuple(int(g) for g in cells.shape[1:]), int(unit)
        idx = cells.nonzero()  # the one host synchronisation
        self.n = int(idx.shape[0])
        self.sample, self.ix, self.iy, self.iz = idx.unbind(1)
        self.blocks_per_sample = cells.flatten(1).sum(1, dtype=torch.float32)
        nx, ny, nz = self.grid
        index = torch.full((self.batch, nx + 2, ny + 2, nz + 2), self.n, dtype=torch.long, device=mask.device)
        index[self.sample, self.ix + 1, self.iy + 1, self.iz + 1] = torch.arange(self.n, device=mask.device)
        self._index = index  # padded grid -> block number, N where masked or outside
        self._neighbours: dict[tuple[int, int, int], Tensor] = {}

    @property
    def visible_fraction(self) -> float:
        """Visible blocks over all blocks of the batch."""
        return self.n / max(self.batch * self.grid[0] * self.grid[1] * self.grid[2], 1)

    def neighbours(self, offset: tuple[int, int, int]) -> Tensor:
        """``(N,)`` long: the number of each block's neighbour at grid ``offset`` (each in -1..1), or N
        where that neighbour is masked or outside the patch (cached per offset; no host synchronisation)."""
        if offset not in self._neighbours:
            dx, dy, dz = offset
            self._neighbours[offset] = self._index[self.sample, self.ix + 1 + dx, self.iy + 1 + dy, self.iz + 1 + dz]
        return self._neighbours[offset]

    def voxels_per_sample(self, side: int) -> Tensor:
        """Visible voxels per sample at a resolution where a block is ``side`` voxels wide: ``(B,)``, >= 1."""
        return (self.blocks_per_sample * float(side) ** 3).clamp_min(1.0)


# --------------------------------------------------------------------------- moving between layouts
def dense_to_blocks(x: Tensor, grid: BlockGrid, lo: int = 0, hi: int = 0) -> Tensor:
    """The visible blocks of ``x`` (B, C, X, Y, Z) with a halo of ``lo`` / ``hi`` voxels before / after
    each block along every axis (zeros beyond the border): ``(N, C, s + lo + hi, ...)``, ``s = X / nx``.

    Reads a strided view of the (padded) tensor and copies the visible blocks only.
    """
    side = x.shape[2] // grid.grid[0]
    if lo or hi:
        x = F.pad(x, (lo, hi) * 3)
    win = side + lo + hi
    cubes = x.unfold(2, win, side).unfold(3, win, side).unfold(4, win, side)  # (B, C, nx, ny, nz, w, w, w)
    return cubes[grid.sample, :, grid.ix, grid.iy, grid.iz]


class BlocksToDense(torch.autograd.Function):
    """``apply(blocks (N, C, s, s, s), grid)`` -> ``(B, C, nx*s, ny*s, nz*s)``, zero outside the visible
    blocks; the backward gathers the visible blocks of the gradient."""

    @staticmethod
    def forward(ctx, blocks, grid):  # type: ignore[override]
        n, c, s = blocks.shape[0], blocks.shape[1], blocks.shape[2]
        nx, ny, nz = grid.grid
        out = blocks.new_zeros(grid.batch, c, nx * s, ny * s, nz * s)
        out.view(grid.batch, c, nx, s, ny, s, nz, s)[grid.sample, :, grid.ix, :, grid.iy, :, grid.iz, :] = blocks
        ctx.grid, ctx.side = grid, s
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grid, s = ctx.grid, ctx.side
        nx, ny, nz = grid.grid
        g = grad.contiguous().view(grid.batch, grad.shape[1], nx, s, ny, s, nz, s)
        return g[grid.sample, :, grid.ix, :, grid.iy, :, grid.iz, :], None


def _halo_slices(d: int, side: int, lo: int, hi: int) -> tuple[slice, slice]:
    """(destination in the haloed cube, source in the neighbour) along one axis for offset ``d``."""
    if d < 0:
        return slice(0, lo), slice(side - lo, side)
    if d > 0:
        return slice(lo + side, lo + side + hi), slice(0, hi)
    return slice(lo, lo + side), slice(0, side)


def _halo_offsets(lo: int, hi: int) -> list[tuple[int, int, int]]:
    steps = [d for d, keep in ((-1, lo), (0, 1), (1, hi)) if keep]
    return [o for o in itertools.product(steps, repeat=3) if o != (0, 0, 0)]


class Halo(torch.autograd.Function):
    """``apply(blocks (N, C, s, s, s), grid, lo, hi)`` -> ``(N, C, s + lo + hi, ...)``: each block with
    ``lo`` / ``hi`` voxels of its neighbours before / after it on every axis (``lo, hi <= s``).

    A neighbour that is masked or outside the patch gives zeros. The backward adds each halo's
    gradient back into the neighbour it came from.
    """

    @staticmethod
    def forward(ctx, blocks, grid, lo, hi):  # type: ignore[override]
        n, c, s = blocks.shape[0], blocks.shape[1], blocks.shape[2]
        if lo > s or hi > s:
            raise ValueError(f"Halo: a halo of ({lo}, {hi}) is wider than the block side {s}")
        out = blocks.new_empty(n, c, s + lo + hi, s + lo + hi, s + lo + hi)
        out[:, :, lo:lo + s, lo:lo + s, lo:lo + s] = blocks
        for offset in _halo_offsets(lo, hi):
            (dx, sx), (dy, sy), (dz, sz) = (_halo_slices(d, s, lo, hi) for d in offset)
            piece = blocks[:, :, sx, sy, sz]
            piece = torch.cat((piece, piece.new_zeros((1,) + piece.shape[1:])))  # row N: the zero neighbour
            out[:, :, dx, dy, dz] = piece.index_select(0, grid.neighbours(offset))
        ctx.grid, ctx.lo, ctx.hi, ctx.side = grid, lo, hi, s
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grid, lo, hi, s = ctx.grid, ctx.lo, ctx.hi, ctx.side
        gb = grad[:, :, lo:lo + s, lo:lo + s, lo:lo + s].contiguous()
        for offset in _halo_offsets(lo, hi):
            (dx, sx), (dy, sy), (dz, sz) = (_halo_slices(d, s, lo, hi) for d in offset)
            halo = grad[:, :, dx, dy, dz]
            back = halo.new_zeros((gb.shape[0] + 1,) + halo.shape[1:]).index_add_(0, grid.neighbours(offset), halo)
            gb[:, :, sx, sy, sz] += back[:-1]
        return gb, None, None, None


# --------------------------------------------------------------------------- norm on blocks
def _segment_sum(values: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """Sum the rows of ``values`` (N, C) per ``segment`` (N,) -> (n_segments, C)."""
    return values.new_zeros(n_segments, values.shape[1]).index_add_(0, segment, values)


class BlockNormAct(torch.autograd.Function):
    """Instance norm over each sample's visible blocks -> optional LeakyReLU, fused, on ``(N, C, s, s, s)``.

    ``apply(x, sample (N,), count (B,) visible voxels per sample, weight (C,), bias (C,), eps, slope)``:
    the statistics of sample ``b`` and channel ``c`` are over every voxel of its blocks, so this
    equals :class:`~volssl.models.resenc_unet.MaskedNormAct` on the dense tensor at its visible
    voxels. Same float32 accumulation and the same hand-written backward (all voxels visible).
    """

    @staticmethod
    def forward(ctx, x, sample, count, weight, bias, eps, slope):  # type: ignore[override]
        acc = _acc_dtype(x)
        dims = (2, 3, 4)
        b = count.shape[0]
        cnt = count.to(acc).view(b, 1)
        mean = _segment_sum(x.sum(dims, dtype=acc), sample, b) / cnt
        sq = torch.linalg.vector_norm(x, 2, dims, dtype=acc).square()
        var = (_segment_sum(sq, sample, b) / cnt - mean.square()).clamp_min(0.0)
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight.to(acc)
        shift = bias.to(acc) - mean * scale
        y = torch.addcmul(shift[sample][..., None, None, None], x.to(acc), scale[sample][..., None, None, None])
        if slope is not None:
            F.leaky_relu_(y, slope)
        y = y.to(x.dtype)
        ctx.slope = slope
        ctx.save_for_backward(x, sample, cnt, mean, rstd, weight, y if slope is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, sample, cnt, mean, rstd, weight, y = ctx.saved_tensors
        acc = rstd.dtype
        b = cnt.shape[0]
        xc = x.to(acc)
        if ctx.slope is not None:
            g = torch.ops.aten.leaky_relu_backward(grad.to(acc), y.to(acc), ctx.slope, True)
        else:
            g = grad.to(acc)
        g_sum = _segment_sum(g.sum((2, 3, 4)), sample, b)  # d loss / d bias, per sample
        gz = _segment_sum(torch.einsum("nc...,nc...->nc", g, xc), sample, b)  # sum(g * x)
        g_xhat, a, coef_x, const = norm_grad_coefficients(g_sum, gz, mean, rstd, weight.to(acc), cnt)

        def per_block(t: Tensor) -> Tensor:
            return t[sample][..., None, None, None]

        dx = (g * per_block(a)).addcmul_(xc, per_block(coef_x)).add_(per_block(const)).to(x.dtype)
        return dx, None, None, g_xhat.sum(0).to(weight.dtype), g_sum.sum(0).to(weight.dtype), None, None


# --------------------------------------------------------------------------- the encoder's modules on blocks
def conv_norm_act_blocks(m: ConvNormAct, x: Tensor, grid: BlockGrid, haloed: bool = False) -> Tensor:
    """:class:`ConvNormAct` on blocks ``x`` (N, Cin, s, s, s) -> (N, Cout, s / stride, ...).

    ``haloed``: ``x`` already carries the halo the conv needs (the stem's input, cut from the dense image).
    """
    k, stride, pad = m.conv.kernel_size[0], m.conv.stride[0], m.conv.padding[0]
    if not haloed and pad:
        x = Halo.apply(x, grid, pad, max(0, pad - stride + 1))
    y = F.conv3d(x, m.conv.weight, m.conv.bias, stride)
    count = grid.voxels_per_sample(y.shape[2])
    slope = LEAKY_SLOPE if m.nonlin is not None else None
    return BlockNormAct.apply(y, grid.sample, count, m.norm.weight, m.norm.bias, m.norm.eps, slope)


def basic_block_blocks(block: BasicBlockD, x: Tensor, grid: BlockGrid) -> Tensor:
    """:class:`BasicBlockD` on blocks (the skip's avg-pool never straddles two blocks)."""
    residual = x
    for op in block.skip:
        if isinstance(op, ConvNormAct):
            residual = conv_norm_act_blocks(op, residual, grid)
        else:
            residual = op(residual)
    out = conv_norm_act_blocks(block.conv2, conv_norm_act_blocks(block.conv1, x, grid), grid) + residual
    return F.leaky_relu_(out, LEAKY_SLOPE)


def block_sides(encoder: "ResidualEncoder", unit: int) -> list[int]:
    """The side of a ``unit``-voxel block at each stage's output resolution."""
    return [unit // c for c in encoder.cumulative_strides]


def encode_block_sparse(encoder: "ResidualEncoder", x: Tensor, mask: Tensor, n_block_stages: int,
                        mask_input: bool = True, unit: int | None = None) -> list[Tensor]:
    """The masked-dense encoder's output (sparse conv and masked norm on) from visible-block compute.

    Args:
        encoder: a ResEnc encoder whose first stage does not downsample.
        x: ``(B, C, X, Y, Z)`` input; ``mask``: ``(B, 1, X, Y, Z)``, 1 = visible, aligned to ``unit``.
        n_block_stages: stem + stages ``[0, n_block_stages)`` run on blocks, the rest masked-dense
            (0: all masked-dense).
        mask_input: zero the masked input first (the stem's halo then reads zeros there).
        unit: block side in input voxels (default: the total stride); a multiple of the total stride.

    Returns: one dense ``(B, C_s, *patch / stride_s)`` tensor per stage, zero at masked positions.
    """
    encoder.check_input(x, mask)
    unit = unit or encoder.total_stride
    if unit % encoder.total_stride:
        raise ValueError(f"block-sparse encoder: block {unit} is not a multiple of the total stride "
                         f"{encoder.total_stride}")
    if encoder.strides[0] != 1:
        raise ValueError("block-sparse encoder: the first stage must not downsample")
    if not 0 <= n_block_stages <= len(encoder.stages):
        raise ValueError(f"block-sparse encoder: n_block_stages must be in [0, {len(encoder.stages)}], "
                         f"got {n_block_stages}")
    if n_block_stages == 0:
        return encoder(x, mask, mask_input=mask_input)
    mask = mask.to(x.dtype)
    if mask_input:
        x = x * mask
    grid = BlockGrid(mask, unit)
    stem = encoder.stem.convs
    pad = stem[0].conv.padding[0]
    blocks = conv_norm_act_blocks(stem[0], dense_to_blocks(x, grid, pad, pad), grid, haloed=True)
    for conv in stem[1:]:
        blocks = conv_norm_act_blocks(conv, blocks, grid)
    skips: list[Tensor] = []
    for stage in encoder.stages[:n_block_stages]:
        for block in stage.blocks:
            blocks = basic_block_blocks(block, blocks, grid)
        skips.append(BlocksToDense.apply(blocks, grid))
    dense_stages = encoder.stages[n_block_stages:]
    if len(dense_stages):  # the masked-dense path continues from the last block-sparse stage's output
        h = skips[-1]
        for stage, level in zip(dense_stages, encoder.mask_levels(mask)[n_block_stages + 1:]):
            h = stage(h, level)
            skips.append(h)
    return skips
