"""AMAES: augmented masked autoencoding with a light-weight decoder (Munk, Ambsdorf et al., 2024).

Paper: "AMAES: Augmented Masked Autoencoder Pretraining on Public Brain MRI Data for 3D-Native
Segmentation" (Sec. 3.1, Tables 2-3, Appendix A/B). :class:`AMAESConfig` holds the settings,
:class:`AMAES` is the ``nn.Module`` the trainer optimises (docs/design.md, "Methods").

One step, in the paper's order ("augmentation reversal", Fig. 2):

1. spatial augmentation of the sample (elastic, rotation, scaling): done by the trainer
   (:func:`volssl.training.augment.spatial_augment`, configured by the preset's ``augment``) before
   :meth:`AMAES.forward` is called, so ``images`` arrive spatially augmented;
2. the target is a copy of them: spatially augmented, intensity-clean;
3. the MRI intensity artifacts (:func:`volssl.data.intensity_artifacts.artifact_augment`, noise, blur,
   ghosting, ringing, low resolution, bias field, gamma) are applied to the input only;
4. 4^3-voxel tokens are masked, each with probability 0.6 as an exact count per sample
   (:func:`volssl.methods.masking.token_mask`), and the masked voxels of the input are set to 0;
5. the backbone's encoder (U-Net, MedNeXt or any encoder returning one feature map per stage) encodes
   the masked input densely; the light-weight decoder (one conv block per stage, no skip connections,
   transposed-conv upsampling, 1^3 output conv) reconstructs from the bottleneck alone;
6. the loss is the MSE against the target over the whole volume (or over masked voxels only).

Fine-tuning transfers the encoder and attaches a new full U-Net decoder with skips: ``network`` holds
the encoder only (``encoder.*`` keys that load into ``build_model(cfg.model)``); the light decoder is
a pre-training-only part of this module and never transferred.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.data.intensity_artifacts import ArtifactConfig, artifact_augment
from volssl.methods import MethodOutput
from volssl.methods.masking import token_mask
from volssl.methods.s3d import reconstruction_loss
from volssl.models.registry import build_model
from volssl.models.resenc_unet import init_weights
from volssl.models.unet import UNetDecoder
from volssl.methods import register_method
from volssl.methods.base import MethodBase


@dataclass
class AMAESConfig(MethodConfig):
    """AMAES settings (Sec. 3.1 and Appendix A; the Table 2 / skip-connection ablations as switches)."""

    name: str = "amaes"
    token_size: int = 4  # side of a masking token in voxels (4^3)
    mask_ratio: float = 0.6  # fraction of tokens masked, exact per sample
    loss_masked_only: bool = False  # MSE on masked voxels only (paper default: the whole volume)
    intensity: ArtifactConfig = field(default_factory=ArtifactConfig)  # input-only intensity augmentation
    decoder_convs: int = 1  # conv layers per pre-training decoder block (1: light-weight; 2: standard, Table 2)
    decoder_skips: bool = False  # skip connections in the pre-training decoder (paper: none)


class EncoderBackbone(nn.Module):
    """The part of the backbone AMAES pre-trains: ``.encoder`` only (state-dict keys ``encoder.*``)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)


