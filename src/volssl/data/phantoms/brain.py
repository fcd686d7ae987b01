"""The ``brain`` kind: MRI-like heads (T1, T2, FLAIR) with lesions, and its variants.

:func:`brain_case` builds one head in steps, each drawing from the case's random stream in turn:
the sampling grid (:func:`_brain_geometry`), the nominal anatomy coordinates
(:func:`_nominal_coords`), the tissue map (:func:`_brain_anatomy`), the intensities
(:func:`_brain_intensities`), the lesions and mimics (:func:`_brain_lesions`) and the acquisition
(:func:`_brain_acquisition`). :class:`BrainVariant` changes the acquisition ("centre") and the
lesion type; the default variant is the ``brain`` kind itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.fields import (
    _box,
    _box_coords,
    _check_shape,
    _ellipsoid_e,
    _frame_with_axis,
    _orient,
    _oriented_affine,
    _quantise,
    _random_orientation,
    _small_rotation,
    _smooth_field,
)

# tissue classes of the brain phantom (``PhantomCase.tissue``)
BRAIN_TISSUES = ("air", "scalp", "bone", "marrow", "csf", "gm", "wm", "deep_gm", "lesion", "mimic", "muscle", "eye",
                 "edema", "tumour_core", "lacune")
_T = {name: i for i, name in enumerate(BRAIN_TISSUES)}
# relative intensity of each tissue in (T1, T2, FLAIR) before per-subject jitter; lesions and mimics share a row
_BRAIN_CONTRAST = np.array(
    [
        [0.0, 0.0, 0.0],  # air
        [850.0, 380.0, 560.0],  # scalp (skin and fat)
        [60.0, 50.0, 50.0],  # bone
        [500.0, 300.0, 380.0],  # marrow (diploe)
        [180.0, 1000.0, 110.0],  # csf
        [480.0, 640.0, 600.0],  # grey matter
        [720.0, 450.0, 450.0],  # white matter
        [560.0, 560.0, 530.0],  # deep grey matter
        [380.0, 880.0, 940.0],  # lesion
        [380.0, 880.0, 940.0],  # mimic (lesion-like signal outside white matter: not labelled)
        [380.0, 300.0, 330.0],  # muscle / soft tissue
        [160.0, 1050.0, 130.0],  # eye (fluid)
    ],
    dtype=np.float32,
)
#: the brain phantom's weighting profiles (columns of a contrast table)
BRAIN_CHANNELS = ("T1", "T2", "FLAIR")
#: contrast tables (rows :data:`BRAIN_TISSUES` up to "eye", columns :data:`BRAIN_CHANNELS`): "standard"
#: (centre A), "centre-b": another scanner / protocol: spin-echo-like T1 with less grey/white contrast
#: and brighter CSF, a T2 with darker CSF, a FLAIR with incomplete CSF suppression, less fat signal
BRAIN_CONTRASTS: dict[str, np.ndarray] = {
    "standard": _BRAIN_CONTRAST,
    "centre-b": np.array(
        [
            [0.0, 0.0, 0.0],  # air
            [700.0, 450.0, 520.0],  # scalp
            [80.0, 70.0, 60.0],  # bone
            [450.0, 340.0, 400.0],  # marrow
            [270.0, 880.0, 260.0],  # csf
            [530.0, 600.0, 640.0],  # grey matter
            [640.0, 470.0, 500.0],  # white matter
            [580.0, 540.0, 580.0],  # deep grey matter
            [420.0, 800.0, 870.0],  # lesion
            [420.0, 800.0, 870.0],  # mimic
            [400.0, 320.0, 360.0],  # muscle
            [240.0, 930.0, 270.0],  # eye
        ],
        dtype=np.float32,
    ),
}
BRAIN_LESION_TYPES = ("wm-lesions", "tumour", "lacunes")


@dataclass(frozen=True)
class BrainVariant:
    """How a brain phantom is acquired ("centre") and which lesions it carries.

    The default values are the ``brain`` kind's: a default variant draws the same random numbers
    and makes the same bytes.

    Attributes:
        name: the variant's name; every non-default variant gets its own random stream (its name is
            part of the seed), so two variants never share subjects.
        contrast: key of :data:`BRAIN_CONTRASTS` (the tissue intensity table of each weighting).
        channels: which weightings of :data:`BRAIN_CHANNELS` are written, in order (1 to 3).
        lesions: "wm-lesions" (MS-like ovoids in white matter, label 1), "tumour" (edema 1, core 2)
            or "lacunes" (small CSF-filled cavities, label 1).
        noise: range of the Rician noise level, relative to the white-matter intensity.
        bias: range of the bias field's log-amplitude (per channel).
        blur: Gaussian partial-volume blur (voxels).
        spacing_factor: in-plane spacing relative to the default draw (0.8-1 mm, or 1.5-2 mm with a
            ``shape``) for the same field of view: 1.25 gives 1.25x coarser voxels and 1/1.25 as
            many of them per axis.
        thick_factors: slice thickness factors (relative to in-plane) drawn from; None: the kind's
            (1, 1, 1.25, 1.5, 2, 3 at default size; 1, 1, 1.25, 1.5, 2 with a ``shape``).
    """

    name: str = "standard"
    contrast: str = "standard"
    channels: tuple[str, ...] = BRAIN_CHANNELS
    lesions: str = "wm-lesions"
    noise: tuple[float, float] = (0.015, 0.04)
    bias: tuple[float, float] = (0.1, 0.3)
    blur: float = 0.6
    spacing_factor: float = 1.0
    thick_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.contrast not in BRAIN_CONTRASTS:
            raise ValueError(f"BrainVariant.contrast must be one of {tuple(BRAIN_CONTRASTS)}, got {self.contrast!r}")
        if not self.channels or len(set(self.channels)) != len(self.channels) or any(
                c not in BRAIN_CHANNELS for c in self.channels):
            raise ValueError(f"BrainVariant.channels must be distinct names from {BRAIN_CHANNELS}, "
                             f"got {self.channels!r}")
        if self.lesions not in BRAIN_LESION_TYPES:
            raise ValueError(f"BrainVariant.lesions must be one of {BRAIN_LESION_TYPES}, got {self.lesions!r}")
        for name in ("noise", "bias"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"BrainVariant.{name} must be a range (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        if not self.blur >= 0:
            raise ValueError(f"BrainVariant.blur must be >= 0 voxels, got {self.blur}")
        if not self.spacing_factor > 0:
            raise ValueError(f"BrainVariant.spacing_factor must be > 0, got {self.spacing_factor}")
        if self.thick_factors is not None and (not self.thick_factors or min(self.thick_factors) < 1):
            raise ValueError(f"BrainVariant.thick_factors must be factors >= 1, got {self.thick_factors!r}")

    @property
    def is_default(self) -> bool:
        return self == BrainVariant()

    @property
    def labels(self) -> dict[str, int]:
        """dataset.json labels of this variant's lesion type."""
        if self.lesions == "tumour":
            return {"background": 0, "edema": 1, "core": 2}
        if self.lesions == "lacunes":
            return {"background": 0, "lacune": 1}
        return {"background": 0, "lesion": 1}


