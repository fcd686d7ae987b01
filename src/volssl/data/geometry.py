"""Geometry of preprocessing: RAS reorientation, nonzero crop, resampling, and the exact inverse.

Forward (:func:`to_preprocessed`), for an array on the source file's voxel grid ``(..., X, Y, Z)``:

1. reorient to RAS: permute/flip voxel axes so that they point (closest to) R, A, S
   (``nibabel.orientations.io_orientation`` + ``apply_orientation``; no interpolation, an oblique
   affine stays oblique in ``reoriented_affine``);
2. crop to a bounding box (the nonzero box of the image, computed by the caller; see
   :func:`nonzero_bbox`);
3. resample the box to the target spacing: new size ``max(1, round(n * spacing / target))`` per
   axis, voxel centres aligned as in ``scipy.ndimage.zoom(grid_mode=True)`` (box edges map onto box
   edges). Images: cubic B-spline (order 3). Labels: nearest, or "linear" = each class's one-hot map
   resampled with order 1 and the argmax taken (cost grows with the number of classes).
   Strong anisotropy (nnU-Net's "separate z"): when ``max(spacing) / min(spacing) >`` the threshold
   (3 by default) for the source or the target spacing, and a single axis has the largest spacing,
   that low-resolution axis is resampled with nearest neighbour (order 0) and each plane across it
   with the in-plane order, so thick slices are never blended.

Everything needed to undo it is a :class:`GeometryRecord` (a JSON-able dict in ``props/<id>.json``).
:func:`to_original` maps an array on the preprocessed grid back: resample to the box, pad the box
into the reoriented grid with ``fill``, undo the orientation. The result has exactly the source
file's (3D) shape, and ``record.original_affine`` is the source file's affine, so saving it with that
affine (or with the source header) reproduces the file's geometry exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

RAS = axcodes2ornt(("R", "A", "S"))


# ---------------------------------------------------------------------------------------------- orientation


def ras_orientation(affine: np.ndarray) -> np.ndarray:
    """(3, 2) nibabel orientation ``[[out_axis, flip], ...]`` that brings the voxel axes to RAS."""
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise ValueError(f"cannot determine the orientation of affine\n{np.asarray(affine)}")
    return ornt


def reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply ``ornt`` to the last three axes of ``array`` (..., X, Y, Z); a view when possible."""
    lead = array.ndim - 3
    moved = np.moveaxis(array, range(lead), range(3, 3 + lead)) if lead else array
    out = apply_orientation(moved, np.asarray(ornt))
    return np.moveaxis(out, range(3, 3 + lead), range(lead)) if lead else out


def unreorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`reorient`: from RAS voxel order back to the orientation ``ornt`` came from."""
    return reorient(array, ornt_transform(RAS, np.asarray(ornt, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- crop


def nonzero_bbox(mask: np.ndarray) -> list[list[int]]:
    """Half-open bounding box ``[[x0, x1], [y0, y1], [z0, z1]]`` of a 3D boolean mask (whole array if empty)."""
    if mask.ndim != 3:
        raise ValueError(f"nonzero_bbox expects a 3D mask, got shape {mask.shape}")
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return [[0, int(n)] for n in mask.shape]
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


# ---------------------------------------------------------------------------------------------- resampling


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """Grid size after resampling ``shape`` at ``spacing`` to ``target`` (mm): ``max(1, round(n s / t))``."""
    if target is None:
        return tuple(int(n) for n in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def lowres_axis(spacing_from: Sequence[float], spacing_to: Sequence[float], threshold: float | None) -> int | None:
    """The axis resampled separately (nnU-Net "separate z"), or None.

    Anisotropic = ``max / min > threshold``, checked for the source spacing first, then the target;
    the axis is the one with the largest spacing, and only when that axis is unique.
    """
    if threshold is None:
        return None
    for sp in (np.asarray(spacing_from, dtype=np.float64), np.asarray(spacing_to, dtype=np.float64)):
        if sp.max() / sp.min() > threshold:
            axes = np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-6))
            return int(axes[0]) if axes.size == 1 else None
    return None


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel centre under nearest-neighbour, grid-mode alignment."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.clip(idx, 0, n_in - 1)


def _zoom(a: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    factors = [n / m for n, m in zip(shape, a.shape)]
    out = ndimage.zoom(a, factors, order=order, mode="nearest", grid_mode=True, output=np.float32)
    if out.shape != tuple(shape):  # rounding inside zoom; never seen, but make it loud
        raise RuntimeError(f"zoom produced {out.shape}, expected {tuple(shape)}")
    return out


def _resample_3d(a: np.ndarray, shape: tuple[int, int, int], order: int, axis: int | None) -> np.ndarray:
    if order == 0:
        ix = [_nearest_index(n, m) for n, m in zip(a.shape, shape)]
        return a[np.ix_(*ix)]
    if axis is None:
        return _zoom(a, shape, order)
    moved = np.moveaxis(a, axis, 0)
    inplane = tuple(s for i, s in enumerate(shape) if i != axis)
    picks = _nearest_index(moved.shape[0], shape[axis])
    unique, inverse = np.unique(picks, return_inverse=True)
    if inplane == moved.shape[1:]:
        planes = moved[unique].astype(np.float32)
    else:
        planes = np.stack([_zoom(moved[u], inplane, order) for u in unique])
    return np.moveaxis(planes[inverse.reshape(-1)], 0, axis)


def resample_image(
    data: np.ndarray,
    shape: Sequence[int],
    spacing_from: Sequence[float],
    spacing_to: Sequence[float],
    order: int = 3,
    anisotropy_threshold: float | None = 3.0,
) -> np.ndarray:
    """Resample an image (X, Y, Z) or (C, X, Y, Z) to spatial ``shape``; float32 out.

    ``order`` is the spline order (3 cubic, 1 linear, 0 nearest). The spacings (mm) only decide the
    separate handling of a low-resolution axis (see module docstring).
    """
    shape = tuple(int(s) for s in shape)
    if data.ndim not in (3, 4):
        raise ValueError(f"resample_image expects (X, Y, Z) or (C, X, Y, Z), got shape {data.shape}")
    if tuple(data.shape[-3:]) == shape:
        return np.asarray(data, dtype=np.float32)
    axis = lowres_axis(spacing_from, spacing_to, anisotropy_threshold)
    if data.ndim == 3:
        return _resample_3d(np.asarray(data, dtype=np.float32), shape, order, axis)
    return np.stack([_resample_3d(np.asarray(c, dtype=np.float32), shape, order, axis) for c in data])


def resample_label(
    label: np.ndarray,
    shape: Sequence[int],
    spacing_from: Sequence[float],
    spacing_to: Sequence[float],
    interpolation: str = "nearest",
    anisotropy_threshold: float | None = 3.0,
) -> np.ndarray:
    """Resample a label map (X, Y, Z) to ``shape`` keeping its dtype.

    ``interpolation``: "nearest", or "linear" (per-class one-hot resampled with order 1, argmax;
    the low-resolution axis, if any, stays nearest).
    """
    if interpolation not in ("nearest", "linear"):
        raise ValueError(f"label interpolation must be 'nearest' or 'linear', got {interpolation!r}")
    shape = tuple(int(s) for s in shape)
    if label.ndim != 3:
        raise ValueError(f"resample_label expects (X, Y, Z), got shape {label.shape}")
    if tuple(label.shape) == shape:
        return label
    if interpolation == "nearest":
        return _resample_3d(label, shape, 0, None)
    axis = lowres_axis(spacing_from, spacing_to, anisotropy_threshold)
    classes = np.unique(label)
    out = np.full(shape, classes[0], dtype=label.dtype)
    if classes.size == 1:
        return out
    best = np.full(shape, -1.0, dtype=np.float32)
    for c in classes:
        score = _resample_3d((label == c).astype(np.float32), shape, 1, axis)
        better = score > best
        out[better] = c
        best[better] = score[better]
    return out


# ---------------------------------------------------------------------------------------------- record


def _floats(a) -> list:
    return np.asarray(a, dtype=np.float64).tolist()


def _ints(a) -> list:
    return [int(x) for x in a]


@dataclass
class GeometryRecord:
    """Everything that maps the preprocessed grid back onto the source file's grid.

    Shapes are spatial (X, Y, Z); spacings in mm; affines (4, 4) voxel -> RAS mm.

    Attributes:
        original_shape: the file's 3D array shape (as :func:`volssl.data.readers.read_volume` returns it).
        original_affine: the file's affine.
        orientation: nibabel orientation (3, 2) applied to reach RAS voxel order.
        reoriented_shape, reoriented_affine, reoriented_spacing: the grid after reorientation.
        crop_bbox: half-open box ``[[x0, x1], ...]`` on the reoriented grid.
        target_spacing: the plan's spacing (None = keep).
        shape, spacing, affine: the preprocessed grid (spacing = exact voxel size after rounding
            the shape, which can differ slightly from ``target_spacing``).
        anisotropy_threshold: separate-z threshold used when resampling (the inverse uses it too).
        source_axes: "xyz", or "zyx" for TIFF/Zarr whose stored array is the transpose.
    """

    original_shape: list[int]
    original_affine: list[list[float]]
    orientation: list[list[float]]
    reoriented_shape: list[int]
    reoriented_affine: list[list[float]]
    reoriented_spacing: list[float]
    crop_bbox: list[list[int]]
    target_spacing: list[float] | None
    shape: list[int]
    spacing: list[float]
    affine: list[list[float]]
    anisotropy_threshold: float | None = 3.0
    source_axes: str = "xyz"
    version: int = 1

    @classmethod
    def create(
        cls,
        shape: Sequence[int],
        affine: np.ndarray,
        target_spacing: Sequence[float] | None = None,
        bbox: Sequence[Sequence[int]] | None = None,
        anisotropy_threshold: float | None = 3.0,
        source_axes: str = "xyz",
    ) -> "GeometryRecord":
        """Plan the geometry for a file of spatial ``shape`` and ``affine``.

        ``bbox`` is the crop box on the *reoriented* grid (None: no crop).
        """
        shape = tuple(int(s) for s in shape[-3:])
        affine = np.asarray(affine, dtype=np.float64)
        ornt = ras_orientation(affine)
        r_affine = affine @ inv_ornt_aff(ornt, shape)
        r_shape = tuple(int(shape[int(i)]) for i in np.argsort(ornt[:, 0]))
        r_spacing = np.sqrt((r_affine[:3, :3] ** 2).sum(0))
        if bbox is None:
            bbox = [[0, n] for n in r_shape]
        bbox = [[int(lo), int(hi)] for lo, hi in bbox]
        if any(not 0 <= lo < hi <= n for (lo, hi), n in zip(bbox, r_shape)) or len(bbox) != 3:
            raise ValueError(f"crop box {bbox} does not fit the reoriented shape {r_shape}")
        cropped = [hi - lo for lo, hi in bbox]
        if target_spacing is not None:
            target_spacing = [float(t) for t in target_spacing]
            if len(target_spacing) != 3 or min(target_spacing) <= 0:
                raise ValueError(f"target spacing must be three positive numbers (mm), got {target_spacing}")
        new = target_shape(cropped, r_spacing, target_spacing)
        f = np.asarray(cropped, dtype=np.float64) / np.asarray(new)
        step = np.eye(4)
        step[:3, :3] = np.diag(f)
        step[:3, 3] = [lo for lo, _ in bbox] + 0.5 * f - 0.5
        return cls(
            original_shape=_ints(shape), original_affine=_floats(affine), orientation=_floats(ornt),
            reoriented_shape=_ints(r_shape), reoriented_affine=_floats(r_affine),
            reoriented_spacing=_floats(r_spacing), crop_bbox=bbox, target_spacing=target_spacing,
            shape=_ints(new), spacing=_floats(r_spacing * f), affine=_floats(r_affine @ step),
            anisotropy_threshold=anisotropy_threshold, source_axes=source_axes,
        )

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(hi - lo for lo, hi in self.crop_bbox)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeometryRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _as_record(record: GeometryRecord | dict) -> GeometryRecord:
    return record if isinstance(record, GeometryRecord) else GeometryRecord.from_dict(record)


def to_preprocessed(
    array: np.ndarray,
    record: GeometryRecord | dict,
    is_label: bool = False,
    order: int = 3,
    label_interpolation: str = "nearest",
) -> np.ndarray:
    """Map an array on the source grid (..., X, Y, Z) onto the preprocessed grid of ``record``.

    Images (any leading axes, e.g. channels) come out float32; labels (X, Y, Z) keep their dtype.
    """
    rec = _as_record(record)
    if tuple(array.shape[-3:]) != tuple(rec.original_shape):
        raise ValueError(f"array shape {array.shape} does not end with the source shape {tuple(rec.original_shape)}")
    return from_reoriented(reorient(array, rec.orientation), rec, is_label, order, label_interpolation)


def from_reoriented(
    array: np.ndarray,
    record: GeometryRecord | dict,
    is_label: bool = False,
    order: int = 3,
    label_interpolation: str = "nearest",
) -> np.ndarray:
    """The second half of :func:`to_preprocessed`: crop and resample an array already on the
    reoriented (RAS voxel order) grid (..., *record.reoriented_shape)."""
    rec = _as_record(record)
    if tuple(array.shape[-3:]) != tuple(rec.reoriented_shape):
        raise ValueError(
            f"array shape {array.shape} does not end with the reoriented shape {tuple(rec.reoriented_shape)}"
        )
    box = tuple(slice(lo, hi) for lo, hi in rec.crop_bbox)
    r = array[(Ellipsis,) + box]
    if is_label:
        out = resample_label(r, rec.shape, rec.reoriented_spacing, rec.spacing, label_interpolation,
                             rec.anisotropy_threshold)
    else:
        out = resample_image(r, rec.shape, rec.reoriented_spacing, rec.spacing, order, rec.anisotropy_threshold)
    return np.ascontiguousarray(out)


def to_original(
    array: np.ndarray,
    record: GeometryRecord | dict,
    is_label: bool = False,
    order: int = 3,
    label_interpolation: str = "nearest",
    fill: float = 0,
) -> np.ndarray:
    """Map an array on the preprocessed grid back onto the source file's voxel grid.

    Args:
        array: (X, Y, Z) or (C, X, Y, Z) with spatial shape ``record.shape`` (e.g. a prediction, or
            per-class probabilities).
        record: the case's :class:`GeometryRecord` (or its dict from ``props/<id>.json``).
        is_label: integer label map: resampled with ``label_interpolation``, dtype kept.
        order: spline order for non-label arrays (3 cubic, 1 linear, 0 nearest).
        fill: value outside the crop box.

    Returns:
        array (..., *record.original_shape): on the grid of the source file, whose affine is
        ``record.original_affine``. For ``source_axes == "zyx"`` (TIFF/Zarr) transpose the last three
        axes to get the file's own (z, y, x) order.
    """
    rec = _as_record(record)
    if tuple(array.shape[-3:]) != tuple(rec.shape):
        raise ValueError(f"array shape {array.shape} does not end with the preprocessed shape {tuple(rec.shape)}")
    if is_label and array.ndim != 3:
        raise ValueError(f"a label map must be (X, Y, Z), got shape {array.shape}")
    cropped = rec.cropped_shape
    if is_label:
        back = resample_label(array, cropped, rec.spacing, rec.reoriented_spacing, label_interpolation,
                              rec.anisotropy_threshold)
    else:
        back = resample_image(array, cropped, rec.spacing, rec.reoriented_spacing, order, rec.anisotropy_threshold)
    full = np.full(array.shape[:-3] + tuple(rec.reoriented_shape), fill, dtype=back.dtype)
    full[(Ellipsis,) + tuple(slice(lo, hi) for lo, hi in rec.crop_bbox)] = back
    out = np.ascontiguousarray(unreorient(full, rec.orientation))
    if tuple(out.shape[-3:]) != tuple(rec.original_shape):  # would be a bug in this module
        raise RuntimeError(f"to_original produced {out.shape}, expected {tuple(rec.original_shape)}")
    return out
