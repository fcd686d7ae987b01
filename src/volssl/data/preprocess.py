"""``volssl preprocess SRC OUT``: quality filter + preprocessing of every volume, parallel,
resumable and shardable, into the layout read by :class:`volssl.data.dataset.PreprocessedDataset`.

Per case (all channels of one case together): read and check (:mod:`volssl.data.quality`),
reorient to RAS, crop to the nonzero box (union over channels and the label), resample to the
plan's spacing (:mod:`volssl.data.geometry`), clip intensities to percentiles, normalise per
channel, then write ``images/<id>.b2nd`` (float32 (C, X, Y, Z)), ``labels/<id>.b2nd`` (smallest
integer dtype), ``props/<id>.json`` (geometry record, normalisation statistics, ``class_locations``)
and finally the manifest row. Cropping happens before resampling (cheaper, and the nonzero box is
exact on the source grid); percentiles and z-score statistics are computed on the cropped,
resampled volume (over the nonzero mask for "zscore_nonzero").

Resuming: a case counts as finished only once its manifest row exists; arrays and props are
written atomically before the row. A rerun skips a case whose row exists with the same source
fingerprint (:func:`volssl.data.readers.fingerprint`: name, size and mtime of the files) and, for
"ok" rows, whose files exist; anything else (no row, a killed half-written case, a changed source)
is redone. An OUT written with another plan is refused.

Sharding: case ``k`` belongs to shard ``blake2b(id) mod n`` (stable when cases are added). Each
shard appends to its own manifest file and report ``report-shard-i-of-n.json``; each shard also
rewrites the merged ``report.json`` from the shard reports present.

Untrusted inputs (see :mod:`volssl.data.readers`): each volume's header is checked against
``max_voxels`` before its data are read (default :func:`volssl.data.readers.default_max_voxels`:
available memory / 32 B; not part of the plan, so shards on different machines agree); Zarr
volumes with missing chunk files are excluded unless ``allow_missing_chunks``. Cases excluded for
either rule ("too_large", "missing_chunks") are checked again on every run, so a rerun with a
larger limit or the flag picks them up. Notes about cases that are used anyway (no label map, a
NIfTI read with assumed 1 mm voxels) and about the dataset (label files without images, ignored
files) are listed under ``"warnings"`` in the reports and the printed summary; a case's notes are
kept in its manifest row (key ``warnings``) so that a resumed run still reports them.

Process hygiene: every worker watches the main process and exits within a second when it is gone
(killed with SIGKILL, which leaves no chance to stop the pool), instead of finishing its case and
idling forever.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from volssl.data.geometry import GeometryRecord, from_reoriented, nonzero_bbox, ras_orientation, reorient
from volssl.data.manifest import CaseRecord, ManifestWriter, read_manifest
from volssl.data.quality import Problem, QualityRules, check_case
from volssl.data.readers import SourceCase, default_max_voxels, discover, fingerprint, source_axes
from volssl.data.storage import SUFFIX, save_array
from volssl.util.atomic import write_json_atomic
from volssl.util.errors import describe_error
from volssl.util.workers import watched_pool

NORMALIZATIONS = ("zscore", "zscore_nonzero", "ct", "none")
#: exclusion rules that depend on the run's options, not on the file alone: such cases are retried every run
RETRY_RULES = ("too_large", "missing_chunks")
#: warnings printed in the summary (all are in report.json)
MAX_PRINTED_WARNINGS = 50
#: the keys of one channel's entry of ``PreprocessPlan.ct_intensities`` (dataset-wide foreground statistics)
CT_INTENSITY_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")
PLAN_VERSION = 1


@dataclass
class PreprocessPlan:
    """How every volume of a dataset is preprocessed (saved as ``OUT/plan.json``).

    Attributes:
        name: plan name (informative).
        target_spacing: (x, y, z) mm on RAS axes, or None to keep each volume's spacing.
        clip_percentiles: (lo, hi) percentiles (0..100) to clip intensities to, or None (AMAES:
            (0, 99), i.e. the 99th percentile only).
        normalization: "zscore" (per channel, whole cropped volume), "zscore_nonzero" (statistics
            inside the nonzero mask, zero outside), "ct" (nnU-Net's CT scheme: every channel with an
            entry in ``ct_intensities`` is clipped to the dataset's foreground percentiles 0.5 / 99.5
            and z-scored with the dataset's foreground mean and std; channels whose entry is None get
            "zscore") or "none".
        crop_nonzero: crop to the bounding box of nonzero voxels (any channel, or the label).
        anisotropy_threshold: max/min spacing above which the low-resolution axis is resampled
            separately (nnU-Net's separate z), None: never.
        label_interpolation: "nearest" or "linear" (per-class linear + argmax).
        class_samples: at most this many voxel samples per label class in ``class_locations``
            (instance label maps: one class "1" for all ids >= 1).
        class_samples_total: at most this many samples per case over all classes (per-class count
            lowered evenly when a label map has very many classes, e.g. instance labels).
        seed: seed of the class-location sampling (combined with the case id).
        rules: the quality filter.
        ct_intensities: for "ct": one entry per channel, ``{"mean", "std", "percentile_00_5",
            "percentile_99_5"}`` (from :func:`volssl.data.fingerprint.dataset_fingerprint`) or None
            (that channel is z-scored per case); None for the other schemes (then left out of
            :meth:`to_dict`, so plans without it keep their plan.json).
    """

    name: str = "s3d"
    target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    clip_percentiles: tuple[float, float] | None = None
    normalization: str = "zscore"
    crop_nonzero: bool = True
    anisotropy_threshold: float | None = 3.0
    label_interpolation: str = "nearest"
    class_samples: int = 10_000
    class_samples_total: int = 100_000
    seed: int = 0
    rules: QualityRules = field(default_factory=QualityRules)
    ct_intensities: list[dict[str, float] | None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rules, dict):
            self.rules = QualityRules(**self.rules)
        if self.target_spacing is not None:
            ts = tuple(float(t) for t in self.target_spacing)
            if len(ts) != 3 or not all(np.isfinite(t) and t > 0 for t in ts):
                raise ValueError(
                    f"target_spacing must be three positive numbers (mm) or None, got {self.target_spacing!r}"
                )
            self.target_spacing = ts
        if self.clip_percentiles is not None:
            cp = tuple(float(p) for p in self.clip_percentiles)
            if len(cp) != 2 or not 0 <= cp[0] < cp[1] <= 100:
                raise ValueError(
                    f"clip_percentiles must be (lo, hi) with 0 <= lo < hi <= 100, got {self.clip_percentiles!r}"
                )
            self.clip_percentiles = cp
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.label_interpolation not in ("nearest", "linear"):
            raise ValueError(f"label_interpolation must be 'nearest' or 'linear', got {self.label_interpolation!r}")
        if self.anisotropy_threshold is not None and not self.anisotropy_threshold >= 1:
            raise ValueError(f"anisotropy_threshold must be >= 1 or None, got {self.anisotropy_threshold!r}")
        if self.class_samples < 1 or self.class_samples_total < 1:
            raise ValueError("class_samples and class_samples_total must be >= 1")
        if self.normalization == "ct" and not self.ct_intensities:
            raise ValueError("normalization 'ct' needs ct_intensities (one entry per channel: the dataset's foreground "
                             "mean, std and percentiles 0.5 / 99.5, or None)")
        if self.ct_intensities is not None:
            self.ct_intensities = [_check_ct_entry(k, e) for k, e in enumerate(self.ct_intensities)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("target_spacing", "clip_percentiles"):
            d[k] = list(d[k]) if d[k] is not None else None
        if d["ct_intensities"] is None:  # plans without CT statistics keep their plan.json byte for byte
            del d["ct_intensities"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessPlan":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _check_ct_entry(k: int, entry: Any) -> dict[str, float] | None:
    """One channel's CT statistics as floats (ValueError naming the channel and key otherwise)."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or any(key not in entry for key in CT_INTENSITY_KEYS):
        raise ValueError(f"ct_intensities[{k}] must be None or a dict with {CT_INTENSITY_KEYS}, got {entry!r}")
    out = {key: float(entry[key]) for key in CT_INTENSITY_KEYS}
    if not all(np.isfinite(v) for v in out.values()) or out["std"] < 0 or \
            out["percentile_00_5"] > out["percentile_99_5"]:
        raise ValueError(f"ct_intensities[{k}]: need finite values, std >= 0 and percentile_00_5 <= percentile_99_5, "
                         f"got {out}")
    return out


PLANS: dict[str, PreprocessPlan] = {
    # S3D / nnssl: 1 mm isotropic, per-image z-score, no clipping, S3D's quality filter
    "s3d": PreprocessPlan(name="s3d"),
    # AMAES (BRAINS-45K, Yucca): RAS, 1 mm, clip at the 99th percentile, z-score, crop to the brain box
    "amaes": PreprocessPlan(name="amaes", clip_percentiles=(0.0, 99.0)),
    # MAE-XNT (nanotomography, microscopy): native spacing, z-score per volume (the public MAE_XNT code's
    # volume statistics; pre-training crops are z-scored again on their own), no crop, no clinical rules.
    # Without it fine-tuning and prediction fed raw grey values (mean ~1000, std ~190 on the phantoms) to
    # an encoder pre-trained on z-scored crops (docs/evidence.md)
    "xnt": PreprocessPlan(
        name="xnt", target_spacing=None, normalization="zscore", crop_nonzero=False,
        rules=QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None),
    ),
}


