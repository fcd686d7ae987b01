"""Batched spatial augmentation of patches on their device: rotation, scaling, mirroring.

The S3D recipe uses "minor spatial augmentation" (:class:`volssl.config.AugmentConfig`): each
sample is rotated (probability ``p_rotation``, each axis uniformly in +-``rotation_deg``), scaled
isotropically (probability ``p_scale``, factor uniform in ``scale_range``; > 1 enlarges the
content) and mirrored along each axis (probability ``p_mirror`` per axis). Rotation and scaling
are one trilinear resampling (``affine_grid`` + ``grid_sample``, zeros outside); samples drawn
without them are not resampled at all, and mirroring is an exact flip.

Elastic deformation (probability ``p_elastic``; AMAES/Yucca/batchgenerators semantics): a
displacement field, per axis uniform in [-1, 1] per voxel, Gaussian-smoothed (``sigma`` voxels,
zero outside the patch, kernel truncated at 4 sigma) and multiplied by ``alpha`` (voxels), is added
to the output voxel positions before the rotation/scaling: the input is sampled at
``M @ (p + d(p))`` in one ``grid_sample`` with the affine part. The smoothing runs on a grid of
``s``-voxel blocks (``s = floor(sigma_lo / 4)``; the blocks' sums of uniform noise are drawn as
Gaussians of the same variance) and is upsampled trilinearly: a 128^3 field costs three small
matrix products instead of a 201-tap convolution per axis (see :func:`elastic_displacement`). Its
randomness is drawn after the rotation/scaling/mirroring draws and only when ``p_elastic > 0``, so
configurations without it draw exactly the old streams.

Data-parallel equivalence: the parameters are drawn for the whole *global* batch (``global_batch``
rows) from a CPU ``torch.Generator`` and each rank keeps rows ``[sample_offset, sample_offset + B)``,
so W processes augment every sample exactly as one process does.

:func:`intensity_augment` adds nnU-Net-like intensity augmentation (noise, blur, brightness,
contrast, low resolution, gamma; :class:`IntensityConfig`) with the same global-batch drawing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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
    centre), "resample": (n,) bool (rotation or scaling drawn), "flip": (n, 3) bool}``; when
    ``cfg.p_elastic > 0`` also ``"elastic"`` (n,) bool, ``"elastic_alpha"``, ``"elastic_sigma"`` (n,)
    float64 (voxels), ``"elastic_seed"`` (n,) int64 (noise of the field) and ``"elastic_block"``
    (n,) int64 (block side of the smoothing grid, :func:`elastic_block_size` of ``sigma_lo``).
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
    _check_elastic(cfg)
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
    params = {"matrix": matrix, "resample": rotate | scale, "flip": flip}
    if cfg.p_elastic > 0:  # drawn after the others (and only when used): older streams stay unchanged
        e = torch.rand(n, 3, generator=g, dtype=torch.float64)
        (alo, ahi), (slo, shi) = cfg.elastic_alpha, cfg.elastic_sigma
        params["elastic"] = e[:, 0] < cfg.p_elastic
        params["elastic_alpha"] = alo + (ahi - alo) * e[:, 1]
        params["elastic_sigma"] = slo + (shi - slo) * e[:, 2]
        params["elastic_seed"] = torch.randint(0, 2**62, (n,), generator=g)
        params["elastic_block"] = torch.full((n,), elastic_block_size(slo), dtype=torch.int64)
    return params


# --------------------------------------------------------------------------- elastic deformation
_ELASTIC_COARSE_SIGMA = 4.0  # the smoothing grid's blocks are at most sigma / 4 voxels wide


def elastic_block_size(sigma: float) -> int:
    """Side ``s`` (voxels) of the blocks on which a field smoothed with ``sigma`` (voxels) is built:
    ``max(1, floor(sigma / 4))`` (5 for the AMAES sigma 20-30)."""
    return max(1, int(float(sigma) // _ELASTIC_COARSE_SIGMA))


def _check_elastic(cfg: AugmentConfig) -> None:
    if not 0.0 <= cfg.p_elastic <= 1.0:
        raise ValueError(f"augment.p_elastic must lie in [0, 1], got {cfg.p_elastic}")
    alo, ahi = cfg.elastic_alpha
    if not 0.0 <= alo <= ahi:
        raise ValueError(f"augment.elastic_alpha must satisfy 0 <= lo <= hi, got {cfg.elastic_alpha}")
    slo, shi = cfg.elastic_sigma
    if not 0.0 < slo <= shi:
        raise ValueError(f"augment.elastic_sigma must satisfy 0 < lo <= hi, got {cfg.elastic_sigma}")


def _coarse_smoothing_matrices(n_blocks: int, block: int, sigmas: torch.Tensor) -> torch.Tensor:
    """(R,) sigmas (voxels) -> (R, n, n) float64: block ``j``'s weight in block ``i`` of a Gaussian of
    that sigma sampled at the blocks' centre distance ``block * (i - j)``, normalised like scipy's
    ``gaussian_filter`` kernel on the voxel grid (radius ``int(4 sigma + 0.5)``, zero beyond)."""
    sig = sigmas.to(torch.float64)[:, None]
    radius = torch.floor(4.0 * sig + 0.5)
    taps = torch.arange(0, int(radius.max().item()) + 1, dtype=torch.float64)[None]
    w = torch.exp(-0.5 * (taps / sig) ** 2) * (taps <= radius)
    norm = 2.0 * w.sum(1, keepdim=True) - w[:, :1]  # the voxel kernel's sum over [-radius, radius]
    idx = torch.arange(n_blocks, dtype=torch.float64)
    dist = block * (idx[:, None] - idx[None, :]).abs()[None]  # (1, n, n) voxels
    k = torch.exp(-0.5 * (dist / sig[:, :, None]) ** 2) * (dist <= radius[:, :, None])
    return k / norm[:, :, None]


def elastic_displacement(shape: tuple[int, int, int], alpha: torch.Tensor, sigma: torch.Tensor,
                         seeds: torch.Tensor, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Smoothed random displacement fields (voxels) for R samples: ``(R, 3, X, Y, Z)`` float32.

    Semantics of batchgenerators/Yucca ``deform_coordinate_matrix``: per axis, noise uniform in
    [-1, 1] per voxel, ``scipy.ndimage.gaussian_filter(noise, sigma, mode="constant")`` (zero outside
    the patch, kernel radius ``int(4 sigma + 0.5)``), times ``alpha``. Computed on a grid of
    ``block``-voxel blocks: each block's noise sum is drawn as a Gaussian of the same variance
    (count / 3; the sum of >= 125 uniforms), smoothed there with the Gaussian sampled at block
    distances (three batched ``(n, n)`` matrix products per field) and upsampled trilinearly to the
    voxels. Covariances at block centres match the voxel-level filter's within 1% for the AMAES
    sigma (the std between centres is at most ~1.2% lower; tests/training/test_augment.py). With the
    AMAES alpha/sigma the RMS displacement is 0.1-0.6 voxel per axis. The noise of sample ``r``
    comes from a CPU generator seeded with ``seeds[r]``: the field does not depend on the batch
    composition or the device.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"elastic_displacement: shape must be 3 positive sizes, got {shape}")
    if block < 1:
        raise ValueError(f"elastic_displacement: block must be >= 1, got {block}")
    r = int(alpha.shape[0])
    if sigma.shape[0] != r or seeds.shape[0] != r:
        raise ValueError("elastic_displacement: alpha, sigma and seeds must have one row per sample")
    n = [-(-size // block) for size in shape]  # blocks per axis (the last one may be partial)
    counts = []
    for size, nb in zip(shape, n):
        c = torch.full((nb,), float(block), dtype=torch.float64)
        c[-1] = size - block * (nb - 1)
        counts.append(c)
    std = (counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :] / 3.0).sqrt()
    noise = torch.stack([torch.randn(3, *n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                         for s in seeds.tolist()]) if r else torch.zeros(0, 3, *n, dtype=torch.float64)
    field = noise * std  # block sums of U[-1, 1] noise: variance count / 3
    kx, ky, kz = (_coarse_smoothing_matrices(nb, block, sigma) for nb in n)
    field = torch.einsum("rij,rajkl->raikl", kx, field)
    field = torch.einsum("rij,rakjl->rakil", ky, field)
    field = torch.einsum("rij,raklj->rakli", kz, field)
    field = (field * alpha.to(torch.float64)[:, None, None, None, None]).to(device=device, dtype=torch.float32)
    if block > 1:  # block centres sit at block * (i + 1/2) - 1/2: align_corners=False upsampling
        field = F.interpolate(field, size=[block * nb for nb in n], mode="trilinear", align_corners=False)
    return field[:, :, :shape[0], :shape[1], :shape[2]].contiguous()


def apply_spatial(images: torch.Tensor, params: dict[str, torch.Tensor], labels: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Apply parameters from :func:`draw_spatial_params` (one row per sample) to a batch.

    ``images``: float (B, C, X, Y, Z), resampled trilinearly; ``labels``: optional integer
    (B, 1, X, Y, Z), resampled with nearest neighbour. Rows with a rotation/scaling or an elastic
    deformation are resampled once, at ``matrix @ (p + d(p))`` for output offset ``p`` and elastic
    displacement ``d`` (:func:`elastic_displacement`). Returns the augmented images (and labels).
    """
    if images.ndim != 5:
        raise ValueError(f"apply_spatial: images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    b = images.shape[0]
    if params["matrix"].shape[0] != b:
        raise ValueError(f"apply_spatial: {params['matrix'].shape[0]} parameter rows for a batch of {b}")
    if labels is not None and (labels.shape[0] != b or labels.shape[2:] != images.shape[2:]):
        raise ValueError(f"apply_spatial: labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    out, lab = images, labels
    elastic = params.get("elastic")
    resample = params["resample"] if elastic is None else params["resample"] | elastic
    rows = torch.nonzero(resample).flatten().tolist()
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
        theta = theta.to(device=images.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(sub.shape), align_corners=True)
        if elastic is not None and bool(elastic[rows].any()):
            grid = _add_elastic(grid, theta, params, rows, tuple(images.shape[2:]), h)
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


def _add_elastic(grid: torch.Tensor, theta: torch.Tensor, params: dict[str, torch.Tensor], rows: list[int],
                 shape: tuple[int, int, int], half_wzyx: torch.Tensor) -> torch.Tensor:
    """Add the elastic displacement of the deformed ``rows`` to their affine ``grid`` (R, X, Y, Z, 3):
    the input is sampled at ``theta @ (u + d / half)`` (deformation before rotation/scaling)."""
    sel = [k for k, row in enumerate(rows) if bool(params["elastic"][row])]
    src = torch.tensor([rows[k] for k in sel])
    blocks = params["elastic_block"][src].unique()
    if blocks.numel() != 1:
        raise ValueError(f"apply_spatial: rows of one batch must share elastic_block, got {blocks.tolist()}")
    disp = elastic_displacement(shape, params["elastic_alpha"][src], params["elastic_sigma"][src],
                                params["elastic_seed"][src], int(blocks.item()), grid.device)  # (R', 3, X, Y, Z)
    d = disp.flip(1).permute(0, 2, 3, 4, 1)  # (R', X, Y, Z, 3) in grid order (Z, Y, X)
    d = d / half_wzyx.to(device=grid.device, dtype=grid.dtype)
    k = torch.tensor(sel, device=grid.device)
    grid = grid.clone()
    grid[k] = grid[k] + torch.einsum("rij,rxyzj->rxyzi", theta[k, :, :3], d)
    return grid


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


# --------------------------------------------------------------------------- intensity augmentation
@dataclass
class IntensityConfig:
    """nnU-Net-like intensity augmentation (the probabilities and ranges of nnU-Net v2's default
    trainer), applied after the spatial augmentation to the images only. Each probability ``p_*`` is
    per sample; ``p_*_channel`` then selects channels of a chosen sample."""

    enabled: bool = False
    p_noise: float = 0.1  # additive Gaussian noise, variance ~ U[noise_variance] per sample
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2  # Gaussian blur, sigma ~ U[blur_sigma] per channel and axis (voxels)
    p_blur_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15  # multiplicative brightness, factor per channel
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15  # contrast about the channel mean, clipped to the channel's range
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_low_res: float = 0.25  # nearest downsampling by a zoom factor, trilinear upsampling back
    p_low_res_channel: float = 0.5
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1  # gamma of the inverted image (statistics kept)
    p_gamma: float = 0.3  # gamma (statistics kept)
    gamma_range: tuple[float, float] = (0.7, 1.5)


_N_INTENSITY_DRAWS = 20  # uniforms per (sample, channel); the layout is fixed, whatever the switches


def _check_intensity(cfg: IntensityConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
            raise ValueError(f"intensity.{f.name} must lie in [0, 1], got {value}")
        if isinstance(value, tuple) and not (len(value) == 2 and 0 <= value[0] <= value[1]):
            raise ValueError(f"intensity.{f.name} must be (lo, hi) with 0 <= lo <= hi, got {value}")
    if cfg.low_res_zoom[0] <= 0 or cfg.low_res_zoom[1] > 1:
        raise ValueError(f"intensity.low_res_zoom must lie in (0, 1], got {cfg.low_res_zoom}")
    if cfg.gamma_range[0] <= 0:
        raise ValueError(f"intensity.gamma_range must be positive, got {cfg.gamma_range}")


def gaussian_blur(volume: torch.Tensor, sigma: tuple[float, float, float], truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of one ``(X, Y, Z)`` volume, ``sigma`` in voxels per axis, kernel radius
    ``int(truncate * sigma + 0.5)`` and mirrored borders (scipy's ``gaussian_filter(mode="mirror")``)."""
    out = volume[None, None]
    for axis, s in enumerate(sigma):
        radius = min(int(truncate * float(s) + 0.5), volume.shape[axis] - 1)
        if s <= 0 or radius < 1:
            continue
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (x / float(s)) ** 2)
        k = (k / k.sum()).to(device=volume.device, dtype=volume.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="reflect"), k.view(shape))
    return out[0, 0]


def _gamma(x: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    """Gamma of one channel rescaled to [0, 1], mapped back to its range, mean and std kept."""
    x = -x if invert else x
    mean, std = x.mean(), x.std()
    lo, span = x.min(), x.max() - x.min()
    y = ((x - lo) / (span + 1e-7)).pow(gamma) * (span + 1e-7) + lo
    y = (y - y.mean()) / (y.std() + 1e-8) * std + mean
    return -y if invert else y


def intensity_augment(images: torch.Tensor, cfg: IntensityConfig, generator: torch.Generator | None = None,
                      sample_offset: int = 0, global_batch: int | None = None) -> torch.Tensor:
    """nnU-Net-like intensity augmentation of a (local) batch ``(B, C, X, Y, Z)`` of z-scored images.

    In order: Gaussian noise, Gaussian blur, brightness, contrast, simulated low resolution, inverted
    gamma, gamma (see :class:`IntensityConfig`). The parameters are drawn for the whole global batch
    from ``generator`` (a CPU generator; None: the global RNG) in a fixed layout and each rank keeps
    rows ``[sample_offset, sample_offset + B)``; noise fields come from a per-sample generator on the
    images' device. Returns a new tensor (``images`` itself when disabled).
    """
    if not cfg.enabled:
        return images
    _check_intensity(cfg)
    if images.ndim != 5:
        raise ValueError(f"intensity_augment: images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    b, c = images.shape[:2]
    total = b if global_batch is None else int(global_batch)
    if sample_offset < 0 or sample_offset + b > total:
        raise ValueError(f"intensity_augment: rows [{sample_offset}, {sample_offset + b}) outside a global batch of {total}")
    u = torch.rand(total, c, _N_INTENSITY_DRAWS, generator=generator, dtype=torch.float64)[sample_offset:sample_offset + b]
    seeds = torch.randint(0, 2**62, (total,), generator=generator)[sample_offset:sample_offset + b]

    def pick(value: torch.Tensor, bounds: tuple[float, float]) -> float:
        return float(bounds[0] + (bounds[1] - bounds[0]) * value)

    out = images.clone()
    spatial = images.shape[2:]
    for i in range(b):
        s = u[i, 0]  # per-sample coins live in channel 0's draws
        if s[0] < cfg.p_noise:
            std = pick(s[1], cfg.noise_variance) ** 0.5
            gen = torch.Generator(device=images.device).manual_seed(int(seeds[i]))
            out[i] += std * torch.randn(out[i].shape, generator=gen, device=images.device, dtype=out.dtype)
        for ch in range(c):
            d = u[i, ch]
            x = out[i, ch]
            if s[2] < cfg.p_blur and d[3] < cfg.p_blur_channel:
                x = gaussian_blur(x, tuple(pick(d[k], cfg.blur_sigma) for k in (4, 5, 6)))
            if s[7] < cfg.p_brightness:
                x = x * pick(d[8], cfg.brightness_range)
            if s[9] < cfg.p_contrast:
                mean, lo, hi = x.mean(), x.min(), x.max()
                x = ((x - mean) * pick(d[10], cfg.contrast_range) + mean).clamp(lo, hi)
            if s[11] < cfg.p_low_res and d[12] < cfg.p_low_res_channel:
                zoom = pick(d[13], cfg.low_res_zoom)
                small = [max(1, round(n * zoom)) for n in spatial]
                low = F.interpolate(x[None, None], size=small, mode="nearest")
                x = F.interpolate(low, size=tuple(spatial), mode="trilinear", align_corners=False)[0, 0]
            for coin, which, invert in ((cfg.p_gamma_inverted, 14, True), (cfg.p_gamma, 17, False)):
                if s[which] < coin:
                    lo, hi = cfg.gamma_range
                    below = d[which + 1] < 0.5 and lo < 1  # nnU-Net: gamma < 1 half of the time
                    gamma = pick(d[which + 2], (lo, min(hi, 1.0)) if below else (max(lo, 1.0), hi))
                    x = _gamma(x, gamma, invert)
            out[i, ch] = x
    return out
