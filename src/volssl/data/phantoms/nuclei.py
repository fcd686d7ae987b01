"""The ``nuclei`` kind: X-ray-nanotomography-like neuropil with cell nuclei (semantic label)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.fields import (
    _box,
    _box_coords,
    _check_shape,
    _random_rotation,
    _texture,
    _xnt_acquisition,
    _xnt_affine,
)

# tissue classes of the nuclei phantom
NUCLEI_TISSUES = ("neuropil", "soma", "nucleus", "vessel", "mimic")


def _ellipsoid_box(center: np.ndarray, semi: np.ndarray, frame: np.ndarray, shape: tuple[int, ...], pad: float = 1.0):
    """Box around a rotated ellipsoid and its normalised radius ``rho`` inside the box (float32)."""
    box = _box(center, np.full(3, semi.max() + pad), shape)
    if box is None:
        return None, None
    bx, by, bz = _box_coords(box, np.zeros(3), np.ones(3))
    d = [bx - np.float32(center[0]), by - np.float32(center[1]), bz - np.float32(center[2])]
    loc = [(frame[0, j] * d[0] + frame[1, j] * d[1] + frame[2, j] * d[2]) / np.float32(semi[j]) for j in range(3)]
    return box, np.sqrt(loc[0] ** 2 + loc[1] ** 2 + loc[2] ** 2)


def nuclei_case(rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> PhantomCase:
    """One X-ray-nanotomography-like volume of neuropil with cell nuclei.

    ``shape`` (default 128^3): voxels, isotropic 1 mm spacing, RAS affine. Nuclei have semi-axes of
    about 5-13 voxels whatever the shape, so their number grows with the volume. Returns images
    (1, X, Y, Z) ("XNT"), label uint8 {0 background, 1 nucleus}, tissue (names :data:`NUCLEI_TISSUES`).
    """
    shape = _check_shape(shape, 16, "nuclei_case") or (128, 128, 128)
    size = np.array(shape, dtype=float)
    img = _texture(rng, shape, 0.7, 2.0)  # membranes and processes of the neuropil
    img += 0.5 * _texture(rng, shape, 2.5, 6.0)
    organelles = ndimage.gaussian_filter((rng.random(shape) < 0.002).astype(np.float32), 1.0)
    img -= 2.5 * (organelles > 0.02)  # dark puncta (mitochondria, myelinated profiles)
    chromatin = _texture(rng, shape, 0.8, 3.0)
    tissue = np.zeros(shape, np.uint8)
    label = np.zeros(shape, np.uint8)

    # cells: non-overlapping somata, each with a nucleus
    cells: list[tuple[np.ndarray, float]] = []
    target = 0.12 * float(np.prod(size))
    volume = 0.0
    for _ in range(1000):
        if volume >= target:
            break
        semi = rng.uniform(8.0, 13.0) * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.6, 0.9)])
        soma = semi * rng.uniform(1.5, 1.8)
        c = rng.uniform(-0.3 * soma[0], size - 1 + 0.3 * soma[0])
        if any(np.linalg.norm(c - c2) < soma[0] + r2 + 2.0 for c2, r2 in cells):
            continue
        cells.append((c, soma[0]))
        volume += 4.19 * float(np.prod(semi))
        frame = _random_rotation(rng)
        box, rho = _ellipsoid_box(c + rng.normal(0, 1.5, 3), soma, frame, shape)
        if box is not None:  # cytoplasm: smoother, slightly brighter, a few organelles
            m = rho < 1.0
            img[box][m] = 0.5 + 0.4 * img[box][m]
            tissue[box][m] = 1
        box, rho = _ellipsoid_box(c, semi, frame, shape)
        if box is None:
            continue
        nucleus = rho < 1.0
        hetero = rng.uniform(0.3, 1.0)  # glia: dense chromatin, neurons: pale nuclei
        val = 1.0 + 0.3 * chromatin[box] - hetero * 1.5 * (chromatin[box] > 0.9) * (rho > 0.6)
        val = np.where(rho > 0.88, -1.0, val)  # envelope
        nucleolus_c = c + frame @ (semi * rng.uniform(-0.35, 0.35, 3))
        nb, nrho = _ellipsoid_box(nucleolus_c, np.full(3, semi.min() * rng.uniform(0.2, 0.3)), np.eye(3), shape)
        img[box][nucleus] = val[nucleus]
        tissue[box][nucleus] = 2
        label[box][nucleus] = 1
        if nb is not None:
            m = (nrho < 1.0) & (label[nb] == 1)
            img[nb][m] = -1.6
    # mimics: nucleus-sized bright homogeneous bodies (no envelope, no chromatin), not labelled
    for _ in range(int(rng.integers(1, 4)) * max(1, int(np.prod(size) // 128**3))):
        semi = rng.uniform(4.0, 9.0) * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)])
        c = rng.uniform(0, size - 1)
        box, rho = _ellipsoid_box(c, semi, _random_rotation(rng), shape)
        if box is None:
            continue
        m = (rho < 1.0) & (label[box] == 0)
        img[box][m] = 1.0 + 0.15 * chromatin[box][m]
        tissue[box][m] = 4
    # a blood vessel: bright (empty) lumen, dark wall
    if rng.random() < 0.7:
        direction = _random_rotation(rng)[:, 0]
        p0 = rng.uniform(0.2, 0.8, 3) * size
        r_v = rng.uniform(3.0, 6.0)
        grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T - p0.astype(np.float32)
        dist = np.linalg.norm(grid - np.outer(grid @ direction.astype(np.float32), direction), axis=1).reshape(shape)
        wall = (dist < r_v + 1.5) & (label == 0)
        img[wall] = -1.8
        tissue[wall] = 3
        lumen = (dist < r_v) & (label == 0)
        img[lumen] = 2.2
        del grid, dist
    # acquisition: point-spread blur, ring artifacts, noise
    img = _xnt_acquisition(rng, img, blur=0.6, rings=0.35, noise=(0.2, 0.35))
    return PhantomCase(
        images=img[None],
        label=label,
        affine=_xnt_affine(shape),
        channel_names=("XNT",),
        tissue=tissue,
        tissue_names=NUCLEI_TISSUES,
    )
