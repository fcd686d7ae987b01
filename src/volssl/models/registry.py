"""Named architectures: ``ARCHITECTURES[name]`` -> an :class:`ArchSpec`; ``build_model(ModelConfig)``.

The ResEnc specs live here; other families (plain U-Net, MedNeXt, SwinUNETR, ViT/UNETR, ...) register
theirs with :func:`register_arch` in their own module, listed in :data:`ARCH_MODULES` and imported on
first use. Every ResEnc preset comes from the same code (:class:`~volssl.models.resenc_unet.ResEncUNet`);
the smaller ones only change widths, depths and strides. ``paper_params`` is the parameter count a
paper reports for the preset (1 input, 1 output channel), or None for our own presets.

Every architecture builds a segmentation network with the layout fine-tuning, transfer and
inference rely on (docs/design.md, "Segmentation networks"): ``.encoder`` (with ``in_channels`` and
``total_stride``), ``.decoder`` (its output heads in ``decoder.seg_layers``, the last one at full
resolution), a ``deep_supervision`` attribute, and ``forward(x) -> logits`` (a list, full resolution
first, under deep supervision).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from volssl.config import ModelConfig
from volssl.models.resenc_unet import ResEncUNet


@dataclass(frozen=True)
class ArchSpec:
    """One named architecture: default widths and a builder.

    The builder is called as ``builder(in_channels, out_channels, features, blocks, strides, **options)``.
    ``features`` are the widths per stage (a ViT: its embedding dim), ``blocks`` the blocks per stage (a
    ViT: its depth), ``strides`` the downsampling per stage (a ViT: its patch size); ``options`` holds
    family-specific constructor arguments (heads, kernel sizes, ...).
    """

    name: str
    description: str
    features: tuple[int, ...]
    blocks: tuple[int, ...]
    strides: tuple[int, ...]
    paper_params: int | None = None  # parameter count reported by the paper (1 in / 1 out channel)
    builder: Callable[..., nn.Module] = ResEncUNet
    options: Mapping[str, Any] = field(default_factory=dict)
    family: str = "resenc"

    @property
    def total_stride(self) -> int:
        out = 1
        for s in self.strides:
            out *= s
        return out


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            "resenc-l",
            "nnU-Net/nnssl ResEncL (S3D paper backbone): 6 stages, 3^3 kernels, instance norm, leaky ReLU, "
            "one decoder conv per stage; total stride 32 (160^3 patch -> 5^3 bottleneck)",
            features=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6), strides=(1, 2, 2, 2, 2, 2),
            paper_params=102_300_000,
        ),
        ArchSpec(
            "resenc-s",
            "ours: ResEncL at half width and about half depth (single small GPU); total stride 32",
            features=(16, 32, 64, 128, 160, 160), blocks=(1, 2, 2, 3, 3, 3), strides=(1, 2, 2, 2, 2, 2),
        ),
        ArchSpec(
            "resenc-tiny",
            "ours: CPU-sized ResEnc U-Net for tests and -tiny presets: 4 stages, total stride 8, so that the "
            "CPU scales' 32^3 patches keep a 4^3 bottleneck (the paper's 160^3 -> 5^3) and S3D masks 64 blocks "
            "(a stride of 16 left 2^3 = 8 blocks: a pretext task too coarse to learn from, docs/evidence.md)",
            features=(8, 16, 32, 64), blocks=(1, 1, 2, 2), strides=(1, 2, 2, 2),
        ),
    )
}


#: modules that register further architecture families (imported on first use of the registry)
ARCH_MODULES: list[str] = [
    "volssl.models.unet",
    "volssl.models.mednext",
    "volssl.models.swinunetr",
    "volssl.models.unetr_xnt",
]
_loaded = False


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to :data:`ARCHITECTURES` (ValueError if the name is taken by another spec)."""
    if spec.name in ARCHITECTURES and ARCHITECTURES[spec.name] != spec:
        raise ValueError(f"architecture {spec.name!r} registered twice")
    ARCHITECTURES[spec.name] = spec
    return spec


def load_architectures() -> dict[str, ArchSpec]:
    """Import every module of :data:`ARCH_MODULES` (registering its architectures); the full registry."""
    global _loaded
    if not _loaded:
        for module in ARCH_MODULES:
            importlib.import_module(module)
        _loaded = True
    return ARCHITECTURES


def get_arch(name: str) -> ArchSpec:
    """The spec of architecture ``name`` (KeyError listing the known names)."""
    load_architectures()
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def tiny_arch(name: str) -> str:
    """The CPU-sized architecture of ``name``'s family: the registered ``<family>-tiny`` (ResEnc:
    ``resenc-tiny``); ``name`` itself if it is already tiny. KeyError if the family has none."""
    spec = get_arch(name)
    if name.endswith("-tiny"):
        return name
    tiny = f"{spec.family}-tiny"
    if tiny not in ARCHITECTURES:
        raise KeyError(f"architecture family {spec.family!r} (of {name!r}) registers no {tiny!r}")
    return tiny


def resolve_widths(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(features, blocks, strides)`` of ``cfg``: the architecture's own, overridden where set."""
    spec = get_arch(cfg.arch)
    return (tuple(cfg.features or spec.features), tuple(cfg.blocks or spec.blocks),
            tuple(cfg.strides or spec.strides))


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> nn.Module:
    """Build the network described by ``cfg`` (architecture name + optional width overrides; with
    ``channel_fusion="features"`` and several input channels, a one-channel network inside a
    :class:`~volssl.models.channel_fusion.ChannelFusionNet`).

    ``device="meta"`` builds it without allocating parameters (for counting).
    """
    from volssl.models.channel_fusion import FUSIONS, ChannelFusionNet

    spec = get_arch(cfg.arch)
    features, blocks, strides = resolve_widths(cfg)
    if cfg.channel_fusion not in FUSIONS:
        raise ValueError(f"model.channel_fusion must be one of {FUSIONS}, got {cfg.channel_fusion!r}")
    fused = cfg.channel_fusion == "features" and cfg.in_channels > 1

    def build() -> nn.Module:
        net = spec.builder(1 if fused else cfg.in_channels, cfg.out_channels, features, blocks, strides,
                           **spec.options)
        return ChannelFusionNet(net, cfg.in_channels) if fused else net

    if device is None:
        return build()
    with torch.device(device):
        return build()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe_architectures(in_channels: int = 1, out_channels: int = 1) -> list[dict]:
    """One row per architecture: name, parameter counts (total, encoder, decoder), paper count, widths.

    Networks are built on the meta device: no memory is allocated for their weights.
    """
    rows = []
    for name, spec in load_architectures().items():
        net = build_model(ModelConfig(arch=name, in_channels=in_channels, out_channels=out_channels), device="meta")
        rows.append({
            "name": name,
            "family": spec.family,
            "params": count_parameters(net),
            "encoder_params": count_parameters(net.encoder),
            "decoder_params": count_parameters(net.decoder),
            "params_paper": spec.paper_params,
            "features": list(spec.features),
            "blocks": list(spec.blocks),
            "strides": list(spec.strides),
            "total_stride": spec.total_stride,
            "description": spec.description,
        })
    return rows