@register_method(AMAESConfig)
class AMAES(MethodBase):
    """Masked autoencoder with augmentation reversal on a U-Net-compatible encoder.

    Args:
        encoder: the backbone's encoder: ``forward(x (B, C, *patch)) -> [stage features, ..., bottleneck]``
            with attributes ``in_channels``, ``output_channels`` (widths per stage), ``strides`` and
            ``total_stride`` (:class:`~volssl.models.unet.UNetEncoder`,
            :class:`~volssl.models.mednext.MedNeXtEncoder`, ...).
        cfg: the :class:`AMAESConfig`.

    The reconstruction decoder is a :class:`~volssl.models.unet.UNetDecoder` with ``cfg.decoder_convs``
    convs per block, skip connections only if ``cfg.decoder_skips``, and a single full-resolution
    1^3 head predicting the input channels.
    """

    def __init__(self, encoder: nn.Module, cfg: AMAESConfig):
        super().__init__()
        for attr in ("in_channels", "output_channels", "strides", "total_stride"):
            if not hasattr(encoder, attr):
                raise ValueError(f"AMAES: the encoder ({type(encoder).__name__}) lacks {attr!r}; it needs the U-Net "
                                 "encoder layout (one feature map per stage)")
        if cfg.token_size < 1:
            raise ValueError(f"AMAES: token_size must be >= 1, got {cfg.token_size}")
        if not 0.0 <= cfg.mask_ratio < 1.0:
            raise ValueError(f"AMAES: mask_ratio must lie in [0, 1), got {cfg.mask_ratio}")
        if cfg.decoder_convs < 1:
            raise ValueError(f"AMAES: decoder_convs must be >= 1, got {cfg.decoder_convs}")
        self.cfg = cfg
        self.network = EncoderBackbone(encoder)
        self.decoder = UNetDecoder(list(encoder.output_channels), list(encoder.strides), int(encoder.in_channels),
                                   convs_per_stage=cfg.decoder_convs, skip_connections=cfg.decoder_skips,
                                   deep_supervision_heads=False)
        self.decoder.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "AMAES":
        """Build from a RunConfig: the encoder of ``build_model(cfg.model)`` (its decoder is not used
        in pre-training: fine-tuning builds a fresh one) and ``cfg.method``."""
        if not isinstance(cfg.method, AMAESConfig):
            raise ValueError(f"AMAES: cfg.method must be an AMAESConfig, got {type(cfg.method).__name__}")
        network = build_model(dataclasses.replace(cfg.model, out_channels=cfg.model.in_channels))
        if not hasattr(network, "encoder"):
            raise ValueError(f"AMAES needs an encoder/decoder backbone, architecture {cfg.model.arch!r} is not one")
        method = cls(network.encoder, cfg.method)
        method.check_patch(cfg.data.patch_size)
        return method

    def check_patch(self, patch_size) -> None:
        """ValueError unless every side of ``patch_size`` is a multiple of the token and of the total stride."""
        token, stride = self.cfg.token_size, self.network.encoder.total_stride
        if any(int(p) % token or int(p) % stride for p in patch_size):
            raise ValueError(f"AMAES: patch size {tuple(patch_size)} must be divisible by the token size {token} "
                             f"and by the encoder's total stride {stride}")

    def draw_mask(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> Tensor:
        """A fresh ``(B, 1, *patch)`` token mask (1 = visible) from the global torch RNG, drawn for the
        ``global_batch`` samples, rows ``[sample_offset, sample_offset + B)`` kept."""
        return token_mask(images.shape[0], images.shape[2:], self.cfg.token_size, self.cfg.mask_ratio,
                          device=images.device, sample_offset=sample_offset, global_batch=global_batch)

    def corrupt(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> Tensor:
        """The input's intensity artifacts (fp32, no autograd), drawn for the global batch like the mask."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            return artifact_augment(images.float(), self.cfg.intensity, None, sample_offset, global_batch)

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch): spatially augmented, z-scored rows ``[sample_offset, sample_offset +
        B)`` of a global batch of ``global_batch`` (default B) -> loss and previews.

        The target is ``images``; the input gets the intensity artifacts, then its masked tokens are
        zeroed. Randomness (mask first, then artifacts) comes from the global torch RNG, drawn for the
        whole global batch.
        """
        enc = self.network.encoder
        if images.ndim != 5 or images.shape[1] != enc.in_channels:
            raise ValueError(f"AMAES: expected images (B, {enc.in_channels}, X, Y, Z), got {tuple(images.shape)}")
        self.check_patch(images.shape[2:])
        mask = self.draw_mask(images, sample_offset, global_batch)
        inputs = self.corrupt(images, sample_offset, global_batch)
        return self.forward_masked(images, inputs, mask)

    def forward_masked(self, target: Tensor, inputs: Tensor, mask: Tensor) -> MethodOutput:
        """The step for given tensors: ``target`` (B, C, *patch), its intensity-augmented copy ``inputs``
        and ``mask`` (B, 1, *patch), 1 = visible."""
        mask = mask.to(inputs.dtype)
        masked = inputs * mask
        features = self.network.encoder(masked)
        recon = self.decoder(features if self.cfg.decoder_skips else features[-1:])
        loss = reconstruction_loss(recon, target, mask if self.cfg.loss_masked_only else None)
        with torch.no_grad():
            previews = {
                "input": inputs[:, :1].detach().to(target.dtype),  # intensity-augmented, before masking
                "masked": masked[:, :1].detach(),
                "reconstruction": recon[:, :1].detach().to(target.dtype),
                "target": target[:, :1].detach(),
            }
        return MethodOutput(loss, previews)

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights (``encoder.*``), as fine-tuning transfers them into ``build_model(cfg.model)``;
        the light decoder is pre-training only."""
        return self.network.state_dict()