def _ellipsoid_depth(qx, qy, qz, c, a, a_z_low: float | None = None) -> np.ndarray:
    """Signed radial distance (mm, positive inside) to an ellipsoid surface; with ``a_z_low`` the
    half below the centre uses that z semi-axis (a flattened base)."""
    dx, dy, dz = qx - c[0], qy - c[1], qz - c[2]
    az = a[2] if a_z_low is None else np.where(dz < 0, np.float32(a_z_low), np.float32(a[2]))
    rho = np.sqrt((dx / a[0]) ** 2 + (dy / a[1]) ** 2 + (dz / az) ** 2)
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    return np.clip(r * (1.0 - rho) / np.maximum(rho, 1e-3), -80.0, 80.0)


def _brain_grid(rng: np.random.Generator, shape: tuple[int, int, int] | None, variant: BrainVariant):
    """Spacing (mm, RAS), RAS grid shape, field of view (mm) and anatomy scale of one brain case."""
    thick = [1.0, 1.0, 1.0]
    if shape is None:
        inplane = float(rng.choice([1.0, 1.0, 0.9375, 0.8]))
        factor = float(rng.choice(variant.thick_factors or [1.0, 1.0, 1.25, 1.5, 2.0, 3.0]))
        fov = np.array([172.0, 188.0, 176.0]) * rng.uniform(0.93, 1.04, 3)
        scale = float(fov.mean() / 176.0 * rng.uniform(0.9, 1.03))
    else:
        inplane = float(rng.uniform(1.5, 2.0))
        factor = float(rng.choice(variant.thick_factors or [1.0, 1.0, 1.25, 1.5, 2.0]))
        fov = np.array(shape, dtype=float) * inplane
        scale = float(fov.mean() / 176.0 * rng.uniform(0.92, 1.02))
    if variant.spacing_factor != 1.0:  # the same field of view with coarser (finer) voxels
        inplane *= variant.spacing_factor
    thick_axis = int(rng.choice(3, p=[0.2, 0.2, 0.6]))  # mostly axial slices
    thick[thick_axis] = factor
    spacing = inplane * np.array(thick)
    grid = tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing))
    return spacing, grid, scale


@dataclass(frozen=True)
class _BrainGeometry:
    """Sampling grid of one brain case, in RAS order.

    ``spacing``: (3,) mm; ``grid``: voxels per world axis; ``scale``: anatomy scale (world mm per
    nominal mm of a 176 mm head); ``coarse``: >= 1, enlarges folds and lesions on coarse grids;
    ``origin``: (3,) world position (mm) of voxel 0; ``world``: float32 world coordinates (mm) of the
    voxel centres along R, A, S, shaped (X, 1, 1), (1, Y, 1), (1, 1, Z); ``u``: the same as 1-D
    float32 arrays normalised for the smooth fields (|u| <= ~0.8 inside the field of view).
    """

    spacing: np.ndarray
    grid: tuple[int, int, int]
    scale: float
    coarse: float
    origin: np.ndarray
    world: tuple[np.ndarray, np.ndarray, np.ndarray]
    u: tuple[np.ndarray, ...]

    @property
    def inv_scale(self) -> np.float32:
        """``1 / scale`` as float32 (world mm -> nominal mm)."""
        return np.float32(1.0 / self.scale)


