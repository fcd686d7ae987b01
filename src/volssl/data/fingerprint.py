"""Dataset fingerprint (nnU-Net's "dataset fingerprint"): what a dynamic plan is computed from.

:func:`dataset_fingerprint` reads every training case of a raw dataset once and records, as a
JSON-serialisable dict (cached as ``fingerprint.json``):

* per case, on the RAS grid that preprocessing uses (:mod:`volssl.data.geometry`): the spacing
  (mm), the shape, the shape after cropping to the nonzero box (union over channels and the label,
  as :func:`volssl.data.preprocess.preprocess_arrays` crops) and the relative size after cropping;
* per channel: its name (dataset.json ``channel_names``) and modality, "CT" when the name is "CT"
  (any case, as nnU-Net maps channel names to normalisation schemes) and "non-CT" otherwise;
* per channel, foreground intensity statistics over a bounded random sample of the voxels where
  the label is > 0 (a case without a label, or with an empty one, contributes its nonzero voxels
  instead; nnU-Net uses the label only): mean, std, min, max, median and the 0.5 / 99.5
  percentiles. At most ``samples // n_cases`` voxels per case and channel (nnU-Net: 10^8 in all;
  default here 10^6), drawn reproducibly from ``(seed, case id)``.

Plus the dataset-level medians (spacing, shape after crop, relative size after crop), the labels
of dataset.json, the cases left out (unreadable or inconsistent files, with the reason) and
``source_checksum`` (name, size and mtime of every file; :func:`volssl.data.readers.fingerprint`).

File naming: for an nnU-Net v2 raw dataset (``imagesTr/<case>_<XXXX><file_ending>``), a file in
imagesTr/imagesTs whose name does not follow that pattern, a channel index dataset.json does not
declare, a case missing a channel file, or a training case without its ``labelsTr/<case>`` file
(and the reverse) raises a ValueError listing every such file and the expected name, instead of
being silently ignored.

The cache is reused when its ``source_checksum``, settings and version match; anything else
recomputes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from volssl.data.dataset_json import read_dataset_json
from volssl.data.geometry import GeometryRecord, nonzero_bbox, ras_orientation, reorient
from volssl.data.quality import QualityRules, check_case
from volssl.data.readers import SourceCase, discover, fingerprint, is_nnunet_dataset
from volssl.util.atomic import write_json_atomic

FINGERPRINT_FILE = "fingerprint.json"
FINGERPRINT_VERSION = 1
DEFAULT_SAMPLES = 1_000_000
#: the quality rules of a fingerprint: only the structural ones (a labelled case is never dropped for its size)
STRUCTURAL_RULES = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None)
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def channel_modality(name: str) -> str:
    """"CT" for a channel named "CT" (case-insensitive), else "non-CT"."""
    return "CT" if str(name).strip().casefold() == "ct" else "non-CT"


# ---------------------------------------------------------------------------------------------- naming
def naming_problems(root: str | os.PathLike) -> list[str]:
    """Every file-naming problem of the nnU-Net v2 raw dataset ``root`` (empty list: none).

    Only the ``imagesTr`` / ``imagesTs`` layout is checked (datasets that list their files in
    dataset.json are not).
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    try:
        meta = read_dataset_json(root)
    except ValueError as e:  # read_dataset_json names the file and the field
        return [str(e)]
    if isinstance(meta.get("dataset"), dict) or isinstance(meta.get("training"), list):
        return []
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict) or not names:
        return [f"{meta_path}: no channel_names"]
    ending = str(meta.get("file_ending", ".nii.gz"))
    channels = sorted(int(k) for k in names)
    expected = f"<case>_XXXX{ending} with XXXX in {', '.join(f'{c:04d}' for c in channels)}"
    problems: list[str] = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        folder = root / images_dir
        if not folder.is_dir():
            continue
        cases: dict[str, set[int]] = {}
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue
            m = _CHANNEL.match(f.name[: -len(ending)]) if f.name.endswith(ending) else None
            if m is None or int(m.group("channel")) not in channels:
                problems.append(f"{images_dir}/{f.name}: not named {expected}")
                continue
            cases.setdefault(m.group("case"), set()).add(int(m.group("channel")))
        for case, found in sorted(cases.items()):
            missing = [c for c in channels if c not in found]
            if missing:
                problems.append(f"{images_dir}/{case}: missing channel file(s) "
                                + ", ".join(f"{case}_{c:04d}{ending}" for c in missing))
        labels = root / labels_dir
        if labels.is_dir():
            label_cases = set()
            for f in sorted(labels.iterdir()):
                if f.name.startswith("."):
                    continue
                if not f.name.endswith(ending):
                    problems.append(f"{labels_dir}/{f.name}: not named <case>{ending}")
                    continue
                label_cases.add(f.name[: -len(ending)])
            for case in sorted(label_cases - set(cases)):
                problems.append(f"{labels_dir}/{case}{ending}: no {images_dir}/{case}_XXXX{ending} images")
            if images_dir == "imagesTr":
                for case in sorted(set(cases) - label_cases):
                    problems.append(f"{images_dir}/{case}: training case without {labels_dir}/{case}{ending}")
        elif images_dir == "imagesTr" and cases:
            problems.append(f"{labels_dir}/: missing (every training case needs {labels_dir}/<case>{ending})")
    return problems


