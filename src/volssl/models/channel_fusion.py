"""Multi-channel data through a single-channel encoder: each channel encoded on its own, fused per stage.

Pre-training sees one channel at a time (S3D and AMAES draw a random channel per patch). The
paper's rule for multi-channel fine-tuning (S3D Table 6) replicates the pre-trained stem over the
``C`` channels divided by ``C``: at step 0 the network sees the *mean* of the channels, an image it
was never pre-trained on, in which contrasts of opposite sign cancel (a lesion dark in T1 and bright
in T2/FLAIR). On the brain phantoms a linear probe on the pre-trained encoder's features of that mean
image is no better than on a random encoder's, while the same encoder run on each channel is
clearly better (docs/evidence.md).

:class:`ChannelFusionNet` keeps the pre-trained encoder as it is (one input channel) and runs it on
each channel (the channels form the batch); per stage a 1x1x1 convolution, initialised to the mean
over channels, fuses the ``C`` feature maps into the width the decoder expects. At step 0 the
decoder therefore sees the mean of the per-channel *features*; fine-tuning learns how to weigh them.
The state dict keeps the wrapped network's names (``encoder.*``, ``decoder.*``) plus ``fusion.*``,
so transfer, the stage rules and checkpoints work unchanged. The encoder's cost grows ``C``-fold.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

FUSIONS = ("stem", "features")  # ModelConfig.channel_fusion: the paper's replicated stem, or this module


class ChannelFusionNet(nn.Module):
    """``forward(x (B, C, X, Y, Z)) -> logits`` of ``base`` (built for one input channel) on ``C`` channels.

    Args:
        base: a CNN encoder/decoder network with one input channel whose ``encoder(x)`` returns the
            per-stage feature maps and ``decoder(skips, deep_supervision=...)`` the logits (ResEnc
            U-Net, U-Net, MedNeXt).
        in_channels: the data's channels ``C`` (>= 2).
    """

    def __init__(self, base: nn.Module, in_channels: int):
        super().__init__()
        widths = getattr(base.encoder, "output_channels", None)
        if widths is None or not hasattr(base, "decoder"):
            raise ValueError(f"channel_fusion='features' needs a CNN encoder with per-stage outputs; "
                             f"{type(base).__name__} has none")
        if int(base.encoder.in_channels) != 1:
            raise ValueError(f"channel_fusion='features': the encoder must take one channel, it takes "
                             f"{base.encoder.in_channels}")
        if in_channels < 2:
            raise ValueError(f"channel_fusion='features' is for 2 or more channels, got {in_channels}")
        self.in_channels = int(in_channels)
        self.encoder = base.encoder
        self.decoder = base.decoder
        self.fusion = nn.ModuleList(nn.Conv3d(self.in_channels * int(w), int(w), 1, bias=False) for w in widths)
        self.deep_supervision = bool(getattr(base, "deep_supervision", False))
        with torch.no_grad():
            for conv, w in zip(self.fusion, widths):
                conv.weight.copy_(mean_fusion_weight(self.in_channels, int(w)))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"channel fusion network: expected input (B, {self.in_channels}, X, Y, Z), got "
                             f"{tuple(x.shape)}")
        return self.decoder(self.fuse(self.encoder(x.reshape(-1, 1, *x.shape[2:])), x.shape[0]),
                            deep_supervision=self.deep_supervision)

    def fuse(self, skips: Sequence[Tensor], batch: int) -> list[Tensor]:
        """Per-channel stage features ``(B*C, F, ...)`` (channel-minor) -> fused ``(B, F, ...)``."""
        return [conv(s.reshape(batch, -1, *s.shape[2:])) for conv, s in zip(self.fusion, skips)]


def mean_fusion_weight(channels: int, width: int) -> Tensor:
    """The ``(width, channels * width, 1, 1, 1)`` 1x1x1 conv weight that averages the channels' features."""
    eye = torch.eye(width) / channels
    return torch.cat([eye] * channels, dim=1)[..., None, None, None]
