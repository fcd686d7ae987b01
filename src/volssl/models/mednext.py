"""MedNeXt (Roy et al. 2023) in our segmentation-network layout, built from MONAI's MedNeXt blocks.

The blocks are MONAI's (:mod:`monai.networks.blocks.mednext_block`: depth-wise conv -> GroupNorm ->
1^3 expansion conv -> GELU -> 1^3 compression conv, residual; strided / transposed variants for down-
and up-sampling); this module only wires them into ``.encoder`` / ``.decoder``. Kernel size 3 and no
UpKern, as in the AMAES paper (Sec. 4.3).

Encoder (``encoder.*``): ``stem`` (1^3 conv to ``features[0]``), ``enc_stages.{i}`` (``blocks[i]``
MedNeXt blocks at ``features[i]``), ``down_blocks.{i}`` (``features[i] -> features[i + 1]``, stride 2)
and ``bottleneck`` (``blocks[-1]`` blocks at ``features[-1]``). ``forward(x)`` returns ``[stage 0,
..., stage n-2, bottleneck]`` like the U-Net encoders. Expansion ratios follow the original MedNeXt
(and Yucca, hence the public AMAES checkpoints): ``down_blocks.{i}`` expands by ``expansion[i + 1]``
(MONAI's own ``MedNeXt`` class uses ``expansion[i]`` there; everything else is identical).

Decoder (``decoder.*``), option ``decoder``:

* ``"unet"`` (default; the AMAES paper's "U-Net dec." rows and its public MedNeXt checkpoints):
  :class:`~volssl.models.unet.UNetDecoder` with skips, 2 convs per stage, starting at 32 features;
* ``"mednext"``: MONAI's ``up_blocks.{k}`` (transposed MedNeXt blocks) + ``dec_stages.{k}`` with the
  skips added, as MONAI's ``MedNeXt``.

Both put one output conv per decoder stage in ``decoder.seg_layers`` (the last at full resolution).

Parameter counts (1 input, 1 output channel), against the AMAES paper::

    mednext-m                 12.49M encoder + 8.45M U-Net decoder    = 20.94M   (paper: 21M)
    mednext-l                 46.75M encoder + 8.45M U-Net decoder    = 55.20M   (paper: 55M)
    mednext-l-mednext-dec     46.75M encoder + 15.03M MedNeXt decoder = 61.78M   (paper: 62M)

(MONAI's own ``create_mednext("L", kernel_size=3)`` has 61.73M: its down blocks expand by the stage's
own ratio and it has one output head; the layouts differ in those down-block shapes only).
"""
from __future__ import annotations

import math
from typing import Sequence

from monai.networks.blocks.mednext_block import MedNeXtBlock, MedNeXtDownBlock, MedNeXtOutBlock, MedNeXtUpBlock
from torch import Tensor, nn

from volssl.models.registry import ArchSpec, register_arch
from volssl.models.resenc_unet import init_weights
from volssl.models.unet import UNetDecoder

DECODERS = ("unet", "mednext")


