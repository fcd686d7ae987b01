"""The ``axons`` kind: X-ray-nanotomography-like bundles of myelinated axons (instance label).

:func:`axons_case` places the axons' centre lines bundle by bundle (:func:`_place_axons`),
rasterises axoplasm and sheaths (:func:`_rasterise_axons`), keeps one connected tube per axon
(:func:`_single_tubes`) and renders and acquires the image (:func:`_axon_image`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.fields import _check_shape, _random_rotation, _texture, _xnt_acquisition, _xnt_affine

# tissue classes of the axons phantom
AXON_TISSUES = ("background", "axoplasm", "myelin")
#: amplitude (voxels) of an axon's own wobble, on top of its bundle's
_OWN_AMP = 0.5
#: minimum gap (voxels) between the sheaths of two axons
_GAP = 1.0

#: one axon: centre line (P, 3), inner radius (P,) (voxels), outer/inner radius ratio
_Axon = tuple[np.ndarray, np.ndarray, float]
#: an axon's position in its bundle's cross-section (2,), inner radius, outer/inner radius ratio
_AxonSeat = tuple[np.ndarray, float, float]


def _axon_curve(rng: np.random.Generator, p0: np.ndarray, frame: np.ndarray, wobble: list, length: float,
                r0: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points (P, 3) every 0.5 voxel and inner radius (P,) of one axon running along
    ``frame[:, 0]`` through ``p0``: a line plus lateral sinusoidal wobble (amplitude, wavelength,
    phase, angle in the cross-section); the radius varies smoothly by up to +-10%."""
    t = np.arange(-length, length, 0.5)
    pts = p0[None, :] + t[:, None] * frame[:, 0][None, :]
    for amp, wavelength, phase, angle in wobble:
        lateral = math.cos(angle) * frame[:, 1] + math.sin(angle) * frame[:, 2]
        pts += (amp * np.sin(2 * np.pi * t / wavelength + phase))[:, None] * lateral[None, :]
    radius = r0 * (1.0 + 0.1 * np.sin(2 * np.pi * t / rng.uniform(30, 80) + rng.uniform(0, 2 * np.pi)))
    return pts, radius


def _wobble(rng: np.random.Generator, amplitude: tuple[float, float], n: int) -> list:
    return [(rng.uniform(*amplitude), rng.uniform(50, 200), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))
            for _ in range(n)]


def _bundle_layout(rng: np.random.Generator, b: int,
                   size: np.ndarray) -> tuple[np.ndarray, list, np.ndarray, list[_AxonSeat]]:
    """Bundle ``b``: direction frame (3, 3) (axis in column 0), shared wobble, centre (3,) (voxels),
    and axon positions in its cross-section (2-D dart throwing with spacing that also absorbs the
    axons' own wobble and radius variation). The first bundle fills the volume, later ones are
    narrower."""
    frame = _random_rotation(rng)
    shared = _wobble(rng, (2.0, 6.0), 2)
    centre = size / 2 + rng.normal(0, 0.15, 3) * size
    half = 0.5 * float(np.linalg.norm(size)) if b == 0 else rng.uniform(0.2, 0.35) * size.min()
    xy = np.zeros((0, 2))
    reach = np.zeros(0)
    params = []
    for _ in range(int(3000 * (half / 110.0) ** 2) + 200):
        r_in = float(np.clip(rng.lognormal(math.log(3.0), 0.35), 1.5, 6.0))
        ratio = max(1.0 / rng.uniform(0.6, 0.75), (r_in + 1.0) / r_in)
        p = rng.uniform(-half, half, 2)
        if b > 0 and np.hypot(*p) > half:
            continue
        r = 1.1 * r_in * ratio + _OWN_AMP + _GAP / 2
        if len(xy) and np.any(np.hypot(*(xy - p).T) < reach + r):
            continue
        xy, reach = np.vstack([xy, p]), np.append(reach, r)
        params.append((p, r_in, ratio))
    return frame, shared, centre, params


def _add_bundle(rng: np.random.Generator, axons: list[_Axon],
                layout: tuple[np.ndarray, list, np.ndarray, list[_AxonSeat]], size: np.ndarray,
                length: float) -> None:
    """Append the axons of one bundle (``layout`` from :func:`_bundle_layout`) to ``axons``: centre
    lines of half-length ``length`` clipped to the volume ``size``; axons that would cross one of an
    earlier bundle are dropped."""
    from scipy.spatial import cKDTree

    frame, shared, centre, params = layout
    tree = cKDTree(np.concatenate([a[0] for a in axons])) if axons else None
    outer_prev = np.concatenate([a[1] * a[2] for a in axons] + [np.zeros(1)]) if axons else None
    for p, r_in, ratio in params:
        pts, radius = _axon_curve(rng, centre + frame[:, 1:] @ p, frame, shared + _wobble(rng, (0, _OWN_AMP), 1),
                                  length, r_in)
        outer = radius * ratio
        inside = np.all((pts > -outer[:, None] - 1) & (pts < size - 1 + outer[:, None] + 1), axis=1)
        if inside.sum() < 8:
            continue
        pts, radius, outer = pts[inside], radius[inside], outer[inside]
        if tree is not None:  # other bundles: reject crossings
            dist, j = tree.query(pts[::2], k=8, distance_upper_bound=outer.max() + 11.0 + _GAP)
            if np.any(dist < outer[::2, None] + outer_prev[np.minimum(j, tree.n)] + _GAP):
                continue
        axons.append((pts, radius, ratio))


