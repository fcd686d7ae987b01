"""Synthetic 3D data (``volssl phantoms``): MRI-like heads with lesions, X-ray-nanotomography-like
cell nuclei and myelinated axons, written as nnU-Net v2 raw datasets.

They are the demo's, the tests' and the benchmarks' data, so they are built to be worth learning
from: the target cannot be found by thresholding intensities, a network needs context, and the
images carry structure (anatomy, texture) that self-supervised pre-training can learn.

``brain``
    Heads built from deformed ellipsoids: scalp, skull (with marrow), CSF, folded cortex (sulci are
    the zero sheets of a band-limited random field), white matter, deep grey nuclei, lateral and
    third ventricles, cerebellum, brainstem, eyes, face/neck soft tissue. Channels T1, T2, FLAIR
    (different intensity tables of the same subject), a smooth multiplicative bias field per
    channel, partial-volume blur and Rician noise. The label is "lesion": MS-like ovoid lesions
    placed in white matter (often periventricular), bright in T2/FLAIR, dark in T1. Lesion-like
    *mimics* with the same intensities are placed in grey matter and labelled background, and CSF
    and the eyes are as bright as lesions in T2, so intensity alone is not enough: the network must
    know where white matter is. Geometry varies per case: axis permutations/flips in the affine
    (about one case in four is stored RAS), in-plane spacing 0.8-1 mm (default size) or 1.5-2 mm
    (``shape`` given) and one thick axis of 1-3x the in-plane spacing.
``nuclei``
    Dense textured neuropil, cell somata, and nuclei (label 1): large ellipsoids only slightly
    brighter than the background, with chromatin clumps, a dark nucleolus and a thin dark envelope;
    nucleus-sized bright mimics without chromatin or envelope, blood vessels, tomographic ring
    artifacts and noise. One channel ("XNT"), isotropic 1 mm spacing (a stand-in unit, chosen so
    that 64+ voxel volumes pass the S3D field-of-view filter), RAS affine.
``axons``
    Bundles of roughly aligned, smoothly wandering tubes of varying radius that cross the volume,
    each with a dark myelin sheath; the inside of an axon has the background's mean intensity, so
    the sheaths are what separates instances. The label is an instance map (uint16, one id per
    axon, the intracellular space only; sheaths and background are 0). One channel ("XNT"),
    isotropic 1 mm spacing, RAS affine.

``organs``
    CT-like upper abdomens in Hounsfield units (one channel, "CT"): air, subcutaneous and visceral
    fat, abdominal wall muscle, ribs and a vertebra, bowel loops with gas and fluid, stomach, aorta
    and vena cava, and the labelled organs liver (1, with vessels), kidneys (2, cortex and medulla
    around a fatty sinus) and spleen (3). Each case is either a native or a portal-venous scan (the
    organs' HU change together, vessels get brighter), so liver and spleen overlap in intensity and
    only shape and position separate them. Random axis order and flips (half the cases RAS); in-plane
    spacing 2.6-3 mm and 2-2.6 mm slices at the default 128 x 128 x 96 (~1 s to make), 5-6 mm and 3-4 mm at
    64^3 (an FOV of 330-390 x 330-390 x 190-250 mm whatever the shape), int16 HU in [-1024, 3071].

Brain variants (:class:`BrainVariant`) change the acquisition ("centre"): the contrast table of each
channel (:data:`BRAIN_CONTRASTS`: a T1/T2/FLAIR weighting profile), which channels are written,
noise and bias-field strength, blur, in-plane spacing and slice thickness; and the lesion type:
``"wm-lesions"`` (the default above), ``"tumour"`` (one large mass: a core (label 2) of enhancing
rim and necrosis inside white-matter edema (label 1)) or ``"lacunes"`` (many small CSF-filled
cavities in deep grey and white matter, label 1, among CSF spaces that look the same). The default
variant is exactly the ``brain`` kind (same random draws, same bytes).

Phantom tasks (:data:`PHANTOM_TASKS`, ``volssl phantoms --task NAME``) are named datasets with
their own seed, variant and labels, for the benchmark table: ``brain-lesions``, ``brain-tumour``,
``brain-lacunes``, ``ct-organs``, and ``brain-lesions-centre-b`` (the lesions of
``brain-lesions`` seen by another "centre": other contrast, more noise and bias, coarser in-plane
spacing and thick slices; the target of a fine-tune-on-A, predict-on-B generalisation test, as
D2 -> D13 in the S3D paper's Table 7).

Images are stored as int16 NIfTI (``.nii.gz``), labels as uint8 (uint16 for axons). Every case is a
pure function of ``(seed, kind, case index)`` (and the variant, for non-default variants): the same
seed gives byte-identical files (gzip with a zero timestamp), a different seed a different
dataset, and case ``i`` does not depend on ``n``. The per-case functions (:func:`brain_case`,
:func:`nuclei_case`, :func:`axons_case`, :func:`organs_case`) return a :class:`PhantomCase` in memory.

Sizes and the S3D quality filter (FOV >= 50 mm, spacing <= 6.5 mm, file >= 200 kB), measured with
this writer (int16, gzip level 1): a default brain case (``shape=None``: FOV 160-190 mm, 0.8-1 mm
in-plane) has 60-240 voxels per axis and 3-11 MB per channel file, 0.3-1 GB of memory and a few
seconds to make; ``shape=(64, 64, 64)`` brains have a FOV of ~100-130 mm and ~220-350 kB per
channel, except thick-slice cases whose thick axis has 32 voxels (2x spacing, ~170 kB: below the
200 kB rule), and every brain under ~56^3 voxels is below 200 kB (48^3: 120-140 kB). Nuclei/axons files are
~380 kB at 64^3, ~255 kB at 56^3 and ~160 kB at 48^3; under 50 voxels their FOV is also < 50 mm.
A 96^3 brain takes ~0.3 s, a 128^3 nuclei/axons volume ~1.5-2.5 s on one core.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from volssl.util.atomic import atomic_path, write_json_atomic

KINDS = ("brain", "nuclei", "axons", "organs")
FILE_ENDING = ".nii.gz"
FORMAT_VERSION = 1

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
# tissue classes of the CT phantom
ORGAN_TISSUES = ("air", "fat", "muscle", "bone", "marrow", "bowel", "bowel_gas", "fluid", "vessel", "liver",
                 "liver_vessel", "kidney_cortex", "kidney_medulla", "renal_sinus", "spleen")
# tissue classes of the XNT phantoms
NUCLEI_TISSUES = ("neuropil", "soma", "nucleus", "vessel", "mimic")
AXON_TISSUES = ("background", "axoplasm", "myelin")


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic volume in memory.

    ``images``: float32 ``(C, X, Y, Z)`` integer-valued intensities in the on-disk voxel order;
    ``label``: ``(X, Y, Z)`` uint8 (semantic) or uint16 (instances); ``affine``: float64 4x4 voxel ->
    world (RAS, mm); ``tissue``: ``(X, Y, Z)`` uint8 ground-truth tissue map (names in
    ``tissue_names``), kept in memory only.
    """

    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    channel_names: tuple[str, ...]
    tissue: np.ndarray
    tissue_names: tuple[str, ...]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def fov_mm(self) -> np.ndarray:
        """Field of view (mm) along each array axis."""
        return self.spacing * np.array(self.label.shape)


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


