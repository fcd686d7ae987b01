"""Segmentation metrics on label maps: Dice and normalised surface distance (NSD).

Stateless functions on numpy label arrays of any integer (or integral float) dtype, 2D or 3D, with
the prediction and the reference on the same voxel grid. A *class* is either one label value (``1``)
or a region, a tuple of label values scored as their union (``(1, 2, 3)``, nnU-Net v2 region-based
datasets such as BraTS).

Definitions (per class, ``P`` / ``R`` the predicted / reference voxel sets)
    * Dice: ``2 |P ∩ R| / (|P| + |R|)``.
    * NSD at tolerance ``tau`` mm (Nikolov et al. 2021, arXiv:2111.05408, the boundary-counting
      variant of MONAI's ``compute_surface_dice`` with ``use_subvoxels=False``): the surface of a mask
      is its voxels that a binary erosion with face connectivity (6-neighbourhood in 3D, image
      outside = background) removes, i.e. ``mask & ~erode(mask)``. With ``S_P`` / ``S_R`` the two
      surfaces and ``d(x, S)`` the Euclidean distance in mm from voxel centre ``x`` to the nearest
      voxel centre of ``S`` (voxel axes scaled by the spacing):
      ``NSD = (#{x in S_P: d(x, S_R) <= tau} + #{y in S_R: d(y, S_P) <= tau}) / (|S_P| + |S_R|)``.
      Distances equal to ``tau`` up to floating-point rounding (relative 1e-9) count as within.
      Only the surfaces matter, so both masks are cropped to their union's bounding box first.

Empty classes (the conventions of nnU-Net's evaluation for Dice and of MONAI for NSD)
    * class absent from both prediction and reference: ``empty_score`` (default NaN; NaN values are
      left out of every mean, as nnU-Net does with ``nanmean``). Pass ``empty_score=1.0`` to score
      a correctly empty prediction as perfect instead (MONAI's ``compute_dice(ignore_empty=False)``).
    * class present in exactly one of them: Dice 0 and NSD 0.
    MONAI agrees with these numbers wherever the reference is non-empty; with an empty reference its
    ``compute_dice(ignore_empty=True)`` (the ``DiceMetric`` default) gives NaN even for a non-empty
    prediction, where we give 0 (a false positive is an error).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

ClassSpec = Union[int, tuple[int, ...]]

# relative slack of the tolerance comparison, so that a distance that equals the tolerance
# mathematically (e.g. sqrt(0.6^2 + 0.8^2) vs 1.0) is not lost to rounding
_TIE_RTOL = 1e-9


def class_mask(seg: np.ndarray, label: ClassSpec) -> np.ndarray:
    """Boolean mask of ``label`` (an int, or a tuple of ints scored as their union) in ``seg``."""
    if isinstance(label, (tuple, list)):
        if len(label) == 0:
            raise ValueError("a region needs at least one label value, got an empty tuple")
        return np.isin(seg, np.asarray(label))
    return seg == label


def dice(pred: np.ndarray, ref: np.ndarray, label: ClassSpec, empty_score: float = float("nan")) -> float:
    """Dice coefficient of one class.

    Args:
        pred: predicted label map, shape (X, Y, Z) (or (X, Y)).
        ref: reference label map, same shape.
        label: class value, or tuple of values scored as one region.
        empty_score: value when the class is absent from both maps (NaN: excluded from means).

    Returns:
        Dice in [0, 1] (0 when the class is in exactly one of the maps), or ``empty_score``.
    """
    _check_pair(pred, ref)
    return dice_from_masks(class_mask(pred, label), class_mask(ref, label), empty_score)


def normalized_surface_distance(
    pred: np.ndarray,
    ref: np.ndarray,
    label: ClassSpec,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
    empty_score: float = float("nan"),
) -> float:
    """Normalised surface distance (surface Dice) of one class at ``tolerance_mm``.

    Args:
        pred: predicted label map, shape (X, Y, Z) (or (X, Y)).
        ref: reference label map, same shape and grid.
        label: class value, or tuple of values scored as one region.
        spacing_mm: voxel size along each array axis in mm (length = ``pred.ndim``).
        tolerance_mm: largest boundary deviation in mm that counts as correct (>= 0).
        empty_score: value when the class is absent from both maps (NaN: excluded from means).

    Returns:
        NSD in [0, 1] (see the module docstring; 0 when the class is in exactly one map), or
        ``empty_score``.
    """
    _check_pair(pred, ref)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    tolerance = _check_tolerance(tolerance_mm)
    return nsd_from_masks(class_mask(pred, label), class_mask(ref, label), spacing, tolerance, empty_score)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[ClassSpec],
    spacing_mm: Sequence[float],
    tolerance_mm: float,
    empty_score: float = float("nan"),
) -> list[tuple[float, float]]:
    """Dice and NSD of every class of one case: ``[(dice, nsd) for label in labels]``.

    Same arguments and conventions as :func:`dice` and :func:`normalized_surface_distance`; the class
    masks are computed once per class.
    """
    _check_pair(pred, ref)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    tolerance = _check_tolerance(tolerance_mm)
    out = []
    for label in labels:
        p, r = class_mask(pred, label), class_mask(ref, label)
        out.append((dice_from_masks(p, r, empty_score), nsd_from_masks(p, r, spacing, tolerance, empty_score)))
    return out


def dice_from_masks(p: np.ndarray, r: np.ndarray, empty_score: float = float("nan")) -> float:
    """Dice of two boolean masks of the same shape (see :func:`dice`)."""
    size = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if size == 0:
        return float(empty_score)
    return 2.0 * int(np.count_nonzero(p & r)) / size


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: ``mask & ~erode(mask)`` with face connectivity and the
    outside of the array taken as background (a mask touching the border has a surface there)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def nsd_from_masks(
    p: np.ndarray,
    r: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
    empty_score: float = float("nan"),
) -> float:
    """NSD of two boolean masks of the same shape (see :func:`normalized_surface_distance`)."""
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return float(empty_score)
    if not p_any or not r_any:
        return 0.0
    # crop to the union's bounding box grown by one voxel: the surfaces and the distances between
    # them are the same as on the whole array (the margin is background, like the outside)
    box = _bounding_box(p | r, margin=1)
    p, r = p[box], r[box]
    scale = np.asarray(spacing_mm, dtype=np.float64)
    xp = np.argwhere(surface(p)) * scale  # surface voxel centres in mm, (n_p, ndim)
    xr = np.argwhere(surface(r)) * scale
    limit = float(tolerance_mm) * (1.0 + _TIE_RTOL)
    correct = _count_within(xp, xr, limit) + _count_within(xr, xp, limit)
    return correct / (len(xp) + len(xr))


def _count_within(points: np.ndarray, targets: np.ndarray, limit: float) -> int:
    """How many ``points`` have a ``targets`` point within Euclidean distance ``limit``.

    Exact nearest-neighbour distances from a KD-tree over the target surface (as MONAI does on CPU;
    the same numbers as a distance transform of the whole box, about 10x faster), searched only up
    to the limit.
    """
    bound = limit * (1.0 + 1e-6) + 1e-12  # the search bound is strict; the comparison below decides
    dist = cKDTree(targets, leafsize=32).query(points, k=1, distance_upper_bound=bound)[0]
    return int(np.count_nonzero(dist <= limit))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D, got shape {tuple(pred.shape)}")


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64)))
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm needs {ndim} values (one per array axis), got {spacing}")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be finite and > 0, got {spacing}")
    return spacing


def _check_tolerance(tolerance_mm: float) -> float:
    tolerance = float(tolerance_mm)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    return tolerance