# ---------------------------------------------------------------------------------------------- one case
def _case_seed(seed: int, case_id: str) -> list[int]:
    tag = int.from_bytes(hashlib.blake2b(case_id.encode("utf-8"), digest_size=8).digest(), "big")
    return [int(seed), tag]


def case_fingerprint(case: SourceCase, n_samples: int, seed: int = 0) -> dict[str, Any]:
    """Geometry and foreground intensity samples of one case (see the module docstring).

    Returns ``{"id", "spacing", "shape", "shape_after_crop", "relative_size_after_crop",
    "foreground" ("label" | "nonzero"), "n_foreground", "samples": [float32 array per channel]}``,
    or ``{"id", "excluded": reason}`` for a case the preprocessing would exclude.
    """
    checked = check_case(case, STRUCTURAL_RULES)
    if not checked.ok:
        return {"id": case.id, "excluded": "; ".join(f"{Path(p.path).name}: {p.reason}" for p in checked.problems)}
    image, affine, label = checked.image, checked.affine, checked.label
    ornt = ras_orientation(affine)
    image_r = reorient(image, ornt)
    label_r = reorient(label, ornt) if label is not None else None
    nonzero = np.any(image_r != 0, axis=0)
    bbox = nonzero_bbox(nonzero | (label_r != 0) if label_r is not None else nonzero)
    record = GeometryRecord.create(image.shape[1:], affine, None, bbox)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    source = "label"
    fg = label_r[crop] > 0 if label_r is not None else None
    if fg is None or not fg.any():
        fg, source = nonzero[crop], "nonzero"
    idx = np.flatnonzero(fg)
    if idx.size > n_samples:
        rng = np.random.default_rng(_case_seed(seed, case.id))
        idx = np.sort(rng.choice(idx, n_samples, replace=False))
    samples = [np.ascontiguousarray(image_r[c][crop]).reshape(-1)[idx].astype(np.float32)
               for c in range(image_r.shape[0])]
    shape, cropped = record.reoriented_shape, list(record.cropped_shape)
    return {
        "id": case.id,
        "spacing": [float(s) for s in record.reoriented_spacing],
        "shape": [int(s) for s in shape],
        "shape_after_crop": [int(s) for s in cropped],
        "relative_size_after_crop": float(np.prod(cropped, dtype=np.float64) / np.prod(shape, dtype=np.float64)),
        "foreground": source,
        "n_foreground": int(fg.sum()),
        "samples": samples,
    }


def intensity_properties(values: np.ndarray) -> dict[str, float | int | None]:
    """``{"n_samples", "mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5"}`` of
    a 1-D sample (statistics None when it is empty)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return {"n_samples": 0, **{k: None for k in ("mean", "std", "min", "max", "median", "percentile_00_5",
                                                     "percentile_99_5")}}
    lo, med, hi = np.percentile(values, [0.5, 50.0, 99.5])
    return {"n_samples": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()), "median": float(med),
            "percentile_00_5": float(lo), "percentile_99_5": float(hi)}


# ---------------------------------------------------------------------------------------------- dataset
def _cases_of(source: str | os.PathLike | Sequence[SourceCase], splits: Iterable[str | None]
              ) -> tuple[list[SourceCase], dict[str, Any] | None, str | None]:
    """(cases of the wanted splits, dataset.json or None, source path or None); naming errors raise."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser().resolve()
        if not root.exists():
            raise FileNotFoundError(f"dataset not found: {root}")
        meta = None
        if is_nnunet_dataset(root):
            problems = naming_problems(root)
            if problems:
                shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                                                     else "")
                raise ValueError(f"{root}: {len(problems)} file naming problem(s) (nnU-Net v2 layout: "
                                 f"imagesTr/<case>_XXXX<ending>, labelsTr/<case><ending>):\n  {shown}")
            meta = read_dataset_json(root)
        cases, where = discover(root), str(root)
    else:
        cases, meta, where = list(source), None, None
    wanted = set(splits)
    cases = [c for c in cases if c.split in wanted]
    if not cases:
        raise ValueError(f"{where or 'cases'}: no cases of split(s) {sorted(map(str, wanted))} to fingerprint "
                         "(an nnU-Net dataset needs imagesTr/<case>_0000<ending> files)")
    return cases, meta, where


def _settings(samples: int, seed: int, splits: Iterable[str | None]) -> dict[str, Any]:
    return {"samples": int(samples), "seed": int(seed), "splits": sorted(str(s) for s in splits)}


def load_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``fingerprint.json`` (a file, or a folder holding one); ValueError if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / FINGERPRINT_FILE
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != "volssl-fingerprint":
        raise ValueError(f"{path}: not a volssl dataset fingerprint")
    return data


