"""Batched spatial augmentation of patches on their device: rotation, scaling, mirroring.

The S3D recipe uses "minor spatial augmentation" (:class:`volssl.config.AugmentConfig`): each
sample is rotated (probability ``p_rotation``, each axis uniformly in +-``rotation_deg``), scaled
isotropically (probability ``p_scale``, factor uniform in ``scale_range``; > 1 enlarges the
content) and mirrored along each axis (probability ``p_mirror`` per axis). Rotation and scaling
are one trilinear resampling (``affine_grid`` + ``grid_sample``, zeros outside); samples drawn
without them are not resampled at all, and mirroring is an exact flip.

Data-parallel equivalence: the parameters are drawn for the whole *global* batch (``global_batch``
rows) from a CPU ``torch.Generator`` and each rank keeps rows ``[sample_offset, sample_offset + B)``,
so W processes augment every sample exactly as one process does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from volssl.config import AugmentConfig


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(N, 3) angles in radians about axes 0, 1, 2 -> (N, 3, 3) rotations R = R2 @ R1 @ R0."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    r0 = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    r1 = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    r2 = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return r2 @ r1 @ r0


def draw_spatial_params(n: int, cfg: AugmentConfig, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random parameters for ``n`` samples, drawn on the CPU in a fixed order.

    Returns ``{"matrix": (n, 3, 3) float64 map from output to input voxel offsets (about the patch
    centre), "resample": (n,) bool (rotation or scaling drawn), "flip": (n, 3) bool}``.
    """
    if n < 0:
        raise ValueError(f"draw_spatial_params: n must be >= 0, got {n}")
    lo, hi = cfg.scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"augment.scale_range must satisfy 0 < lo <= hi, got {cfg.scale_range}")
    for name in ("p_rotation", "p_scale", "p_mirror"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.{name} must lie in [0, 1], got {p}")
    g = generator
    u = torch.rand(n, 9, generator=g, dtype=torch.float64)  # one draw per use, same order for any n
    rotate = u[:, 0] < cfg.p_rotation
    scale = u[:, 1] < cfg.p_scale
    flip = u[:, 2:5] < cfg.p_mirror
    max_angle = math.radians(cfg.rotation_deg)
    angles = (2.0 * u[:, 5:8] - 1.0) * max_angle * rotate[:, None]
    factor = torch.where(scale, lo + (hi - lo) * u[:, 8], torch.ones_like(u[:, 8]))
    # output voxel offset p (from the centre) samples the input at R @ p / factor
    matrix = _rotation_matrices(angles) / factor[:, None, None]
    return {"matrix": matrix, "resample": rotate | scale, "flip": flip}


def apply_spatial(images: torch.Tensor, params: dict[str, torch.Tensor], labels: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Apply parameters from :func:`draw_spatial_params` (one row per sample) to a batch.

    ``images``: float (B, C, X, Y, Z), resampled trilinearly; ``labels``: optional integer
    (B, 1, X, Y, Z), resampled with nearest neighbour. Returns the augmented images (and labels).
    """
    if images.ndim != 5:
        raise ValueError(f"apply_spatial: images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    b = images.shape[0]
    if params["matrix"].shape[0] != b:
        raise ValueError(f"apply_spatial: {params['matrix'].shape[0]} parameter rows for a batch of {b}")
    if labels is not None and (labels.shape[0] != b or labels.shape[2:] != images.shape[2:]):
        raise ValueError(f"apply_spatial: labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    out, lab = images, labels
    rows = torch.nonzero(params["resample"]).flatten().tolist()
    if rows:
        size = torch.tensor(images.shape[2:], dtype=torch.float64)
        half = (size - 1) / 2  # align_corners=True: normalised coordinate u = offset / half
        # grid_sample's coordinate order is (W, H, D) = (Z, Y, X): reverse our axes
        perm = [2, 1, 0]
        m = params["matrix"][rows][:, perm][:, :, perm]
        h = half[perm]
        theta = (m / h[None, :, None]) * h[None, None, :]  # D^-1 M D in normalised coordinates
        theta = torch.cat([theta, torch.zeros(len(rows), 3, 1, dtype=theta.dtype)], dim=2)
        idx = torch.tensor(rows, device=images.device)
        sub = images.index_select(0, idx)
        grid = F.affine_grid(theta.to(device=images.device, dtype=torch.float32), list(sub.shape), align_corners=True)
        out = images.clone()
        out[idx] = F.grid_sample(sub.float(), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=True).to(images.dtype)
        if labels is not None:
            lsub = labels.index_select(0, idx).float()
            lab = labels.clone()
            lab[idx] = F.grid_sample(lsub, grid, mode="nearest", padding_mode="zeros",
                                     align_corners=True).to(labels.dtype)
    flips = params["flip"]
    if bool(flips.any()):
        out = out.clone() if out is images else out
        if labels is not None:
            lab = lab.clone() if lab is labels else lab
        for i in range(b):
            dims = [1 + a for a in range(3) if bool(flips[i, a])]  # spatial axes of one (C, X, Y, Z) sample
            if dims:
                out[i] = torch.flip(out[i], dims=dims)
                if labels is not None:
                    lab[i] = torch.flip(lab[i], dims=dims)
    return out if labels is None else (out, lab)


def spatial_augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
                    sample_offset: int = 0, global_batch: int | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Augment a (local) batch (B, C, X, Y, Z) that is rows ``[sample_offset, sample_offset + B)`` of
    a global batch of ``global_batch`` samples (default: B, offset 0).

    Parameters come from ``generator`` (a CPU ``torch.Generator``; None: the global torch RNG).
    Returns ``images`` unchanged when ``cfg.enabled`` is False.
    """
    if not cfg.enabled:
        return images if labels is None else (images, labels)
    b = images.shape[0]
    total = b if global_batch is None else int(global_batch)
    if sample_offset < 0 or sample_offset + b > total:
        raise ValueError(f"spatial_augment: rows [{sample_offset}, {sample_offset + b}) outside a global batch of {total}")
    params = draw_spatial_params(total, cfg, generator)
    params = {k: v[sample_offset:sample_offset + b] for k, v in params.items()}
    return apply_spatial(images, params, labels)
