"""Models Genesis (Zhou et al., 2021) on the Residual Encoder U-Net: restore the original from a deformed copy.

The S3D paper's baseline "MG" (Appendix A.1): the official deformation pipeline and probabilities
(:mod:`volssl.data.genesis_transforms`), the ResEnc U-Net as the restoration network, MSE loss.
:class:`ModelsGenesisConfig` holds the probabilities; :class:`ModelsGenesis` is the ``nn.Module`` the
trainer optimises (see docs/design.md, "Methods").

Intensity range. The deformations assume intensities in [0, 1] (U[0, 1] noise for painting, a Bezier
map on [0, 1]); the official code min-max scales CT Hounsfield units to [0, 1]. Our patches are
z-scored per image (the S3D plan), so every patch is min-max rescaled per sample and channel to
[0, 1] first (:func:`~volssl.data.genesis_transforms.minmax_rescale`); input and target both live in
that space and the network (linear 1^3 output conv, no sigmoid) regresses the rescaled original.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.data.genesis_transforms import apply_genesis, draw_genesis, minmax_rescale
from volssl.methods import MethodOutput
from volssl.methods.backbone import check_stride_divisible, method_on_backbone
from volssl.methods.masking import _rows
from volssl.models.resenc_unet import ResEncUNet
from volssl.methods import register_method
from volssl.methods.base import MethodBase

SEED_BOUND = 2**62


@dataclass
class ModelsGenesisConfig(MethodConfig):
    """Models Genesis settings: the official ``generate_pair`` probabilities (ModelsGenesis ``config.py``)."""

    name: str = "models-genesis"
    flip_rate: float = 0.4  # per flip, up to 3 flips along random axes (input and target)
    local_rate: float = 0.5  # local pixel shuffling
    nonlinear_rate: float = 0.9  # Bezier intensity map (inverted half of the time)
    paint_rate: float = 0.9  # in- or out-painting
    inpaint_rate: float = 0.2  # given painting: in-painting (else out-painting, 0.8)
    shuffle_blocks: int = 10_000  # windows per shuffled sample
    shuffle_max_fraction: float = 0.1  # window side: 1 .. side * 0.1 voxels (official: side // 10)
    bezier_points: int = 100_000  # samples of the Bezier curve (official nTimes)


@register_method(ModelsGenesisConfig)
class ModelsGenesis(MethodBase):
    """Models Genesis restoration on the ResEnc U-Net.

    Per step, each sample is min-max rescaled to [0, 1] and deformed (flip, local shuffling, Bezier
    map, in-/out-painting, :func:`~volssl.data.genesis_transforms.draw_genesis`); the network maps
    the deformed input to the (flipped) original; loss = MSE, the mean over samples of each sample's
    mean squared error.

    Randomness: one 62-bit seed per sample of the global batch is drawn from the global torch RNG
    (``torch.randint(2**62, (G,))[o:o + B]``); a sample's deformation is a pure function of its
    seed and image (scalar draws on a CPU generator, per-voxel noise on one on the device), so data
    parallel ranks deform their rows exactly as one process would.

    Args:
        network: a :class:`~volssl.models.resenc_unet.ResEncUNet` with ``out_channels == in_channels``.
        cfg: the :class:`ModelsGenesisConfig`.
    """

    def __init__(self, network: ResEncUNet, cfg: ModelsGenesisConfig):
        super().__init__()
        enc = network.encoder
        if network.decoder.out_channels != enc.in_channels:
            raise ValueError(f"ModelsGenesis: the network must restore its input: out_channels "
                             f"{network.decoder.out_channels} != in_channels {enc.in_channels}")
        for name in ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "inpaint_rate"):
            value = getattr(cfg, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ModelsGenesis: {name} must lie in [0, 1], got {value}")
        if cfg.shuffle_blocks < 0:
            raise ValueError(f"ModelsGenesis: shuffle_blocks must be >= 0, got {cfg.shuffle_blocks}")
        if not 0.0 < cfg.shuffle_max_fraction <= 1.0:
            raise ValueError(f"ModelsGenesis: shuffle_max_fraction must lie in (0, 1], got {cfg.shuffle_max_fraction}")
        if cfg.bezier_points < 2:
            raise ValueError(f"ModelsGenesis: bezier_points must be >= 2, got {cfg.bezier_points}")
        self.network = network
        self.cfg = cfg
        for head in network.decoder.seg_layers[:-1]:  # deep-supervision heads: unused here, so frozen
            head.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "ModelsGenesis":
        """Build from a RunConfig: ``cfg.model`` with ``out_channels = in_channels``, ``cfg.method``."""
        return method_on_backbone(cls, cfg, ModelsGenesisConfig, ResEncUNet)

    def check_patch(self, patch_size) -> None:
        """ValueError unless the patch fits the encoder and the painting boxes (every side >= 16)."""
        patch = check_stride_divisible("ModelsGenesis", patch_size, self.network.encoder.total_stride)
        if min(patch) < 16:
            raise ValueError(f"ModelsGenesis: patch size {patch} is too small for the painting boxes (>= 16 per side)")

    def make_pair(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None
                  ) -> tuple[Tensor, Tensor]:
        """``images`` (B, C, *patch), rows ``[sample_offset, sample_offset + B)`` of a global batch ->
        ``(inputs, targets)``, both (B, C, *patch) float32 in [0, 1]: the deformed and the (flipped)
        min-max rescaled originals."""
        if images.ndim != 5:
            raise ValueError(f"ModelsGenesis: expected images (B, C, X, Y, Z), got {tuple(images.shape)}")
        b = images.shape[0]
        g, o = _rows(b, sample_offset, global_batch)
        seeds = torch.randint(0, SEED_BOUND, (g,))[o:o + b].tolist()
        x01 = minmax_rescale(images)
        cfg = self.cfg
        inputs, targets = [], []
        for x, seed in zip(x01, seeds):
            draw = draw_genesis(x.shape[1:], torch.Generator().manual_seed(seed), cfg.flip_rate, cfg.local_rate,
                                cfg.nonlinear_rate, cfg.paint_rate, cfg.inpaint_rate, cfg.shuffle_blocks,
                                cfg.shuffle_max_fraction)
            noise = torch.Generator(device=x.device).manual_seed(seed ^ 0x5DEECE66D)
            inp, tgt = apply_genesis(x, draw, noise, cfg.bezier_points)
            inputs.append(inp)
            targets.append(tgt)
        return torch.stack(inputs), torch.stack(targets)

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch), z-scored -> the restoration loss and previews (input: the rescaled
        original, masked: the deformed input, reconstruction, target)."""
        enc = self.network.encoder
        if images.ndim != 5 or images.shape[1] != enc.in_channels:
            raise ValueError(f"ModelsGenesis: expected images (B, {enc.in_channels}, X, Y, Z), got "
                             f"{tuple(images.shape)}")
        self.check_patch(images.shape[2:])
        with torch.no_grad():
            inputs, targets = self.make_pair(images, sample_offset, global_batch)
        recon = self.network(inputs.to(images.dtype))
        loss = restoration_loss(recon, targets)
        previews = {"input": targets[:, :1], "masked": inputs[:, :1],
                    "reconstruction": recon[:, :1].detach().float(), "target": targets[:, :1]}
        return MethodOutput(loss, previews)

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The whole backbone (encoder and decoder) without its restoration heads ``decoder.seg_layers.*``."""
        return {k: v for k, v in self.network.state_dict().items() if not k.startswith("decoder.seg_layers.")}


def restoration_loss(recon: Tensor, target: Tensor) -> Tensor:
    """MSE of ``recon`` vs ``target`` (B, C, *s) in float32: the mean over samples of each sample's mean."""
    if recon.shape != target.shape:
        raise ValueError(f"restoration_loss: shapes differ, {tuple(recon.shape)} vs {tuple(target.shape)}")
    per_sample = F.mse_loss(recon.float(), target.float(), reduction="none").flatten(1).mean(1)
    return per_sample.mean()
