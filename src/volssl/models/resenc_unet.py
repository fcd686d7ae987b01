"""Residual Encoder U-Net (nnU-Net "ResEnc", Isensee et al. 2024) with a mask-aware encoder.

Architecture: a stem (one 3^3 conv -> InstanceNorm -> LeakyReLU), then one stage of ResNet-D basic
blocks per resolution (the first block of a stage strides; its skip path is avg-pool + 1^3 conv +
norm when the shape changes), then a U-Net decoder with one transposed conv up, a concatenation with
the skip and one conv block per stage, and a 1^3 output conv per decoder stage (deep supervision).

State-dict keys follow dynamic-network-architectures' ``ResidualEncoderUNet`` so nnssl weights map
one to one (see :mod:`volssl.models.checkpoint_import`)::

    encoder.stem.convs.0.{conv,norm}.{weight,bias}
    encoder.stages.{s}.blocks.{j}.conv1.{conv,norm}.*  / .conv2.{conv,norm}.*  / .skip.{k}.{conv,norm}.*
    decoder.transpconvs.{s}.{weight,bias}   decoder.stages.{s}.convs.0.{conv,norm}.*
    decoder.seg_layers.{s}.{weight,bias}

Sparse (masked) encoding: ``encoder(x, mask)`` with ``mask`` a ``(B, 1, X, Y, Z)`` float 0/1 tensor
at input resolution (1 = visible) zeroes the masked input, re-applies the mask (sampled at each
stage's resolution) after every convolution and pooling, and computes instance-norm statistics over
visible voxels only. The mask is an argument passed down the call chain, never module state.
Masked regions must be aligned to the encoder's total stride (blocks of ``k * total_stride`` voxels
starting at multiples of it); then sampling the mask every ``stride`` voxels is exact at every stage.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-5
LEAKY_SLOPE = 0.01


# --------------------------------------------------------------------------- masks and norms
class MaskLevel(NamedTuple):
    """The mask at one resolution of the encoder, as its modules use it.

    ``mask``: ``(B, 1, *s)`` 0/1 (1 = visible); ``count``: ``(B, 1, 1, 1, 1)`` float32 visible voxels
    per sample, clamped to >= 1; ``sparse_conv``: multiply the mask into every conv/pool output;
    ``masked_norm``: take norm statistics over visible voxels only.
    """

    mask: Tensor
    count: Tensor
    sparse_conv: bool = True
    masked_norm: bool = True


def make_mask_level(mask: Tensor, sparse_conv: bool = True, masked_norm: bool = True) -> MaskLevel:
    """Build the :class:`MaskLevel` of a ``(B, 1, *s)`` 0/1 mask (no host synchronisation)."""
    count = mask.sum(dim=tuple(range(2, mask.ndim)), keepdim=True, dtype=torch.float32).clamp_min(1.0)
    return MaskLevel(mask, count, sparse_conv, masked_norm)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32 under autocast, float64 for gradcheck


def _masked_moments(z: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per (sample, channel) of the visible voxels of ``z = x * mask``.

    Masked sums: ``sum(z) / count`` and ``sum(z^2) / count - mean^2`` (one read of ``z`` each, no
    temporaries), accumulated in float32 or wider. The one-pass variance loses precision as
    ``(mean / std)^2`` grows: in float32 the normalised values are off by about 1e-5 at
    mean/std = 3, 5e-4 at 30 and 1e-2 at 100 (measured; bf16 activations round at 4e-3 anyway).
    """
    dims = tuple(range(2, z.ndim))
    acc = _acc_dtype(z)
    count = count.to(acc)
    mean = z.sum(dims, keepdim=True, dtype=acc) / count
    sq = torch.linalg.vector_norm(z, 2, dims, keepdim=True, dtype=acc).square()
    return mean, (sq / count - mean.square()).clamp_min(0.0)


def masked_instance_norm(x: Tensor, mask: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                         eps: float = NORM_EPS, count: Tensor | None = None) -> Tensor:
    """Instance norm of ``x`` (B, C, *s) with statistics over the voxels where ``mask`` (B, 1, *s) is 1.

    Mean and (biased) variance per (sample, channel) come from masked sums divided by the visible
    count (clamped to >= 1): no ``nonzero()``, boolean indexing or ``.item()``, so no host
    synchronisation. Plain autograd ops (any combination of switches); the encoder's default path
    uses the fused :class:`MaskedNormAct` instead. With an all-ones mask this is ``F.instance_norm``.

    Returns the normalised, affinely transformed tensor; at masked voxels it holds ``bias - mean *
    scale`` (not a normalised value), so callers re-apply the mask.
    """
    dims = tuple(range(2, x.ndim))
    if count is None:
        count = mask.sum(dims, keepdim=True, dtype=torch.float32).clamp_min(1.0)
    z = x * mask.to(x.dtype)
    mean, var = _masked_moments(z, count)
    scale = torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * len(dims)
    if weight is not None:
        scale = scale * weight.to(scale.dtype).view(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype).view(shape)
    return torch.addcmul(shift, z.to(shift.dtype), scale).to(x.dtype)


