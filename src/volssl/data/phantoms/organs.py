"""The ``organs`` kind: CT-like upper abdomens in Hounsfield units with liver, kidneys and spleen.

:func:`organs_case` draws the tissue map in steps, each drawing from the case's random stream in
turn: the grid and deformed coordinates (:func:`_abdomen_grid`), the body wall and ribs
(:func:`_body_wall`), bowel and stomach (:func:`_bowel_and_stomach`), liver and spleen
(:func:`_liver_and_spleen`), muscles, kidneys, great vessels and spine (:func:`_retroperitoneum`),
then the CT image (:func:`_ct_image`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.fields import (
    _check_shape,
    _ellipsoid_e,
    _orient,
    _oriented_affine,
    _quantise,
    _random_orientation,
    _smooth_field,
)

# tissue classes of the CT phantom
ORGAN_TISSUES = ("air", "fat", "muscle", "bone", "marrow", "bowel", "bowel_gas", "fluid", "vessel", "liver",
                 "liver_vessel", "kidney_cortex", "kidney_medulla", "renal_sinus", "spleen")

#: (native, portal-venous) Hounsfield units of :data:`ORGAN_TISSUES` before per-case jitter
_ORGAN_HU = np.array(
    [
        [-1000.0, -1000.0],  # air
        [-100.0, -100.0],  # fat
        [50.0, 55.0],  # muscle
        [750.0, 750.0],  # bone (cortex)
        [230.0, 240.0],  # marrow (cancellous bone)
        [35.0, 80.0],  # bowel wall
        [-850.0, -850.0],  # bowel gas
        [12.0, 15.0],  # fluid
        [42.0, 170.0],  # aorta / vena cava
        [58.0, 108.0],  # liver
        [40.0, 165.0],  # liver vessels
        [34.0, 165.0],  # kidney cortex
        [30.0, 100.0],  # kidney medulla
        [-60.0, -60.0],  # renal sinus fat
        [48.0, 118.0],  # spleen
    ],
    dtype=np.float32,
)
_O = {name: i for i, name in enumerate(ORGAN_TISSUES)}


class _Abdomen:
    """One CT case being drawn: deformed world coordinates ``x``, ``y``, ``z`` (mm, float32
    (X, Y, Z)), the in-plane field of view ``fov_xy`` (mm), half the cranio-caudal one ``fz`` (mm,
    float32) and the tissue map ``tissue`` (uint8 (X, Y, Z), indices of :data:`ORGAN_TISSUES`), drawn
    in place."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, fov_xy: float, fz: np.float32,
                 shape: tuple[int, int, int]) -> None:
        self.x, self.y, self.z = x, y, z
        self.fov_xy = fov_xy
        self.fz = fz
        self.tissue = np.zeros(shape, np.uint8)

    def ellipse(self, cx, cy, ax, ay) -> np.ndarray:
        """Squared normalised radius in an elliptic cylinder along z (float32 (X, Y, Z))."""
        return ((self.x - np.float32(cx)) / np.float32(ax)) ** 2 + ((self.y - np.float32(cy)) / np.float32(ay)) ** 2

    def ellipsoid(self, c, a) -> np.ndarray:
        """Squared normalised radius in an axis-aligned ellipsoid (float32 (X, Y, Z))."""
        return _ellipsoid_e(self.x, self.y, self.z, np.asarray(c, np.float32), np.asarray(a, np.float32))


@dataclass(frozen=True)
class _Cavity:
    """The body's semi-axes ``ax``, ``ay`` (mm), the abdominal cavity's squared normalised radius
    ``cavity`` (float32 (X, Y, Z)) and its ``inside`` (bool, ``cavity < 1``), and the y (mm) of the
    vertebral body's centre ``y_spine``."""

    ax: float
    ay: float
    cavity: np.ndarray
    inside: np.ndarray
    y_spine: float


