"""S3D / Spark3D: sparse masked autoencoding for the Residual Encoder U-Net.

Paper: "Revisiting MAE pre-training for 3D medical image segmentation" (Sec. 3, Table 1a/1b).
:class:`S3DConfig` holds the settings (one switch per sparsification row of Table 1a); :class:`S3D`
is the ``nn.Module`` the trainer optimises (see docs/design.md, "Methods").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.methods import MethodOutput
from volssl.methods.backbone import method_on_backbone
from volssl.methods.masking import block_mask
from volssl.models.block_sparse import block_sides, encode_block_sparse
from volssl.models.resenc_unet import ResEncUNet, init_weights
from volssl.methods import register_method
from volssl.methods.base import MethodBase


@dataclass
class S3DConfig(MethodConfig):
    """S3D settings (paper: "Revisiting MAE pre-training for 3D medical image segmentation").

    Each sparsification switch corresponds to a row of the paper's Table 1a ablation.
    """

    name: str = "s3d"
    mask_ratio: float = 0.75  # static ratio, used when mask_ratio_range is None
    mask_ratio_range: tuple[float, float] | None = (0.6, 0.9)  # dynamic: U[lo, hi] per sample (S3D-B)
    mask_block: int | None = None  # side of a mask block in voxels; None: the encoder's total stride
    mask_input: bool = True  # zero masked blocks of the input before the stem
    sparse_conv: bool = True  # re-apply the mask after every conv / pooling of the encoder
    masked_norm: bool = True  # instance-norm statistics over visible voxels only
    mask_token: bool = True  # learnable per-stage token fills masked positions before decoding
    densify: bool = True  # 3x3x3 conv on every resolution but the highest before decoding
    loss_masked_only: bool = True  # L2 on masked voxels only (False: whole patch)
    # encoder compute on the visible blocks only (models/block_sparse.py; same numbers as masked-dense):
    # "on", "off" (masked-dense), "auto" (on with sparse_conv + masked_norm and a mean mask ratio >= 0.5)
    block_sparse: str = "auto"
    block_stages: int | None = None  # stem + stages [0, n) on blocks; None: every stage whose block is >= 2 voxels


MIN_BLOCK_SIDE = 2  # stages whose mask blocks are one voxel wide (the bottleneck) stay masked-dense
AUTO_MIN_RATIO = 0.5  # "auto": block-sparse from this mean mask ratio up (measured faster: docs/benchmarks.md)


# --------------------------------------------------------------------------- the method
@register_method(S3DConfig)
class S3D(MethodBase):
    """Sparse masked autoencoder on the Residual Encoder U-Net (S3D / Spark3D).

    Per step: a block mask is drawn on the encoder's bottleneck grid (blocks of ``mask_block``
    voxels, by default the total stride) with a static or per-sample U[lo, hi] ratio; the encoder
    sees the masked input with the mask re-applied after every conv/pool and visible-only norm
    statistics (computed on the visible blocks only with ``block_sparse``: :func:`block_stages`);
    each stage's masked positions are filled with that stage's learnable mask token; a
    3^3 densification conv (conv + bias only: the decoder block that follows normalises) is applied
    at every resolution except the highest; the U-Net decoder (skips kept) reconstructs the input
    and the loss is the L2 error on masked voxels, in the z-scored intensity space of the input.

    Args:
        network: a :class:`~volssl.models.resenc_unet.ResEncUNet` whose output channels equal its
            input channels (its last 1^3 output conv is the reconstruction head).
        cfg: the :class:`S3DConfig`; each switch off reproduces a row of the paper's Table 1a.
    """

    def __init__(self, network: ResEncUNet, cfg: S3DConfig):
        super().__init__()
        enc = network.encoder
        if network.decoder.out_channels != enc.in_channels:
            raise ValueError(f"S3D: the network must reconstruct its input: out_channels "
                             f"{network.decoder.out_channels} != in_channels {enc.in_channels}")
        if enc.strides[0] != 1:
            raise ValueError(f"S3D: the first stage must not downsample (strides[0] = {enc.strides[0]})")
        block = cfg.mask_block or enc.total_stride
        if block < 1 or block % enc.total_stride:
            raise ValueError(
                f"S3D: mask_block {block} must be a multiple of the encoder's total stride {enc.total_stride}; "
                "smaller blocks cannot be masked exactly in the bottleneck (the masked regions would leak)")
        if cfg.mask_ratio_range is None and not 0.0 <= cfg.mask_ratio <= 1.0:
            raise ValueError(f"S3D: mask_ratio must be in [0, 1], got {cfg.mask_ratio}")
        if cfg.block_sparse not in ("auto", "on", "off"):
            raise ValueError(f"S3D: block_sparse must be 'auto', 'on' or 'off', got {cfg.block_sparse!r}")
        if cfg.block_sparse == "on" and not (cfg.sparse_conv and cfg.masked_norm):
            raise ValueError("S3D: block_sparse='on' needs sparse_conv and masked_norm (without them the masked "
                             "blocks are not zero, so there is nothing to skip); use 'auto' or 'off'")
        if cfg.block_stages is not None and not 0 <= cfg.block_stages <= len(enc.stages):
            raise ValueError(f"S3D: block_stages must be in [0, {len(enc.stages)}], got {cfg.block_stages}")
        self.network = network
        self.cfg = cfg
        for head in network.decoder.seg_layers[:-1]:  # deep-supervision heads: unused here, so frozen
            head.requires_grad_(False)  # (no parameter without a gradient for DDP or the optimiser)
        self.block = int(block)
        widths = enc.output_channels
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, c, 1, 1, 1)) for c in widths] if cfg.mask_token else [])
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.04, b=0.04)
        self.densify = nn.ModuleList(
            ([nn.Identity()] + [nn.Conv3d(c, c, 3, padding=1) for c in widths[1:]]) if cfg.densify else [])
        self.densify.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "S3D":
        """Build from a RunConfig: ``cfg.model`` with ``out_channels = in_channels``, ``cfg.method``."""
        return method_on_backbone(cls, cfg, S3DConfig, ResEncUNet)

    def check_patch(self, patch_size) -> None:
        """ValueError unless every side of ``patch_size`` is a multiple of the mask block."""
        if any(int(p) % self.block for p in patch_size):
            raise ValueError(f"S3D: patch size {tuple(patch_size)} must be divisible by the mask block {self.block} "
                             f"(the encoder's total stride is {self.network.encoder.total_stride})")

    def draw_mask(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> Tensor:
        """A fresh ``(B, 1, *patch)`` block mask (1 = visible) from the global torch RNG.

        Drawn for the ``global_batch`` samples; rows ``[sample_offset, sample_offset + B)`` kept.
        """
        ratio = self.cfg.mask_ratio_range if self.cfg.mask_ratio_range is not None else self.cfg.mask_ratio
        return block_mask(images.shape[0], images.shape[2:], self.block, ratio, device=images.device,
                          sample_offset=sample_offset, global_batch=global_batch)

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch), z-scored, rows ``[sample_offset, sample_offset + B)`` of a global
        batch of ``global_batch`` (default B) -> loss and previews, with a freshly drawn mask."""
        enc = self.network.encoder
        if images.ndim != 5 or images.shape[1] != enc.in_channels:
            raise ValueError(f"S3D: expected images (B, {enc.in_channels}, X, Y, Z), got {tuple(images.shape)}")
        self.check_patch(images.shape[2:])
        return self.forward_masked(images, self.draw_mask(images, sample_offset, global_batch))

    def forward_masked(self, images: Tensor, mask: Tensor) -> MethodOutput:
        """The step for a given ``mask`` (B, 1, *patch), 1 = visible, aligned to the mask block."""
        cfg, enc = self.cfg, self.network.encoder
        mask = mask.to(images.dtype)
        n_block = self.block_stages(images.shape[2:])
        if n_block:
            skips = encode_block_sparse(enc, images, mask, n_block, mask_input=cfg.mask_input, unit=self.block)
        else:
            skips = enc(images, mask, mask_input=cfg.mask_input, sparse_conv=cfg.sparse_conv,
                        masked_norm=cfg.masked_norm)
        if cfg.mask_token or cfg.densify:
            skips = [self._densify(s, x, mask[:, :, ::c, ::c, ::c]) for s, (x, c)
                     in enumerate(zip(skips, enc.cumulative_strides))]
        recon = self.network.decoder(skips)
        loss = reconstruction_loss(recon, images, mask if cfg.loss_masked_only else None)
        with torch.no_grad():
            previews = {
                "input": images[:, :1].detach(),
                "masked": (images[:, :1] * mask).detach(),
                # MAE figure convention: predicted masked blocks, visible blocks pasted from the input
                "reconstruction": torch.lerp(recon[:, :1].detach().to(images.dtype), images[:, :1], mask),
                "target": images[:, :1].detach(),
            }
        return MethodOutput(loss, previews)

    def block_stages(self, patch_size) -> int:
        """How many encoder stages (with the stem) run block-sparse for this patch: 0 = masked-dense."""
        cfg = self.cfg
        if cfg.block_sparse == "off" or not (cfg.sparse_conv and cfg.masked_norm):
            return 0
        sides = block_sides(self.network.encoder, self.block)
        n = cfg.block_stages if cfg.block_stages is not None else sum(s >= MIN_BLOCK_SIDE for s in sides)
        if cfg.block_sparse == "on":
            return max(n, 1)
        ratio = cfg.mask_ratio if cfg.mask_ratio_range is None else sum(cfg.mask_ratio_range) / 2
        return n if ratio >= AUTO_MIN_RATIO else 0

    def _densify(self, stage: int, x: Tensor, mask: Tensor) -> Tensor:
        """Fill masked positions of stage ``stage``'s features with its token, then densify (stages >= 1)."""
        if self.cfg.mask_token:
            x = torch.where(mask > 0.5, x, self.mask_tokens[stage].to(x.dtype))
        if self.cfg.densify and stage > 0:
            x = self.densify[stage](x)
        return x

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The backbone's weights fine-tuning transfers: the network without its reconstruction heads.

        Mask tokens and densification convs belong to this module, not to ``network``, so they are
        never included; the 1^3 output convs (``decoder.seg_layers``) predict intensities and are dropped.
        """
        return {k: v for k, v in self.network.state_dict().items() if not k.startswith("decoder.seg_layers.")}


def reconstruction_loss(recon: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error of ``recon`` vs ``target`` (B, C, *s), in float32: the mean over samples of each
    sample's mean (so that data-parallel gradient averaging equals the single-process gradient).

    With ``mask`` (B, 1, *s; 1 = visible) each sample's mean runs over its masked voxels only (all
    channels); visible voxels contribute nothing, whatever their values.
    """
    sq = (recon.float() - target.float()).square()
    if mask is None:
        return sq.mean()
    dims = tuple(range(1, sq.ndim))
    hidden = 1.0 - mask.float()
    per_sample = (sq * hidden).sum(dims) / (hidden.sum(dims) * sq.shape[1]).clamp_min(1.0)
    return per_sample.mean()
