"""VolumeFusion (Wang et al., 2023, "MIS-FM") on the Residual Encoder U-Net: pseudo-segmentation of fused volumes.

The S3D paper's baseline "VF" (Appendix A.2): two sub-volumes from different scans are fused voxel by
voxel, ``fused = a * x1 + (1 - a) * x2``, with the coefficient ``a`` taking one of K = 5 levels
``linspace(0, 1, 5)``; ``a`` is painted by M ~ U{10, ..., 40} random boxes (drawn one after the other,
later boxes overwrite earlier ones, each with a uniformly drawn level; the background keeps level 0),
each box 8 .. 62.5% of the patch side per axis (the paper: [8, 100] voxels for a 160^3 patch). The
network predicts the level of every voxel (K output channels); loss = Dice + cross-entropy.

:class:`VolumeFusionConfig` holds the settings; :class:`VolumeFusion` is the ``nn.Module`` the trainer
optimises (see docs/design.md, "Methods").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.methods import MethodOutput
from volssl.methods.backbone import check_stride_divisible, method_on_backbone
from volssl.methods.masking import _rows
from volssl.models.resenc_unet import ResEncUNet
from volssl.methods import register_method
from volssl.methods.base import MethodBase


@dataclass
class VolumeFusionConfig(MethodConfig):
    """VolumeFusion settings (S3D paper, Appendix A.2; Wang et al., 2023)."""

    name: str = "volume-fusion"
    levels: int = 5  # K fusion classes: coefficients linspace(0, 1, K)
    boxes: tuple[int, int] = (10, 40)  # M ~ U{lo, ..., hi} boxes per sample
    box_min: int = 8  # smallest box side (voxels)
    box_max_fraction: float = 0.625  # largest box side as a fraction of the patch side (100 of 160)
    dice_weight: float = 1.0
    ce_weight: float = 1.0


@register_method(VolumeFusionConfig)
class VolumeFusion(MethodBase):
    """VolumeFusion pre-training on the ResEnc U-Net (K output channels).

    Pairs. Row ``j`` of the local batch is fused with row ``j ^ 1`` (rows 0-1, 2-3, ...; with an odd
    batch the last row pairs with the one before it; a batch of one pairs the sample with its own
    mirror image). ``x1`` is the row itself, ``x2`` its partner, so each image is once the foreground
    and once the background of a fused volume and the step sees B fused volumes from B patches. With
    an even per-rank batch and an even ``sample_offset`` the pairs are those of one process.

    Randomness: box counts, sizes, positions and levels are drawn for the ``global_batch`` samples
    from the global torch RNG, shapes ``(G,)``, ``(G, M_max, 3)``, ``(G, M_max)``, rows
    ``[o, o + B)`` kept (docs/design.md, "Methods").

    Args:
        network: a :class:`~volssl.models.resenc_unet.ResEncUNet` with ``out_channels == cfg.levels``.
        cfg: the :class:`VolumeFusionConfig`.
    """

    def __init__(self, network: ResEncUNet, cfg: VolumeFusionConfig):
        super().__init__()
        if cfg.levels < 2:
            raise ValueError(f"VolumeFusion: levels must be >= 2, got {cfg.levels}")
        if network.decoder.out_channels != cfg.levels:
            raise ValueError(f"VolumeFusion: the network must predict {cfg.levels} classes, has out_channels "
                             f"{network.decoder.out_channels}")
        lo, hi = cfg.boxes
        if not 0 <= lo <= hi:
            raise ValueError(f"VolumeFusion: boxes must be (lo, hi) with 0 <= lo <= hi, got {cfg.boxes}")
        if cfg.box_min < 1 or not 0.0 < cfg.box_max_fraction <= 1.0:
            raise ValueError(f"VolumeFusion: need box_min >= 1 and 0 < box_max_fraction <= 1, got {cfg.box_min}, "
                             f"{cfg.box_max_fraction}")
        if cfg.dice_weight < 0 or cfg.ce_weight < 0 or cfg.dice_weight + cfg.ce_weight == 0:
            raise ValueError(f"VolumeFusion: dice_weight and ce_weight must be >= 0, not both 0; got "
                             f"{cfg.dice_weight}, {cfg.ce_weight}")
        self.network = network
        self.cfg = cfg
        for head in network.decoder.seg_layers[:-1]:  # deep-supervision heads: unused here, so frozen
            head.requires_grad_(False)
        self.register_buffer("coefficients", torch.linspace(0.0, 1.0, cfg.levels), persistent=False)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "VolumeFusion":
        """Build from a RunConfig: ``cfg.model`` with ``out_channels = cfg.method.levels``."""
        return method_on_backbone(cls, cfg, VolumeFusionConfig, ResEncUNet,
                                  out_channels=getattr(cfg.method, "levels", None))

    def check_patch(self, patch_size) -> None:
        """ValueError unless every side is divisible by the encoder's total stride and >= ``box_min``."""
        patch = check_stride_divisible("VolumeFusion", patch_size, self.network.encoder.total_stride)
        if min(patch) < self.cfg.box_min:
            raise ValueError(f"VolumeFusion: patch size {patch} must be >= box_min {self.cfg.box_min} per side")

    def box_range(self, side: int) -> tuple[int, int]:
        """Smallest and largest box side (voxels) for a patch side of ``side`` voxels."""
        return self.cfg.box_min, max(self.cfg.box_min, min(side, int(side * self.cfg.box_max_fraction)))

    def draw_levels(self, batch: int, patch_size, sample_offset: int = 0, global_batch: int | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """The fusion level of every voxel, ``(batch, *patch)`` int64 in [0, K): 0, then the boxes painted
        in order (see the class docstring for the draws)."""
        patch = tuple(int(p) for p in patch_size)
        g, o = _rows(batch, sample_offset, global_batch)
        lo, hi = self.cfg.boxes
        count = torch.randint(lo, hi + 1, (g,))[o:o + batch].tolist()
        side = torch.tensor(patch)
        size_lo = torch.tensor([self.box_range(p)[0] for p in patch])
        size_hi = torch.tensor([self.box_range(p)[1] for p in patch])
        sizes = (size_lo + (torch.rand(g, hi, 3, dtype=torch.float64) * (size_hi - size_lo + 1)).floor().long())
        starts = (torch.rand(g, hi, 3, dtype=torch.float64) * (side - sizes + 1)).floor().long()
        levels = torch.randint(0, self.cfg.levels, (g, hi))
        sizes, starts, levels = sizes[o:o + batch].tolist(), starts[o:o + batch].tolist(), levels[o:o + batch].tolist()
        out = torch.zeros(batch, *patch, dtype=torch.uint8 if self.cfg.levels <= 256 else torch.long, device=device)
        for b in range(batch):  # painted where the patch lives: at most B * M_max slice fills, no transfer
            for m in range(count[b]):
                (x, y, z), (sx, sy, sz) = starts[b][m], sizes[b][m]
                out[b, x:x + sx, y:y + sy, z:z + sz] = levels[b][m]
        return out.long()

    @staticmethod
    def partners(images: Tensor) -> Tensor:
        """The second sub-volume of each row: row ``j ^ 1`` (the previous row for an odd batch's last
        row; the mirrored sample itself for a batch of one)."""
        b = images.shape[0]
        if b == 1:
            return images.flip((2, 3, 4))
        idx = [j ^ 1 if (j ^ 1) < b else j - 1 for j in range(b)]
        return images[idx]

    def fuse(self, x1: Tensor, x2: Tensor, levels: Tensor) -> Tensor:
        """``a * x1 + (1 - a) * x2`` with ``a = linspace(0, 1, K)[levels]`` (levels (B, *patch), broadcast
        over channels)."""
        a = self.coefficients.to(x1.device, x1.dtype)[levels].unsqueeze(1)
        return a * x1 + (1 - a) * x2

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch) -> Dice + CE of the predicted fusion level per voxel, and previews
        (input: x1, masked: the fused volume, reconstruction / target: predicted / true coefficient)."""
        enc = self.network.encoder
        if images.ndim != 5 or images.shape[1] != enc.in_channels:
            raise ValueError(f"VolumeFusion: expected images (B, {enc.in_channels}, X, Y, Z), got "
                             f"{tuple(images.shape)}")
        self.check_patch(images.shape[2:])
        with torch.no_grad():
            levels = self.draw_levels(images.shape[0], images.shape[2:], sample_offset, global_batch, images.device)
            fused = self.fuse(images, self.partners(images), levels)
        logits = self.network(fused)
        loss = dice_ce_loss(logits, levels, self.cfg.dice_weight, self.cfg.ce_weight)
        with torch.no_grad():
            coef = self.coefficients.to(images.device)
            previews = {"input": images[:, :1].detach(), "masked": fused[:, :1].detach(),
                        "reconstruction": coef[logits.detach().argmax(1)].unsqueeze(1),
                        "target": coef[levels].unsqueeze(1)}
        return MethodOutput(loss, previews)

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The whole backbone (encoder and decoder) without its K-class heads ``decoder.seg_layers.*``."""
        return {k: v for k, v in self.network.state_dict().items() if not k.startswith("decoder.seg_layers.")}


