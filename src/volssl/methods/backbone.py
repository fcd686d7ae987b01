"""What the ResEnc / SwinUNETR methods' ``from_config`` share: ``cfg.method`` checked, ``cfg.model``
built and checked, the method built on it and the patch size checked."""
from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

from torch import nn

from volssl.config import RunConfig
from volssl.models.registry import build_model

M = TypeVar("M", bound=nn.Module)


def method_on_backbone(cls: type[M], cfg: RunConfig, config_type: type, network_type: type[nn.Module],
                       out_channels: int | None = None, needs: str = "a ResEnc U-Net backbone",
                       check: str = "check_patch") -> M:
    """``cls(network, cfg.method)`` on ``network = build_model(cfg.model)`` with ``out_channels`` (default
    ``cfg.model.in_channels``: a restoration network), then ``method.<check>(cfg.data.patch_size)``.

    ValueError (naming ``cls``) unless ``cfg.method`` is a ``config_type`` and the network a
    ``network_type`` (``needs`` describes it in the message), or from the patch check.
    """
    name = cls.__name__
    if not isinstance(cfg.method, config_type):
        raise ValueError(f"{name}: cfg.method must be an instance of {config_type.__name__}, got "
                         f"{type(cfg.method).__name__}")
    channels = cfg.model.in_channels if out_channels is None else out_channels
    network = build_model(dataclasses.replace(cfg.model, out_channels=channels))
    if not isinstance(network, network_type):
        raise ValueError(f"{name} needs {needs}, got architecture {cfg.model.arch!r}")
    method = cls(network, cfg.method)
    getattr(method, check)(cfg.data.patch_size)
    return method


def check_stride_divisible(name: str, patch_size: Sequence[int], stride: int) -> tuple[int, int, int]:
    """``patch_size`` as 3 ints; ValueError (naming the method ``name``) unless every side is divisible by
    the encoder's total ``stride``."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or any(p % stride for p in patch):
        raise ValueError(f"{name}: patch size {patch} must be 3 sides divisible by the encoder's total "
                         f"stride {stride}")
    return patch
