"""``volssl evaluate``: Dice and NSD of a folder of predicted label maps against reference label maps.

Files are paired by case id: the file name without its volume suffix (``BraTS_001.nii.gz`` ->
``BraTS_001``), among the files directly inside each folder with a suffix that
:func:`volssl.data.readers.read_volume` reads (NIfTI, MGH, NRRD, MHA/MHD, TIFF, Zarr); other files
(nnU-Net's ``plans.json``, ``*.npz`` ...) are ignored.

Classes: ``labels`` when given; else the foreground labels of ``dataset.json`` when the reference
folder belongs to an nnU-Net dataset (``REF_DIR/dataset.json`` or ``REF_DIR/../dataset.json``, e.g.
``Dataset001_X/labelsTr``; list-valued labels are regions, scored as the union of their values);
else every nonzero value found in the reference files. Each class is reported under its key: the
value as a string (``"1"``) or a region's values joined by commas (``"1,2,3"``).

Per case and class: :func:`volssl.evaluation.metrics.case_metrics` (Dice; NSD at ``nsd_tolerance_mm``
with the reference file's voxel spacing, the column norms of its affine). Empty-class conventions:
see :mod:`volssl.evaluation.metrics` (absent from both: ``empty_score``, NaN by default and then left
out of every mean; present in one only: 0).

Output ``metrics.json`` (NaN written as ``null``)::

    {"cases": [{"case": str, "class": str, "name": str, "dice": float|null, "nsd": float|null}, ...],
     "mean": {"dice": float|null, "nsd": float|null, "n_cases": int,
              "per_class": {class: {"name": str, "dice": float|null, "nsd": float|null, "n": int}}},
     "missing": [case ids with a reference but no prediction],
     "errors": [{"case": str, "error": str}, ...],    # unreadable, shape or geometry mismatch, ...
     "unmatched_predictions": [case ids with a prediction but no reference],
     "settings": {...}}

``mean.per_class[c]`` is the mean over cases of class ``c`` (NaN values left out, ``n`` = how many
counted); ``mean.dice`` / ``mean.nsd`` are the means over classes of those per-class means (nnU-Net's
"foreground mean"). Missing and failed cases are left out of the means and listed.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volssl.data.readers import VolumeError, is_nnunet_dataset, read_volume, volume_suffix
from volssl.evaluation.metrics import ClassSpec, case_metrics
from volssl.util.atomic import write_json_atomic


def class_key(label: ClassSpec) -> str:
    """The key of a class in metrics.json: ``"1"`` for a label, ``"1,2,3"`` for a region."""
    if isinstance(label, (tuple, list)):
        return ",".join(str(int(v)) for v in label)
    return str(int(label))


def parse_class_key(key: str) -> ClassSpec:
    """Inverse of :func:`class_key` (``"2"`` -> 2, ``"1,2"`` -> (1, 2))."""
    try:
        values = tuple(int(v) for v in str(key).split(","))
    except ValueError:
        raise ValueError(f"a class is an integer label or comma-separated labels (a region), got {key!r}") from None
    return values[0] if len(values) == 1 else values


def case_id(path: str | os.PathLike) -> str:
    """Case id of a volume file: its name without the volume suffix (and a ``.ome`` before it)."""
    name = Path(path).name
    suffix = volume_suffix(name)
    stem = name[: -len(suffix)] if suffix else name
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def find_volumes(folder: str | os.PathLike) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Volume files directly inside ``folder`` by case id.

    Returns:
        ``(files, duplicates)``: ``files[case]`` the one file of a case; ``duplicates[case]`` the files
        of a case id that several files share (``a.nii`` and ``a.nii.gz``), which cannot be paired.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    by_case: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or volume_suffix(f.name) is None:
            continue
        by_case.setdefault(case_id(f), []).append(f)
    files = {c: v[0] for c, v in by_case.items() if len(v) == 1}
    duplicates = {c: v for c, v in by_case.items() if len(v) > 1}
    return files, duplicates


def dataset_labels(ref_dir: str | os.PathLike) -> tuple[list[ClassSpec], dict[str, str], Path] | None:
    """Foreground classes declared by the nnU-Net ``dataset.json`` of ``ref_dir`` (or of its parent).

    Returns:
        ``(labels, names, path)`` (``names[class_key] = name``), or None without a dataset.json.
        nnU-Net v2 ``{"name": value | [values]}`` and v1 ``{"value": "name"}`` are both read; value 0
        (background) is dropped.
    """
    ref_dir = Path(ref_dir)
    for path in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read dataset.json: {e}") from e
        raw = meta.get("labels")
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{path}: dataset.json has no 'labels' mapping")
        labels: list[ClassSpec] = []
        names: dict[str, str] = {}
        try:
            for k, v in raw.items():
                if isinstance(v, str) and str(k).lstrip("-").isdigit():  # v1: "1": "tumour"
                    label: ClassSpec = int(k)
                    name = v
                elif isinstance(v, (list, tuple)):  # v2 region
                    label = tuple(int(x) for x in v)
                    label = label[0] if len(label) == 1 else label
                    name = str(k)
                else:
                    label, name = int(v), str(k)
                if label == 0 or label == (0,):
                    continue
                labels.append(label)
                names[class_key(label)] = name
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'labels' must map names to integers or lists of integers, got {raw}") from None
        return labels, names, path
    return None


def _read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    array, affine = read_volume(path)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array, equal_nan=False):
            raise VolumeError(path, "not a label map: it holds non-integer values", "not_labels")
        array = rounded.astype(np.int32)
    elif array.dtype.kind not in "iub":
        raise VolumeError(path, f"not a label map: dtype {array.dtype}", "not_labels")
    return array, affine


def evaluate_case(
    case: str,
    pred_path: str,
    ref_path: str,
    labels: Sequence[ClassSpec] | None,
    tolerance_mm: float,
    empty_score: float,
) -> dict[str, Any]:
    """Scores of one case (run in a worker process).

    Returns:
        ``{"case", "scores": {class_key: (dice, nsd)}, "ref_labels": [int], "spacing": [float]}``, or
        ``{"case", "error": str}`` when the pair cannot be scored. With ``labels=None`` the classes
        are the nonzero values of either file.
    """
    try:
        ref, ref_affine = _read_labels(Path(ref_path))
        pred, pred_affine = _read_labels(Path(pred_path))
    except VolumeError as e:
        return {"case": case, "error": str(e)}
    if pred.shape != ref.shape:
        return {"case": case, "error": f"{pred_path}: prediction shape {tuple(pred.shape)} differs from "
                                       f"reference {ref_path} shape {tuple(ref.shape)}"}
    spacing = np.sqrt((ref_affine[:3, :3] ** 2).sum(0))
    if not np.allclose(pred_affine, ref_affine, rtol=1e-5, atol=1e-3 * float(spacing.min())):
        return {"case": case, "error": f"{pred_path}: prediction geometry (affine) differs from reference "
                                       f"{ref_path}: {np.round(pred_affine, 4).tolist()} vs "
                                       f"{np.round(ref_affine, 4).tolist()}"}
    ref_labels = sorted(int(v) for v in np.unique(ref) if v != 0)
    if labels is None:
        present = sorted(set(ref_labels) | {int(v) for v in np.unique(pred) if v != 0})
        classes: list[ClassSpec] = list(present)
    else:
        classes = list(labels)
    scores = case_metrics(pred, ref, classes, spacing, tolerance_mm, empty_score)
    return {"case": case, "scores": {class_key(c): s for c, s in zip(classes, scores)},
            "ref_labels": ref_labels, "spacing": [float(s) for s in spacing]}


def evaluate_folder(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    out_json: str | os.PathLike | None,
    labels: Sequence[ClassSpec] | None = None,
    nsd_tolerance_mm: float = 1.0,
    workers: int = 1,
    progress: bool = True,
    empty_score: float = float("nan"),
) -> dict[str, Any]:
    """Evaluate every reference case of ``ref_dir`` against its prediction in ``pred_dir``.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps (e.g. an nnU-Net dataset's ``labelsTr``).
        out_json: where to write metrics.json (atomically); None: do not write.
        labels: classes to score (ints, or tuples of ints scored as one region); default: see the
            module docstring.
        nsd_tolerance_mm: NSD tolerance in mm (>= 0).
        workers: parallel processes (1: in this process).
        progress: show a tqdm bar on stderr.
        empty_score: score of a class absent from both prediction and reference (NaN: left out of
            the means; 1.0: counted as perfect).

    Returns:
        The metrics.json content (NaN as float NaN; the file holds null).

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: no reference volumes, no prediction matches any reference, bad arguments.
    """
    from tqdm import tqdm

    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs, ref_dups = find_volumes(ref_dir)
    preds, pred_dups = find_volumes(pred_dir)
    if not refs and not ref_dups:
        hint = " (an nnU-Net dataset root: pass its labelsTr or labelsTs folder)" if is_nnunet_dataset(ref_dir) else ""
        raise ValueError(f"{ref_dir}: no reference volumes found{hint}")

    names: dict[str, str] = {}
    if labels is not None:
        labels = [tuple(int(v) for v in c) if isinstance(c, (tuple, list)) else int(c) for c in labels]
        if not labels or any(c == 0 for c in labels):
            raise ValueError(f"labels must be non-empty foreground classes (not 0), got {labels}")
        labels_source = "argument"
    else:
        declared = dataset_labels(ref_dir)
        if declared is not None:
            labels, names, path = declared
            labels_source = str(path)
        else:
            labels_source = "reference files"

    errors = [{"case": c, "error": f"several reference files for case {c}: {', '.join(map(str, fs))}"}
              for c, fs in ref_dups.items()]
    errors += [{"case": c, "error": f"several prediction files for case {c}: {', '.join(map(str, fs))}"}
               for c, fs in pred_dups.items() if c in refs]
    missing = sorted(c for c in refs if c not in preds and c not in pred_dups)
    unmatched = sorted(c for c in preds if c not in refs and c not in ref_dups)
    todo = sorted(c for c in refs if c in preds)
    if not todo:
        raise ValueError(f"{pred_dir}: no prediction matches a reference case of {ref_dir} "
                         f"({len(refs)} references, {len(preds)} predictions; files pair by name)")

    args = [(c, str(preds[c]), str(refs[c]), labels, float(nsd_tolerance_mm), float(empty_score)) for c in todo]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(args), desc="evaluate", unit="case", disable=not progress, file=sys.stderr)
    if workers == 1:
        for a in args:
            results.append(evaluate_case(*a))
            bar.update()
    else:
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(min(workers, len(args)), mp_context=ctx) as ex:
            for fut in as_completed([ex.submit(evaluate_case, *a) for a in args]):
                results.append(fut.result())
                bar.update()
    bar.close()
    results.sort(key=lambda r: r["case"])

    errors += [{"case": r["case"], "error": r["error"]} for r in results if "error" in r]
    errors.sort(key=lambda e: e["case"])
    scored = [r for r in results if "error" not in r]
    ignored_pred_labels: list[int] = []
    if labels is None:
        ref_values = sorted({v for r in scored for v in r["ref_labels"]})
        labels = list(ref_values)
        pred_only = {int(k) for r in scored for k in r["scores"]} - set(ref_values)
        ignored_pred_labels = sorted(pred_only)
    keys = [class_key(c) for c in labels]
    both_empty = (float(empty_score), float(empty_score))

    cases = []
    for r in scored:
        for k in keys:
            d, s = r["scores"].get(k, both_empty)  # a class in neither file of this case
            cases.append({"case": r["case"], "class": k, "name": names.get(k, k), "dice": d, "nsd": s})

    per_class = {}
    for k in keys:
        d = np.array([c["dice"] for c in cases if c["class"] == k], dtype=np.float64)
        s = np.array([c["nsd"] for c in cases if c["class"] == k], dtype=np.float64)
        per_class[k] = {"name": names.get(k, k), "dice": _nanmean(d), "nsd": _nanmean(s),
                        "n": int(np.count_nonzero(~np.isnan(d)))}
    mean = {
        "dice": _nanmean(np.array([v["dice"] for v in per_class.values()], dtype=np.float64)),
        "nsd": _nanmean(np.array([v["nsd"] for v in per_class.values()], dtype=np.float64)),
        "n_cases": len(scored),
        "per_class": per_class,
    }
    result = {
        "cases": cases,
        "mean": mean,
        "missing": missing,
        "errors": errors,
        "unmatched_predictions": unmatched,
        "settings": {
            "pred_dir": str(pred_dir.resolve()),
            "ref_dir": str(ref_dir.resolve()),
            "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "classes": {k: names.get(k, k) for k in keys},
            "labels_source": labels_source,
            "ignored_prediction_labels": ignored_pred_labels,
            "empty_score": None if math.isnan(empty_score) else float(empty_score),
            "conventions": "class in neither file: empty_score (null = NaN, left out of means); "
                           "in one file only: dice 0, nsd 0; spacing from the reference affine",
        },
    }
    if out_json is not None:
        write_json_atomic(out_json, _nan_to_none(result))
    return result


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read a metrics.json written by :func:`evaluate_folder` (null scores become NaN)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read metrics.json: {e}") from e
    if not isinstance(data, dict) or "cases" not in data or "mean" not in data:
        raise ValueError(f"{path}: not a volssl metrics.json (needs 'cases' and 'mean')")
    for c in data["cases"]:
        for k in ("dice", "nsd"):
            c[k] = float("nan") if c.get(k) is None else float(c[k])
    for k in ("dice", "nsd"):
        data["mean"][k] = float("nan") if data["mean"].get(k) is None else float(data["mean"][k])
    return data


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
