"""The quality filter of ``volssl preprocess``: which input volumes are excluded, and why.

The defaults are the S3D paper's pre-training filter (FOV < 50 mm on any axis, spacing > 6.5 mm on
any axis, file < 200 kB); each is switched off with ``None``. The structural rules are always on:
not a regular file (a named pipe, a symbolic link loop), unreadable/truncated file, not 3D (a
trailing axis of size 1 is fine), complex or colour voxels, larger than the run's voxel limit
(read from the header, before any data), missing Zarr chunks, zero/negative voxel size, non-finite
or constant image, values beyond float32 range (the image is stored as float32), channels on
different grids, label map on a different grid (shape or affine), non-integer label values, label
values not declared in dataset.json.

Each rule is one small function returning a reason (a sentence) or None. :func:`check_case` reads a
case's files once, applies every rule and returns the problems together with the arrays it read.
Every problem carries a short ``rule`` code (used in the JSON report):

``missing`` ``channel_count`` ``not_regular`` ``file_size`` ``unreadable`` ``not_3d`` ``bad_dtype``
``too_large`` ``missing_chunks`` ``no_spacing`` ``bad_spacing`` ``bad_affine`` ``spacing`` ``fov``
``nonfinite`` ``out_of_range`` ``constant`` ``channel_geometry`` ``label_shape`` ``label_affine``
``label_nonint`` ``label_values`` (and ``error`` for an unexpected failure while preprocessing).

Warnings (the case is used; the note goes to the report): ``assumed_spacing`` (a NIfTI without
geometry read with 1 mm voxels), ``no_label`` (a training case without a label map),
``missing_chunks`` (allowed missing Zarr chunks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from volssl.data.readers import SourceCase, VolumeError, check_source_path, read_volume, source_bytes


@dataclass
class QualityRules:
    """Exclusion thresholds (None switches a rule off).

    Attributes:
        min_fov_mm: exclude when ``shape * spacing`` < this along any voxel axis (mm).
        max_spacing_mm: exclude when the voxel size > this along any voxel axis (mm).
        min_file_bytes: exclude image files smaller than this on disk (bytes; 200 kB = 200_000).
        affine_atol_mm: largest entry-wise difference (mm) between the affines of a label map (or of
            another channel) and the image for them to count as the same grid.
    """

    min_fov_mm: float | None = 50.0
    max_spacing_mm: float | None = 6.5
    min_file_bytes: int | None = 200_000
    affine_atol_mm: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("min_fov_mm", "max_spacing_mm", "min_file_bytes"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise ValueError(f"QualityRules.{name} must be None (off) or a number >= 0, got {v!r}")
        if not self.affine_atol_mm >= 0:
            raise ValueError(f"QualityRules.affine_atol_mm must be >= 0, got {self.affine_atol_mm!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Problem:
    """Why a case is excluded: ``rule`` code, the offending ``path`` and a readable ``reason``."""

    rule: str
    path: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckedCase:
    """What :func:`check_case` found: ``problems`` (empty = usable) and, when usable, the arrays.

    ``image`` is float32 (C, X, Y, Z) in the file's voxel order, ``affine`` its (4, 4) RAS affine,
    ``label`` the integer-valued label map (X, Y, Z) (int64) or None. ``warnings`` are notes about a
    case that is used anyway (same fields as a problem), e.g. a NIfTI read with assumed 1 mm voxels.
    """

    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    image: np.ndarray | None = None
    affine: np.ndarray | None = None
    label: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each voxel axis: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ---------------------------------------------------------------------------------------------- rules


def check_file_size(path: str, min_bytes: int | None) -> str | None:
    if min_bytes is None:
        return None
    size = source_bytes(path)
    if size < min_bytes:
        return f"file is {size / 1000:.1f} kB < {min_bytes / 1000:g} kB (likely empty)"
    return None


def check_spacing(spacing: np.ndarray, max_mm: float | None) -> str | None:
    if max_mm is None:
        return None
    bad = [f"{_fmt(s)} mm along axis {i}" for i, s in enumerate(spacing) if s > max_mm]
    return f"spacing {', '.join(bad)} > {_fmt(max_mm)} mm" if bad else None


def check_fov(shape: tuple[int, ...], spacing: np.ndarray, min_mm: float | None) -> str | None:
    if min_mm is None:
        return None
    fov = np.asarray(shape[-3:], dtype=np.float64) * spacing
    bad = [f"{_fmt(f)} mm along axis {i}" for i, f in enumerate(fov) if f < min_mm]
    return f"field of view {', '.join(bad)} < {_fmt(min_mm)} mm" if bad else None


def check_finite(array: np.ndarray) -> str | None:
    if np.issubdtype(array.dtype, np.integer):
        return None
    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    return f"image has {n_bad} non-finite (NaN/inf) voxels" if n_bad else None


def check_float32_range(raw: np.ndarray, cast: np.ndarray) -> str | None:
    """Values of a finite ``raw`` image that became inf in its float32 ``cast`` (beyond +-3.4e38)."""
    if cast.dtype == raw.dtype or np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.bool_):
        return None
    n_bad = int(cast.size - np.count_nonzero(np.isfinite(cast)))
    if not n_bad:
        return None
    peak = float(np.max(np.abs(raw[~np.isfinite(cast)])))
    return (f"values beyond float32 range (max |value| {peak:.3g}; float32, the stored type, holds up to "
            f"{float(np.finfo(np.float32).max):.3g}): {n_bad} voxel(s) would become inf")


def check_constant(array: np.ndarray) -> str | None:
    lo, hi = array.min(), array.max()
    return f"image is constant (every voxel = {_fmt(float(lo))})" if lo == hi else None


def check_shape_match(shape: tuple[int, ...], ref_shape: tuple[int, ...], what: str) -> str | None:
    if tuple(shape) != tuple(ref_shape):
        return f"{what} shape {tuple(shape)} differs from the image shape {tuple(ref_shape)}"
    return None


def check_affine_match(affine: np.ndarray, ref_affine: np.ndarray, atol_mm: float, what: str) -> str | None:
    diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(ref_affine))))
    if diff > atol_mm:
        return f"{what} affine differs from the image affine (max difference {_fmt(diff)} > {_fmt(atol_mm)})"
    return None


def check_integer_labels(label: np.ndarray) -> str | None:
    """A float label map must hold whole numbers (they are never rounded) within the int64 range."""
    if np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.bool_):
        return None
    finite = np.isfinite(label)
    if not finite.all():
        return f"label map has {int(label.size - np.count_nonzero(finite))} non-finite (NaN/inf) values"
    frac = label != np.round(label)
    if np.any(frac):
        example = float(label[frac].flat[0])
        return (f"label map has {int(np.count_nonzero(frac))} non-integer values (e.g. {example:g}); label values "
                "must be whole numbers (they are not rounded)")
    if label.size and float(np.max(np.abs(label))) >= 2.0 ** 63:
        return f"label map has values beyond the integer range (max |value| {float(np.max(np.abs(label))):.3g})"
    return None


def check_label_values(values: np.ndarray, declared: tuple[int, ...] | None) -> str | None:
    if declared is None:
        return None
    extra = sorted(set(int(v) for v in values) - set(declared))
    if extra:
        shown = extra[:10] + (["..."] if len(extra) > 10 else [])
        return f"label values {shown} are not declared in dataset.json (declared: {list(declared)})"
    return None


# ---------------------------------------------------------------------------------------------- case


def check_case(
    case: SourceCase, rules: QualityRules, *, max_voxels: int | None = None, allow_missing_chunks: bool = False,
) -> CheckedCase:
    """Read a case's files and apply every rule.

    Checks in stages, stopping after the first stage that finds a problem (so a tiny file is not
    read): discovery error; every file is a regular file (nothing else is opened); file sizes;
    reading (unreadable, not 3D, not real scalars, larger than ``max_voxels``, missing Zarr chunks,
    no or invalid spacing, bad affine); the image rules (spacing, FOV, finite, float32 range,
    constant, same grid for every channel); the label rules.

    Args:
        case: the case (all channels and the label map).
        rules: the thresholds.
        max_voxels: largest declared shape (voxels of one file) that is read; checked on the header
            before any voxel data (None: no limit).
        allow_missing_chunks: read Zarr chunk files missing from the store as the fill value (with a
            warning) instead of excluding the volume.

    Returns:
        CheckedCase with the problems and warnings, and the image (float32 (C, X, Y, Z)), affine and
        label (int64 (X, Y, Z) or None) when there are no problems.
    """
    out = CheckedCase()
    out.warnings.extend(Problem(rule, path, reason) for rule, path, reason in case.warnings)
    if not _files_ok(case, rules, out):
        return out
    read = partial(_read_noted, out=out, spacing=case.spacing, max_voxels=max_voxels,
                   allow_missing_chunks=allow_missing_chunks)
    channels, affine = _read_channels(case, rules, read, out)
    if out.problems:
        return out
    image = np.stack(channels) if len(channels) > 1 else channels[0][None]
    del channels

    label = None
    if case.label is not None:
        label = _read_label(case, image.shape[1:], affine, rules, read, out)
        if out.problems:
            return out

    out.image, out.affine, out.label = image, affine, label
    return out


def _files_ok(case: SourceCase, rules: QualityRules, out: CheckedCase) -> bool:
    """The stages before reading: discovery error, regular files, image file sizes.

    Appends the problems of the first failing stage to ``out``; True when all pass.
    """
    if case.error:
        out.problems.append(Problem(case.error_rule, case.images[0] if case.images else case.id, case.error))
        return False
    for path in [*case.images, *([case.label] if case.label is not None else [])]:
        try:
            check_source_path(path)
        except VolumeError as e:
            out.problems.append(Problem(e.rule, e.path, e.reason))
    if out.problems:
        return False
    for path in case.images:
        reason = check_file_size(path, rules.min_file_bytes)
        if reason:
            out.problems.append(Problem("file_size", path, reason))
    return not out.problems


def _read_noted(path: str, out: CheckedCase, spacing, max_voxels: int | None,
                allow_missing_chunks: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_volume` of ``path`` ((X, Y, Z) array, (4, 4) affine); its warnings go to ``out.warnings``."""
    notes: list[tuple[str, str]] = []
    try:
        return read_volume(path, spacing=spacing, max_voxels=max_voxels,
                           allow_missing_chunks=allow_missing_chunks, warnings=notes)
    finally:
        out.warnings.extend(Problem(rule, str(path), reason) for rule, reason in notes)


