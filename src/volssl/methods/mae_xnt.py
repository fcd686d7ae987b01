"""MAE-XNT: masked autoencoding of cubic patches with a 3D ViT (He et al.'s MAE on volumes).

Paper: "MAE-XNT: A Foundation Model for Segmenting Neuronal Tissue Volumes Generated with X-Ray
Nanotomography" (Sec. 3; supplement Sec. 7, Table 4). :class:`MAEXNTConfig` holds the settings;
:class:`MAEXNT` is the ``nn.Module`` the trainer optimises (see docs/design.md, "Methods").

Per step: the crop is cut into ``p^3`` patches (tokens); of each sample's ``N`` tokens, ranked by
uniform noise, the ``int(N * (1 - mask_ratio))`` lowest are kept (the public MAE and MAE_XNT count:
409 of 4096 at 0.9) and the rest removed; the ViT encoder sees only the visible
tokens (with their fixed 3D sin-cos positions); a light transformer decoder (linear projection,
learnable mask token at every removed position, its own fixed positions, ``decoder_depth`` blocks,
LayerNorm, linear head to ``p^3 C`` voxels) predicts every patch; the loss is the squared error on
the removed patches only, in the z-scored intensity space of the crop (``norm_pix_loss``: of each
patch normalised by its own mean and standard deviation, MAE's option; off in MAE-XNT).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.methods import MethodOutput
from volssl.models.pos_embed import sincos_pos_embed_3d
from volssl.models.registry import build_model
from volssl.models.vit import LN_EPS, ViTEncoder3D, init_vit_weights, transformer_block
from volssl.methods import register_method
from volssl.methods.base import MethodBase


@dataclass
class MAEXNTConfig(MethodConfig):
    """MAE-XNT settings (public code defaults: decoder 2 blocks of width 768 with 12 heads)."""

    name: str = "mae-xnt"
    mask_ratio: float = 0.9  # fraction removed: int(N (1 - r)) tokens kept per sample (Table 4: 0.75 .. 0.90)
    decoder_dim: int = 768  # width of the MAE decoder (a multiple of 6 and of decoder_heads)
    decoder_depth: int = 2  # transformer blocks of the MAE decoder
    decoder_heads: int = 12
    mlp_ratio: float = 4.0  # decoder MLP width / decoder_dim
    norm_pix_loss: bool = False  # MAE's per-patch normalised targets (MAE-XNT: raw z-scored voxels)


class EncoderOnly(nn.Module):
    """The backbone MAE-XNT pre-trains: a segmentation network's ``encoder`` alone (keys ``encoder.*``).

    The UNETR decoder is not used in pre-training, so it is not part of the method: no parameter
    without a gradient, and the state dict loads into ``build_model(cfg.model)`` with
    ``transfer="encoder"`` (or ``"all"``, which then moves the same keys).
    """

    def __init__(self, encoder: ViTEncoder3D):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor, ids_keep: Tensor | None = None):
        return self.encoder(x, ids_keep)


@register_method(MAEXNTConfig)
class MAEXNT(MethodBase):
    """Masked autoencoder on a 3D ViT (see the module docstring).

    Args:
        encoder: the :class:`~volssl.models.vit.ViTEncoder3D` to pre-train (``network.encoder``).
        cfg: the :class:`MAEXNTConfig`.
    """

    def __init__(self, encoder: ViTEncoder3D, cfg: MAEXNTConfig):
        super().__init__()
        if not isinstance(encoder, ViTEncoder3D):
            raise ValueError(f"MAE-XNT: needs a ViTEncoder3D encoder, got {type(encoder).__name__}")
        if not 0.0 <= cfg.mask_ratio < 1.0:
            raise ValueError(f"MAE-XNT: mask_ratio must lie in [0, 1), got {cfg.mask_ratio}")
        if cfg.decoder_dim < 6 or cfg.decoder_dim % 6:
            raise ValueError(f"MAE-XNT: decoder_dim must be a positive multiple of 6 (3D sin-cos positions), got "
                             f"{cfg.decoder_dim}")
        if cfg.decoder_heads < 1 or cfg.decoder_dim % cfg.decoder_heads:
            raise ValueError(f"MAE-XNT: decoder_dim {cfg.decoder_dim} is not divisible by decoder_heads "
                             f"{cfg.decoder_heads}")
        if cfg.decoder_depth < 1:
            raise ValueError(f"MAE-XNT: decoder_depth must be >= 1, got {cfg.decoder_depth}")
        self.cfg = cfg
        self.network = EncoderOnly(encoder)
        self.patch_size = encoder.patch_size
        self.in_channels = encoder.in_channels
        dd = int(cfg.decoder_dim)
        self.decoder_embed = nn.Linear(encoder.dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_blocks = nn.ModuleList(transformer_block(dd, cfg.decoder_heads, cfg.mlp_ratio)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=LN_EPS)
        self.decoder_pred = nn.Linear(dd, self.patch_size ** 3 * self.in_channels)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        self._pos_cache: dict[tuple, Tensor] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "MAEXNT":
        """Build from a RunConfig: the encoder of ``build_model(cfg.model)`` (a ViT family), ``cfg.method``."""
        if not isinstance(cfg.method, MAEXNTConfig):
            raise ValueError(f"MAE-XNT: cfg.method must be an MAEXNTConfig, got {type(cfg.method).__name__}")
        network = build_model(dataclasses.replace(cfg.model, out_channels=1))
        encoder = getattr(network, "encoder", None)
        if not isinstance(encoder, ViTEncoder3D):
            raise ValueError(f"MAE-XNT needs a ViT backbone (e.g. vit-b-unetr), got architecture {cfg.model.arch!r}")
        method = cls(encoder, cfg.method)
        encoder.grid_of(cfg.data.patch_size)  # ValueError unless the crop is divisible by the patch size
        return method

    @property
    def encoder(self) -> ViTEncoder3D:
        return self.network.encoder

    # ------------------------------------------------------------------ patches and masks
    def patchify(self, images: Tensor) -> Tensor:
        """``(B, C, X, Y, Z) -> (B, N, p^3 C)``: tokens in C order of the grid, voxels ``(px, py, pz, c)``."""
        b, c = images.shape[:2]
        p = self.patch_size
        gx, gy, gz = self.encoder.grid_of(images.shape[2:])
        x = images.reshape(b, c, gx, p, gy, p, gz, p)
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, gx * gy * gz, p ** 3 * c)

    def unpatchify(self, patches: Tensor, grid: Sequence[int]) -> Tensor:
        """Inverse of :meth:`patchify`: ``(B, N, p^3 C)`` on ``grid`` -> ``(B, C, *grid * p)``."""
        b, n, k = patches.shape
        p = self.patch_size
        gx, gy, gz = (int(g) for g in grid)
        if n != gx * gy * gz or k % p ** 3:
            raise ValueError(f"MAE-XNT unpatchify: {tuple(patches.shape)} does not fit grid {tuple(grid)} with "
                             f"patch {p}")
        c = k // p ** 3
        x = patches.reshape(b, gx, gy, gz, p, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, gx * p, gy * p, gz * p)

    def n_kept(self, n_tokens: int) -> int:
        """Tokens kept (visible) per sample: ``int(N * (1 - mask_ratio))``, at least one.

        The expression of facebookresearch/mae and xni-esrf/MAE_XNT (``len_keep``), floating point
        included: ``int(4096 * (1 - 0.9)) == int(409.599...) == 409`` visible of 4096 tokens at 0.9.
        """
        if n_tokens < 1:
            raise ValueError(f"MAE-XNT: n_tokens must be >= 1, got {n_tokens}")
        return max(1, int(n_tokens * (1 - self.cfg.mask_ratio)))

    def n_masked(self, n_tokens: int) -> int:
        """Tokens removed per sample: ``N - n_kept(N)`` (3687 of 4096 at mask_ratio 0.9)."""
        return n_tokens - self.n_kept(n_tokens)

    def random_masking(self, batch: int, n_tokens: int, device: torch.device | str | None = None,
                       sample_offset: int = 0, global_batch: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random masking by ranking uniform noise (the global torch RNG).

        The noise is drawn for the ``global_batch`` samples, ``(global_batch, N)``, and rows
        ``[sample_offset, sample_offset + batch)`` are kept, so W processes mask exactly as one does.

        Returns:
            ``ids_keep`` ``(B, N - M)`` int64, the visible tokens in ascending order of their noise;
            ``ids_restore`` ``(B, N)`` int64, the position of each token in the shuffled order
            (visible first); ``masked`` ``(B, N)`` float32, 1 where a token is removed
            (``M = N - int(N (1 - mask_ratio))`` per row, see :meth:`n_kept`).
        """
        g = batch if global_batch is None else int(global_batch)
        o = int(sample_offset)
        if batch < 1 or o < 0 or o + batch > g:
            raise ValueError(f"MAE-XNT: mask rows [{o}, {o + batch}) do not fit a global batch of {g}")
        n_keep = self.n_kept(n_tokens)
        noise = torch.rand(g, n_tokens, device=device)[o:o + batch]
        ids_shuffle = noise.argsort(dim=1)  # low noise: kept
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        masked = (ids_restore >= n_keep).to(torch.float32)
        return ids_keep, ids_restore, masked

    # ------------------------------------------------------------------ the three stages
    def forward_encoder(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """The visible tokens' encoding ``(B, n_keep, D)`` (after the encoder's final norm)."""
        return self.encoder(images, ids_keep=ids_keep).tokens

    def decoder_pos_embed(self, grid: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        key = (tuple(int(g) for g in grid), str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed_3d(key[0], self.cfg.decoder_dim, device=device)
        return self._pos_cache[key]

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, grid: Sequence[int]) -> Tensor:
        """``latent`` (B, n_keep, D) -> predicted patches ``(B, N, p^3 C)`` for every token."""
        x = self.decoder_embed(latent)
        b, n_keep, dd = x.shape
        n = ids_restore.shape[1]
        x = torch.cat((x, self.mask_token.to(x.dtype).expand(b, n - n_keep, dd)), dim=1)  # shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # grid order
        x = x + self.decoder_pos_embed(grid, x.device).to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def target_patches(self, images: Tensor) -> Tensor:
        """The regression target ``(B, N, p^3 C)`` in float32 (per-patch normalised with ``norm_pix_loss``)."""
        target = self.patchify(images.float())
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward_loss(self, images: Tensor, pred: Tensor, masked: Tensor) -> Tensor:
        """Squared error on removed patches: each sample's mean over its removed patches' voxels, then
        the mean over samples (float32). Predictions of visible patches do not contribute."""
        err = (pred.float() - self.target_patches(images)).square().mean(dim=-1)  # (B, N) per patch
        masked = masked.float()
        per_sample = (err * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1.0)
        return per_sample.mean()

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch), z-scored crops, rows ``[sample_offset, sample_offset + B)`` of a
        global batch of ``global_batch`` (default B) -> loss and previews, with a fresh random mask."""
        if images.ndim != 5 or images.shape[1] != self.in_channels:
            raise ValueError(f"MAE-XNT: expected images (B, {self.in_channels}, X, Y, Z), got {tuple(images.shape)}")
        grid = self.encoder.grid_of(images.shape[2:])
        n_tokens = grid[0] * grid[1] * grid[2]
        ids_keep, ids_restore, masked = self.random_masking(images.shape[0], n_tokens, images.device, sample_offset,
                                                            global_batch)
        pred = self.forward_decoder(self.forward_encoder(images, ids_keep), ids_restore, grid)
        loss = self.forward_loss(images, pred, masked)
        return MethodOutput(loss, self.previews(images, pred.detach(), masked, grid))

    @torch.no_grad()
    def previews(self, images: Tensor, pred: Tensor, masked: Tensor, grid: Sequence[int]) -> dict[str, Tensor]:
        """``(B, 1, *patch)`` preview volumes: input, masked input (removed patches 0), reconstruction
        (predicted removed patches, visible patches pasted from the input; de-normalised per patch under
        ``norm_pix_loss``) and target, first channel."""
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            raw = self.patchify(images.float())
            pred = pred * (raw.var(dim=-1, keepdim=True) + 1e-6).sqrt() + raw.mean(dim=-1, keepdim=True)
        p = self.patch_size
        hidden = self.unpatchify(masked.unsqueeze(-1).expand(-1, -1, p ** 3), grid)  # (B, 1, *patch), 1 = removed
        recon = self.unpatchify(pred, grid)
        x = images[:, :1].float()
        return {
            "input": x,
            "masked": x * (1.0 - hidden),
            "reconstruction": torch.lerp(x, recon[:, :1], hidden),
            "target": x,
        }

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The pre-trained encoder (keys ``encoder.*``); the MAE decoder and mask token are left out."""
        return self.network.state_dict()