def get_plan(name: str) -> PreprocessPlan:
    """A fresh copy of the named plan."""
    if name not in PLANS:
        raise KeyError(f"unknown preprocessing plan {name!r}; known: {', '.join(PLANS)}")
    return PreprocessPlan.from_dict(PLANS[name].to_dict())


def labelled_plan(plan: dict[str, Any]) -> PreprocessPlan:
    """The :class:`PreprocessPlan` of a pre-training plan dict for labelled data (fine-tuning, the
    probe): the same arrays, only the structural quality rules (no case dropped for FOV/spacing/size)."""
    fixed = PreprocessPlan.from_dict(plan)
    fixed.rules = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None,
                               affine_atol_mm=fixed.rules.affine_atol_mm)
    return fixed


#: plan fields that change the preprocessed arrays (data preprocessed for one plan serves another only if equal)
ARRAY_PLAN_KEYS = ("target_spacing", "clip_percentiles", "normalization", "crop_nonzero", "anisotropy_threshold",
                   "label_interpolation", "ct_intensities")


def plan_differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """An empty string when plans ``found`` and ``wanted`` make the same arrays (:data:`ARRAY_PLAN_KEYS`),
    else the differing fields as ``"key: <found> here, <wanted> wanted; ..."``."""
    a, b = PreprocessPlan.from_dict(found).to_dict(), PreprocessPlan.from_dict(wanted).to_dict()
    return "; ".join(f"{k}: {a.get(k)!r} here, {b.get(k)!r} wanted" for k in ARRAY_PLAN_KEYS if a.get(k) != b.get(k))