def _read_channels(case: SourceCase, rules: QualityRules, read: Callable[[str], tuple[np.ndarray, np.ndarray]],
                   out: CheckedCase) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Read every channel and apply the image rules (problems go to ``out``).

    Returns:
        (the usable channels, float32 (X, Y, Z) each, the (4, 4) affine of the first channel or None).
    """
    channels: list[np.ndarray] = []  # float32, (X, Y, Z) each
    affine = None
    for c, path in enumerate(case.images):
        try:
            raw, aff = read(path)
        except VolumeError as e:
            out.problems.append(Problem(e.rule, e.path, e.reason))
            continue
        name = f"channel {c} ({case.channels[c]})" if len(case.images) > 1 else "image"
        if c == 0:
            affine = aff
            spacing = voxel_sizes(aff)
            for rule, reason in (
                ("spacing", check_spacing(spacing, rules.max_spacing_mm)),
                ("fov", check_fov(raw.shape, spacing, rules.min_fov_mm)),
            ):
                if reason:
                    out.problems.append(Problem(rule, path, reason))
        else:
            reason = check_shape_match(raw.shape, channels[0].shape, name) if channels else None
            if reason is None and affine is not None:
                reason = check_affine_match(aff, affine, rules.affine_atol_mm, name)
            if reason:
                out.problems.append(Problem("channel_geometry", path, reason))
                continue
        reason = check_finite(raw)
        if reason:
            out.problems.append(Problem("nonfinite", path, reason))
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # the stored type: check the values after the cast
            cast = np.array(raw, dtype=np.float32, order="C")  # an own copy (raw may be a file's memory map)
        reason = check_float32_range(raw, cast)
        del raw
        if reason:
            out.problems.append(Problem("out_of_range", path, reason))
            continue
        reason = check_constant(cast)
        if reason:
            out.problems.append(Problem("constant", path, reason))
        channels.append(cast)
    return channels, affine


def _read_label(case: SourceCase, shape: tuple[int, ...], affine: np.ndarray | None, rules: QualityRules,
                read: Callable[[str], tuple[np.ndarray, np.ndarray]], out: CheckedCase) -> np.ndarray | None:
    """Read ``case.label`` and apply the label rules against the image grid (``shape`` (X, Y, Z), ``affine``).

    Returns:
        the int64 (X, Y, Z) label map once its values are integers (problems go to ``out``), else None.
    """
    try:
        raw, lab_aff = read(case.label)
    except VolumeError as e:
        out.problems.append(Problem(e.rule, e.path, e.reason))
        return None
    label = None
    checks = [("label_shape", check_shape_match(raw.shape, shape, "label"))]
    if checks[0][1] is None:
        checks.append(("label_affine", check_affine_match(lab_aff, affine, rules.affine_atol_mm, "label")))
    checks.append(("label_nonint", check_integer_labels(raw)))
    if checks[-1][1] is None:
        label = np.asarray(raw).astype(np.int64, copy=False)
        checks.append(("label_values", check_label_values(np.unique(label), case.label_values)))
    for rule, reason in checks:
        if reason:
            out.problems.append(Problem(rule, case.label, reason))
    return label