def norm_grad_coefficients(g_sum: Tensor, gz: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                           count: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The instance norm's backward per (sample, channel), from the sums over the visible voxels of
    the output gradient ``g_sum = sum(g)`` and ``gz = sum(g * z)`` (``z`` the un-normalised input):
    returns ``(g_xhat, a, coef_z, const)`` with ``dx = g * a + z * coef_z + const`` at visible voxels
    and ``g_xhat = sum(g * xhat)`` (the weight's gradient per sample). Shapes broadcast together.
    """
    g_xhat = rstd * (gz - mean * g_sum)
    a = weight * rstd
    coef_z = -a * rstd * g_xhat / count
    const = a * (rstd * mean * g_xhat - g_sum) / count
    return g_xhat, a, coef_z, const


class MaskedNormAct(torch.autograd.Function):
    """Fused masked instance norm -> re-mask -> optional LeakyReLU, with a hand-written backward.

    ``apply(x (B, C, *s), mask (B, 1, *s), count (B, 1, 1, 1, 1), weight (C,), bias (C,), eps,
    slope)`` returns ``act(((x - mean) * rstd * weight + bias) * mask)`` with statistics over the
    visible voxels; ``slope=None``: no activation. Same values as :func:`masked_instance_norm`,
    mask and LeakyReLU in fewer passes over the activations; the backward is the batch-norm
    gradient restricted to visible voxels, ``dx = w * rstd * (g - mean_vis(g) - xhat *
    mean_vis(g * xhat)) * mask``. bf16/fp16 activations (autocast) are normalised in float32 and
    rounded once, as PyTorch's own norms do.
    """

    @staticmethod
    def forward(ctx, x, mask, count, weight, bias, eps, slope):  # type: ignore[override]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        m = mask.to(x.dtype)
        z = x * m
        mean, var = _masked_moments(z, count)
        acc = mean.dtype
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight.to(acc).view(shape)
        shift = bias.to(acc).view(shape) - mean * scale
        y = torch.addcmul(shift, z.to(acc), scale).mul_(m.to(acc))
        if slope is not None:
            F.leaky_relu_(y, slope)
        y = y.to(x.dtype)
        ctx.slope = slope
        ctx.save_for_backward(z, m, count, mean, rstd, weight, y if slope is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, m, count, mean, rstd, weight, y = ctx.saved_tensors
        dims = tuple(range(2, z.ndim))
        shape = (1, -1) + (1,) * len(dims)
        acc = rstd.dtype
        zc, mc = z.to(acc), m.to(acc)  # no copies for float32 activations
        if ctx.slope is not None:
            g = torch.ops.aten.leaky_relu_backward(grad.to(acc), y.to(acc), ctx.slope, True).mul_(mc)
        else:
            g = grad.to(acc) * mc
        count = count.to(acc)
        g_sum = g.sum(dims, keepdim=True)  # d loss / d bias, per sample
        gz = torch.einsum("bc...,bc...->bc", g, zc).view_as(g_sum)  # sum(g * z), no temporary
        g_xhat, a, coef_z, const = norm_grad_coefficients(g_sum, gz, mean, rstd, weight.to(acc).view(shape), count)
        dx = (g * a).addcmul_(zc, coef_z).addcmul_(mc, const).to(z.dtype)
        grad_weight = g_xhat.sum(0).view(-1).to(weight.dtype)
        grad_bias = g_sum.sum(0).view(-1).to(weight.dtype)
        return dx, None, None, grad_weight, grad_bias, None, None


def _norm_act(x: Tensor, norm: nn.InstanceNorm3d, level: MaskLevel | None, act: bool) -> Tensor:
    """norm -> (re-mask) -> LeakyReLU, dense or masked according to ``level``."""
    slope = LEAKY_SLOPE if act else None
    if level is not None and level.sparse_conv and level.masked_norm:
        return MaskedNormAct.apply(x, level.mask, level.count, norm.weight, norm.bias, norm.eps, slope)
    if level is None or not level.masked_norm:
        y = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    else:
        y = masked_instance_norm(x, level.mask, norm.weight, norm.bias, norm.eps, level.count)
    # Out of place: F.instance_norm returns a view, and in-place ops on it make autograd copy slices.
    if level is not None and level.sparse_conv:
        y = y * level.mask.to(y.dtype)
    if act:
        y = F.leaky_relu(y, LEAKY_SLOPE)  # LeakyReLU(0) = 0: a masked input stays masked
    return y


# --------------------------------------------------------------------------- building blocks
class ConvNormAct(nn.Module):
    """conv -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01) (activation optional).

    Shapes: ``(B, Cin, *s) -> (B, Cout, *s / stride)``; padding keeps ``s / stride`` exact.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias)
        self.norm = nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True)
        self.nonlin = nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if act else None

    def forward(self, x: Tensor, level: MaskLevel | None = None) -> Tensor:
        return _norm_act(self.conv(x), self.norm, level, self.nonlin is not None)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: ``conv1`` (strided) -> ``conv2`` (no activation) + skip -> LeakyReLU.

    The skip is the identity, or avg-pool (when strided) then a 1^3 conv + norm (when the channels
    change). ``level`` is the mask at the block's output resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, stride)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, 1, act=False)
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:
            skip.append(ConvNormAct(in_channels, out_channels, 1, 1, bias=False, act=False))
        self.skip = nn.ModuleList(skip)  # empty: identity
        self.nonlin2 = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor, level: MaskLevel | None = None) -> Tensor:
        residual = x
        for op in self.skip:
            if isinstance(op, nn.AvgPool3d):
                residual = op(residual)
                if level is not None and level.sparse_conv:
                    residual = residual * level.mask.to(residual.dtype)
            else:
                residual = op(residual, level)
        out = self.conv2(self.conv1(x, level), level) + residual  # both masked, so the sum is masked
        return F.leaky_relu_(out, LEAKY_SLOPE)