@dataclass(frozen=True)
class _HeadParams:
    """Per-subject anatomy parameters (nominal mm): semi-axes ``a_brain`` (3,) and centre ``c_brain``
    (3,) of the cerebrum, ``atrophy`` in [0, 1], thickness of subarachnoid CSF, bone, scalp and cortex
    (on gyral crowns), sulcal depth, fold wavelength (~ twice the sulcal spacing), and the widths of
    sulcal CSF and of grey matter around the zero sheets of the fold field (units of its std)."""

    a_brain: np.ndarray
    c_brain: np.ndarray
    atrophy: float
    t_csf: float
    t_bone: float
    t_scalp: float
    t_gm: float
    d_sulc: float
    fold_wavelength: float
    w_csf: float
    w_gm: float


@dataclass(frozen=True)
class _BrainAnatomy:
    """Tissue map of one head before lesions: ``tissue`` uint8 (X, Y, Z) RAS (indices of
    :data:`BRAIN_TISSUES`), ``cerebral`` bool (X, Y, Z) (inside cerebrum or cerebellum: where lesions
    may go, not the brainstem tube), ``vents``: the lateral ventricles as (centre (3,), semi-axes (3,),
    bend) in nominal mm, ``centre``: the cerebrum's centre (3,) (nominal mm)."""

    tissue: np.ndarray
    cerebral: np.ndarray
    vents: list[tuple[np.ndarray, np.ndarray, float]]
    centre: np.ndarray


def _brain_geometry(rng: np.random.Generator, shape: tuple[int, int, int] | None,
                    variant: BrainVariant) -> _BrainGeometry:
    """Draw the sampling grid of one brain case (see :func:`_brain_grid`)."""
    spacing, grid, g = _brain_grid(rng, shape, variant)
    # coarse grids (small shapes): fewer, larger folds and lesions, so that they span enough voxels
    # (judged at the variant's nominal resolution, so that a coarser centre images the same anatomy)
    coarse = max(1.0, 0.45 * float(spacing.min()) / variant.spacing_factor / g)
    origin = -(np.array(grid) - 1) / 2 * spacing
    wx, wy, wz = (
        (origin[a] + np.arange(n) * spacing[a]).astype(np.float32).reshape([-1 if b == a else 1 for b in range(3)])
        for a, n in enumerate(grid)
    )
    # normalised grid coordinates for the smooth fields (|u| <= ~0.8 inside the field of view)
    u = tuple((w.ravel() / (110.0 * g)).astype(np.float32) for w in (wx, wy, wz))
    return _BrainGeometry(spacing, grid, g, coarse, origin, (wx, wy, wz), u)


