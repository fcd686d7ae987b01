"""Self-supervised pre-training methods: each file is one method (config dataclass + nn.Module).

:func:`build_method` turns a :class:`~volssl.config.RunConfig` into the method's ``nn.Module``
(see docs/design.md, "Methods"): ``forward(images (B, C, *patch)) -> MethodOutput(loss, previews)``,
``.network`` (the backbone fine-tuning transfers) and ``transfer_state_dict()``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:  # torch stays unimported until a method is built
    from torch import Tensor, nn

    from volssl.config import RunConfig

# method name (RunConfig.method.name) -> "module:class" of its nn.Module (imported on demand)
METHODS: dict[str, str] = {
    "s3d": "volssl.methods.s3d:S3D",
    "mae-xnt": "volssl.methods.mae_xnt:MAEXNT",
    "swinunetr-ssl": "volssl.methods.swinunetr_ssl:SwinUNETRSSL",
    "models-genesis": "volssl.methods.models_genesis:ModelsGenesis",
    "volume-fusion": "volssl.methods.volume_fusion:VolumeFusion",
    "voco": "volssl.methods.voco:VoCo",
    "amaes": "volssl.methods.amaes:AMAES",
}


class MethodOutput(NamedTuple):
    """What a method's forward returns.

    ``loss``: scalar tensor to minimise; ``previews``: detached ``(B, 1, *patch)`` tensors named
    "input", "masked", "reconstruction" and "target" (first channel) for the preview images.
    """

    loss: Tensor
    previews: dict[str, Tensor]


class PretrainMethod(Protocol):
    """The interface every method's ``nn.Module`` offers to the training loop."""

    network: nn.Module

    def __call__(self, images: Tensor) -> MethodOutput: ...

    def transfer_state_dict(self) -> dict[str, Tensor]: ...


def build_method(cfg: RunConfig) -> nn.Module:
    """The pre-training module of ``cfg.method.name`` built for ``cfg`` (ValueError if unknown)."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"no pre-training method {name!r}; implemented: {', '.join(sorted(METHODS))}")
    module_name, cls_name = METHODS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_config(cfg)
