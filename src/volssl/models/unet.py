"""Plain 3D U-Net (Yucca / AMAES style): the AMAES paper's "U-Net B" and "U-Net XL" backbones.

Architecture (AMAES Sec. 4.3, the Yucca ``UNet`` the public AMAES checkpoints were trained with):
five stages with ``F, 2F, 4F, 8F, 16F`` features (B: F = 32, XL: F = 64); every stage is a block of
two conv 3^3 -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01) layers; stages 1..4 first
downsample by 2x2x2 max-pooling. The decoder upsamples with a 2^3 transposed conv (stride 2),
concatenates the skip, applies a block of (by default) two conv layers, and has a 1^3 output conv
per decoder stage (``decoder.seg_layers``; the last one at full resolution, the others for deep
supervision).

Parameter counts (1 input, 1 output channel; the paper's 22M / 90M are encoder + this full decoder):

    unet-b    14.13M encoder +  8.45M decoder = 22.58M   (paper: 22M)
    unet-xl   56.53M encoder + 33.78M decoder = 90.31M   (paper: 90M)

(the four 1^3 heads count 0.5k / 1k of that; the light pre-training decoder of unet-b has 3.74M).

State-dict layout (what :mod:`volssl.models.import_amaes` maps Yucca's names onto)::

    encoder.stages.{s}.convs.{j}.{conv,norm}.{weight,bias}      s = 0..4, j = 0..blocks[s]-1
    decoder.transpconvs.{k}.{weight,bias}                        k = 0 (deepest) .. 3
    decoder.stages.{k}.convs.{j}.{conv,norm}.{weight,bias}
    decoder.seg_layers.{k}.{weight,bias}                         k = 3: full resolution

:class:`UNetDecoder` also builds AMAES's light-weight pre-training decoder (``convs_per_stage=1``,
``skip_connections=False``, one output head): see :mod:`volssl.methods.amaes`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from volssl.models.registry import ArchSpec, register_arch
from volssl.models.resenc_unet import ConvNormAct, init_weights


def _check_widths(features: Sequence[int], blocks: Sequence[int], strides: Sequence[int], where: str) -> None:
    if not (len(features) == len(blocks) == len(strides)) or len(features) < 2:
        raise ValueError(f"{where}: features {tuple(features)}, blocks {tuple(blocks)} and strides {tuple(strides)} "
                         "must have the same length (one entry per stage, at least 2 stages)")
    for name, vals in (("features", features), ("blocks", blocks), ("strides", strides)):
        if any(int(v) < 1 for v in vals):
            raise ValueError(f"{where}: {name} must be positive integers, got {tuple(vals)}")


def conv_layers(in_channels: int, out_channels: int, n: int) -> nn.ModuleList:
    """``n`` conv 3^3 -> InstanceNorm -> LeakyReLU layers, the first ``Cin -> Cout``, then ``Cout -> Cout``."""
    if n < 1:
        raise ValueError(f"U-Net: convolutions per block must be >= 1, got {n}")
    return nn.ModuleList([ConvNormAct(in_channels if j == 0 else out_channels, out_channels, 3, 1)
                          for j in range(n)])


class ConvBlock(nn.Module):
    """``n`` conv 3^3 -> InstanceNorm -> LeakyReLU layers, ``(B, Cin, *s) -> (B, Cout, *s)``."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 2):
        super().__init__()
        self.convs = conv_layers(in_channels, out_channels, n)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return x