def dice_ce_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 smooth: float = 1e-5) -> Tensor:
    """Soft Dice + cross-entropy of ``logits`` (B, K, *s) against class indices ``target`` (B, *s).

    Per sample: CE = the mean over voxels; Dice loss = 1 - the mean soft Dice
    ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over the classes present in the sample's
    target (an absent class is only penalised through the softmax). Returns the mean over samples of
    ``dice_weight * dice + ce_weight * ce``, in float32.
    """
    if logits.ndim < 3 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"dice_ce_loss: expected logits (B, K, *s) and target (B, *s), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    k = logits.shape[1]
    logits = logits.float()
    dims = tuple(range(2, logits.ndim))
    ce = F.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
    probs = logits.softmax(1)
    # per class, not through a one-hot tensor: (B, K, *s) int64 would cost 8 bytes per class and voxel
    hits = [target == c for c in range(k)]
    inter = torch.stack([(probs[:, c] * hits[c]).flatten(1).sum(1) for c in range(k)], 1)
    ref = torch.stack([h.flatten(1).sum(1) for h in hits], 1).to(probs.dtype)
    dice = (2 * inter + smooth) / (probs.sum(dims) + ref + smooth)  # (B, K)
    present = (ref > 0).to(dice.dtype)
    dice_loss = 1 - (dice * present).sum(1) / present.sum(1).clamp_min(1.0)
    return (dice_weight * dice_loss + ce_weight * ce).mean()
