"""Helpers shared by the phantom kinds: smooth random fields, rotations, index boxes, textures and
noise, orientation (axis permutation/flip) of a RAS grid and its affine, quantisation, the X-ray
nanotomography acquisition of the ``nuclei`` and ``axons`` kinds, and argument checks."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def _smooth_field(
    rng: np.random.Generator, coords: tuple[np.ndarray, np.ndarray, np.ndarray], n_basis: int,
    k_center: float = 0.0, k_width: float = 2.0,
) -> np.ndarray:
    """Random smooth field (float32, unit std on the grid) on the grid spanned by three 1-D
    coordinate arrays in about [-1, 1]. A tensor product of cosine bases (wavelength 4/k) with
    Gaussian spectral weights around radial frequency ``k_center``: a band-limited field computed
    with three matrix products instead of a full-resolution filter or zoom."""
    k = np.arange(n_basis, dtype=np.float32)
    kr = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    weight = np.exp(-(((kr - k_center) / k_width) ** 2)).astype(np.float32)
    coef = rng.standard_normal((n_basis,) * 3, dtype=np.float32) * weight
    coef[0, 0, 0] = 0.0
    bx, by, bz = (np.cos(np.pi * k[None, :] * (np.asarray(c, np.float32)[:, None] + 1.0) / 2.0) for c in coords)
    t = np.tensordot(bz, coef, axes=([1], [2]))  # (nz, K, K)
    t = np.tensordot(by, t, axes=([1], [2]))  # (ny, nz, K)
    f = np.tensordot(bx, t, axes=([1], [2]))  # (nx, ny, nz)
    std = float(f[::2, ::2, ::2].std())
    return (f / max(std, 1e-6)).astype(np.float32, copy=False)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _small_rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """Rotation about a random axis by an angle ~ N(0, degrees)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.normal(0.0, degrees))
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _frame_with_axis(rng: np.random.Generator, axis: np.ndarray) -> np.ndarray:
    """Rotation whose first column is ``axis`` (normalised), random roll about it."""
    e1 = axis / max(np.linalg.norm(axis), 1e-9)
    m = _random_rotation(rng)
    e2 = m[:, 0] - e1 * (m[:, 0] @ e1)
    if np.linalg.norm(e2) < 1e-6:
        e2 = m[:, 1] - e1 * (m[:, 1] @ e1)
    e2 /= np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)


def _box(center: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice, slice] | None:
    """Index box ``center +- half`` clipped to ``shape``; None when empty."""
    lo = np.maximum(np.floor(center - half).astype(int), 0)
    hi = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _box_coords(box: tuple[slice, ...], origin: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """World coordinates (broadcastable 1-D arrays) of the voxel centres in ``box``."""
    out = []
    for a, s in enumerate(box):
        shape = [1, 1, 1]
        shape[a] = s.stop - s.start
        out.append((origin[a] + np.arange(s.start, s.stop) * spacing[a]).astype(np.float32).reshape(shape))
    return out


def _quantise(x: np.ndarray, lo: float = 0.0, hi: float = 32767.0) -> np.ndarray:
    """Round to integers in [lo, hi] (the int16 range of the stored images), keep float32."""
    return np.clip(np.rint(x), lo, hi).astype(np.float32)


def _random_orientation(rng: np.random.Generator, p_ras: float) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Axis permutation (disk axis d holds world axis perm[d]) and flips; RAS with probability p_ras."""
    if rng.random() < p_ras:
        return (0, 1, 2), (False, False, False)
    perm = tuple(int(a) for a in rng.permutation(3))
    flips = tuple(bool(f) for f in rng.random(3) < 0.5)
    if perm == (0, 1, 2) and not any(flips):
        flips = (True, False, False)
    return perm, flips  # type: ignore[return-value]


def _orient(ras: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """RAS-ordered array (spatial axes last) -> on-disk voxel order."""
    lead = ras.ndim - 3
    out = ras.transpose(tuple(range(lead)) + tuple(lead + p for p in perm))
    for d, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=lead + d)
    return np.ascontiguousarray(out)


def _oriented_affine(origin: np.ndarray, spacing: np.ndarray, shape: tuple[int, ...],
                     perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """Affine of the on-disk array made by :func:`_orient` from a RAS grid whose voxel ``i`` along
    world axis ``a`` sits at ``origin[a] + i * spacing[a]`` mm."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for d, a in enumerate(perm):
        sign = -1.0 if flips[d] else 1.0
        affine[a, d] = sign * spacing[a]
        affine[a, 3] = origin[a] + ((shape[a] - 1) * spacing[a] if flips[d] else 0.0)
    return affine


def _texture(rng: np.random.Generator, shape: tuple[int, ...], fine: float, coarse: float) -> np.ndarray:
    """Band-pass noise (difference of Gaussians of white noise), float32 with unit std."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    t = ndimage.gaussian_filter(noise, fine) - ndimage.gaussian_filter(noise, coarse)
    return t / max(float(t.std()), 1e-6)


def _ring_artifacts(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Tomographic ring artifacts: concentric rings around a rotation axis along the last axis,
    float32 (X, Y, 1)."""
    nx, ny = shape[0], shape[1]
    cx, cy = (nx - 1) / 2 + rng.normal(0, nx * 0.05), (ny - 1) / 2 + rng.normal(0, ny * 0.05)
    r = np.sqrt((np.arange(nx)[:, None] - cx) ** 2 + (np.arange(ny)[None, :] - cy) ** 2)
    n_r = int(r.max()) + 2
    profile = np.where(rng.random(n_r) < 0.12, rng.normal(0, amplitude, n_r), 0.0)
    profile = ndimage.gaussian_filter1d(profile, 0.6)
    return profile[np.rint(r).astype(int)].astype(np.float32)[:, :, None]


def _check_shape(shape: tuple[int, int, int] | None, minimum: int, what: str) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < minimum:
        raise ValueError(f"{what}: shape must be three sizes >= {minimum} voxels, got {shape}")
    return shape  # type: ignore[return-value]


def _ellipsoid_e(qx, qy, qz, c, a) -> np.ndarray:
    """Squared normalised ellipsoid radius of the points (qx, qy, qz) (nominal mm)."""
    return ((qx - c[0]) / a[0]) ** 2 + ((qy - c[1]) / a[1]) ** 2 + ((qz - c[2]) / a[2]) ** 2


def _xnt_acquisition(rng: np.random.Generator, img: np.ndarray, blur: float, rings: float,
                     noise: tuple[float, float]) -> np.ndarray:
    """X-ray nanotomography acquisition of a tissue image (arbitrary units): point-spread blur
    (``blur`` voxels), ring artifacts of amplitude ``rings``, Gaussian noise with a std drawn in
    ``noise``, then a random grey-value offset and gain, quantised to integers."""
    img = ndimage.gaussian_filter(img, blur)
    img += _ring_artifacts(rng, img.shape, rings)
    img += rng.uniform(*noise) * rng.standard_normal(img.shape, dtype=np.float32)
    return _quantise(rng.uniform(900, 1100) + rng.uniform(160, 220) * img)


def _xnt_affine(shape: tuple[int, ...], spacing: float = 1.0) -> np.ndarray:
    """RAS affine (4x4, mm) of an isotropic grid of ``shape`` voxels centred on the origin."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    return affine