class UNetStage(nn.Module):
    """Max-pool by ``stride`` (none when 1), then a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int, stride: int):
        super().__init__()
        self.pool = nn.MaxPool3d(stride, stride) if stride > 1 else nn.Identity()
        self.convs = conv_layers(in_channels, out_channels, n_convs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        for conv in self.convs:
            x = conv(x)
        return x


class UNetEncoder(nn.Module):
    """Stages of max-pool + conv block. ``forward(x (B, C, *patch))`` returns one feature map per
    stage, ``(B, features[s], *patch / prod(strides[:s+1]))``; the last is the bottleneck."""

    def __init__(self, in_channels: int, features: Sequence[int], blocks: Sequence[int], strides: Sequence[int]):
        super().__init__()
        _check_widths(features, blocks, strides, "U-Net encoder")
        self.in_channels = int(in_channels)
        self.output_channels = [int(f) for f in features]
        self.strides = [int(s) for s in strides]
        stages, cin = [], self.in_channels
        for f, b, s in zip(features, blocks, strides):
            stages.append(UNetStage(cin, int(f), int(b), int(s)))
            cin = int(f)
        self.stages = nn.ModuleList(stages)

    @property
    def total_stride(self) -> int:
        """Input voxels per bottleneck voxel along each axis."""
        return math.prod(self.strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"U-Net encoder: expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(d % self.total_stride for d in x.shape[2:]):
            raise ValueError(f"U-Net encoder: patch {tuple(x.shape[2:])} is not divisible by the total stride "
                             f"{self.total_stride}")
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """U-Net decoder: per stage a transposed conv up (kernel = stride = the encoder stage's stride),
    optionally a concatenation with the skip, and a block of ``convs_per_stage`` conv layers.

    Args:
        encoder_channels: the encoder's widths per stage (bottleneck last).
        strides: the encoder's strides per stage.
        out_channels: channels of the 1^3 output convs.
        convs_per_stage: conv layers per decoder block (U-Net: 2; AMAES light decoder: 1).
        skip_connections: concatenate the encoder's skips (False: only the bottleneck is decoded).
        deep_supervision_heads: one output conv per decoder stage (False: only the full-resolution one).

    ``forward(features)`` takes the encoder's list (bottleneck last; without skip connections only
    its last element is read, so ``[bottleneck]`` suffices) and returns ``(B, out_channels, *patch /
    strides[0])``; with ``deep_supervision`` a list of every stage's output, highest resolution first.
    """

    def __init__(self, encoder_channels: Sequence[int], strides: Sequence[int], out_channels: int,
                 convs_per_stage: int = 2, skip_connections: bool = True, deep_supervision_heads: bool = True):
        super().__init__()
        n = len(encoder_channels)
        if n < 2 or len(strides) != n:
            raise ValueError(f"U-Net decoder: need >= 2 encoder stages and one stride per stage, got channels "
                             f"{tuple(encoder_channels)} and strides {tuple(strides)}")
        self.out_channels = int(out_channels)
        self.skip_connections = bool(skip_connections)
        transp, stages, heads = [], [], []
        for s in range(1, n):
            below, skip, stride = int(encoder_channels[-s]), int(encoder_channels[-(s + 1)]), int(strides[-s])
            transp.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=True))
            stages.append(ConvBlock(2 * skip if self.skip_connections else skip, skip, convs_per_stage))
            if deep_supervision_heads or s == n - 1:
                heads.append(nn.Conv3d(skip, self.out_channels, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transp)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, features: Sequence[Tensor], deep_supervision: bool = False) -> Tensor | list[Tensor]:
        n = len(self.stages) + 1
        if self.skip_connections and len(features) != n:
            raise ValueError(f"U-Net decoder: expected {n} feature maps (skips + bottleneck), got {len(features)}")
        if not features:
            raise ValueError("U-Net decoder: no feature maps (give at least the bottleneck)")
        if deep_supervision and len(self.seg_layers) != len(self.stages):
            raise ValueError("U-Net decoder: built without deep-supervision heads")
        x = features[-1]
        outputs = []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = up(x)
            if self.skip_connections:
                x = torch.cat((x, features[-(s + 2)]), dim=1)
            x = stage(x)
            if deep_supervision:
                outputs.append(self.seg_layers[s](x))
        if deep_supervision:
            return outputs[::-1]
        return self.seg_layers[-1](x)


class UNet(nn.Module):
    """Plain U-Net: ``forward(x (B, in, X, Y, Z)) -> logits (B, out, X, Y, Z)`` (a list, full
    resolution first, when ``deep_supervision``).

    Args:
        in_channels / out_channels: input modalities and output channels.
        features: width of each stage (Yucca: ``F * 2**s``).
        blocks: conv layers per encoder stage (Yucca / AMAES: 2).
        strides: max-pool factor of each stage (``strides[0]`` is normally 1).
        decoder_convs: conv layers per decoder block (2: the standard U-Net decoder).
        deep_supervision: return every decoder stage's output.
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[int], decoder_convs: int = 2, deep_supervision: bool = False):
        super().__init__()
        _check_widths(features, blocks, strides, "U-Net")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"U-Net: in/out channels must be >= 1, got {in_channels}/{out_channels}")
        self.encoder = UNetEncoder(in_channels, features, blocks, strides)
        self.decoder = UNetDecoder(self.encoder.output_channels, self.encoder.strides, out_channels,
                                   convs_per_stage=decoder_convs)
        self.deep_supervision = deep_supervision
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        return self.decoder(self.encoder(x), deep_supervision=self.deep_supervision)


for _spec in (
    ArchSpec("unet-b", "AMAES U-Net B (Yucca): 5 stages 32..512, 2 conv-IN-LeakyReLU per block, max-pool down, "
             "transposed-conv up, skips; total stride 16 (128^3 patch -> 8^3 bottleneck)",
             features=(32, 64, 128, 256, 512), blocks=(2, 2, 2, 2, 2), strides=(1, 2, 2, 2, 2),
             paper_params=22_000_000, builder=UNet, family="unet"),
    ArchSpec("unet-xl", "AMAES U-Net XL (Yucca): as unet-b at double width, 64..1024",
             features=(64, 128, 256, 512, 1024), blocks=(2, 2, 2, 2, 2), strides=(1, 2, 2, 2, 2),
             paper_params=90_000_000, builder=UNet, family="unet"),
    ArchSpec("unet-tiny", "ours: CPU-sized plain U-Net for tests and -tiny presets, 8..128 (Yucca's doubling "
             "widths); total stride 16 (64^3 patch -> 4^3 bottleneck)",
             features=(8, 16, 32, 64, 128), blocks=(2, 2, 2, 2, 2), strides=(1, 2, 2, 2, 2),
             builder=UNet, family="unet"),
):
    register_arch(_spec)