def _place_axons(rng: np.random.Generator, size: np.ndarray) -> list[_Axon]:
    """Centre lines of the axons of 1-3 bundles crossing a volume of ``size`` (3,) voxels."""
    length = float(np.linalg.norm(size)) * 0.6
    axons: list[_Axon] = []
    bundles = int(rng.integers(1, 4))
    for b in range(bundles):
        _add_bundle(rng, axons, _bundle_layout(rng, b, size), size, length)
    return axons


def _rasterise_axons(axons: list[_Axon], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Owner id (int32, 1-based index into ``axons``), axoplasm and sheath masks (bool), all
    (X, Y, Z), from the nearest centre-line point of every voxel (one distance transform of the
    stamped lines)."""
    pad = 12  # > the largest sheath radius (6 * 1.1 / 0.6)
    padded = tuple(s + 2 * pad for s in shape)
    seeds = np.ones(padded, bool)
    owner = np.zeros(padded, np.int32)
    exact = np.zeros((3,) + padded, np.float32)
    r_in_map = np.zeros(padded, np.float32)
    for k, (pts, radius, ratio) in enumerate(axons, start=1):
        idx = np.rint(pts).astype(int) + pad
        ok = np.all((idx >= 0) & (idx < np.array(padded)), axis=1)
        idx, p, r = idx[ok], pts[ok] + pad, radius[ok]
        seeds[tuple(idx.T)] = False
        owner[tuple(idx.T)] = k
        r_in_map[tuple(idx.T)] = r
        for a in range(3):
            exact[a][tuple(idx.T)] = p[:, a]
    ratios = np.array([1.0] + [a[2] for a in axons], np.float32)
    if not axons:
        return np.zeros(shape, np.int32), np.zeros(shape, bool), np.zeros(shape, bool)
    _, nearest = ndimage.distance_transform_edt(seeds, return_distances=True, return_indices=True)
    crop = tuple(slice(pad, pad + s) for s in shape)
    near = tuple(n[crop] for n in nearest)
    del nearest
    vox = np.indices(shape, dtype=np.float32) + pad
    dist = np.sqrt(sum((vox[a] - exact[a][near]) ** 2 for a in range(3)))
    del vox
    ids, r_in = owner[near], r_in_map[near]
    inner = (dist <= r_in) & (ids > 0)
    sheath = (dist <= r_in * ratios[ids]) & ~inner & (ids > 0)
    return ids, inner, sheath


def _single_tubes(label: np.ndarray) -> np.ndarray:
    """Each axon one connected tube: keep the largest piece of every id of ``label`` (a curve grazing
    a face can split; pieces under 20 voxels are dropped) and renumber 1..K, uint16 (X, Y, Z)."""
    out = np.zeros(label.shape, np.uint16)
    next_id = 1
    for k, sl in enumerate(ndimage.find_objects(label), start=1):
        if sl is None:
            continue
        comp, n = ndimage.label(label[sl] == k)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        if sizes.max() < 20:
            continue
        out[sl][comp == 1 + int(sizes.argmax())] = next_id
        next_id += 1
    return out


def _axon_image(rng: np.random.Generator, shape: tuple[int, int, int], inner: np.ndarray,
                sheath: np.ndarray) -> np.ndarray:
    """The acquired XNT image, float32 (X, Y, Z): neuropil-like texture everywhere (the same mean
    inside axons), dark sheaths, dark organelles, then :func:`_xnt_acquisition`."""
    img = _texture(rng, shape, 0.8, 2.5) * np.float32(0.8)
    img[inner] *= np.float32(0.6)
    img += 0.4 * _texture(rng, shape, 3.0, 8.0)
    img[sheath] = -2.8 + 0.3 * img[sheath]
    organelles = ndimage.gaussian_filter((rng.random(shape) < 0.0015).astype(np.float32), 0.9)
    img -= 1.8 * (organelles > 0.03)
    return _xnt_acquisition(rng, img, blur=0.7, rings=0.3, noise=(0.25, 0.45))


def axons_case(rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> PhantomCase:
    """One X-ray-nanotomography-like volume of myelinated axons with an instance label.

    ``shape`` (default 128^3): voxels, isotropic 1 mm spacing, RAS affine. 1-3 bundles of aligned
    axons (inner radius ~1.5-6 voxels, g-ratio 0.6-0.75) wander smoothly across the volume; the
    axons of a bundle share most of their wobble. Sheaths of different axons stay >= 1 voxel apart.
    Returns images (1, X, Y, Z) ("XNT"), label uint16 (0 background and sheaths, 1..K one id per axon,
    each a single connected tube), tissue (names :data:`AXON_TISSUES`).
    """
    shape = _check_shape(shape, 16, "axons_case") or (128, 128, 128)
    size = np.array(shape, dtype=float)
    axons = _place_axons(rng, size)
    # rasterise: nearest centre-line point of every voxel
    ids, inner, sheath = _rasterise_axons(axons, shape)
    out = _single_tubes(np.where(inner, ids, 0))
    del ids
    tissue = np.zeros(shape, np.uint8)
    tissue[inner] = 1
    tissue[sheath] = 2
    img = _axon_image(rng, shape, inner, sheath)
    return PhantomCase(
        images=img[None],
        label=out,
        affine=_xnt_affine(shape),
        channel_names=("XNT",),
        tissue=tissue,
        tissue_names=AXON_TISSUES,
    )