def _abdomen_grid(rng: np.random.Generator,
                  shape: tuple[int, int, int]) -> tuple[_Abdomen, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The field of view (330-390 mm in-plane, 190-250 mm cranio-caudally) sampled by ``shape``, and a
    smooth deformation of the anatomy; returns the abdomen to draw, spacing (3,) and origin (3,) (mm,
    RAS) and the 1-D grid coordinates in [-1, 1] of the smooth fields."""
    fov_xy = rng.uniform(330.0, 390.0)
    fov = np.array([fov_xy, fov_xy * rng.uniform(0.97, 1.03), rng.uniform(190.0, 250.0)])
    spacing = fov / np.array(shape, dtype=float)
    origin = -(np.array(shape) - 1) / 2 * spacing
    wx, wy, wz = (
        (origin[a] + np.arange(n) * spacing[a]).astype(np.float32).reshape([-1 if b == a else 1 for b in range(3)])
        for a, n in enumerate(shape)
    )
    u = tuple(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    amp = np.float32(rng.uniform(4.0, 9.0))  # smooth deformation of the anatomy (mm)
    x = wx + amp * _smooth_field(rng, u, 4, 0.0, 2.0)
    y = wy + amp * _smooth_field(rng, u, 4, 0.0, 2.0)
    z = wz + amp * _smooth_field(rng, u, 4, 0.0, 2.0)
    fz = np.float32(fov[2] / 2)
    return _Abdomen(x, y, z, fov_xy, fz, shape), spacing, origin, u


def _body_wall(rng: np.random.Generator, b: _Abdomen) -> _Cavity:
    """Subcutaneous fat, the abdominal wall muscle, visceral fat filling the cavity, and ribs (a
    posterior-lateral band near the cavity wall, periodic in z)."""
    tissue, y, z = b.tissue, b.y, b.z
    ax = b.fov_xy * rng.uniform(0.40, 0.46)
    ay = ax * rng.uniform(0.68, 0.8)
    t_fat, t_wall = rng.uniform(12.0, 30.0), rng.uniform(6.0, 12.0)
    tissue[b.ellipse(0, 0, ax, ay) < 1] = _O["fat"]
    tissue[b.ellipse(0, 0, ax - t_fat, ay - t_fat) < 1] = _O["muscle"]
    cavity = b.ellipse(0, 0, ax - t_fat - t_wall, ay - t_fat - t_wall)
    inside = cavity < 1
    tissue[inside] = _O["fat"]
    y_spine = -(ay - t_fat - t_wall) + rng.uniform(40.0, 50.0)
    # ribs: a posterior-lateral band near the cavity wall, periodic in z
    period, phase = rng.uniform(22.0, 28.0), rng.uniform(0.0, 2 * np.pi)
    ribs = (cavity > 0.80) & (cavity < 0.93) & (y < np.float32(0.4 * ay)) & (
        np.sin(np.float32(2 * np.pi / period) * z + np.float32(phase)) > 0.55)
    tissue[ribs] = _O["bone"]
    return _Cavity(ax, ay, cavity, inside, y_spine)


def _bowel_and_stomach(rng: np.random.Generator, b: _Abdomen, cav: _Cavity, u: tuple[np.ndarray, ...]) -> None:
    """Bowel loops (the zero sheets of a band-limited field, with fluid or gas inside) and the
    stomach in the left upper quadrant (wall, fluid below an air-fluid level, gas above)."""
    tissue, y, z, fz = b.tissue, b.y, b.z, b.fz
    ax, ay, cavity, inside = cav.ax, cav.ay, cav.cavity, cav.inside
    loops = _smooth_field(rng, u, 14, 6.0, 2.5)
    content = _smooth_field(rng, u, 8, 2.0, 2.0)
    bowel_region = inside & (cavity < 0.8) & ((z < 0.2 * fz) | (y > np.float32(0.25 * ay)))
    tube = bowel_region & (np.abs(loops) < 0.45)
    tissue[tube] = _O["bowel"]
    tissue[tube & (np.abs(loops) < 0.25)] = _O["fluid"]
    tissue[tube & (np.abs(loops) < 0.25) & (content > 0.9)] = _O["bowel_gas"]
    del loops, content, bowel_region, tube
    # stomach (left upper quadrant): wall, fluid below an air-fluid level, gas above
    c_st = (-0.32 * ax, 0.2 * ay, 0.55 * fz)
    a_st = np.array([0.2 * ax, 0.25 * ay, 0.3 * fz]) * rng.uniform(0.85, 1.15, 3)
    st = b.ellipsoid(c_st, a_st)
    tissue[(st < 1) & inside] = _O["bowel"]
    lumen = (b.ellipsoid(c_st, a_st * 0.8) < 1) & inside
    tissue[lumen] = _O["fluid"]
    tissue[lumen & (z > np.float32(c_st[2] + rng.uniform(0.0, 0.4) * a_st[2]))] = _O["bowel_gas"]


def _liver_and_spleen(rng: np.random.Generator, b: _Abdomen, cav: _Cavity, u: tuple[np.ndarray, ...]) -> None:
    """The liver (right lobe + left lobe, with vessels) and the spleen."""
    tissue, fz = b.tissue, b.fz
    ax, ay, cavity, inside = cav.ax, cav.ay, cav.cavity, cav.inside
    a_right = np.array([0.42 * ax, 0.55 * ay, 0.45 * fz]) * rng.uniform(0.9, 1.1, 3)
    right_lobe = b.ellipsoid((0.3 * ax, 0.0, 0.35 * fz), a_right)
    a_left = np.array([0.28 * ax, 0.22 * ay, 0.25 * fz]) * rng.uniform(0.85, 1.15, 3)
    left_lobe = b.ellipsoid((0.0, 0.3 * ay, 0.5 * fz), a_left)
    liver = (right_lobe < 1) | (left_lobe < 1)
    del right_lobe, left_lobe
    liver &= inside & (cavity < 0.78)
    tissue[liver] = _O["liver"]
    tissue[liver & (np.abs(_smooth_field(rng, u, 18, 9.0, 3.0)) < 0.07)] = _O["liver_vessel"]
    a_spleen = np.array([0.16 * ax, 0.3 * ay, 0.28 * fz]) * rng.uniform(0.85, 1.15, 3)
    spleen = b.ellipsoid((-0.52 * ax, -0.28 * ay, 0.4 * fz), a_spleen) < 1
    tissue[spleen & inside & (cavity < 0.8)] = _O["spleen"]


def _retroperitoneum(rng: np.random.Generator, b: _Abdomen, cav: _Cavity) -> None:
    """Psoas and paraspinal muscles, kidneys (cortex, medulla, sinus fat on the medial side), aorta,
    vena cava, the vertebra (cortex, marrow, discs), spinal canal and arch."""
    tissue, z, fz = b.tissue, b.z, b.fz
    ax, inside, y_spine = cav.ax, cav.inside, cav.y_spine
    # psoas and paraspinal muscles
    for side in (-1.0, 1.0):
        tissue[(b.ellipse(side * 40.0, y_spine + 8.0, 17.0, 14.0) < 1) & (z < 0.1 * fz) & inside] = _O["muscle"]
        tissue[(b.ellipse(side * 32.0, y_spine - 38.0, 24.0, 18.0) < 1)] = _O["muscle"]
    # kidneys: cortex, medulla, sinus fat on the medial side
    for side, dz in ((1.0, -0.18), (-1.0, -0.05)):  # the right kidney sits lower
        c = np.array([side * 0.33 * ax, y_spine + 12.0, dz * fz])
        a = np.array([26.0, 30.0, 52.0]) * rng.uniform(0.85, 1.15, 3)
        e = b.ellipsoid(c, a)
        tissue[e < 1] = _O["kidney_cortex"]
        tissue[e < 0.5] = _O["kidney_medulla"]
        tissue[b.ellipsoid(c - np.array([side * 0.45 * a[0], 0.0, 0.0]), a * np.array([0.45, 0.35, 0.45])) < 1] = \
            _O["renal_sinus"]
    # aorta, vena cava, vertebra (cortex, marrow, discs), spinal canal and arch
    r_ao = rng.uniform(9.0, 13.0)
    tissue[b.ellipse(-12.0, y_spine + 30.0, r_ao, r_ao) < 1] = _O["vessel"]
    tissue[b.ellipse(24.0, y_spine + 26.0, 13.0, 9.0) < 1] = _O["vessel"]
    r_vb = rng.uniform(16.0, 20.0)
    vb = b.ellipse(0.0, y_spine, r_vb, r_vb * 0.85)
    tissue[vb < 1] = _O["bone"]
    tissue[vb < 0.75] = _O["marrow"]
    disc = np.mod(z - np.float32(rng.uniform(0.0, 30.0)), np.float32(30.0)) < 6.0
    tissue[(vb < 1) & disc] = _O["muscle"]
    canal = b.ellipse(0.0, y_spine - r_vb - 9.0, 14.0, 13.0)
    tissue[canal < 1] = _O["bone"]
    tissue[canal < 0.4] = _O["fluid"]


def _ct_image(rng: np.random.Generator, tissue: np.ndarray, u: tuple[np.ndarray, ...]) -> np.ndarray:
    """The CT image, float32 (X, Y, Z), integer HU in [-1024, 3071]: a native or portal-venous HU
    table jittered per case, smooth within-tissue variation, blur and noise."""
    venous = int(rng.random() < 0.5)
    hu = _ORGAN_HU[:, venous] + rng.normal(0.0, 6.0, len(ORGAN_TISSUES)).astype(np.float32)
    hu[_O["air"]] = -1000.0
    img = hu[tissue]
    soft = (tissue != _O["air"]) & (tissue != _O["bowel_gas"])
    img += np.float32(8.0) * _smooth_field(rng, u, 12, 4.0, 3.0) * soft
    img = ndimage.gaussian_filter(img, rng.uniform(0.5, 0.8), truncate=3.0)
    img += np.float32(rng.uniform(8.0, 20.0)) * rng.standard_normal(tissue.shape, dtype=np.float32)
    return _quantise(img, -1024.0, 3071.0)


def organs_case(rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> PhantomCase:
    """One CT-like upper abdomen in Hounsfield units with liver (1), kidneys (2) and spleen (3).

    ``shape`` (default 128 x 128 x 96): voxels per world axis (R, A, S) covering a field of view of
    330-390 mm in-plane and 190-250 mm cranio-caudally (so 64^3 gives ~5.5 mm in-plane and ~3.5 mm
    slices); the on-disk order is a random permutation/flip (half the cases RAS). Returns images
    (1, X, Y, Z) ("CT", integer HU in [-1024, 3071]), label uint8, tissue (names :data:`ORGAN_TISSUES`).
    """
    shape = _check_shape(shape, 16, "organs_case") or (128, 128, 96)
    b, spacing, origin, u = _abdomen_grid(rng, shape)
    cav = _body_wall(rng, b)
    _bowel_and_stomach(rng, b, cav, u)
    _liver_and_spleen(rng, b, cav, u)
    _retroperitoneum(rng, b, cav)
    tissue = b.tissue
    del b, cav
    label = np.zeros(shape, np.uint8)
    label[np.isin(tissue, [_O["liver"], _O["liver_vessel"]])] = 1
    label[np.isin(tissue, [_O["kidney_cortex"], _O["kidney_medulla"]])] = 2
    label[tissue == _O["spleen"]] = 3
    img = _ct_image(rng, tissue, u)
    perm, flips = _random_orientation(rng, p_ras=0.5)
    return PhantomCase(
        images=_orient(img[None], perm, flips),
        label=_orient(label, perm, flips),
        affine=_oriented_affine(origin, spacing, shape, perm, flips),
        channel_names=("CT",),
        tissue=_orient(tissue, perm, flips),
        tissue_names=ORGAN_TISSUES,
    )