def dataset_fingerprint(
    source: str | os.PathLike | Sequence[SourceCase],
    cache: str | os.PathLike | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    splits: Sequence[str | None] = ("train", None),
    progress: bool = True,
    workers: int = 1,
    recompute: bool = False,
) -> dict[str, Any]:
    """The fingerprint of a raw dataset (see the module docstring).

    Args:
        source: an nnU-Net v2 raw dataset (or any folder :func:`volssl.data.readers.discover`
            reads), or already discovered cases.
        cache: a folder (``<cache>/fingerprint.json``) or a ``.json`` path: reused when it matches
            the files, settings and version; (re)written otherwise. None: no cache.
        samples: foreground voxels sampled per channel over the whole dataset (``samples // n``
            per case, at least 1).
        seed: seed of the voxel sampling.
        splits: which cases count ("train": imagesTr; None: cases of a plain folder; "test": imagesTs).
        progress: a tqdm bar on stderr.
        workers: processes reading cases (1: in this process).
        recompute: ignore a matching cache.

    Returns:
        the JSON-serialisable fingerprint dict.
    """
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cases, meta, where = _cases_of(source, splits)
    checksum = fingerprint([p for c in cases for p in (*c.images, c.label)])
    settings = _settings(samples, seed, splits)
    cache_path = _cache_path(cache)
    if cache_path is not None and not recompute:
        old = _cached(cache_path, checksum, settings)
        if old is not None:
            return old
    per_case = max(1, int(samples) // len(cases))
    results = _fingerprint_cases(cases, per_case, int(seed), int(workers), progress)
    fp = _summarise(results, cases, meta, where, checksum, settings)
    if cache_path is not None:
        write_json_atomic(cache_path, fp)
    return fp


def _cache_path(cache: str | os.PathLike | None) -> Path | None:
    """The ``fingerprint.json`` path of ``cache`` (a folder or a ``.json`` path); None without a cache."""
    if cache is None:
        return None
    cache_path = Path(cache)
    if cache_path.suffix != ".json":
        cache_path = cache_path / FINGERPRINT_FILE
    return cache_path


def _cached(cache_path: Path, checksum: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The cached fingerprint at ``cache_path`` when its version, checksum and settings match; else None."""
    if not cache_path.is_file():
        return None
    try:
        old = load_fingerprint(cache_path)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if old and old.get("version") == FINGERPRINT_VERSION and old.get("source_checksum") == checksum \
            and old.get("settings") == settings:
        return old
    return None


def _fingerprint_cases(cases: Sequence[SourceCase], per_case: int, seed: int, workers: int,
                       progress: bool) -> list[dict[str, Any]]:
    """:func:`case_fingerprint` of every case (``per_case`` samples per channel), in order.

    ``workers`` > 1 reads cases in a forkserver process pool; ``progress`` shows a tqdm bar on stderr.
    """
    from tqdm import tqdm

    work = partial(case_fingerprint, n_samples=per_case, seed=seed)
    bar = tqdm(total=len(cases), desc="fingerprint", unit="case", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    results = []
    if workers > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            for r in ex.map(work, cases):
                results.append(r)
                bar.update(1)
    else:
        for case in cases:
            results.append(work(case))
            bar.update(1)
    bar.close()
    return results


def _summarise(results: list[dict[str, Any]], cases: Sequence[SourceCase], meta: dict[str, Any] | None,
               where: str | None, checksum: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint dict from the per-case results (ValueError when no case was readable)."""
    channel_names = list(cases[0].channels)
    kept = [r for r in results if "excluded" not in r]
    if not kept:
        reasons = "; ".join(f"{r['id']}: {r['excluded']}" for r in results[:5])
        raise ValueError(f"{where or 'cases'}: no readable case to fingerprint ({reasons})")
    spacings = [r["spacing"] for r in kept]
    shapes = [r["shape_after_crop"] for r in kept]
    intensity = []
    for c, name in enumerate(channel_names):
        values = np.concatenate([r["samples"][c] for r in kept])
        intensity.append({"channel": name, **intensity_properties(values)})
    return {
        "format": "volssl-fingerprint",
        "version": FINGERPRINT_VERSION,
        "source": where,
        "source_checksum": checksum,
        "settings": settings,
        "channel_names": channel_names,
        "modalities": [channel_modality(n) for n in channel_names],
        "labels": dict(meta["labels"]) if meta and isinstance(meta.get("labels"), dict) else None,
        "instance_labels": bool(meta.get("instance_labels", False)) if meta else bool(cases[0].instance_labels),
        "n_cases": len(kept),
        "cases": [{k: v for k, v in r.items() if k != "samples"} for r in kept],
        "excluded": [{"id": r["id"], "reason": r["excluded"]} for r in results if "excluded" in r],
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0)],
        "median_shape_after_crop": [float(v) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0)],
        "median_relative_size_after_cropping": float(np.median([r["relative_size_after_crop"] for r in kept])),
        "foreground_intensity_properties_per_channel": intensity,
    }