class Stem(nn.Module):
    """One 3^3 conv block from the input channels to the first stage's width (no stride)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.ModuleList([ConvNormAct(in_channels, out_channels, 3, 1)])

    def forward(self, x: Tensor, level: MaskLevel | None = None) -> Tensor:
        for conv in self.convs:
            x = conv(x, level)
        return x


class ResidualStage(nn.Module):
    """``n_blocks`` basic blocks; the first one strides and changes the width."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [BasicBlockD(in_channels, out_channels, stride)]
            + [BasicBlockD(out_channels, out_channels, 1) for _ in range(n_blocks - 1)]
        )

    def forward(self, x: Tensor, level: MaskLevel | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, level)
        return x


def _check_widths(features: Sequence[int], blocks: Sequence[int], strides: Sequence[int]) -> None:
    if not (len(features) == len(blocks) == len(strides)) or len(features) < 2:
        raise ValueError(
            f"ResEnc U-Net: features {tuple(features)}, blocks {tuple(blocks)} and strides {tuple(strides)} "
            "must have the same length (one entry per stage, at least 2 stages)")
    for name, vals in (("features", features), ("blocks", blocks), ("strides", strides)):
        if any(int(v) < 1 for v in vals):
            raise ValueError(f"ResEnc U-Net: {name} must be positive integers, got {tuple(vals)}")


# --------------------------------------------------------------------------- encoder / decoder
class ResidualEncoder(nn.Module):
    """Stem + residual stages. ``forward(x, mask=None)`` returns one feature map per stage.

    Stage ``s`` outputs ``(B, features[s], *patch / prod(strides[:s+1]))``; the last is the
    bottleneck. ``patch`` must be divisible by :attr:`total_stride`.
    """

    def __init__(self, in_channels: int, features: Sequence[int], blocks: Sequence[int], strides: Sequence[int]):
        super().__init__()
        _check_widths(features, blocks, strides)
        self.in_channels = int(in_channels)
        self.output_channels = [int(f) for f in features]
        self.strides = [int(s) for s in strides]
        self.stem = Stem(in_channels, features[0])
        stages, cin = [], features[0]
        for f, b, s in zip(features, blocks, strides):
            stages.append(ResidualStage(cin, f, int(b), int(s)))
            cin = f
        self.stages = nn.ModuleList(stages)

    @property
    def total_stride(self) -> int:
        """Input voxels per bottleneck voxel along each axis."""
        return math.prod(self.strides)

    @property
    def cumulative_strides(self) -> list[int]:
        """Downsampling factor of each stage's output relative to the input."""
        out, c = [], 1
        for s in self.strides:
            c *= s
            out.append(c)
        return out

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        """ValueError naming the problem if ``x`` (B, C, X, Y, Z) or ``mask`` (B, 1, X, Y, Z) do not fit."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResEnc encoder: expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(d % self.total_stride for d in x.shape[2:]):
            raise ValueError(f"ResEnc encoder: patch {tuple(x.shape[2:])} is not divisible by the total stride "
                             f"{self.total_stride}")
        if mask is not None and (mask.ndim != 5 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0]
                                 or mask.shape[2:] != x.shape[2:]):
            raise ValueError(f"ResEnc encoder: mask must be (B, 1, X, Y, Z) = {(x.shape[0], 1, *x.shape[2:])}, "
                             f"got {tuple(mask.shape)}")

    def mask_levels(self, mask: Tensor, sparse_conv: bool = True, masked_norm: bool = True) -> list[MaskLevel]:
        """The mask at the stem's and each stage's resolution: ``[stem, stage 0, ..., bottleneck]``.

        Sampling every ``c``-th voxel (``c`` = cumulative stride) is exact for masks aligned to the
        total stride.
        """
        cache: dict[int, MaskLevel] = {}

        def level(c: int) -> MaskLevel:
            if c not in cache:
                m = mask if c == 1 else mask[:, :, ::c, ::c, ::c].contiguous()
                cache[c] = make_mask_level(m, sparse_conv, masked_norm)
            return cache[c]

        return [level(1)] + [level(c) for c in self.cumulative_strides]

    def forward(self, x: Tensor, mask: Tensor | None = None, *, mask_input: bool = True, sparse_conv: bool = True,
                masked_norm: bool = True) -> list[Tensor]:
        """Encode ``x`` (B, C, X, Y, Z) -> ``[stage 0 features, ..., bottleneck]``.

        With ``mask`` (B, 1, X, Y, Z; 1 = visible): ``mask_input`` zeroes the masked input before the
        stem, ``sparse_conv`` re-applies the mask after every conv/pool (bottleneck included) and
        ``masked_norm`` takes norm statistics over visible voxels only. Without ``mask`` the switches
        are ignored and the encoder is the plain dense one.
        """
        self.check_input(x, mask)
        levels: list[MaskLevel | None] = [None] * (len(self.stages) + 1)
        if mask is not None:
            mask = mask.to(x.dtype)
            if sparse_conv or masked_norm:
                levels = list(self.mask_levels(mask, sparse_conv, masked_norm))
            if mask_input:
                x = x * mask
        x = self.stem(x, levels[0])
        skips = []
        for stage, level in zip(self.stages, levels[1:]):
            x = stage(x, level)
            skips.append(x)
        return skips


class DecoderStage(nn.Module):
    """One conv block merging the upsampled features with the skip: ``2 * C -> C``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.ModuleList([ConvNormAct(in_channels, out_channels, 3, 1)])

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return x