def _nominal_coords(rng: np.random.Generator, geom: _BrainGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nominal anatomy coordinates q (mm of a 176 mm head; three float32 (X, Y, Z) arrays) of the
    voxels: head position in the field of view, pose, scale and a smooth deformation."""
    g = geom.scale
    shift = rng.normal(0.0, 4.0, 3) * g  # head position in the field of view (mm)
    wx, wy, wz = geom.world
    rot = _small_rotation(rng, 5.0).astype(np.float32)
    px, py, pz = wx - np.float32(shift[0]), wy - np.float32(shift[1]), wz - np.float32(shift[2])
    inv_g = geom.inv_scale
    q = [(rot[i, 0] * px + rot[i, 1] * py + rot[i, 2] * pz) * inv_g for i in range(3)]
    amp = np.float32(rng.uniform(3.0, 6.0))
    q = [qi + amp * _smooth_field(rng, geom.u, 5, 0.0, 2.0) for qi in q]
    return q[0], q[1], q[2]


def _head_params(rng: np.random.Generator, coarse: float) -> _HeadParams:
    """Draw the per-subject anatomy parameters; fold sizes scale with ``coarse``."""
    a_brain = np.array([56.0, 70.0, 52.0]) * rng.uniform(0.92, 1.06, 3)
    c_brain = np.array([0.0, 2.0, 12.0])
    atrophy = rng.uniform(0.0, 1.0)
    t_csf = 2.0 + 2.5 * atrophy  # subarachnoid CSF
    t_bone, t_scalp = rng.uniform(5.5, 8.0), rng.uniform(4.0, 7.0)
    t_gm = rng.uniform(2.8, 3.6) * coarse  # cortex thickness on gyral crowns
    d_sulc = rng.uniform(10.0, 16.0) * coarse  # sulcal depth
    fold_wavelength = rng.uniform(19.0, 23.0) * coarse  # ~ twice the sulcal spacing
    w_csf, w_gm = 0.08 + 0.12 * atrophy, 0.6 + 0.1 * rng.random()
    return _HeadParams(a_brain, c_brain, atrophy, t_csf, t_bone, t_scalp, t_gm, d_sulc, fold_wavelength, w_csf,
                       w_gm)


def _brain_depth(rng: np.random.Generator, q: tuple[np.ndarray, np.ndarray, np.ndarray],
                 hp: _HeadParams) -> np.ndarray:
    """Signed depth (mm, positive inside; float32 (X, Y, Z)) below the surface of the cerebrum
    (flattened base, interhemispheric fissure above the corpus callosum) and the cerebellum."""
    qx, qy, qz = q
    a_brain, c_brain = hp.a_brain, hp.c_brain
    d_cer = _ellipsoid_depth(qx, qy, qz, c_brain, a_brain, a_z_low=a_brain[2] * 0.78)
    fissure_x = qx - np.float32(c_brain[0])
    # no fissure inside the arch of the corpus callosum (and the diencephalon below it)
    cc_len, cc_height = a_brain[1] * rng.uniform(0.48, 0.56), rng.uniform(18.0, 24.0)
    above_cc = ((qy - np.float32(c_brain[1] - 4.0)) / np.float32(cc_len)) ** 2 + (
        (qz - np.float32(c_brain[2] - 8.0)) / np.float32(cc_height)) ** 2 > 1.0
    d_cer = np.where(above_cc & (d_cer > 0), np.minimum(d_cer, np.abs(fissure_x) - 0.8), d_cer)
    del fissure_x, above_cc
    a_cb = np.array([46.0, 24.0, 20.0]) * rng.uniform(0.9, 1.1, 3)
    c_cb = np.array([0.0, c_brain[1] - a_brain[1] * 0.62, c_brain[2] - a_brain[2] * 0.78])
    d_cb = _ellipsoid_depth(qx, qy, qz, c_cb, a_cb)
    return np.maximum(d_cer, d_cb)


def _cortical_folds(rng: np.random.Generator, u: tuple[np.ndarray, ...],
                    hp: _HeadParams) -> tuple[np.ndarray, np.ndarray]:
    """Depth limits (mm below the brain surface, float32 (X, Y, Z)) of sulcal CSF and of grey matter:
    sulci are the zero sheets of a band-limited random field."""
    fold = _smooth_field(rng, u, 28, 440.0 / hp.fold_wavelength, 3.0)
    sulc = np.exp(-((fold / np.float32(hp.w_csf)) ** 2)) * np.float32(hp.d_sulc)
    gm_lim = np.exp(-((fold / np.float32(hp.w_gm)) ** 2)) * np.float32(hp.d_sulc) + np.float32(hp.t_gm)
    return sulc, gm_lim


def _brainstem_depth(rng: np.random.Generator, q: tuple[np.ndarray, np.ndarray, np.ndarray],
                     hp: _HeadParams) -> np.ndarray:
    """Signed depth (mm, positive inside; float32 (X, Y, Z)) of the brainstem, a vertical cylinder
    below the cerebrum."""
    qx, qy, qz = q
    c_brain = hp.c_brain
    r_bs = rng.uniform(9.0, 12.0)
    d_bs = r_bs - np.sqrt(qx**2 + (qy - np.float32(c_brain[1] - 14.0)) ** 2)
    return np.where(qz < np.float32(c_brain[2] - 5.0), d_bs, np.float32(-80.0))


def _draw_head(rng: np.random.Generator, tissue: np.ndarray, q: tuple[np.ndarray, np.ndarray, np.ndarray],
               hp: _HeadParams, d_all: np.ndarray) -> None:
    """Draw, in place, face and neck soft tissue, then the layers around the brain from the outside
    in (scalp, bone with marrow, CSF) and the eyes; ``d_all``: depth (mm) below the surface of brain
    and brainstem."""
    qx, qy, qz = q
    a_brain, c_brain = hp.a_brain, hp.c_brain
    t_csf, t_bone, t_scalp = hp.t_csf, hp.t_bone, hp.t_scalp
    a_face = np.array([58.0, 72.0, 62.0]) * rng.uniform(0.92, 1.08, 3)
    face = _ellipsoid_depth(qx, qy, qz, (0.0, 12.0, c_brain[2] - 78.0), a_face)
    tissue[face > 0] = _T["scalp"]
    tissue[face > 5.0] = _T["muscle"]
    del face
    out = -d_all
    tissue[out < t_csf + t_bone + t_scalp] = _T["scalp"]
    tissue[out < t_csf + t_bone] = _T["bone"]
    tissue[(out > t_csf + 0.35 * t_bone) & (out < t_csf + 0.7 * t_bone)] = _T["marrow"]
    tissue[out < t_csf] = _T["csf"]
    del out
    for side in (-1.0, 1.0):  # eyes: fluid-filled spheres in front of the frontal lobes
        c_eye = (side * 30.0, c_brain[1] + a_brain[1] * 0.88, c_brain[2] - a_brain[2] * 0.72)
        e = _ellipsoid_e(qx, qy, qz, c_eye, (11.5, 11.5, 11.5))
        tissue[(e < 1.0) & (tissue != _T["bone"])] = _T["eye"]


def _deep_grey_and_ventricles(rng: np.random.Generator, tissue: np.ndarray,
                              q: tuple[np.ndarray, np.ndarray, np.ndarray], hp: _HeadParams,
                              inside: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Draw, in place, deep grey nuclei (thalamus, putamen) into white matter and the ventricles (bent
    lateral ventricles, slit-like third ventricle) inside the brain; returns the lateral ventricles
    as (centre, semi-axes, bend) in nominal mm."""
    qx, qy, qz = q
    c_brain = hp.c_brain
    vent_scale = rng.uniform(0.75, 1.1) + 0.6 * hp.atrophy
    for side in (-1.0, 1.0):
        for c, a in (((side * 15.0, -6.0, c_brain[2] - 8.0), (8.0, 15.0, 9.0)),  # thalamus
                     ((side * 22.0, 10.0, c_brain[2] - 6.0), (6.0, 14.0, 9.0))):  # putamen
            e = _ellipsoid_e(qx, qy, qz, c, np.array(a) * rng.uniform(0.9, 1.1, 3))
            tissue[(e < 1.0) & (tissue == _T["wm"])] = _T["deep_gm"]
    vents = []
    for side in (-1.0, 1.0):
        c = np.array([side * rng.uniform(7.0, 9.0), c_brain[1] - 2.0, c_brain[2] + 6.0])
        a = np.array([4.0 * vent_scale, 27.0, 6.5 * vent_scale]) * rng.uniform(0.9, 1.1, 3)
        bend = rng.uniform(6.0, 10.0)
        vents.append((c, a, bend))
    ventricle = np.zeros(tissue.shape, bool)
    for c, a, bend in vents:
        zb = qz + np.float32(bend) * ((qy - np.float32(c[1])) / np.float32(a[1])) ** 2
        ventricle |= _ellipsoid_e(qx, qy, zb, c, a) < 1.0
    ventricle |= _ellipsoid_e(qx, qy, qz, (0.0, c_brain[1] - 6.0, c_brain[2] - 8.0),
                              (1.2 * vent_scale, 11.0, 7.0)) < 1.0
    tissue[ventricle & inside] = _T["csf"]
    return vents


def _brain_anatomy(rng: np.random.Generator, geom: _BrainGeometry,
                   q: tuple[np.ndarray, np.ndarray, np.ndarray]) -> _BrainAnatomy:
    """The tissue map of one head (nominal coordinates ``q``): per-subject parameters, folded cortex,
    cerebellum, brainstem, the layers around the brain, eyes, deep grey nuclei and ventricles."""
    hp = _head_params(rng, geom.coarse)
    depth = _brain_depth(rng, q, hp)
    sulc, gm_lim = _cortical_folds(rng, geom.u, hp)
    d_bs = _brainstem_depth(rng, q, hp)
    tissue = np.zeros(geom.grid, np.uint8)
    _draw_head(rng, tissue, q, hp, np.maximum(depth, d_bs))
    inside = depth > 0
    tissue[inside] = _T["wm"]
    tissue[inside & (depth < gm_lim)] = _T["gm"]
    tissue[inside & (depth < sulc)] = _T["csf"]
    tissue[(d_bs > 0) & (depth <= 2.0)] = _T["wm"]
    del sulc, gm_lim, d_bs, depth
    vents = _deep_grey_and_ventricles(rng, tissue, q, hp, inside)
    return _BrainAnatomy(tissue, inside, vents, hp.c_brain)


def _brain_intensities(rng: np.random.Generator, variant: BrainVariant, tissue: np.ndarray,
                       u: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 (3, X, Y, Z) (T1, T2, FLAIR) of the tissue map from a per-subject jittered
    contrast table with per-channel scanner gain, times a smooth within-tissue variation; also returns
    the table (rows :data:`BRAIN_TISSUES` up to "eye", columns :data:`BRAIN_CHANNELS`)."""
    base_table = BRAIN_CONTRASTS[variant.contrast]
    table = base_table * rng.uniform(0.93, 1.07, base_table.shape).astype(np.float32)
    table = table * rng.uniform(0.75, 1.35, (1, 3)).astype(np.float32)  # per-channel scanner gain
    inhom = 1.0 + np.float32(0.04) * _smooth_field(rng, u, 14, 7.0, 3.0)
    images = np.stack([table[:, c][tissue] * inhom for c in range(3)])
    return images, table


class _LesionPainter:
    """Draws soft-edged ovoids (lesions, lacunes, mimics) into one brain case in place: ``images``
    (3, X, Y, Z), ``tissue`` and ``label`` (X, Y, Z, created here), all in RAS order."""

    def __init__(self, rng: np.random.Generator, geom: _BrainGeometry, q: tuple[np.ndarray, np.ndarray, np.ndarray],
                 anatomy: _BrainAnatomy, images: np.ndarray, table: np.ndarray) -> None:
        self.rng = rng
        self.geom = geom
        self.q = q
        self.vents = anatomy.vents
        self.tissue = anatomy.tissue
        self.images = images
        self.table = table
        self.label = np.zeros(geom.grid, np.uint8)

    def vent_proximity(self, i: int) -> float:
        """Normalised radius of flat voxel ``i`` in the nearest lateral ventricle (1: on its wall)."""
        qx, qy, qz = self.q
        best = 1e9
        for c, a, bend in self.vents:
            x, y, z = qx.flat[i], qy.flat[i], qz.flat[i]
            zb = z + bend * ((y - c[1]) / a[1]) ** 2
            best = min(best, math.sqrt(((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((zb - c[2]) / a[2]) ** 2))
        return best

    def draw_blob(self, i: int, radius: float, axis: np.ndarray, allowed: np.ndarray, klass: int, strength: float,
                  target: np.ndarray | None = None, label_value: int = 1) -> None:
        """An irregular ovoid of ``radius`` (nominal mm) at flat voxel ``i``, long axis ``axis``, kept
        to ``allowed`` and to one connected piece: intensities pulled towards ``target`` (default: the
        lesion row) by ``strength``, tissue ``klass``, label ``label_value`` for lesions and lacunes."""
        rng, geom, images = self.rng, self.geom, self.images
        grid, spacing, origin, g, inv_g = geom.grid, geom.spacing, geom.origin, geom.scale, geom.inv_scale
        idx = np.array(np.unravel_index(i, grid))
        semi = radius * np.array([1.0, rng.uniform(0.6, 0.95), rng.uniform(0.45, 0.8)])
        frame = _frame_with_axis(rng, axis)
        box = _box(idx, semi[0] * g * 1.7 / spacing + 1, grid)  # room for the irregular, soft edge
        if box is None:
            return
        bx, by, bz = _box_coords(box, origin, spacing)
        cw = origin + idx * spacing
        d = [(bx - cw[0]) * inv_g, (by - cw[1]) * inv_g, (bz - cw[2]) * inv_g]
        loc = [(frame[0, j] * d[0] + frame[1, j] * d[1] + frame[2, j] * d[2]) / np.float32(semi[j]) for j in range(3)]
        rho = np.sqrt(loc[0] ** 2 + loc[1] ** 2 + loc[2] ** 2)
        bu = tuple(np.linspace(-1, 1, s.stop - s.start, dtype=np.float32) for s in box)
        rho = rho * (1.0 + np.float32(0.18) * np.clip(_smooth_field(rng, bu, 4, 0.0, 2.5), -1.5, 1.5))
        keep = allowed[box]
        core = (rho < 1.0) & keep
        pieces, n_pieces = ndimage.label(core)
        if n_pieces == 0:
            return
        if n_pieces > 1:  # one ovoid, one connected lesion: drop the pieces cut off by grey matter
            core = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
            keep = keep & ndimage.binary_dilation(core, iterations=2)
        w = np.clip((1.2 - rho) / 0.4, 0.0, 1.0) * keep
        row = self.table[_T["lesion"]] if target is None else target
        for c in range(3):
            images[c][box] += np.float32(strength) * w * (row[c] - images[c][box])
        self.tissue[box][core] = klass
        if klass in (_T["lesion"], _T["lacune"]):
            self.label[box][core] = label_value

    def sample(self, flat: np.ndarray, accept: Callable[[int], float], tries: int = 200) -> int | None:
        """A flat voxel index drawn from ``flat`` and accepted with probability ``accept(i)`` (None
        after ``tries`` rejections or when ``flat`` is empty)."""
        if flat.size == 0:
            return None
        for _ in range(tries):
            i = int(flat[self.rng.integers(flat.size)])
            if self.rng.random() < accept(i):
                return i
        return None


def _deep_white_matter(wm0: np.ndarray, spacing: np.ndarray, variant: BrainVariant) -> np.ndarray:
    """Lesion centres: white matter ``wm0`` (bool (X, Y, Z)) away from the grey-matter border (two
    voxels, or the same margin in mm on a variant's coarser or thicker grid)."""
    if variant.spacing_factor == 1.0 and variant.thick_factors is None:
        return ndimage.binary_erosion(wm0, iterations=2)  # lesion centres: not at the grey-matter border
    # the same margin in mm (two nominal voxels) on a coarser or thicker grid
    r = np.maximum(1.0, np.rint(2.0 * float(spacing.min()) / variant.spacing_factor / spacing))
    e = np.indices((2 * r + 1).astype(int)) - r.reshape(3, 1, 1, 1)
    return ndimage.binary_erosion(wm0, structure=((e / r.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 1.0)


def _wm_lesions(p: _LesionPainter, flat_wm: np.ndarray, wm0: np.ndarray, deep_wm: np.ndarray,
                centre: np.ndarray) -> None:
    """4-12 MS-like ovoid lesions in white matter, often periventricular and radially oriented."""
    rng, (qx, qy, qz) = p.rng, p.q
    center = np.array(centre)
    for _ in range(int(rng.integers(4, 13))):
        i = p.sample(flat_wm,
                     lambda j: deep_wm.flat[j] * (0.2 + 0.8 * math.exp(-2.0 * max(p.vent_proximity(j) - 1, 0))))
        if i is None:
            break
        radial = np.array([qx.flat[i], qy.flat[i], qz.flat[i]]) - center
        radius = (3.5 + 8.0 * rng.beta(1.3, 3.0)) * p.geom.coarse
        p.draw_blob(i, radius, radial if rng.random() < 0.7 else rng.standard_normal(3), wm0, _T["lesion"],
                    rng.uniform(0.55, 1.0))


def _lacunes(p: _LesionPainter, deep_wm: np.ndarray) -> None:
    """10-25 small CSF-filled cavities (label 1) in deep grey and white matter."""
    rng, tissue, table = p.rng, p.tissue, p.table
    deep = np.flatnonzero(deep_wm | (tissue == _T["deep_gm"]))
    allowed = (tissue == _T["wm"]) | (tissue == _T["deep_gm"])
    for _ in range(int(rng.integers(10, 26))):
        i = p.sample(deep, lambda j: 1.0)
        if i is None:
            break
        p.draw_blob(i, rng.uniform(2.5, 4.5) * p.geom.coarse, rng.standard_normal(3), allowed, _T["lacune"],
                    rng.uniform(0.85, 1.0), target=0.85 * table[_T["csf"]] + 0.15 * table[_T["wm"]])


def _draw_tumour(p: _LesionPainter, flat_wm: np.ndarray, deep_wm: np.ndarray) -> None:
    """One glioma-like mass centred in deep white matter, drawn in place: an irregular core (label 2:
    an enhancing rim, bright in T1 like a contrast-enhanced T1, around a CSF-like necrosis) inside a
    larger edema (label 1: lesion-like signal) that spreads through white and deep grey matter only.
    Centres are drawn from ``flat_wm`` (flat indices of white matter) inside ``deep_wm``."""
    rng, images, tissue, label, table = p.rng, p.images, p.tissue, p.label, p.table
    qx, qy, qz = p.q
    u, coarse = p.geom.u, p.geom.coarse
    cand = flat_wm[deep_wm.flat[flat_wm]] if flat_wm.size else flat_wm
    if cand.size == 0:
        cand = flat_wm
    if cand.size == 0:
        return
    i = int(cand[rng.integers(cand.size)])
    c = (qx.flat[i], qy.flat[i], qz.flat[i])
    r_core = rng.uniform(9.0, 15.0) * min(coarse, 1.5)  # nominal mm
    r_edema = r_core * rng.uniform(1.6, 2.3)
    d = np.sqrt((qx - np.float32(c[0])) ** 2 + (qy - np.float32(c[1])) ** 2 + (qz - np.float32(c[2])) ** 2)
    wob_core = 1.0 + np.float32(0.2) * np.clip(_smooth_field(rng, u, 5, 0.0, 2.5), -2.0, 2.0)
    wob_edema = 1.0 + np.float32(0.3) * np.clip(_smooth_field(rng, u, 6, 1.0, 2.5), -2.0, 2.0)
    parenchyma = np.isin(tissue, [_T["wm"], _T["gm"], _T["deep_gm"]])
    rho_core = d / (np.float32(r_core) * wob_core)
    core = (rho_core < 1.0) & parenchyma
    pieces, n = ndimage.label(core)
    if n == 0:
        return
    core = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    edema = (d < np.float32(r_edema) * wob_edema) & np.isin(tissue, [_T["wm"], _T["deep_gm"]]) & ~core
    pieces, n = ndimage.label(edema | core)  # edema connected to the core only
    edema &= pieces == pieces[core].max()
    necrosis = core & (rho_core < rng.uniform(0.45, 0.65))
    rim = core & ~necrosis
    tex = 1.0 + np.float32(0.06) * _smooth_field(rng, u, 10, 4.0, 2.0)
    rows = {
        "edema": table[_T["lesion"]] * np.float32(rng.uniform(0.9, 1.0)),
        "rim": np.array([1.25 * table[_T["wm"], 0], 1.1 * table[_T["gm"], 1], 0.9 * table[_T["lesion"], 2]],
                        np.float32),
        "necrosis": 0.7 * table[_T["csf"]] + 0.3 * table[_T["lesion"]],
    }
    for name, mask in (("edema", edema), ("rim", rim), ("necrosis", necrosis)):
        for ch in range(images.shape[0]):
            images[ch][mask] = rows[name][ch] * tex[mask]
    tissue[edema] = _T["edema"]
    tissue[core] = _T["tumour_core"]
    label[edema] = 1
    label[core] = 2


def _mimics(p: _LesionPainter, variant: BrainVariant, allowed_gm: np.ndarray) -> None:
    """4-11 unlabelled lesion look-alikes in grey matter ``allowed_gm`` (bool (X, Y, Z)): lesion-like
    signal, or CSF-like dots for lacunes; with tumours and lacunes they never overwrite a label."""
    rng, table = p.rng, p.table
    flat_gm = np.flatnonzero(allowed_gm)
    mimic_target = None
    if variant.lesions != "wm-lesions":  # mimics never overwrite a labelled lesion
        allowed_gm = allowed_gm & (p.label == 0)
        flat_gm = np.flatnonzero(allowed_gm)
        if variant.lesions == "lacunes":  # CSF-like dots in grey matter: unlabelled look-alikes of lacunes
            mimic_target = 0.85 * table[_T["csf"]] + 0.15 * table[_T["gm"]]
    for _ in range(int(rng.integers(4, 12))):
        i = p.sample(flat_gm, lambda j: 1.0)
        if i is None:
            break
        p.draw_blob(i, (3.5 + 8.0 * rng.beta(1.3, 3.0)) * p.geom.coarse, rng.standard_normal(3), allowed_gm,
                    _T["mimic"], rng.uniform(0.55, 1.0), target=mimic_target)


def _brain_lesions(rng: np.random.Generator, variant: BrainVariant, geom: _BrainGeometry,
                   q: tuple[np.ndarray, np.ndarray, np.ndarray], anatomy: _BrainAnatomy, images: np.ndarray,
                   table: np.ndarray) -> np.ndarray:
    """Draw the variant's lesions (white matter lesions, a tumour or lacunes) and the grey-matter
    mimics into ``images`` and ``anatomy.tissue`` in place; returns the label, uint8 (X, Y, Z) RAS."""
    p = _LesionPainter(rng, geom, q, anatomy, images, table)
    tissue = anatomy.tissue
    wm0 = (tissue == _T["wm"]) & anatomy.cerebral
    flat_wm = np.flatnonzero(wm0)
    allowed_gm = (tissue == _T["gm"]) | (tissue == _T["deep_gm"])
    deep_wm = _deep_white_matter(wm0, geom.spacing, variant)
    if variant.lesions == "wm-lesions":
        _wm_lesions(p, flat_wm, wm0, deep_wm, anatomy.centre)
    elif variant.lesions == "tumour":
        _draw_tumour(p, flat_wm, deep_wm)
    else:  # lacunes: small CSF-filled cavities in deep grey and white matter
        _lacunes(p, deep_wm)
    _mimics(p, variant, allowed_gm)
    return p.label


def _brain_acquisition(rng: np.random.Generator, variant: BrainVariant, geom: _BrainGeometry, images: np.ndarray,
                       table: np.ndarray) -> None:
    """Acquire ``images`` (3, X, Y, Z) in place: partial-volume blur, a smooth bias field per channel
    and Rician noise (relative to the white-matter intensity), quantised to integers."""
    grid = geom.grid
    sigma_noise = rng.uniform(*variant.noise)
    for c in range(3):
        img = ndimage.gaussian_filter(images[c], variant.blur, truncate=3.0)
        img *= np.exp(np.float32(rng.uniform(*variant.bias)) * _smooth_field(rng, geom.u, 4, 0.0, 2.0))
        s = np.float32(sigma_noise * table[_T["wm"], c])
        real = img + s * rng.standard_normal(grid, dtype=np.float32)
        imag = s * rng.standard_normal(grid, dtype=np.float32)
        images[c] = _quantise(np.sqrt(real * real + imag * imag))


def brain_case(rng: np.random.Generator, shape: tuple[int, int, int] | None = None,
               variant: BrainVariant | None = None) -> PhantomCase:
    """One MRI-like head with MS-like lesions (or the lesions and acquisition of ``variant``).

    ``shape``: voxels per world axis (R, A, S) at the in-plane spacing (1.5-2 mm), e.g. (64, 64, 64)
    for a ~100-130 mm field of view; a thick-slice axis (1-2x) gets proportionally fewer voxels and
    the on-disk order is a random permutation. ``None``: a clinical-like field of view of 160-190 mm
    per axis at 0.8-1 mm in-plane and up to 3x thicker slices (about 60-235 voxels per axis). A
    variant's ``spacing_factor`` keeps that field of view with coarser voxels (fewer of them).
    Returns images (C, X, Y, Z) (default T1/T2/FLAIR; ``variant.channels``), label uint8 (default
    {0 background, 1 lesion}; ``variant.labels``), tissue (names :data:`BRAIN_TISSUES`).
    """
    variant = variant or BrainVariant()
    shape = _check_shape(shape, 16, "brain_case")
    geom = _brain_geometry(rng, shape, variant)
    q = _nominal_coords(rng, geom)
    anatomy = _brain_anatomy(rng, geom, q)
    images, table = _brain_intensities(rng, variant, anatomy.tissue, geom.u)
    # lesions (white matter, often periventricular) and mimics (grey matter), soft-edged ovoids
    label = _brain_lesions(rng, variant, geom, q, anatomy, images, table)
    del q
    _brain_acquisition(rng, variant, geom, images, table)
    perm, flips = _random_orientation(rng, p_ras=0.25)
    affine = _oriented_affine(geom.origin, geom.spacing, geom.grid, perm, flips)
    if variant.channels != BRAIN_CHANNELS:
        images = images[[BRAIN_CHANNELS.index(c) for c in variant.channels]]
    return PhantomCase(
        images=_orient(images, perm, flips),
        label=_orient(label, perm, flips),
        affine=affine,
        channel_names=tuple(variant.channels),
        tissue=_orient(anatomy.tissue, perm, flips),
        tissue_names=BRAIN_TISSUES,
    )
