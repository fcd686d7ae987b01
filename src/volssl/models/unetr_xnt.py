"""UNETR-XNT: the MAE-XNT segmentation network, a 3D ViT encoder with a light UNETR-style decoder.

MAE-XNT supplement, Fig. 2 (patch 4) and Fig. 5 (patch 8). With patch ``p = 2^s`` and token grid
``g = patch / p``, the decoder climbs ``s`` factor-2 levels from ``g`` to full resolution:

* bottom: the encoder's output (last block, final LayerNorm) as a ``(D, g^3)`` map -> 3^3 conv
  ``D -> D/2`` -> transposed conv up to level 1 (``w_1`` channels);
* ``s - 1`` token skips: the output of block ``(s - l) * depth / s`` (patch 4: block ``depth/2``;
  patch 8: blocks ``2 depth/3`` and ``depth/3``), through its own LayerNorm, as a map, then conv and
  transposed convs up to level ``l`` (``w_l`` channels); at each level the two maps are
  concatenated, two 3^3 conv blocks merge them and a transposed conv goes up one level;
* a full-resolution skip from the raw input: two 3^3 conv blocks ``C -> w_s``; concatenated with
  the last level, two 3^3 conv blocks and the 1^3 output conv (``decoder.seg_layers[0]``).

Widths (ViT-B, ``D = 768``) follow the public MAE-XNT models: patch 4: ``w = (D/16, D/64) = (48,
12)``; patch 8: ``(D/8, D/16, D/32) = (96, 48, 24)``; the patch-8 decoder has the one extra
up-sampling level and the second token skip. Conv blocks are conv -> InstanceNorm -> LeakyReLU
(the public code uses BatchNorm before each conv; instance norm does not depend on the batch size
and behaves the same in training and sliding-window inference). Transposed convs are 2^3, stride 2.

Layout contract (models/registry.py): ``.encoder`` (:class:`~volssl.models.vit.ViTEncoder3D`,
``in_channels``, ``total_stride`` = patch size), ``.decoder`` with its single output head in
``decoder.seg_layers``, and ``deep_supervision``: the decoder has no lower-resolution heads, so
``deep_supervision=True`` only wraps the full-resolution logits in a one-element list (the same
loss as without it).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from volssl.models.registry import ArchSpec, register_arch
from volssl.models.resenc_unet import LEAKY_SLOPE, NORM_EPS, ConvNormAct, init_weights
from volssl.models.vit import LN_EPS, ViTEncoder3D


class UpNormAct(nn.Module):
    """2^3 transposed conv (stride 2) -> InstanceNorm3d -> LeakyReLU: ``(B, Cin, *s) -> (B, Cout, *2s)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, 2, 2)
        self.norm = nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True)
        self.nonlin = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.norm(self.conv(x)))


