"""MONAI's SwinUNETR in volssl's segmentation-network layout (``swinunetr``, ``swinunetr-tiny``).

Paper: Hatamizadeh et al. 2022, "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images"; pre-trained by Tang et al. 2022, "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis" (the AMAES paper's baseline, 62M parameters).

:class:`SwinUNETRNet` builds :class:`monai.networks.nets.SwinUNETR` and re-parents its submodules
(no layer is re-implemented):

* ``encoder`` = MONAI's ``swinViT`` (:class:`monai.networks.nets.swin_unetr.SwinTransformer`: patch
  embedding 2^3, four Swin stages each ending in a patch merging), with the attributes
  ``in_channels`` and ``total_stride`` (32) the fine-tuning code reads. ``encoder.*`` keys are
  exactly the Swin ViT's weights, what the authors' pre-training produces and their ``load_from``
  loads (MONAI's ``swinViT.*`` keys with the prefix ``encoder.`` instead);
* ``decoder`` = :class:`SwinUNETRDecoder`: MONAI's ``encoder1..4`` and ``encoder10`` (the residual
  conv blocks on the skips, which the authors never pre-train), ``decoder5..1`` (transposed conv up,
  concatenated skip, residual block) and the 1^3 output conv as ``decoder.seg_layers[0]``.

There is a single, full-resolution output head: ``deep_supervision`` reads False and setting it
True raises a ValueError (fine-tuning recipes for this family set ``deep_supervision=False``).
Every side of an input patch must be a multiple of 32; to train with batch 1, the patch needs a side
of at least 64 (the instance norms on a 1^3 bottleneck refuse to train; 96^3 in the papers).

The Swin encoder's widths per resolution are ``F, 2F, 4F, 8F, 16F`` for feature size ``F`` (MONAI's
``feature_size``), at strides 2, 4, 8, 16, 32: an :class:`~volssl.models.registry.ArchSpec`'s
``features`` lists these five widths, ``blocks`` the Swin blocks per stage (MONAI's ``depths``) and
``strides`` the five factor-2 downsamplings; ``options`` hold ``num_heads`` and ``window_size``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from volssl.models.registry import ArchSpec, register_arch

SWIN_STRIDES = (2, 2, 2, 2, 2)  # patch embedding 2^3, then four patch mergings


def feature_widths(feature_size: int) -> tuple[int, ...]:
    """The Swin encoder's widths per resolution, ``(F, 2F, 4F, 8F, 16F)``."""
    return tuple(int(feature_size) * 2 ** i for i in range(5))