def _per_stage(value: int | Sequence[int], n: int, name: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n or any(v < 1 for v in values):
        raise ValueError(f"MedNeXt: {name} must be one positive integer or {n} of them, got {value!r}")
    return values


def _blocks(channels: int, n: int, expansion: int, kernel_size: int, residual: bool) -> nn.Sequential:
    return nn.Sequential(*[MedNeXtBlock(channels, channels, expansion_ratio=expansion, kernel_size=kernel_size,
                                        use_residual_connection=residual, norm_type="group", dim="3d")
                           for _ in range(n)])


class MedNeXtEncoder(nn.Module):
    """Stem + MedNeXt stages with strided down blocks; ``forward(x (B, C, *patch))`` returns one
    feature map per stage, ``(B, features[s], *patch / 2**s)``, the bottleneck last."""

    def __init__(self, in_channels: int, features: Sequence[int], blocks: Sequence[int],
                 expansion: int | Sequence[int] = 2, kernel_size: int = 3, residual: bool = True):
        super().__init__()
        n = len(features)
        if n < 2 or len(blocks) != n or any(int(f) < 1 for f in features) or any(int(b) < 1 for b in blocks):
            raise ValueError(f"MedNeXt encoder: features {tuple(features)} and blocks {tuple(blocks)} must be "
                             "positive, one entry per stage (at least 2)")
        exp = _per_stage(expansion, n, "expansion")
        self.in_channels = int(in_channels)
        self.output_channels = [int(f) for f in features]
        self.strides = [1] + [2] * (n - 1)
        f = self.output_channels
        self.stem = nn.Conv3d(self.in_channels, f[0], kernel_size=1)
        self.enc_stages = nn.ModuleList([_blocks(f[i], int(blocks[i]), exp[i], kernel_size, residual)
                                         for i in range(n - 1)])
        self.down_blocks = nn.ModuleList([
            MedNeXtDownBlock(f[i], f[i + 1], expansion_ratio=exp[i + 1], kernel_size=kernel_size,
                             use_residual_connection=residual, norm_type="group", dim="3d") for i in range(n - 1)])
        self.bottleneck = _blocks(f[-1], int(blocks[-1]), exp[-1], kernel_size, residual)

    @property
    def total_stride(self) -> int:
        """Input voxels per bottleneck voxel along each axis."""
        return math.prod(self.strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"MedNeXt encoder: expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(d % self.total_stride for d in x.shape[2:]):
            raise ValueError(f"MedNeXt encoder: patch {tuple(x.shape[2:])} is not divisible by the total stride "
                             f"{self.total_stride}")
        x = self.stem(x)
        skips = []
        for stage, down in zip(self.enc_stages, self.down_blocks):
            x = stage(x)
            skips.append(x)
            x = down(x)
        skips.append(self.bottleneck(x))
        return skips


class MedNeXtDecoder(nn.Module):
    """MONAI's MedNeXt decoder: per stage a transposed MedNeXt up block, the skip added, MedNeXt blocks;
    a 1^3 output block per stage in ``seg_layers`` (last: full resolution).

    ``blocks`` / ``expansion``: per decoder stage, deepest first (``len(encoder_channels) - 1`` entries).
    """

    def __init__(self, encoder_channels: Sequence[int], out_channels: int, blocks: Sequence[int],
                 expansion: int | Sequence[int] = 2, kernel_size: int = 3, residual: bool = True):
        super().__init__()
        n = len(encoder_channels) - 1
        blocks = _per_stage(list(blocks), n, "decoder_blocks")
        exp = _per_stage(expansion, n, "decoder_expansion")
        ups, stages, heads = [], [], []
        for k in range(n):
            below, skip = int(encoder_channels[-(k + 1)]), int(encoder_channels[-(k + 2)])
            ups.append(MedNeXtUpBlock(below, skip, expansion_ratio=exp[k], kernel_size=kernel_size,
                                      use_residual_connection=residual, norm_type="group", dim="3d"))
            stages.append(_blocks(skip, blocks[k], exp[k], kernel_size, residual))
            heads.append(MedNeXtOutBlock(skip, int(out_channels), dim="3d"))
        self.out_channels = int(out_channels)
        self.up_blocks = nn.ModuleList(ups)
        self.dec_stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, features: Sequence[Tensor], deep_supervision: bool = False) -> Tensor | list[Tensor]:
        if len(features) != len(self.dec_stages) + 1:
            raise ValueError(f"MedNeXt decoder: expected {len(self.dec_stages) + 1} feature maps, got {len(features)}")
        x = features[-1]
        outputs = []
        for k, (up, stage) in enumerate(zip(self.up_blocks, self.dec_stages)):
            x = stage(up(x) + features[-(k + 2)])
            if deep_supervision:
                outputs.append(self.seg_layers[k](x))
        if deep_supervision:
            return outputs[::-1]
        return self.seg_layers[-1](x)


class MedNeXt(nn.Module):
    """MedNeXt encoder with a U-Net or MedNeXt decoder: ``forward(x (B, in, X, Y, Z)) -> logits
    (B, out, X, Y, Z)`` (a list, full resolution first, when ``deep_supervision``).

    Args:
        in_channels / out_channels: input modalities and output channels.
        features: width of each stage (MedNeXt: ``32 * 2**s``).
        blocks: MedNeXt blocks per encoder stage, the bottleneck last.
        strides: must be ``(1, 2, 2, ...)`` (MedNeXt's down blocks halve the resolution).
        expansion: expansion ratio per encoder stage (the bottleneck last), or one for all.
        decoder: "unet" or "mednext" (see the module docstring).
        decoder_blocks / decoder_expansion: the MedNeXt decoder's blocks and ratios per stage, deepest
            first (default: the encoder's mirrored).
        kernel_size: depth-wise kernel (AMAES: 3).
        residual: residual connections in every block (MedNeXt's default).
        deep_supervision: return every decoder stage's output.
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[int], expansion: int | Sequence[int] = 2, decoder: str = "unet",
                 decoder_blocks: Sequence[int] | None = None, decoder_expansion: int | Sequence[int] | None = None,
                 kernel_size: int = 3, residual: bool = True, deep_supervision: bool = False):
        """Exempt from the size rule: the 12 arguments (class docstring) mirror MONAI's MedNeXt arguments,
        and the registry calls every builder with the same flat ``(in, out, features, blocks, strides, **options)``."""
        super().__init__()
        n = len(features)
        if len(strides) != n or [int(s) for s in strides] != [1] + [2] * (n - 1):
            raise ValueError(f"MedNeXt: strides must be (1, 2, ..., 2) with one entry per stage, got {tuple(strides)}")
        if decoder not in DECODERS:
            raise ValueError(f"MedNeXt: decoder must be one of {DECODERS}, got {decoder!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"MedNeXt: in/out channels must be >= 1, got {in_channels}/{out_channels}")
        self.encoder = MedNeXtEncoder(in_channels, features, blocks, expansion, kernel_size, residual)
        if decoder == "unet":
            self.decoder = UNetDecoder(self.encoder.output_channels, self.encoder.strides, out_channels)
            self.decoder.apply(init_weights)
        else:
            exp = _per_stage(expansion, n, "expansion")
            self.decoder = MedNeXtDecoder(
                self.encoder.output_channels, out_channels,
                decoder_blocks if decoder_blocks is not None else [int(b) for b in blocks[:-1]][::-1],
                decoder_expansion if decoder_expansion is not None else exp[:-1][::-1], kernel_size, residual)
        self.deep_supervision = deep_supervision

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        return self.decoder(self.encoder(x), deep_supervision=self.deep_supervision)


_M = dict(expansion=(2, 3, 4, 4, 4), decoder_blocks=(4, 4, 4, 3), decoder_expansion=(4, 4, 3, 2), kernel_size=3)
_L = dict(expansion=(3, 4, 8, 8, 8), decoder_blocks=(8, 8, 4, 3), decoder_expansion=(8, 8, 4, 3), kernel_size=3)
_WIDTHS = dict(features=(32, 64, 128, 256, 512), strides=(1, 2, 2, 2, 2))

for _spec in (
    ArchSpec("mednext-m", "MedNeXt M encoder (kernel 3, no UpKern; MONAI blocks) + U-Net decoder with skips: "
             "the AMAES paper's 'MedNeXt M' (U-Net dec.); total stride 16",
             blocks=(3, 4, 4, 4, 4), paper_params=21_000_000, builder=MedNeXt,
             options=dict(_M, decoder="unet"), family="mednext", **_WIDTHS),
    ArchSpec("mednext-l", "MedNeXt L encoder (kernel 3, no UpKern; MONAI blocks) + U-Net decoder with skips: "
             "the AMAES paper's 'MedNeXt L' (U-Net dec.); total stride 16",
             blocks=(3, 4, 8, 8, 8), paper_params=55_000_000, builder=MedNeXt,
             options=dict(_L, decoder="unet"), family="mednext", **_WIDTHS),
    ArchSpec("mednext-l-mednext-dec", "MedNeXt L with its own MedNeXt decoder (kernel 3, no UpKern): the AMAES "
             "paper's 'MedNeXt L MedNeXt dec.' from-scratch row",
             blocks=(3, 4, 8, 8, 8), paper_params=62_000_000, builder=MedNeXt,
             options=dict(_L, decoder="mednext"), family="mednext", **_WIDTHS),
    ArchSpec("mednext-tiny", "ours: CPU-sized MedNeXt encoder (8..128, one block per stage, expansion 2) + "
             "U-Net decoder, for tests and -tiny presets; total stride 16",
             features=(8, 16, 32, 64, 128), blocks=(1, 1, 1, 1, 1), strides=(1, 2, 2, 2, 2), builder=MedNeXt,
             options=dict(expansion=2, kernel_size=3, decoder="unet"), family="mednext"),
):
    register_arch(_spec)