class UNetDecoder(nn.Module):
    """Transposed conv up, concat skip, one conv block, per stage; a 1^3 output conv per stage.

    ``forward(skips)`` takes the encoder's list (bottleneck last) and returns ``(B, out_channels,
    *patch / strides[0])``; with ``deep_supervision`` a list of every stage's output, highest first.
    """

    def __init__(self, encoder_channels: Sequence[int], strides: Sequence[int], out_channels: int):
        super().__init__()
        n = len(encoder_channels)
        self.out_channels = int(out_channels)
        transp, stages, heads = [], [], []
        for s in range(1, n):
            below, skip, stride = encoder_channels[-s], encoder_channels[-(s + 1)], strides[-s]
            transp.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=True))
            stages.append(DecoderStage(2 * skip, skip))
            heads.append(nn.Conv3d(skip, out_channels, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transp)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: Sequence[Tensor], deep_supervision: bool = False) -> Tensor | list[Tensor]:
        if len(skips) != len(self.stages) + 1:
            raise ValueError(f"UNet decoder: expected {len(self.stages) + 1} skip tensors, got {len(skips)}")
        x = skips[-1]
        outputs = []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            if deep_supervision:
                outputs.append(self.seg_layers[s](x))
        if deep_supervision:
            return outputs[::-1]
        return self.seg_layers[-1](x)


class ResEncUNet(nn.Module):
    """Residual Encoder U-Net: ``forward(x (B, in, X, Y, Z)) -> logits (B, out, X, Y, Z)``.

    Args:
        in_channels / out_channels: input modalities and output channels (classes, or the input
            channels for reconstruction).
        features: width of each stage (stem = ``features[0]``).
        blocks: residual blocks per stage.
        strides: isotropic downsampling of each stage (``strides[0]`` is normally 1).
        deep_supervision: return every decoder stage's output (highest resolution first).
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[int], deep_supervision: bool = False):
        super().__init__()
        _check_widths(features, blocks, strides)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"ResEnc U-Net: in/out channels must be >= 1, got {in_channels}/{out_channels}")
        self.encoder = ResidualEncoder(in_channels, features, blocks, strides)
        self.decoder = UNetDecoder(self.encoder.output_channels, self.encoder.strides, out_channels)
        self.deep_supervision = deep_supervision
        self.apply(init_weights)
        for m in self.modules():  # zero-init the last norm of each residual branch (nnU-Net's default)
            if isinstance(m, BasicBlockD):
                nn.init.zeros_(m.conv2.norm.weight)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        return self.decoder(self.encoder(x), deep_supervision=self.deep_supervision)


def init_weights(module: nn.Module) -> None:
    """He (Kaiming normal, negative slope 1e-2) init of conv weights, zero biases (nnU-Net's)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