class SwinUNETRDecoder(nn.Module):
    """MONAI SwinUNETR's convolutional part: skip blocks, up blocks and the output conv.

    ``forward(x_in (B, C, *patch), hidden (5 Swin features, widths F..16F at strides 2..32))``
    -> logits ``(B, out_channels, *patch)``. The output conv is ``seg_layers[0]`` (the only head).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                     "decoder5", "decoder4", "decoder3", "decoder2", "decoder1"):
            setattr(self, name, getattr(net, name))
        self.seg_layers = nn.ModuleList([net.out])

    def forward(self, x_in: Tensor, hidden: Sequence[Tensor]) -> Tensor:
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return self.seg_layers[-1](out)


class SwinUNETRNet(nn.Module):
    """MONAI's SwinUNETR as an ``encoder`` / ``decoder`` segmentation network (see the module docstring).

    Args:
        in_channels, out_channels: input channels and output classes.
        features: the five widths ``(F, 2F, 4F, 8F, 16F)``; ``F`` (MONAI's ``feature_size``) must be a
            multiple of 12.
        blocks: Swin blocks per stage (four values; MONAI's ``depths``).
        strides: must be ``(2, 2, 2, 2, 2)`` (MONAI's patch size 2 and four mergings: total stride 32).
        num_heads: attention heads per stage (four values).
        window_size: the local attention window (voxels of each stage's grid).
        drop_path_rate: stochastic depth of the Swin blocks.
        use_checkpoint: gradient checkpointing in the Swin blocks (less memory, more time).
        normalize: layer-normalise each Swin output before the decoder (MONAI's default, True).

    ``forward(x (B, in_channels, X, Y, Z))`` -> logits ``(B, out_channels, X, Y, Z)``; X, Y, Z
    multiples of 32 (ValueError otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int] = feature_widths(48),
                 blocks: Sequence[int] = (2, 2, 2, 2), strides: Sequence[int] = SWIN_STRIDES,
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False, normalize: bool = True) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR

        features, blocks, strides, num_heads = (tuple(int(v) for v in s) for s in (features, blocks, strides,
                                                                                    num_heads))
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"SwinUNETRNet: in_channels and out_channels must be >= 1, got {in_channels}, "
                             f"{out_channels}")
        if len(features) != 5 or features[0] % 12 or features != feature_widths(features[0]):
            raise ValueError(f"SwinUNETRNet: features must be (F, 2F, 4F, 8F, 16F) with F a multiple of 12 "
                             f"(MONAI's feature_size), got {features}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"SwinUNETRNet: blocks (Swin depths) must be four values >= 1, got {blocks}")
        if strides != SWIN_STRIDES:
            raise ValueError(f"SwinUNETRNet: strides must be {SWIN_STRIDES} (patch size 2, four patch mergings), "
                             f"got {strides}")
        if len(num_heads) != 4 or any(h < 1 or (features[0] * 2 ** i) % h for i, h in enumerate(num_heads)):
            raise ValueError(f"SwinUNETRNet: num_heads must be four values dividing the stage widths "
                             f"{features[:4]}, got {num_heads}")
        if int(window_size) < 1:
            raise ValueError(f"SwinUNETRNet: window_size must be >= 1, got {window_size}")
        kwargs = dict(in_channels=in_channels, out_channels=out_channels, patch_size=2, depths=blocks,
                      num_heads=num_heads, window_size=int(window_size), feature_size=features[0],
                      dropout_path_rate=float(drop_path_rate), use_checkpoint=bool(use_checkpoint),
                      normalize=bool(normalize), spatial_dims=3)
        if torch.empty(()).device.type == "meta":
            # MONAI's constructor calls .item() (drop-path rates), which meta tensors refuse: build on
            # the CPU, then move to meta (build_model(..., device="meta") only counts parameters)
            with torch.device("cpu"):
                net = SwinUNETR(**kwargs)
            net = net.to("meta")
        else:
            net = SwinUNETR(**kwargs)
        self.encoder = net.swinViT
        self.encoder.in_channels = int(in_channels)
        self.encoder.total_stride = 32
        self.encoder.output_channels = features
        self.decoder = SwinUNETRDecoder(net)
        self.decoder.out_channels = int(out_channels)
        self.normalize = bool(normalize)
        self.feature_size = features[0]

    @property
    def deep_supervision(self) -> bool:
        """Always False: SwinUNETR has one (full-resolution) output head."""
        return False

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value:
            raise ValueError("swinunetr has a single full-resolution output head: deep supervision is not "
                             "supported (use a recipe with deep_supervision=false, e.g. 'swinunetr')")

    def check_input(self, shape: Sequence[int]) -> None:
        """ValueError unless every spatial side of ``shape`` is a multiple of the total stride 32."""
        if any(int(s) % self.encoder.total_stride for s in shape):
            raise ValueError(f"swinunetr: every side of the patch must be a multiple of {self.encoder.total_stride}, "
                             f"got {tuple(int(s) for s in shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, in_channels, X, Y, Z) -> logits (B, out_channels, X, Y, Z)."""
        if x.ndim != 5 or x.shape[1] != self.encoder.in_channels:
            raise ValueError(f"swinunetr: expected input (B, {self.encoder.in_channels}, X, Y, Z), "
                             f"got {tuple(x.shape)}")
        if not torch.jit.is_tracing():
            self.check_input(x.shape[2:])
        hidden = self.encoder(x.contiguous(), self.normalize)
        return self.decoder(x, hidden)


def build_swinunetr(in_channels: int, out_channels: int, features: Sequence[int], blocks: Sequence[int],
                    strides: Sequence[int], **options) -> SwinUNETRNet:
    """:data:`~volssl.models.registry.ArchSpec` builder for the SwinUNETR family."""
    return SwinUNETRNet(in_channels, out_channels, features, blocks, strides, **options)


SWINUNETR = register_arch(ArchSpec(
    "swinunetr",
    "MONAI SwinUNETR (Hatamizadeh et al. 2022; SSL pre-training by Tang et al. 2022; the AMAES paper's baseline): "
    "Swin ViT encoder (patch 2^3, feature size 48, depths 2/2/2/2, heads 3/6/12/24, window 7) + UNETR conv "
    "decoder; total stride 32 (patches: multiples of 32; 96^3 in the papers)",
    features=feature_widths(48), blocks=(2, 2, 2, 2), strides=SWIN_STRIDES,
    paper_params=62_000_000,  # AMAES paper Table 4 ("62"); MONAI: 62.19M with 1 in / 1 out channel
    builder=build_swinunetr, options={"num_heads": (3, 6, 12, 24), "window_size": 7}, family="swinunetr",
))

SWINUNETR_TINY = register_arch(ArchSpec(
    "swinunetr-tiny",
    "ours: CPU-sized SwinUNETR for tests and -tiny presets: feature size 12, depths 2/2/2/2, heads 1/2/4/8, "
    "window 4; total stride 32 (64^3 patch -> 2^3 bottleneck)",
    features=feature_widths(12), blocks=(2, 2, 2, 2), strides=SWIN_STRIDES,
    builder=build_swinunetr, options={"num_heads": (1, 2, 4, 8), "window_size": 4}, family="swinunetr",
))