def default_widths(dim: int, patch_size: int) -> tuple[int, ...]:
    """Decoder widths ``(w_1, ..., w_s)`` per level (level ``s`` = full resolution) for ``p = 2^s``:
    patch 4: ``(D/16, D/64)``; otherwise ``w_l = D / 2^(s + l - 1)`` (patch 8: ``(D/8, D/16, D/32)``)."""
    s = int(round(math.log2(patch_size)))
    if patch_size == 4:
        return (dim // 16, dim // 64)
    return tuple(dim // 2 ** (s + l - 1) for l in range(1, s + 1))


def skip_blocks(depth: int, patch_size: int) -> tuple[int, ...]:
    """0-based indices of the blocks feeding the token skips, deepest first: blocks ``(s - l) depth / s``
    (1-based) for ``l = 1 .. s-1`` (patch 4: ``depth/2``; patch 8: ``2 depth/3``, ``depth/3``)."""
    s = int(round(math.log2(patch_size)))
    out = tuple((s - l) * depth // s - 1 for l in range(1, s))
    if any(i < 0 for i in out) or len(set(out)) != len(out):
        raise ValueError(f"UNETR-XNT: depth {depth} is too shallow for patch {patch_size} ({s - 1} distinct token "
                         f"skips needed)")
    return out


def _tokens_to_map(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """``(B, N, D)`` tokens in C order of ``grid`` -> ``(B, D, *grid)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class UNETRXNTDecoder(nn.Module):
    """The UNETR-XNT decoder (see the module docstring).

    Args:
        in_channels: the raw input's channels (full-resolution skip).
        out_channels: classes (logit channels).
        dim, depth, patch_size: the encoder's width, block count and patch size (a power of two >= 2).
        widths: channels per level ``(w_1, ..., w_s)``; None: :func:`default_widths`.

    ``forward(image (B, C, *patch), tokens (B, N, D), hidden (list of (B, N, D), deepest first), grid)
    -> logits (B, out_channels, *patch)``.
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int, depth: int, patch_size: int,
                 widths: Sequence[int] | None = None):
        super().__init__()
        s = int(round(math.log2(patch_size))) if patch_size >= 1 else 0
        if patch_size < 2 or 2 ** s != patch_size:
            raise ValueError(f"UNETR-XNT: patch_size must be a power of two >= 2, got {patch_size}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"UNETR-XNT: in/out channels must be >= 1, got {in_channels}/{out_channels}")
        w = tuple(int(v) for v in (widths if widths is not None else default_widths(dim, patch_size)))
        if len(w) != s or min(w) < 1:
            raise ValueError(f"UNETR-XNT: widths must be {s} positive channel counts (one per level) for patch "
                             f"{patch_size} and dim {dim}, got {w}")
        self.levels = s
        self.widths = w
        self.skip_blocks = skip_blocks(depth, patch_size)
        self.out_channels = int(out_channels)
        self.bottom = nn.Sequential(ConvNormAct(dim, dim // 2), UpNormAct(dim // 2, w[0]))
        self.skip_norms = nn.ModuleList(nn.LayerNorm(dim, eps=LN_EPS) for _ in self.skip_blocks)
        self.skips = nn.ModuleList(self._token_path(dim, level, w[level - 1]) for level in range(1, s))
        self.merges = nn.ModuleList(
            nn.Sequential(ConvNormAct(2 * w[l - 1], 2 * w[l - 1]), ConvNormAct(2 * w[l - 1], 2 * w[l - 1]),
                          UpNormAct(2 * w[l - 1], w[l]))
            for l in range(1, s))
        self.input_skip = nn.Sequential(ConvNormAct(in_channels, w[-1]), ConvNormAct(w[-1], w[-1]))
        self.out_block = nn.Sequential(ConvNormAct(2 * w[-1], 2 * w[-1]), ConvNormAct(2 * w[-1], 2 * w[-1]))
        self.seg_layers = nn.ModuleList([nn.Conv3d(2 * w[-1], out_channels, 1)])
        self.apply(init_weights)

    @staticmethod
    def _token_path(dim: int, level: int, width: int) -> nn.Sequential:
        """Token map ``(D, g)`` -> ``(width, g 2^level)``: level 1: conv ``D -> D/2``, up; deeper: conv
        ``D -> D``, then ups dividing the width by 4 (a conv block between two ups), the last to ``width``."""
        if level == 1:
            return nn.Sequential(ConvNormAct(dim, dim // 2), UpNormAct(dim // 2, width))
        layers: list[nn.Module] = [ConvNormAct(dim, dim)]
        c = dim
        for k in range(level):
            nxt = width if k == level - 1 else max(c // 4, width)
            layers.append(UpNormAct(c, nxt))
            if k < level - 1:
                layers.append(ConvNormAct(nxt, nxt))
            c = nxt
        return nn.Sequential(*layers)

    def forward(self, image: Tensor, tokens: Tensor, hidden: Sequence[Tensor], grid: Sequence[int]) -> Tensor:
        if len(hidden) != len(self.skips):
            raise ValueError(f"UNETR-XNT decoder: expected {len(self.skips)} hidden states, got {len(hidden)}")
        x = self.bottom(_tokens_to_map(tokens, grid))
        for norm, path, merge, h in zip(self.skip_norms, self.skips, self.merges, hidden):
            skip = path(_tokens_to_map(norm(h), grid))
            x = merge(torch.cat((x, skip), dim=1))
        x = self.out_block(torch.cat((x, self.input_skip(image)), dim=1))
        return self.seg_layers[-1](x)


class UNETRXNT(nn.Module):
    """ViT encoder + UNETR-XNT decoder: ``forward(x (B, in, X, Y, Z)) -> logits (B, out, X, Y, Z)``.

    Registry builder signature: ``features = (dim,)``, ``blocks = (depth,)``, ``strides = (patch,)``;
    ``heads``, ``mlp_ratio`` and decoder ``widths`` as options. Every side of the input must be a
    multiple of the patch size.
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[int], heads: int = 12, mlp_ratio: float = 4.0,
                 widths: Sequence[int] | None = None, deep_supervision: bool = False):
        super().__init__()
        if not (len(features) == len(blocks) == len(strides) == 1):
            raise ValueError(f"UNETR-XNT: features {tuple(features)}, blocks {tuple(blocks)} and strides "
                             f"{tuple(strides)} must each hold one value (ViT width, depth, patch size)")
        dim, depth, patch = int(features[0]), int(blocks[0]), int(strides[0])
        self.encoder = ViTEncoder3D(in_channels, dim, depth, heads, patch, mlp_ratio)
        self.decoder = UNETRXNTDecoder(in_channels, out_channels, dim, depth, patch, widths)
        self.deep_supervision = deep_supervision

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        enc = self.encoder(x, hidden=self.decoder.skip_blocks)
        logits = self.decoder(x, enc.tokens, enc.hidden_states, enc.grid)
        return [logits] if self.deep_supervision else logits


# --------------------------------------------------------------------------- registered architectures
_VIT_B = dict(features=(768,), blocks=(12,), options={"heads": 12})
_VIT_TINY = dict(features=(192,), blocks=(4,), options={"heads": 3})

for _spec in (
    ArchSpec("vit-b-unetr", "MAE-XNT: ViT-B (768 wide, 12 blocks, 12 heads) on 4^3 patches, fixed 3D sin-cos "
             "positions, UNETR-XNT decoder (input skip, block-6 skip; Fig. 2); total stride 4",
             strides=(4,), builder=UNETRXNT, family="vit-unetr", **_VIT_B),
    ArchSpec("vit-b-unetr-p8", "MAE-XNT ablation: ViT-B on 8^3 patches, UNETR-XNT decoder with one more "
             "up-sampling level and skips from blocks 8 and 4 (Fig. 5); total stride 8",
             strides=(8,), builder=UNETRXNT, family="vit-unetr-p8", **_VIT_B),
    ArchSpec("vit-unetr-tiny", "ours: CPU-sized vit-b-unetr (192 wide, 4 blocks, 3 heads, patch 4)",
             strides=(4,), builder=UNETRXNT, family="vit-unetr", **_VIT_TINY),
    ArchSpec("vit-unetr-p8-tiny", "ours: CPU-sized vit-b-unetr-p8 (192 wide, 4 blocks, 3 heads, patch 8)",
             strides=(8,), builder=UNETRXNT, family="vit-unetr-p8", **_VIT_TINY),
):
    register_arch(_spec)
