"""Self-supervised pre-training methods: each file is one method (config dataclass + nn.Module).

:func:`build_method` turns a :class:`~volssl.config.RunConfig` into the method's ``nn.Module``
(see docs/design.md, "Methods"): ``forward(images (B, C, *patch)) -> MethodOutput(loss, previews)``,
``.network`` (the backbone fine-tuning transfers) and ``transfer_state_dict()``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol

if TYPE_CHECKING:  # torch stays unimported until a method is built
    from torch import Tensor, nn

    from volssl.config import RunConfig

#: method name (RunConfig.method.name) -> its nn.Module class; filled by :func:`register_method` in each
#: method's own module (the built-in ones are imported with the presets, see volssl.config.SPEC_LOADERS)
METHODS: dict[str, type] = {}


def register_method(config: type) -> Callable[[type], type]:
    """Class decorator of a method's ``nn.Module``: registers it, and its ``config`` class (a
    :class:`~volssl.config.MethodConfig` subclass whose default ``name`` names the method), for
    :func:`build_method` and for reading saved configurations. One registration per method::

        @register_method(S3DConfig)
        class S3D(MethodBase): ...
    """
    from volssl.config import register_method_config

    def deco(cls: type) -> type:
        name = register_method_config(config)().name
        if METHODS.get(name, cls) is not cls:
            raise ValueError(f"method {name!r} registered twice ({METHODS[name].__name__} and {cls.__name__})")
        METHODS[name] = cls
        return cls

    return deco


class MethodOutput(NamedTuple):
    """What a method's forward returns.

    ``loss``: scalar tensor to minimise; ``previews``: detached ``(B, 1, *patch)`` tensors named
    "input", "masked", "reconstruction" and "target" (first channel) for the preview images.
    """

    loss: Tensor
    previews: dict[str, Tensor]


class PretrainMethod(Protocol):
    """The interface every method's ``nn.Module`` offers to the training loop (defaults:
    :class:`volssl.methods.base.MethodBase`, which every method subclasses).

    - ``from_config(cfg)``: the method built for a :class:`~volssl.config.RunConfig`;
    - ``forward(images, sample_offset, global_batch)``: the loss of this rank's rows
      ``sample_offset .. + B`` of a global batch (random quantities drawn for the whole global batch);
    - ``after_step(steps_done)``: after every optimiser update (a momentum teacher's EMA; else nothing);
    - ``transfer_state_dict()`` and ``network``: what fine-tuning transfers.
    """

    network: nn.Module

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PretrainMethod: ...

    def __call__(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput: ...

    def after_step(self, step: int) -> None: ...

    def transfer_state_dict(self) -> dict[str, Tensor]: ...


def build_method(cfg: RunConfig) -> nn.Module:
    """The pre-training module of ``cfg.method.name`` built for ``cfg`` (ValueError if unknown)."""
    from volssl.config import load_builtin_specs

    name = cfg.method.name
    if name not in METHODS:
        load_builtin_specs()
    if name not in METHODS:
        raise ValueError(f"no pre-training method {name!r}; implemented: {', '.join(sorted(METHODS))}")
    return METHODS[name].from_config(cfg)