# --------------------------------------------------------------------------------------------------
# shared helpers


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


# --------------------------------------------------------------------------------------------------
# brain


def _ellipsoid_e(qx, qy, qz, c, a) -> np.ndarray:
    """Squared normalised ellipsoid radius of the points (qx, qy, qz) (nominal mm)."""
    return ((qx - c[0]) / a[0]) ** 2 + ((qy - c[1]) / a[1]) ** 2 + ((qz - c[2]) / a[2]) ** 2


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
    spacing, grid, g = _brain_grid(rng, shape, variant)
    # coarse grids (small shapes): fewer, larger folds and lesions, so that they span enough voxels
    # (judged at the variant's nominal resolution, so that a coarser centre images the same anatomy)
    coarse = max(1.0, 0.45 * float(spacing.min()) / variant.spacing_factor / g)
    shift = rng.normal(0.0, 4.0, 3) * g  # head position in the field of view (mm)
    origin = -(np.array(grid) - 1) / 2 * spacing
    wx, wy, wz = (
        (origin[a] + np.arange(n) * spacing[a]).astype(np.float32).reshape([-1 if b == a else 1 for b in range(3)])
        for a, n in enumerate(grid)
    )
    # normalised grid coordinates for the smooth fields (|u| <= ~0.8 inside the field of view)
    u = tuple((w.ravel() / (110.0 * g)).astype(np.float32) for w in (wx, wy, wz))

    # nominal anatomy coordinates q (mm of a 176 mm head): head pose, scale and a smooth deformation
    rot = _small_rotation(rng, 5.0).astype(np.float32)
    px, py, pz = wx - np.float32(shift[0]), wy - np.float32(shift[1]), wz - np.float32(shift[2])
    inv_g = np.float32(1.0 / g)
    q = [(rot[i, 0] * px + rot[i, 1] * py + rot[i, 2] * pz) * inv_g for i in range(3)]
    amp = np.float32(rng.uniform(3.0, 6.0))
    q = [qi + amp * _smooth_field(rng, u, 5, 0.0, 2.0) for qi in q]
    qx, qy, qz = q

    # per-subject anatomy parameters (nominal mm)
    a_brain = np.array([56.0, 70.0, 52.0]) * rng.uniform(0.92, 1.06, 3)
    c_brain = np.array([0.0, 2.0, 12.0])
    atrophy = rng.uniform(0.0, 1.0)
    t_csf = 2.0 + 2.5 * atrophy  # subarachnoid CSF
    t_bone, t_scalp = rng.uniform(5.5, 8.0), rng.uniform(4.0, 7.0)
    t_gm = rng.uniform(2.8, 3.6) * coarse  # cortex thickness on gyral crowns
    d_sulc = rng.uniform(10.0, 16.0) * coarse  # sulcal depth
    fold_wavelength = rng.uniform(19.0, 23.0) * coarse  # ~ twice the sulcal spacing
    w_csf, w_gm = 0.08 + 0.12 * atrophy, 0.6 + 0.1 * rng.random()

    # cortex: cerebrum (flattened base, interhemispheric fissure above the corpus callosum) + cerebellum
    d_cer = _ellipsoid_depth(qx, qy, qz, c_brain, a_brain, a_z_low=a_brain[2] * 0.78)
    fissure_x = qx - np.float32(c_brain[0])
    # no fissure inside the arch of the corpus callosum (and the diencephalon below it)
    cc_len, cc_height = a_brain[1] * rng.uniform(0.48, 0.56), rng.uniform(18.0, 24.0)
    above_cc = ((qy - np.float32(c_brain[1] - 4.0)) / np.float32(cc_len)) ** 2 + (
        (qz - np.float32(c_brain[2] - 8.0)) / np.float32(cc_height)) ** 2 > 1.0
    d_cer = np.where(above_cc & (d_cer > 0), np.minimum(d_cer, np.abs(fissure_x) - 0.8), d_cer)
    a_cb = np.array([46.0, 24.0, 20.0]) * rng.uniform(0.9, 1.1, 3)
    c_cb = np.array([0.0, c_brain[1] - a_brain[1] * 0.62, c_brain[2] - a_brain[2] * 0.78])
    d_cb = _ellipsoid_depth(qx, qy, qz, c_cb, a_cb)
    depth = np.maximum(d_cer, d_cb)
    del d_cer, d_cb, fissure_x, above_cc
    fold = _smooth_field(rng, u, 28, 440.0 / fold_wavelength, 3.0)
    sulc = np.exp(-((fold / np.float32(w_csf)) ** 2)) * np.float32(d_sulc)
    gm_lim = np.exp(-((fold / np.float32(w_gm)) ** 2)) * np.float32(d_sulc) + np.float32(t_gm)
    del fold
    # brainstem: a vertical cylinder below the cerebrum
    r_bs = rng.uniform(9.0, 12.0)
    d_bs = r_bs - np.sqrt(qx**2 + (qy - np.float32(c_brain[1] - 14.0)) ** 2)
    d_bs = np.where(qz < np.float32(c_brain[2] - 5.0), d_bs, np.float32(-80.0))
    d_all = np.maximum(depth, d_bs)

    tissue = np.zeros(grid, np.uint8)
    # face and neck soft tissue, then the layers around the brain from the outside in
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
    inside = depth > 0
    tissue[inside] = _T["wm"]
    tissue[inside & (depth < gm_lim)] = _T["gm"]
    tissue[inside & (depth < sulc)] = _T["csf"]
    tissue[(d_bs > 0) & (depth <= 2.0)] = _T["wm"]
    del sulc, gm_lim, d_all, d_bs
    # deep grey nuclei and ventricles (bent lateral ventricles, slit-like third ventricle)
    vent_scale = rng.uniform(0.75, 1.1) + 0.6 * atrophy
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
    ventricle = np.zeros(grid, bool)
    for c, a, bend in vents:
        zb = qz + np.float32(bend) * ((qy - np.float32(c[1])) / np.float32(a[1])) ** 2
        ventricle |= _ellipsoid_e(qx, qy, zb, c, a) < 1.0
    ventricle |= _ellipsoid_e(qx, qy, qz, (0.0, c_brain[1] - 6.0, c_brain[2] - 8.0),
                              (1.2 * vent_scale, 11.0, 7.0)) < 1.0
    tissue[ventricle & inside] = _T["csf"]
    cerebral = inside  # lesions go in cerebral/cerebellar white matter (not the brainstem tube)
    del ventricle, depth

    # intensities: jittered per-subject tables, smooth within-tissue variation
    base_table = BRAIN_CONTRASTS[variant.contrast]
    table = base_table * rng.uniform(0.93, 1.07, base_table.shape).astype(np.float32)
    table = table * rng.uniform(0.75, 1.35, (1, 3)).astype(np.float32)  # per-channel scanner gain
    inhom = 1.0 + np.float32(0.04) * _smooth_field(rng, u, 14, 7.0, 3.0)
    images = np.stack([table[:, c][tissue] * inhom for c in range(3)])
    del inhom

    # lesions (white matter, often periventricular) and mimics (grey matter), soft-edged ovoids
    wm0 = (tissue == _T["wm"]) & cerebral
    del cerebral
    label = np.zeros(grid, np.uint8)
    flat_wm = np.flatnonzero(wm0)
    allowed_gm = (tissue == _T["gm"]) | (tissue == _T["deep_gm"])
    flat_gm = np.flatnonzero(allowed_gm)

    def vent_proximity(i: int) -> float:
        best = 1e9
        for c, a, bend in vents:
            x, y, z = qx.flat[i], qy.flat[i], qz.flat[i]
            zb = z + bend * ((y - c[1]) / a[1]) ** 2
            best = min(best, math.sqrt(((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((zb - c[2]) / a[2]) ** 2))
        return best

    def draw_blob(i: int, radius: float, axis: np.ndarray, allowed: np.ndarray, klass: int, strength: float,
                  target: np.ndarray | None = None, label_value: int = 1) -> None:
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
        row = table[_T["lesion"]] if target is None else target
        for c in range(3):
            images[c][box] += np.float32(strength) * w * (row[c] - images[c][box])
        tissue[box][core] = klass
        if klass in (_T["lesion"], _T["lacune"]):
            label[box][core] = label_value

    def sample(flat: np.ndarray, accept: Callable[[int], float], tries: int = 200) -> int | None:
        if flat.size == 0:
            return None
        for _ in range(tries):
            i = int(flat[rng.integers(flat.size)])
            if rng.random() < accept(i):
                return i
        return None

    center = np.array(c_brain)
    if variant.spacing_factor == 1.0 and variant.thick_factors is None:
        deep_wm = ndimage.binary_erosion(wm0, iterations=2)  # lesion centres: not at the grey-matter border
    else:  # the same margin in mm (two nominal voxels) on a coarser or thicker grid
        r = np.maximum(1.0, np.rint(2.0 * float(spacing.min()) / variant.spacing_factor / spacing))
        e = np.indices((2 * r + 1).astype(int)) - r.reshape(3, 1, 1, 1)
        deep_wm = ndimage.binary_erosion(wm0, structure=((e / r.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 1.0)
    if variant.lesions == "wm-lesions":
        for _ in range(int(rng.integers(4, 13))):
            i = sample(flat_wm,
                       lambda j: deep_wm.flat[j] * (0.2 + 0.8 * math.exp(-2.0 * max(vent_proximity(j) - 1, 0))))
            if i is None:
                break
            radial = np.array([qx.flat[i], qy.flat[i], qz.flat[i]]) - center
            radius = (3.5 + 8.0 * rng.beta(1.3, 3.0)) * coarse
            draw_blob(i, radius, radial if rng.random() < 0.7 else rng.standard_normal(3), wm0, _T["lesion"],
                      rng.uniform(0.55, 1.0))
    elif variant.lesions == "tumour":
        _draw_tumour(rng, images, tissue, label, table, (qx, qy, qz), u, flat_wm, deep_wm, coarse)
    else:  # lacunes: small CSF-filled cavities in deep grey and white matter
        deep = np.flatnonzero(deep_wm | (tissue == _T["deep_gm"]))
        allowed = (tissue == _T["wm"]) | (tissue == _T["deep_gm"])
        for _ in range(int(rng.integers(10, 26))):
            i = sample(deep, lambda j: 1.0)
            if i is None:
                break
            draw_blob(i, rng.uniform(2.5, 4.5) * coarse, rng.standard_normal(3), allowed, _T["lacune"],
                      rng.uniform(0.85, 1.0), target=0.85 * table[_T["csf"]] + 0.15 * table[_T["wm"]])
    mimic_target = None
    if variant.lesions != "wm-lesions":  # mimics never overwrite a labelled lesion
        allowed_gm &= label == 0
        flat_gm = np.flatnonzero(allowed_gm)
        if variant.lesions == "lacunes":  # CSF-like dots in grey matter: unlabelled look-alikes of lacunes
            mimic_target = 0.85 * table[_T["csf"]] + 0.15 * table[_T["gm"]]
    for _ in range(int(rng.integers(4, 12))):
        i = sample(flat_gm, lambda j: 1.0)
        if i is None:
            break
        draw_blob(i, (3.5 + 8.0 * rng.beta(1.3, 3.0)) * coarse, rng.standard_normal(3), allowed_gm, _T["mimic"],
                  rng.uniform(0.55, 1.0), target=mimic_target)
    del wm0, deep_wm, allowed_gm, flat_wm, flat_gm, qx, qy, qz, q

    # acquisition: partial-volume blur, smooth bias field, Rician noise
    sigma_noise = rng.uniform(*variant.noise)
    for c in range(3):
        img = ndimage.gaussian_filter(images[c], variant.blur, truncate=3.0)
        img *= np.exp(np.float32(rng.uniform(*variant.bias)) * _smooth_field(rng, u, 4, 0.0, 2.0))
        s = np.float32(sigma_noise * table[_T["wm"], c])
        real = img + s * rng.standard_normal(grid, dtype=np.float32)
        imag = s * rng.standard_normal(grid, dtype=np.float32)
        images[c] = _quantise(np.sqrt(real * real + imag * imag))
    perm, flips = _random_orientation(rng, p_ras=0.25)
    affine = _oriented_affine(origin, spacing, grid, perm, flips)
    if variant.channels != BRAIN_CHANNELS:
        images = images[[BRAIN_CHANNELS.index(c) for c in variant.channels]]
    return PhantomCase(
        images=_orient(images, perm, flips),
        label=_orient(label, perm, flips),
        affine=affine,
        channel_names=tuple(variant.channels),
        tissue=_orient(tissue, perm, flips),
        tissue_names=BRAIN_TISSUES,
    )


def _draw_tumour(rng: np.random.Generator, images: np.ndarray, tissue: np.ndarray, label: np.ndarray,
                 table: np.ndarray, q: tuple[np.ndarray, np.ndarray, np.ndarray], u: tuple[np.ndarray, ...],
                 flat_wm: np.ndarray, deep_wm: np.ndarray, coarse: float) -> None:
    """One glioma-like mass centred in deep white matter, drawn in place: an irregular core (label 2:
    an enhancing rim, bright in T1 like a contrast-enhanced T1, around a CSF-like necrosis) inside a
    larger edema (label 1: lesion-like signal) that spreads through white and deep grey matter only.
    ``q``: nominal anatomy coordinates (mm); ``u``: normalised grid coordinates of the smooth fields."""
    qx, qy, qz = q
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


# --------------------------------------------------------------------------------------------------
# nuclei (X-ray nanotomography-like)


def _ellipsoid_box(center: np.ndarray, semi: np.ndarray, frame: np.ndarray, shape: tuple[int, ...], pad: float = 1.0):
    """Box around a rotated ellipsoid and its normalised radius ``rho`` inside the box (float32)."""
    box = _box(center, np.full(3, semi.max() + pad), shape)
    if box is None:
        return None, None
    bx, by, bz = _box_coords(box, np.zeros(3), np.ones(3))
    d = [bx - np.float32(center[0]), by - np.float32(center[1]), bz - np.float32(center[2])]
    loc = [(frame[0, j] * d[0] + frame[1, j] * d[1] + frame[2, j] * d[2]) / np.float32(semi[j]) for j in range(3)]
    return box, np.sqrt(loc[0] ** 2 + loc[1] ** 2 + loc[2] ** 2)


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
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    return affine


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


# --------------------------------------------------------------------------------------------------
# axons


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


def axons_case(rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> PhantomCase:
    """One X-ray-nanotomography-like volume of myelinated axons with an instance label.

    ``shape`` (default 128^3): voxels, isotropic 1 mm spacing, RAS affine. 1-3 bundles of aligned
    axons (inner radius ~1.5-6 voxels, g-ratio 0.6-0.75) wander smoothly across the volume; the
    axons of a bundle share most of their wobble. Sheaths of different axons stay >= 1 voxel apart.
    Returns images (1, X, Y, Z) ("XNT"), label uint16 (0 background and sheaths, 1..K one id per axon,
    each a single connected tube), tissue (names :data:`AXON_TISSUES`).
    """
    from scipy.spatial import cKDTree

    shape = _check_shape(shape, 16, "axons_case") or (128, 128, 128)
    size = np.array(shape, dtype=float)
    length = float(np.linalg.norm(size)) * 0.6
    own_amp, gap = 0.5, 1.0
    axons: list[tuple[np.ndarray, np.ndarray, float]] = []  # centre line, inner radius, outer/inner ratio
    bundles = int(rng.integers(1, 4))
    for b in range(bundles):
        # bundle: direction, shared wobble, and axon positions in its cross-section (2-D dart throwing
        # with spacing that also absorbs the axons' own wobble and radius variation)
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
            r = 1.1 * r_in * ratio + own_amp + gap / 2
            if len(xy) and np.any(np.hypot(*(xy - p).T) < reach + r):
                continue
            xy, reach = np.vstack([xy, p]), np.append(reach, r)
            params.append((p, r_in, ratio))
        tree = cKDTree(np.concatenate([a[0] for a in axons])) if axons else None
        outer_prev = np.concatenate([a[1] * a[2] for a in axons] + [np.zeros(1)]) if axons else None
        for p, r_in, ratio in params:
            pts, radius = _axon_curve(rng, centre + frame[:, 1:] @ p, frame, shared + _wobble(rng, (0, own_amp), 1),
                                      length, r_in)
            outer = radius * ratio
            inside = np.all((pts > -outer[:, None] - 1) & (pts < size - 1 + outer[:, None] + 1), axis=1)
            if inside.sum() < 8:
                continue
            pts, radius, outer = pts[inside], radius[inside], outer[inside]
            if tree is not None:  # other bundles: reject crossings
                dist, j = tree.query(pts[::2], k=8, distance_upper_bound=outer.max() + 11.0 + gap)
                if np.any(dist < outer[::2, None] + outer_prev[np.minimum(j, tree.n)] + gap):
                    continue
            axons.append((pts, radius, ratio))
    # rasterise: nearest centre-line point of every voxel (one distance transform of the stamped lines)
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
    if axons:
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
    else:
        ids = np.zeros(shape, np.int32)
        inner = sheath = np.zeros(shape, bool)
    label = np.where(inner, ids, 0)
    # each axon one connected tube: keep its largest piece (a curve grazing a face can split), renumber
    out = np.zeros(shape, np.uint16)
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
    tissue = np.zeros(shape, np.uint8)
    tissue[inner] = 1
    tissue[sheath] = 2
    # intensities: neuropil-like texture everywhere (same mean inside axons), dark sheaths, organelles
    img = _texture(rng, shape, 0.8, 2.5) * np.float32(0.8)
    img[inner] *= np.float32(0.6)
    img += 0.4 * _texture(rng, shape, 3.0, 8.0)
    img[sheath] = -2.8 + 0.3 * img[sheath]
    organelles = ndimage.gaussian_filter((rng.random(shape) < 0.0015).astype(np.float32), 0.9)
    img -= 1.8 * (organelles > 0.03)
    img = _xnt_acquisition(rng, img, blur=0.7, rings=0.3, noise=(0.25, 0.45))
    return PhantomCase(
        images=img[None],
        label=out,
        affine=_xnt_affine(shape),
        channel_names=("XNT",),
        tissue=tissue,
        tissue_names=AXON_TISSUES,
    )


# --------------------------------------------------------------------------------------------------
# organs (CT-like upper abdomen)

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


def organs_case(rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> PhantomCase:
    """One CT-like upper abdomen in Hounsfield units with liver (1), kidneys (2) and spleen (3).

    ``shape`` (default 128 x 128 x 96): voxels per world axis (R, A, S) covering a field of view of
    330-390 mm in-plane and 190-250 mm cranio-caudally (so 64^3 gives ~5.5 mm in-plane and ~3.5 mm
    slices); the on-disk order is a random permutation/flip (half the cases RAS). Returns images
    (1, X, Y, Z) ("CT", integer HU in [-1024, 3071]), label uint8, tissue (names :data:`ORGAN_TISSUES`).
    """
    shape = _check_shape(shape, 16, "organs_case") or (128, 128, 96)
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

    def ellipse(cx, cy, ax, ay) -> np.ndarray:  # an elliptic cylinder along z
        return ((x - np.float32(cx)) / np.float32(ax)) ** 2 + ((y - np.float32(cy)) / np.float32(ay)) ** 2

    def ellipsoid(c, a) -> np.ndarray:
        return _ellipsoid_e(x, y, z, np.asarray(c, np.float32), np.asarray(a, np.float32))

    tissue = np.zeros(shape, np.uint8)
    ax = fov_xy * rng.uniform(0.40, 0.46)
    ay = ax * rng.uniform(0.68, 0.8)
    t_fat, t_wall = rng.uniform(12.0, 30.0), rng.uniform(6.0, 12.0)
    tissue[ellipse(0, 0, ax, ay) < 1] = _O["fat"]
    tissue[ellipse(0, 0, ax - t_fat, ay - t_fat) < 1] = _O["muscle"]
    cavity = ellipse(0, 0, ax - t_fat - t_wall, ay - t_fat - t_wall)
    inside = cavity < 1
    tissue[inside] = _O["fat"]
    y_spine = -(ay - t_fat - t_wall) + rng.uniform(40.0, 50.0)
    # ribs: a posterior-lateral band near the cavity wall, periodic in z
    period, phase = rng.uniform(22.0, 28.0), rng.uniform(0.0, 2 * np.pi)
    ribs = (cavity > 0.80) & (cavity < 0.93) & (y < np.float32(0.4 * ay)) & (
        np.sin(np.float32(2 * np.pi / period) * z + np.float32(phase)) > 0.55)
    tissue[ribs] = _O["bone"]
    # bowel loops: the zero sheets of a band-limited field, with fluid or gas inside
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
    st = ellipsoid(c_st, a_st)
    tissue[(st < 1) & inside] = _O["bowel"]
    lumen = (ellipsoid(c_st, a_st * 0.8) < 1) & inside
    tissue[lumen] = _O["fluid"]
    tissue[lumen & (z > np.float32(c_st[2] + rng.uniform(0.0, 0.4) * a_st[2]))] = _O["bowel_gas"]
    del st, lumen
    # liver (right lobe + left lobe) with vessels, spleen
    a_right = np.array([0.42 * ax, 0.55 * ay, 0.45 * fz]) * rng.uniform(0.9, 1.1, 3)
    right_lobe = ellipsoid((0.3 * ax, 0.0, 0.35 * fz), a_right)
    a_left = np.array([0.28 * ax, 0.22 * ay, 0.25 * fz]) * rng.uniform(0.85, 1.15, 3)
    left_lobe = ellipsoid((0.0, 0.3 * ay, 0.5 * fz), a_left)
    liver = (right_lobe < 1) | (left_lobe < 1)
    del right_lobe, left_lobe
    liver &= inside & (cavity < 0.78)
    tissue[liver] = _O["liver"]
    tissue[liver & (np.abs(_smooth_field(rng, u, 18, 9.0, 3.0)) < 0.07)] = _O["liver_vessel"]
    a_spleen = np.array([0.16 * ax, 0.3 * ay, 0.28 * fz]) * rng.uniform(0.85, 1.15, 3)
    spleen = ellipsoid((-0.52 * ax, -0.28 * ay, 0.4 * fz), a_spleen) < 1
    tissue[spleen & inside & (cavity < 0.8)] = _O["spleen"]
    del liver, spleen
    # psoas and paraspinal muscles
    for side in (-1.0, 1.0):
        tissue[(ellipse(side * 40.0, y_spine + 8.0, 17.0, 14.0) < 1) & (z < 0.1 * fz) & inside] = _O["muscle"]
        tissue[(ellipse(side * 32.0, y_spine - 38.0, 24.0, 18.0) < 1)] = _O["muscle"]
    # kidneys: cortex, medulla, sinus fat on the medial side
    for side, dz in ((1.0, -0.18), (-1.0, -0.05)):  # the right kidney sits lower
        c = np.array([side * 0.33 * ax, y_spine + 12.0, dz * fz])
        a = np.array([26.0, 30.0, 52.0]) * rng.uniform(0.85, 1.15, 3)
        e = ellipsoid(c, a)
        tissue[e < 1] = _O["kidney_cortex"]
        tissue[e < 0.5] = _O["kidney_medulla"]
        tissue[ellipsoid(c - np.array([side * 0.45 * a[0], 0.0, 0.0]), a * np.array([0.45, 0.35, 0.45])) < 1] = \
            _O["renal_sinus"]
    # aorta, vena cava, vertebra (cortex, marrow, discs), spinal canal and arch
    r_ao = rng.uniform(9.0, 13.0)
    tissue[ellipse(-12.0, y_spine + 30.0, r_ao, r_ao) < 1] = _O["vessel"]
    tissue[ellipse(24.0, y_spine + 26.0, 13.0, 9.0) < 1] = _O["vessel"]
    r_vb = rng.uniform(16.0, 20.0)
    vb = ellipse(0.0, y_spine, r_vb, r_vb * 0.85)
    tissue[vb < 1] = _O["bone"]
    tissue[vb < 0.75] = _O["marrow"]
    disc = np.mod(z - np.float32(rng.uniform(0.0, 30.0)), np.float32(30.0)) < 6.0
    tissue[(vb < 1) & disc] = _O["muscle"]
    canal = ellipse(0.0, y_spine - r_vb - 9.0, 14.0, 13.0)
    tissue[canal < 1] = _O["bone"]
    tissue[canal < 0.4] = _O["fluid"]
    del vb, disc, canal, cavity, inside, x, y, z

    label = np.zeros(shape, np.uint8)
    label[np.isin(tissue, [_O["liver"], _O["liver_vessel"]])] = 1
    label[np.isin(tissue, [_O["kidney_cortex"], _O["kidney_medulla"]])] = 2
    label[tissue == _O["spleen"]] = 3
    venous = int(rng.random() < 0.5)
    hu = _ORGAN_HU[:, venous] + rng.normal(0.0, 6.0, len(ORGAN_TISSUES)).astype(np.float32)
    hu[_O["air"]] = -1000.0
    img = hu[tissue]
    soft = (tissue != _O["air"]) & (tissue != _O["bowel_gas"])
    img += np.float32(8.0) * _smooth_field(rng, u, 12, 4.0, 3.0) * soft
    img = ndimage.gaussian_filter(img, rng.uniform(0.5, 0.8), truncate=3.0)
    img += np.float32(rng.uniform(8.0, 20.0)) * rng.standard_normal(shape, dtype=np.float32)
    img = _quantise(img, -1024.0, 3071.0)
    perm, flips = _random_orientation(rng, p_ras=0.5)
    return PhantomCase(
        images=_orient(img[None], perm, flips),
        label=_orient(label, perm, flips),
        affine=_oriented_affine(origin, spacing, shape, perm, flips),
        channel_names=("CT",),
        tissue=_orient(tissue, perm, flips),
        tissue_names=ORGAN_TISSUES,
    )


# --------------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class _Kind:
    make: Callable[[np.random.Generator, tuple[int, int, int] | None], PhantomCase]
    labels: dict[str, int]
    channel_names: tuple[str, ...]
    label_dtype: type
    instance: bool
    description: str


PHANTOM_KINDS: dict[str, _Kind] = {
    "brain": _Kind(brain_case, {"background": 0, "lesion": 1}, ("T1", "T2", "FLAIR"), np.uint8, False,
                   "MRI-like heads (T1, T2, FLAIR) with MS-like white-matter lesions and grey-matter mimics"),
    "nuclei": _Kind(nuclei_case, {"background": 0, "nucleus": 1}, ("XNT",), np.uint8, False,
                    "X-ray nanotomography-like neuropil with cell nuclei (semantic)"),
    "axons": _Kind(axons_case, {"background": 0, "axon": 1}, ("XNT",), np.uint16, True,
                   "X-ray nanotomography-like myelinated axons (instance ids: every id >= 1 is an axon)"),
    "organs": _Kind(organs_case, {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}, ("CT",), np.uint8, False,
                    "CT-like upper abdomens (HU, native or portal-venous) with liver, kidneys and spleen"),
}


def _variant_tag(variant: BrainVariant) -> int:
    """A stable 32-bit number for a non-default variant's random stream (crc32 of its name)."""
    import zlib

    return zlib.crc32(variant.name.encode("utf-8"))


def make_case(kind: str, seed: int, index: int, shape: tuple[int, int, int] | None = None,
              variant: BrainVariant | None = None) -> PhantomCase:
    """Case ``index`` of the phantom dataset ``(kind, seed)`` (brain: and ``variant``): what
    :func:`generate_phantoms` / :func:`generate_task` write. A default (or no) variant gives the
    ``brain`` kind's case; any other variant draws from its own stream (its name is in the seed)."""
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    if variant is not None and kind != "brain":
        raise ValueError(f"phantom variants are brain variants; kind {kind!r} takes none")
    key = [int(seed), KINDS.index(kind), int(index)]
    if variant is None or variant.is_default:
        return PHANTOM_KINDS[kind].make(np.random.default_rng(key), shape)
    return brain_case(np.random.default_rng(key + [_variant_tag(variant)]), shape, variant)


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    """Write ``array`` (X, Y, Z) as a gzipped NIfTI-1 with qform = sform = ``affine`` (scanner, mm),
    atomically and byte-reproducibly (gzip timestamp 0)."""
    import nibabel as nib

    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"{path}: values [{array.min()}, {array.max()}] do not fit {np.dtype(dtype).name}")
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, suffix=FILE_ENDING) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def generate_phantoms(
    out: str | os.PathLike,
    kind: str,
    n: int,
    seed: int = 0,
    n_test: int | None = None,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` training and ``n_test`` (default ``max(1, n // 5)``) test phantoms of ``kind`` as an
    nnU-Net v2 raw dataset and return ``out``::

        out/dataset.json                          channel_names, labels, numTraining, file_ending, ...
        out/imagesTr/<kind>_<i>_<cccc>.nii.gz     int16, one file per channel
        out/labelsTr/<kind>_<i>.nii.gz            uint8 (uint16 instance ids for axons)
        out/imagesTs/..., out/labelsTs/...        the held-out cases (numbered after the training ones)

    ``dataset.json`` is written last: a directory without it is incomplete. An existing non-empty
    ``out`` is refused unless ``overwrite`` (which deletes only the entries above and preview.png).
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = PHANTOM_KINDS[kind]
    meta = {
        "name": f"volssl-phantoms-{kind}",
        "description": spec.description,
        "channel_names": {str(c): name for c, name in enumerate(spec.channel_names)},
        "labels": dict(spec.labels),
    }
    return _write_dataset(out, kind, lambda i, shp: make_case(kind, seed, i, shp), meta, spec.label_dtype,
                          spec.instance, {"kind": kind, "seed": int(seed)}, n, n_test, shape, progress, overwrite)


def _write_dataset(out: str | os.PathLike, prefix: str, make: Callable[[int, tuple[int, int, int] | None], PhantomCase],
                   meta: dict, label_dtype: type, instance: bool, provenance: dict, n: int, n_test: int | None,
                   shape: tuple[int, int, int] | None, progress: bool, overwrite: bool) -> Path:
    """Write cases ``make(i, shape)`` as an nnU-Net v2 raw dataset (see :func:`generate_phantoms`);
    ``meta`` holds dataset.json's name, description, channel_names and labels."""
    from tqdm import tqdm

    if int(n) < 1:
        raise ValueError(f"phantoms: need n >= 1 training cases, got {n}")
    n_test = max(1, int(n) // 5) if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"phantoms: n_test must be >= 0, got {n_test}")
    shape = _check_shape(shape, 16, "phantoms")
    out = Path(out)
    parts = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dataset.json", "preview.png")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: output directory is not empty (use --overwrite to replace the dataset)")
        for name in parts:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    total = int(n) + n_test
    width = max(3, len(str(total - 1)))
    for i in tqdm(range(total), desc=f"phantoms {prefix}", unit="case", disable=not progress):
        case = make(i, shape)
        split = "Tr" if i < n else "Ts"
        name = f"{prefix}_{i:0{width}d}"
        for c in range(case.images.shape[0]):
            write_nifti(out / f"images{split}" / f"{name}_{c:04d}{FILE_ENDING}", case.images[c], case.affine, np.int16)
        write_nifti(out / f"labels{split}" / f"{name}{FILE_ENDING}", case.label, case.affine, label_dtype)
    meta = {
        **meta,
        "numTraining": int(n),
        "numTest": n_test,
        "file_ending": FILE_ENDING,
        "tensorImageSize": "3D",
        "licence": "CC0 (synthetic)",
        "reference": "volssl phantoms",
        "instance_labels": instance,
        "volssl_phantoms": {**provenance, "shape": list(shape) if shape else None, "version": FORMAT_VERSION},
    }
    write_json_atomic(out / "dataset.json", meta)
    return out


# --------------------------------------------------------------------------------------------------
# named tasks


@dataclass(frozen=True)
class PhantomTask:
    """A named phantom dataset: a kind, a brain variant (None: the kind as is), a default seed."""

    name: str
    kind: str
    seed: int
    description: str
    variant: BrainVariant | None = None

    @property
    def labels(self) -> dict[str, int]:
        return self.variant.labels if self.variant is not None else dict(PHANTOM_KINDS[self.kind].labels)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(self.variant.channels) if self.variant is not None else PHANTOM_KINDS[self.kind].channel_names


#: centre B of the generalisation test: brain-lesions' lesions under another protocol and scanner
CENTRE_B = BrainVariant(name="centre-b", contrast="centre-b", noise=(0.04, 0.06), bias=(0.3, 0.45), blur=0.8,
                        spacing_factor=1.25, thick_factors=(1.5, 2.0, 2.5))

PHANTOM_TASKS: dict[str, PhantomTask] = {
    t.name: t
    for t in (
        PhantomTask("brain-lesions", "brain", 0, "MS-like white-matter lesions in T1/T2/FLAIR heads with grey-matter "
                    "mimics (centre A; the brain kind itself)", BrainVariant()),
        PhantomTask("brain-lesions-centre-b", "brain", 100, "brain-lesions seen by another centre: other T1/T2/FLAIR "
                    "contrast (spin-echo-like T1, FLAIR with incomplete CSF suppression), about twice the noise, "
                    "stronger "
                    "bias, blurrier, 1.25x coarser in-plane and 1.5-2.5x thick slices: the generalisation target",
                    CENTRE_B),
        PhantomTask("brain-tumour", "brain", 1, "one glioma-like mass per head: edema (1) around a core (2) of "
                    "enhancing rim and necrosis; T1/T2/FLAIR; grey-matter mimics",
                    BrainVariant(name="tumour", lesions="tumour")),
        PhantomTask("brain-lacunes", "brain", 2, "many small CSF-filled lacunes (1) in deep grey and white matter "
                    "among CSF spaces and CSF-like grey-matter dots; T1 and FLAIR only",
                    BrainVariant(name="lacunes", lesions="lacunes", channels=("T1", "FLAIR"))),
        PhantomTask("ct-organs", "organs", 3, "CT-like upper abdomens in HU (native or portal-venous): liver (1), "
                    "kidneys (2), spleen (3)"),
    )
}


def get_task(name: str) -> PhantomTask:
    """The phantom task ``name`` (ValueError listing the known ones)."""
    if name not in PHANTOM_TASKS:
        raise ValueError(f"unknown phantom task {name!r}; choose one of {', '.join(PHANTOM_TASKS)}")
    return PHANTOM_TASKS[name]


def generate_task(
    out: str | os.PathLike,
    task: str,
    n: int,
    seed: int | None = None,
    n_test: int | None = None,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the phantom task ``task`` (a key of :data:`PHANTOM_TASKS`) as an nnU-Net v2 raw dataset,
    as :func:`generate_phantoms` does (files ``<task>_<i>_<cccc>.nii.gz`` with "-" -> "_"); ``seed``
    defaults to the task's own. dataset.json names the task's labels and channels and records the
    variant under ``volssl_phantoms``."""
    spec = get_task(task)
    seed = spec.seed if seed is None else int(seed)
    kind = PHANTOM_KINDS[spec.kind]
    meta = {
        "name": f"volssl-phantoms-{spec.name}",
        "description": spec.description,
        "channel_names": {str(c): name for c, name in enumerate(spec.channel_names)},
        "labels": spec.labels,
    }
    provenance = {"kind": spec.kind, "task": spec.name, "seed": seed,
                  "variant": dataclasses.asdict(spec.variant) if spec.variant is not None else None}
    return _write_dataset(out, spec.name.replace("-", "_"),
                          lambda i, shp: make_case(spec.kind, seed, i, shp, spec.variant), meta, kind.label_dtype,
                          kind.instance, provenance, n, n_test, shape, progress, overwrite)


# --------------------------------------------------------------------------------------------------
# preview


def render_phantom_preview(dataset_dir: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """PNG of the first training case of an nnU-Net v2 raw dataset: axial, coronal and sagittal
    slices (RAS, through the label's centre of mass or the middle) of every channel plus the label
    over the first channel. Works for any dataset with a ``dataset.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import nibabel as nib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    root = Path(dataset_dir)
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root}: no dataset.json (not an nnU-Net raw dataset)")
    meta = json.loads(meta_path.read_text())
    ending = meta.get("file_ending", FILE_ENDING)
    channels = meta.get("channel_names", {"0": "image"})
    firsts = sorted((root / "imagesTr").glob(f"*_0000{ending}"))
    if not firsts:
        raise FileNotFoundError(f"{root / 'imagesTr'}: no *_0000{ending} images")
    case = firsts[0].name[: -len(f"_0000{ending}")]

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asanyarray(img.dataobj), np.array(img.header.get_zooms()[:3])

    images = [load(root / "imagesTr" / f"{case}_{int(c):04d}{ending}")[0] for c in sorted(channels, key=int)]
    _, zooms = load(firsts[0])
    label_path = root / "labelsTr" / f"{case}{ending}"
    label = load(label_path)[0] if label_path.exists() else np.zeros(images[0].shape, np.uint8)
    fg = np.argwhere(label > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(label.shape) // 2
    views = [("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2))]
    names = [channels[c] for c in sorted(channels, key=int)]
    fig = Figure(figsize=(2.6 * (len(images) + 1), 2.6 * 3), dpi=110)
    rng = np.random.default_rng(0)
    lut = ListedColormap(np.concatenate([[[0, 0, 0, 0]], np.c_[rng.uniform(0.2, 1, (255, 3)), np.full(255, 0.6)]]))
    for row, (view, axis, (h, v)) in enumerate(views):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        aspect = zooms[v] / zooms[h]
        for col in range(len(images) + 1):
            ax = fig.add_subplot(3, len(images) + 1, row * (len(images) + 1) + col + 1)
            src = images[min(col, len(images) - 1) if col < len(images) else 0][tuple(sl)].T
            lo, hi = np.percentile(src, [0.5, 99.5])
            ax.imshow(src, cmap="gray", origin="lower", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect,
                      interpolation="nearest")
            if col == len(images):
                lab = label[tuple(sl)].T
                shown = np.where(lab > 0, (lab - 1) % 255 + 1, 0)
                ax.imshow(shown, cmap=lut, vmin=0, vmax=255, origin="lower", aspect=aspect, interpolation="nearest")
                title = "label"
            else:
                title = names[col]
            ax.set_title(f"{title} ({view} {int(centre[axis])})", fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"{meta.get('name', root.name)}: {case}", fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return png_path
