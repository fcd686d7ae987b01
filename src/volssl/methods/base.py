"""The base class of every pre-training method's ``nn.Module``: the defaults of :class:`~volssl.methods.PretrainMethod`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from volssl.config import RunConfig
    from volssl.methods import MethodOutput


class MethodBase(nn.Module):
    """A pre-training method: built from a :class:`~volssl.config.RunConfig`, one loss per step.

    Subclasses set ``self.network`` (the backbone fine-tuning transfers) and implement
    :meth:`from_config`, :meth:`forward` and :meth:`transfer_state_dict`; :meth:`after_step` is a no-op
    unless the method keeps state outside autograd (a momentum teacher, methods/voco.py).
    """

    network: nn.Module

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "MethodBase":
        """The method built for ``cfg`` (its ``cfg.method`` config class, ``cfg.model`` backbone, patch)."""
        raise NotImplementedError(f"{cls.__name__} must implement from_config(cfg)")

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """The loss of this rank's ``images`` (B, C, *patch): rows ``sample_offset .. + B`` of a global batch of
        ``global_batch`` samples (None: B), every random quantity drawn for the global batch (docs/design.md)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images, sample_offset, global_batch)")

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """What fine-tuning transfers: the backbone's state dict (keys ``encoder.*`` / ``decoder.*``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement transfer_state_dict()")

    def after_step(self, step: int) -> None:
        """Called by the loop after every optimiser update with the number of steps done (default: nothing)."""