@dataclass
class PreprocessSummary:
    """Outcome of one shard's run. Counts are over this shard's cases (finished earlier included)."""

    out: str
    shard: int
    n_shards: int
    n_cases: int = 0
    n_ok: int = 0
    n_excluded: int = 0
    n_processed: int = 0  # done in this run
    n_skipped: int = 0  # already finished
    excluded: list[dict] = field(default_factory=list)
    report: str = ""
    seconds: float = 0.0
    strict: bool = False
    warnings: list[dict] = field(default_factory=list)  # {"id" (None: the dataset), "path", "rule", "reason"}
    max_voxels: int | None = None  # the size limit of one input volume used (None: none)

    @property
    def exit_code(self) -> int:
        """0, or 3 when ``strict`` and something was excluded."""
        return 3 if self.strict and self.n_excluded else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"volssl preprocess: shard {self.shard}/{self.n_shards}: {self.n_cases} cases: {self.n_ok} ok, "
            f"{self.n_excluded} excluded ({self.n_processed} processed now, {self.n_skipped} already done) "
            f"in {self.seconds:.1f} s",
            f"output: {self.out}",
            f"report: {self.report}",
        ]
        if self.excluded:
            lines.append("excluded:")
            for e in self.excluded:
                for p in e.get("problems") or [{"path": (e.get("source") or [e["id"]])[0], "reason": e["reason"]}]:
                    lines.append(f"  {e['id']}: {p['path']}: {p['reason']}")
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            for w in self.warnings[:MAX_PRINTED_WARNINGS]:
                lines.append(f"  {w['id'] + ': ' if w.get('id') else ''}{w['path']}: {w['reason']}")
            if len(self.warnings) > MAX_PRINTED_WARNINGS:
                lines.append(f"  ... and {len(self.warnings) - MAX_PRINTED_WARNINGS} more (see {self.report})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sharding


def shard_of(case_id: str, n_shards: int) -> int:
    """Deterministic shard of a case id (blake2b of the id, mod ``n_shards``)."""
    h = hashlib.blake2b(case_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") % n_shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n)."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")
    return i, n


# ---------------------------------------------------------------------------------------------- one case


def normalize(
    image: np.ndarray, mask: np.ndarray | None, clip: tuple[float, float] | None, mode: str,
    ct_intensities: list[dict[str, float] | None] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Clip and normalise each channel of ``image`` (C, X, Y, Z) float32 in place.

    Statistics are over ``mask`` (X, Y, Z) for "zscore_nonzero" (voxels outside set to 0), over the
    whole volume otherwise. "ct": channel ``c`` with ``ct_intensities[c]`` is clipped to its
    dataset-wide ``[percentile_00_5, percentile_99_5]`` and becomes ``(x - mean) / max(std, 1e-8)``
    with the dataset-wide foreground mean and std (nnU-Net's CTNormalization; ``clip`` is not
    used); a channel whose entry is None is z-scored as "zscore". Returns the image and per-channel
    {"clip": [lo, hi] | None, "mean", "std"} (the statistics used).
    """
    stats = []
    use_mask = mode == "zscore_nonzero" and mask is not None and mask.any()
    if mode == "ct" and (ct_intensities is None or len(ct_intensities) != image.shape[0]):
        n = None if ct_intensities is None else len(ct_intensities)
        raise ValueError(f"normalization 'ct': ct_intensities must have one entry per channel ({image.shape[0]}), "
                         f"got {n}")
    for c in range(image.shape[0]):
        ch = image[c]
        ct = ct_intensities[c] if mode == "ct" and ct_intensities is not None else None
        if ct is not None:
            lo, hi, mean, std = (float(ct[k]) for k in ("percentile_00_5", "percentile_99_5", "mean", "std"))
            np.clip(ch, lo, hi, out=ch)
            ch -= np.float32(mean)
            ch /= np.float32(max(std, 1e-8))
            stats.append({"clip": [lo, hi], "mean": mean, "std": std})
            continue
        values = ch[mask] if use_mask else ch
        bounds = None
        if clip is not None:
            lo, hi = np.percentile(values, clip)
            np.clip(ch, lo, hi, out=ch)
            bounds = [float(lo), float(hi)]
            values = ch[mask] if use_mask else ch
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        if mode in ("zscore", "zscore_nonzero", "ct"):
            ch -= np.float32(mean)
            ch /= np.float32(max(std, 1e-8))
            if use_mask:
                ch[~mask] = 0
        stats.append({"clip": bounds, "mean": mean, "std": std})
    return image, stats


def label_dtype(label: np.ndarray) -> np.dtype:
    """Smallest integer dtype that holds every value of ``label``."""
    if label.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(label.min()), int(label.max())
    candidates = (np.uint8, np.uint16, np.uint32, np.uint64) if lo >= 0 else (np.int8, np.int16, np.int32, np.int64)
    for dtype in candidates:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise ValueError(f"label values [{lo}, {hi}] do not fit any integer type")


def class_locations(label: np.ndarray, per_class: int, total: int, seed: int, case_id: str) -> dict[str, list]:
    """Up to ``per_class`` voxel coordinates ``[x, y, z]`` of each nonzero class, sampled reproducibly.

    With K classes, at most ``max(1, total // K)`` per class (so instance labels stay small).
    """
    flat = label.reshape(-1)
    fg = np.flatnonzero(flat)
    if fg.size == 0:
        return {}
    values = flat[fg]
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    cuts = np.flatnonzero(np.diff(sorted_values)) + 1
    groups = np.split(fg[order], cuts)
    keys = sorted_values[np.concatenate([[0], cuts])]
    n = max(1, min(per_class, total // len(groups)))
    tag = int.from_bytes(hashlib.blake2b(case_id.encode(), digest_size=8).digest(), "big")
    rng = np.random.default_rng([int(seed), tag])
    out = {}
    for key, idx in zip(keys, groups):
        if idx.size > n:
            idx = np.sort(rng.choice(idx, n, replace=False))
        out[str(int(key))] = np.stack(np.unravel_index(idx, label.shape), axis=1).tolist()
    return out


def _paths(out: Path, case_id: str) -> tuple[Path, Path, Path]:
    """(image, label, props) paths of a case under ``out``."""
    return (out / "images" / f"{case_id}{SUFFIX}", out / "labels" / f"{case_id}{SUFFIX}",
            out / "props" / f"{case_id}.json")


@dataclass
class CaseRow(CaseRecord):
    """A manifest row with the notes about its case: ``warnings`` ``[{"rule", "path", "reason"}]`` or
    None. Written as the row's ``warnings`` key (:func:`volssl.data.manifest.read_manifest` ignores
    it; :func:`manifest_warnings` reads it back for the reports)."""

    warnings: list[dict] | None = None


def _warning_dicts(warnings: list[Problem] | None) -> list[dict] | None:
    return [w.to_dict() for w in warnings] if warnings else None


def _base_record(case: SourceCase, checksum: str, warnings: list[Problem] | None = None) -> CaseRow:
    return CaseRow(
        id=case.id, channels=list(case.channels), source=list(case.images), label_source=case.label,
        subject=case.subject, split=case.split, checksum=checksum, warnings=_warning_dicts(warnings),
    )


def _excluded(case: SourceCase, checksum: str, problems: list[Problem], out: Path,
              warnings: list[Problem] | None = None) -> CaseRow:
    for p in _paths(out, case.id):  # a case that was fine before its source changed
        p.unlink(missing_ok=True)
    rec = _base_record(case, checksum, warnings)
    rec.status = "excluded"
    rec.reason = "; ".join(f"{Path(p.path).name}: {p.reason}" for p in problems)
    rec.problems = [p.to_dict() for p in problems]
    return rec


def process_case(
    case: SourceCase, checksum: str | None = None, *, out: str | os.PathLike, plan: PreprocessPlan,
    max_voxels: int | None = None, allow_missing_chunks: bool = False,
) -> CaseRow:
    """Check and preprocess one case, write its arrays and props; returns its manifest row.

    Never raises for a bad input: problems become an "excluded" row (unexpected errors get rule
    "error" with the exception). The row is not written here (the caller owns the manifest).
    ``max_voxels`` and ``allow_missing_chunks``: see :func:`volssl.data.quality.check_case`.
    """
    out = Path(out)
    checksum = checksum or fingerprint([*case.images, case.label])
    warnings: list[Problem] = []
    try:
        checked = check_case(case, plan.rules, max_voxels=max_voxels, allow_missing_chunks=allow_missing_chunks)
        warnings = checked.warnings
        if not checked.ok:
            return _excluded(case, checksum, checked.problems, out, warnings)
        return _preprocess_checked(case, checked.image, checked.affine, checked.label, out, plan, checksum,
                                   warnings)
    except MemoryError:
        problem = Problem("error", case.images[0] if case.images else case.id, "out of memory while preprocessing")
    except Exception as e:  # noqa: BLE001 - a bug or an odd file must not stop the run
        problem = Problem("error", case.images[0] if case.images else case.id, describe_error(e))
    return _excluded(case, checksum, [problem], out, warnings)


def preprocess_arrays(
    image: np.ndarray, affine: np.ndarray, plan: PreprocessPlan, label: np.ndarray | None = None, axes: str = "xyz"
) -> tuple[np.ndarray, np.ndarray | None, GeometryRecord, list[dict]]:
    """Preprocess one case in memory (no files): what ``volssl preprocess`` does to a case, and what
    prediction does to an input.

    Args:
        image: float32 (C, X, Y, Z) on the source file's grid (:func:`volssl.data.quality.check_case`).
        affine: the file's (4, 4) voxel-to-RAS affine.
        plan: the preprocessing plan.
        label: integer (X, Y, Z) label map on the same grid, or None.
        axes: :func:`volssl.data.readers.source_axes` of the image file.

    Returns:
        ``(image_p float32 (C, *record.shape), label_p (smallest int dtype) or None, record, stats)``
        with the per-channel normalisation statistics of :func:`normalize`.
    """
    from scipy.ndimage import binary_fill_holes

    ornt = ras_orientation(affine)
    image_r = reorient(image, ornt)
    label_r = reorient(label, ornt) if label is not None else None
    nonzero = np.any(image_r != 0, axis=0)
    bbox = None
    if plan.crop_nonzero:
        bbox = nonzero_bbox(nonzero | (label_r != 0) if label_r is not None else nonzero)
    record = GeometryRecord.create(image.shape[1:], affine, plan.target_spacing, bbox, plan.anisotropy_threshold, axes)
    image_p = from_reoriented(image_r, record)
    del image, image_r
    mask_p = None
    if plan.normalization == "zscore_nonzero":
        crop = tuple(slice(lo, hi) for lo, hi in record.crop_bbox)
        nonzero[crop] = binary_fill_holes(nonzero[crop])
        mask_p = from_reoriented(nonzero, record, is_label=True)
    image_p, stats = normalize(image_p, mask_p, plan.clip_percentiles, plan.normalization, plan.ct_intensities)
    label_p = None
    if label_r is not None:
        label_p = from_reoriented(label_r, record, is_label=True, label_interpolation=plan.label_interpolation)
        label_p = label_p.astype(label_dtype(label_p), copy=False)
    return image_p, label_p, record, stats


def _preprocess_checked(case, image, affine, label, out: Path, plan: PreprocessPlan, checksum: str,
                        warnings: list[Problem] | None = None) -> CaseRow:
    image_p, label_p, record, stats = preprocess_arrays(image, affine, plan, label, source_axes(case.images[0]))
    del image, label
    img_path, lab_path, props_path = _paths(out, case.id)
    save_array(img_path, image_p)
    if label_p is not None:
        save_array(lab_path, label_p)
    else:
        lab_path.unlink(missing_ok=True)
    props = {
        "id": case.id,
        "channels": list(case.channels),
        "source": list(case.images),
        "label_source": case.label,
        "subject": case.subject,
        "split": case.split,
        "geometry": record.to_dict(),
        "normalization": [{"channel": n, **s} for n, s in zip(case.channels, stats)],
        "label_values": [int(v) for v in np.unique(label_p)] if label_p is not None else None,
        "class_locations": class_locations(
            (label_p > 0).astype(np.uint8) if case.instance_labels else label_p,
            plan.class_samples, plan.class_samples_total, plan.seed, case.id,
        ) if label_p is not None else {},
    }
    if warnings:
        props["warnings"] = _warning_dicts(warnings)
    write_json_atomic(props_path, props)
    rec = _base_record(case, checksum, warnings)
    rec.shape = [int(image_p.shape[0]), *record.shape]
    rec.spacing = list(record.spacing)
    rec.has_label = label_p is not None
    return rec


# ---------------------------------------------------------------------------------------------- the run


def _mp_context():
    """The "forkserver" context, with the preprocessing modules preloaded in the server so that each
    worker starts without re-importing numpy/scipy/nibabel/... (and without fork's thread hazards)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["volssl.data.preprocess"])
    return ctx


def _run_isolated(
    work: Callable[..., CaseRecord], cases: list[SourceCase], out: Path, checksums: dict[str, str]
) -> Iterator[CaseRecord]:
    """Run ``cases`` one at a time in a single-worker pool; a case whose worker dies is excluded
    (and the pool is replaced), the others are processed normally."""
    ctx = _mp_context()
    ex = None
    try:
        for case in cases:
            ex = ex or watched_pool(1, ctx)
            try:
                yield ex.submit(work, case, checksums[case.id]).result()
            except BrokenProcessPool:
                ex.shutdown(wait=True)
                ex = None
                problem = Problem("error", case.images[0] if case.images else case.id,
                                  "the worker process died while preprocessing this case (out of memory?)")
                yield _excluded(case, checksums[case.id], [problem], out)
    finally:
        if ex is not None:
            ex.shutdown(wait=True)


def _map_cases(
    cases: list[SourceCase], work: Callable[..., CaseRecord], workers: int, out: Path, checksums: dict[str, str]
) -> Iterator[CaseRecord]:
    """Yield ``work(case, checksum)`` for every case (completion order), ``workers`` processes at a time.

    If a worker dies (e.g. killed for memory), the pool breaks and every case in flight fails with
    it: those cases are retried one by one in isolation (so only the culprit is excluded), then the
    remaining cases continue in a new pool.
    """
    if workers <= 1:
        for case in cases:
            yield work(case, checksums[case.id])
        return
    pending = deque(cases)
    ctx = _mp_context()
    while pending:
        suspects: list[SourceCase] = []
        with watched_pool(workers, ctx) as ex:
            inflight: dict = {}
            while pending or inflight:
                while pending and len(inflight) < 2 * workers:
                    case = pending.popleft()
                    inflight[ex.submit(work, case, checksums[case.id])] = case
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    case = inflight.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        suspects.append(case)
                        broken = True
                if broken:
                    suspects.extend(inflight.values())
                    break
        yield from _run_isolated(work, suspects, out, checksums)


def _check_plan(out: Path, plan_dict: dict) -> None:
    path = out / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan_dict:
            changed = sorted(k for k in set(old) | set(plan_dict) if old.get(k) != plan_dict.get(k))
            raise ValueError(
                f"{out} was preprocessed with a different plan (differs in: {', '.join(changed)}); "
                "use a new output folder or the same options"
            )
    else:
        write_json_atomic(path, plan_dict)


def _clean_stray_temps(out: Path, ids: set[str]) -> int:
    """Remove temporary files (``.<id>.b2nd.XXXX.tmp...``) a killed run left for ``ids``."""
    removed = 0
    for sub, suffix in (("images", SUFFIX), ("labels", SUFFIX), ("props", ".json")):
        folder = out / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = entry.name
            if not (name.startswith(".") and ".tmp" in name):
                continue
            head = name[1:name.rindex(".tmp")]  # "<id><suffix>.<random>"
            head = head.rsplit(".", 1)[0]
            if head.endswith(suffix) and head[: -len(suffix)] in ids:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _report_entry(rec: CaseRecord) -> dict:
    return {"id": rec.id, "source": rec.source, "label_source": rec.label_source, "reason": rec.reason,
            "problems": rec.problems or []}


_ROW_ID = re.compile(r'^\{"id":\s*"((?:[^"\\]|\\.)*)"')


def manifest_warnings(out: str | os.PathLike) -> dict[str, list[dict]]:
    """The ``warnings`` of the manifest rows under ``out`` (:class:`CaseRow`), by case id (the last
    row of an id wins, as in :func:`volssl.data.manifest.read_manifest`); ids without any are left out."""
    found: dict[str, list[dict]] = {}
    folder = Path(out) / "manifest"
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("shard-*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn last line
                m = _ROW_ID.match(line)
                if m is None:
                    continue
                if '"warnings":' not in line or '"warnings":null' in line:
                    found.pop(json.loads(f'"{m.group(1)}"'), None)
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("warnings"):
                    found[row["id"]] = row["warnings"]
                else:
                    found.pop(row["id"], None)
    return found


def _warning_entries(rows: list[CaseRecord], out: Path, dataset_warnings: list[dict]) -> list[dict]:
    """The report's ``warnings``: the dataset's (``id`` None or a case of ``rows``), then the cases'."""
    ids = {r.id for r in rows}
    entries = [dict(w) for w in dataset_warnings if w.get("id") is None or w["id"] in ids]
    stored = manifest_warnings(out)
    for r in rows:
        for w in stored.get(r.id, []):
            entries.append({"id": r.id, **w})
    return entries


def _write_reports(out: Path, shard: int, n_shards: int, rows: list[CaseRecord], plan_dict: dict,
                   warnings: list[dict] | None = None) -> Path:
    excluded = [_report_entry(r) for r in rows if not r.ok]
    shard_report = {
        "shard": shard, "n_shards": n_shards, "n_cases": len(rows), "n_ok": sum(r.ok for r in rows),
        "n_excluded": len(excluded), "excluded": excluded, "warnings": warnings or [],
    }
    write_json_atomic(out / f"report-shard-{shard:05d}-of-{n_shards:05d}.json", shard_report)
    merged = {"n_shards": n_shards, "shards_reported": [], "n_cases": 0, "n_ok": 0, "n_excluded": 0,
              "plan": plan_dict, "excluded": [], "warnings": []}
    seen: set[str] = set()
    for path in sorted(out.glob(f"report-shard-*-of-{n_shards:05d}.json")):
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # another shard is replacing it right now (atomic), or it is damaged
        merged["shards_reported"].append(part["shard"])
        for k in ("n_cases", "n_ok", "n_excluded"):
            merged[k] += part[k]
        merged["excluded"].extend(part["excluded"])
        for w in part.get("warnings", []):  # dataset-level notes are in every shard's report: once here
            key = json.dumps(w, sort_keys=True)
            if key not in seen:
                seen.add(key)
                merged["warnings"].append(w)
    merged["complete"] = len(merged["shards_reported"]) == n_shards
    write_json_atomic(out / "report.json", merged)
    return out / "report.json"


def _finished(rec: CaseRecord | None, checksum: str, out: Path) -> bool:
    if rec is None or rec.checksum != checksum:
        return False
    if not rec.ok:
        # excluded for the run's options (size limit, missing Zarr chunks): cheap to check again
        return not any(p.get("rule") in RETRY_RULES for p in rec.problems or [])
    img, lab, props = _paths(out, rec.id)
    return img.exists() and props.exists() and (lab.exists() or not rec.has_label)


def preprocess(
    src: str | os.PathLike,
    out: str | os.PathLike,
    plan: PreprocessPlan | str = "s3d",
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    spacing: tuple[float, float, float] | None = None,
    strict: bool = False,
    progress: bool = True,
    max_voxels: int | str | None = "auto",
    allow_missing_chunks: bool = False,
) -> PreprocessSummary:
    """Quality-filter and preprocess every case of ``src`` that falls in ``shard`` into ``out``.

    Args:
        src: a folder of volumes or an nnU-Net v2 raw dataset (see :func:`volssl.data.readers.discover`).
        out: output folder (layout in :mod:`volssl.data.dataset`); reruns resume.
        plan: a :class:`PreprocessPlan` or the name of one in :data:`PLANS`.
        shard: (i, n): process the cases with ``shard_of(id, n) == i``.
        workers: processes (1: in this process).
        spacing: (x, y, z) mm for files that carry no spacing (TIFF, Zarr).
        strict: make ``summary.exit_code`` 3 when anything in the shard is excluded (the run itself
            never stops for a bad file).
        progress: show a tqdm bar on stderr.
        max_voxels: largest volume read (voxels of one file, from its header, before any data):
            "auto" (:func:`volssl.data.readers.default_max_voxels`, from the available memory), an
            integer, or None (no limit). Larger volumes are excluded (rule "too_large").
        allow_missing_chunks: read Zarr chunk files missing from the store as the fill value (with a
            warning) instead of excluding the volume (rule "missing_chunks").

    Returns:
        the shard's :class:`PreprocessSummary` (also written as reports under ``out``).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    plan = get_plan(plan) if isinstance(plan, str) else plan
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_voxels == "auto":
        max_voxels = default_max_voxels()
    elif max_voxels is not None and (isinstance(max_voxels, (str, bool)) or int(max_voxels) < 1):
        raise ValueError(f"max_voxels must be 'auto', None or an integer >= 1, got {max_voxels!r}")
    max_voxels = int(max_voxels) if max_voxels is not None else None
    out = Path(out).expanduser().resolve()
    dataset_warnings: list[dict] = []
    cases = [c for c in discover(src, spacing=spacing, warnings=dataset_warnings) if shard_of(c.id, n) == i]
    out.mkdir(parents=True, exist_ok=True)
    plan_dict = {"version": PLAN_VERSION, **plan.to_dict(),
                 "input_spacing": list(map(float, spacing)) if spacing is not None else None}
    _check_plan(out, plan_dict)

    existing = read_manifest(out)
    checksums = {c.id: fingerprint([*c.images, c.label]) for c in cases}
    todo = [c for c in cases if not _finished(existing.get(c.id), checksums[c.id], out)]
    _clean_stray_temps(out, {c.id for c in todo})
    work = partial(process_case, out=str(out), plan=plan, max_voxels=max_voxels,
                   allow_missing_chunks=allow_missing_chunks)

    n_processed = 0
    bar = tqdm(total=len(todo), desc=f"preprocess {i}/{n}", unit="vol", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    n_bad = 0
    with ManifestWriter(out, i, n) as writer:
        for rec in _map_cases(todo, work, workers, out, checksums):
            writer.append(rec)
            n_processed += 1
            n_bad += not rec.ok
            bar.update(1)
            bar.set_postfix(excluded=n_bad, refresh=False)
    bar.close()

    manifest = read_manifest(out)
    rows = [manifest[c.id] for c in cases if c.id in manifest]
    warnings = _warning_entries(rows, out, dataset_warnings)
    report = _write_reports(out, i, n, rows, plan_dict, warnings)
    excluded = [_report_entry(r) for r in rows if not r.ok]
    return PreprocessSummary(
        out=str(out), shard=i, n_shards=n, n_cases=len(cases), n_ok=sum(r.ok for r in rows),
        n_excluded=len(excluded), n_processed=n_processed, n_skipped=len(cases) - len(todo),
        excluded=excluded, report=str(report), seconds=time.perf_counter() - t0, strict=strict,
        warnings=warnings, max_voxels=max_voxels,
    )

