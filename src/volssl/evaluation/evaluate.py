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
     "errors": [{"case": str, "error": str}, ...],    # unreadable, shape or geometry mismatch, too large ...
     "warnings": [str, ...],                           # e.g. undeclared 255 / negative values ignored
     "unmatched_predictions": [case ids with a prediction but no reference],
     "settings": {...}}

``mean.per_class[c]`` is the mean over cases of class ``c`` (NaN values left out, ``n`` = how many
counted); ``mean.dice`` / ``mean.nsd`` are the means over classes of those per-class means (nnU-Net's
"foreground mean"). Missing and failed cases are left out of the means and listed.

Faults are per pair: a pair that cannot be scored -- an unreadable file, a shape or geometry mismatch
(shapes are compared from the two headers before anything is read, :func:`declared_shape_mismatch`),
a file whose header declares a volume too large for this machine (checked from the header before
anything is read: :func:`check_pair_size`, limit ``max_voxels`` or else the machine's memory), out of
memory while scoring, a worker process that died -- is listed in ``errors`` with its reason, and every
other pair is still scored.

Ignore label (as nnU-Net's): reference voxels holding an *ignore* value are left out of the scores
(set to background in both maps before scoring, which for Dice is exactly leaving them out; for NSD the
border of an ignored region is then a surface in both maps). Ignore values are the ``ignore`` entry of
dataset.json's labels (nnU-Net v2), the ``ignore_labels`` argument (``--ignore-label``), and -- with a
warning in ``warnings`` -- any negative value or 255 found in a reference that is not a declared class:
the usual "unlabelled" values, which must not be scored as a class of their own. A declared class
(``labels`` / dataset.json) is never ignored. ``settings.ignore_labels`` lists the values used and
each scored case records its ``ignored_voxels``.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volssl.data.readers import (ITK_SUFFIXES, NIBABEL_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, VolumeError,
                                 available_memory_bytes, check_declared_size, declared_size, is_nnunet_dataset,
                                 read_volume, volume_suffix)
from volssl.evaluation.metrics import ClassSpec, case_metrics
from volssl.util.atomic import write_json_atomic
from volssl.util.errors import check_input_path, check_output_file, describe_failure
from volssl.util.workers import watched_pool

# reference values taken as "unlabelled / ignore" when no class declares them
COMMON_IGNORE_VALUES = (255,)  # and every negative value


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
    folder = check_input_path(folder, "folder", kind="dir")
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
        (background) is dropped, and so is nnU-Net's ``ignore`` label (:func:`dataset_ignore_label`).
    """
    found = _dataset_json(ref_dir)
    if found is None:
        return None
    path, raw = found
    labels: list[ClassSpec] = []
    names: dict[str, str] = {}
    try:
        for k, v in raw.items():
            if _is_ignore_entry(k, v):  # nnU-Net v2 "ignore": value -- not a class
                continue
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


def dataset_ignore_label(ref_dir: str | os.PathLike) -> int | None:
    """The ``ignore`` label value of the nnU-Net ``dataset.json`` of ``ref_dir`` (or of its parent), if any."""
    found = _dataset_json(ref_dir)
    if found is None:
        return None
    path, raw = found
    for k, v in raw.items():
        if _is_ignore_entry(k, v):
            value = v if not str(k).lstrip("-").isdigit() else k
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: the 'ignore' label must be one integer, got {value!r}") from None
    return None


def _is_ignore_entry(key: Any, value: Any) -> bool:
    if str(key).strip().lower() == "ignore":  # v2: "ignore": 4
        return True
    return isinstance(value, str) and value.strip().lower() == "ignore" and str(key).lstrip("-").isdigit()  # v1


def _dataset_json(ref_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """``(path, labels mapping)`` of the dataset.json of ``ref_dir`` or of its parent, or None."""
    ref_dir = Path(ref_dir)
    for path in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if not path.is_file():
            if os.path.lexists(path):  # a named pipe (reading it would block), a folder, a link loop ...
                raise ValueError(f"{path}: dataset.json is not a regular file; not read (the classes to score "
                                 "cannot be taken from it: give --labels, or remove it)")
            continue
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read dataset.json: {describe_failure(e)}") from None
        raw = meta.get("labels") if isinstance(meta, dict) else None
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{path}: dataset.json has no 'labels' mapping")
        return path, raw
    return None


# ---------------------------------------------------------------------------------------------- sizes


def check_pair_size(pred_path: str | os.PathLike, ref_path: str | os.PathLike, max_voxels: int | None = None) -> None:
    """Raise MemoryError (with a sentence naming the file) when a file's header declares more voxels
    than ``max_voxels`` (:func:`volssl.data.readers.check_declared_size`), or -- without a limit -- a
    volume whose reading alone would need more than this machine's memory
    (:func:`volssl.data.readers.available_memory_bytes` with ``total=True``). Nothing of the voxel
    data is read (:func:`volssl.data.readers.declared_size`)."""
    sizes = {}
    for p in (pred_path, ref_path):
        d = declared_size(p)
        if d is not None:
            sizes[str(p)] = (d[0], int(np.prod(d[0], dtype=np.float64)), d[1])
    if max_voxels is not None:
        for p, (shape, _, _) in sizes.items():
            check_declared_size(p, shape, max_voxels, as_memory_error=True)
        return
    memory = available_memory_bytes(total=True)
    if memory is None:
        return
    # a lower bound of what scoring needs: both arrays as read, plus a boolean mask each
    need = sum(n * (itemsize + 1) for _, n, itemsize in sizes.values())
    if need > memory:
        p, (shape, n, _) = max(sizes.items(), key=lambda kv: kv[1][1])
        raise MemoryError(f"{p}: its header declares {_shape_text(shape)} = {n:.3g} voxels; scoring the pair "
                          f"needs at least {_bytes_text(need)}, more than this machine's {_bytes_text(memory)} "
                          "of memory; not read (a corrupt header? --max-voxels sets the limit)")


def _reader_family(path: str | os.PathLike) -> str | None:
    """Which reader (and so which axis convention) :func:`declared_size` used for ``path``."""
    if str(path).lower().endswith(".npy"):
        return "npy"
    suffix = volume_suffix(Path(path))
    for name, suffixes in (("nibabel", NIBABEL_SUFFIXES), ("itk", ITK_SUFFIXES), ("tiff", TIFF_SUFFIXES),
                           ("zarr", ZARR_SUFFIXES)):
        if suffix in suffixes:
            return name
    return None


def declared_shape_mismatch(pred_path: str | os.PathLike, ref_path: str | os.PathLike) -> str | None:
    """The shape-mismatch error of a pair, told from the two headers before any voxel is read (a
    decompression bomb declaring 1024^3 against a 128^3 reference is never decompressed), or None when
    the headers agree or cannot be compared (files of different formats, a header that cannot tell)."""
    family = _reader_family(pred_path)
    if family is None or family != _reader_family(ref_path):
        return None
    shapes = []
    for p in (pred_path, ref_path):
        d = declared_size(p)
        if d is None:
            return None
        shape = tuple(d[0])
        while len(shape) > 3 and shape[-1] == 1:  # the readers drop trailing singleton axes
            shape = shape[:-1]
        shapes.append(shape)
    if shapes[0] == shapes[1]:
        return None
    return (f"{pred_path}: prediction shape {shapes[0]} differs from reference {ref_path} shape {shapes[1]} "
            "(from the file headers; not read)")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def _bytes_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1000.0
    return f"{n:.3g} PB"


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
    ignore_labels: Sequence[int] = (),
    max_voxels: int | None = None,
) -> dict[str, Any]:
    """Scores of one case (run in a worker process). Never raises for a bad pair.

    Args:
        ignore_labels: reference values whose voxels are left out (module docstring); negative values
            and 255 found in the reference are left out too unless ``labels`` declares them.
        max_voxels: refuse a file whose header declares more voxels (None: the machine's memory decides).

    Returns:
        ``{"case", "scores": {class_key: (dice, nsd)}, "ref_labels": [int], "spacing": [float],
        "ignored_voxels": {value: count}, "undeclared_ignored": [values]}``, or ``{"case", "error": str}``
        when the pair cannot be scored (unreadable, too large, shape or geometry mismatch, out of
        memory, ...). With ``labels=None`` the classes are the nonzero values of either file.
    """
    try:
        return _evaluate_case(case, pred_path, ref_path, labels, tolerance_mm, empty_score, ignore_labels, max_voxels)
    except MemoryError as e:
        detail = " ".join(str(e).split())
        if not detail or (pred_path not in detail and ref_path not in detail):
            detail = f"out of memory while scoring {pred_path} against {ref_path}" + (f" ({detail})" if detail else "")
        return {"case": case, "error": detail}
    except Exception as e:  # noqa: BLE001 - one bad pair (or a bug on one pair) must not stop the others
        msg = describe_failure(e)
        if pred_path not in msg and ref_path not in msg:
            msg = f"{pred_path} vs {ref_path}: {msg}"
        return {"case": case, "error": msg}


def _evaluate_case(case, pred_path, ref_path, labels, tolerance_mm, empty_score, ignore_labels, max_voxels):
    check_pair_size(pred_path, ref_path, max_voxels)
    mismatch = declared_shape_mismatch(pred_path, ref_path)  # e.g. a 1 MB gzip bomb declaring 1024^3: not read
    if mismatch is not None:
        return {"case": case, "error": mismatch}
    ref, ref_affine = _read_labels(Path(ref_path))
    pred, pred_affine = _read_labels(Path(pred_path))
    if pred.shape != ref.shape:
        return {"case": case, "error": f"{pred_path}: prediction shape {tuple(pred.shape)} differs from "
                                       f"reference {ref_path} shape {tuple(ref.shape)}"}
    spacing = np.sqrt((ref_affine[:3, :3] ** 2).sum(0))
    if not np.allclose(pred_affine, ref_affine, rtol=1e-5, atol=1e-3 * float(spacing.min())):
        return {"case": case, "error": f"{pred_path}: prediction geometry (affine) differs from reference "
                                       f"{ref_path}: {np.round(pred_affine, 4).tolist()} vs "
                                       f"{np.round(ref_affine, 4).tolist()}"}
    ref_values = [int(v) for v in np.unique(ref)]
    declared = set()
    for c in labels or ():
        declared.update(int(v) for v in (c if isinstance(c, (tuple, list)) else (c,)))
    undeclared = [v for v in ref_values if (v < 0 or v in COMMON_IGNORE_VALUES) and v not in declared
                  and v not in ignore_labels]
    ignore = sorted(v for v in set(ignore_labels) | set(undeclared) if v in ref_values and v not in declared)
    ignored_voxels: dict[str, int] = {}
    if ignore:
        mask = np.isin(ref, ignore)
        for v in ignore:
            ignored_voxels[str(v)] = int(np.count_nonzero(ref == v))
        ref = np.where(mask, 0, ref)
        pred = np.where(mask, 0, pred)
        del mask
    ref_labels = sorted(v for v in ref_values if v != 0 and v not in ignore)
    if labels is None:
        present = sorted(set(ref_labels) | {int(v) for v in np.unique(pred) if v != 0})
        classes: list[ClassSpec] = list(present)
    else:
        classes = list(labels)
    scores = case_metrics(pred, ref, classes, spacing, tolerance_mm, empty_score)
    return {"case": case, "scores": {class_key(c): s for c, s in zip(classes, scores)},
            "ref_labels": ref_labels, "spacing": [float(s) for s in spacing],
            "ignored_voxels": ignored_voxels, "undeclared_ignored": sorted(undeclared)}


def _score_all(args: list[tuple], workers: int, bar: Any) -> list[dict[str, Any]]:
    """:func:`evaluate_case` of every argument tuple, in ``workers`` processes. A worker that dies
    (killed for memory by the system, a crash in a library) loses only the case it was scoring: the
    cases the broken pool could not finish are scored again one by one, each in a process of its own."""
    if workers == 1:
        results = []
        for a in args:
            results.append(evaluate_case(*a))
            bar.update()
        return results
    ctx = multiprocessing.get_context("forkserver")
    results, again = [], []
    with watched_pool(min(workers, len(args)), ctx) as ex:
        futures = {ex.submit(evaluate_case, *a): a for a in args}
        for fut in as_completed(futures):
            try:
                results.append(fut.result())
            except BrokenProcessPool:
                again.append(futures[fut])
                continue
            except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be sent back
                results.append({"case": futures[fut][0], "error": describe_failure(e)})
            bar.update()
    for a in sorted(again, key=lambda a: a[0]):
        try:
            with watched_pool(1, ctx) as ex:
                results.append(ex.submit(evaluate_case, *a).result())
        except BrokenProcessPool:
            results.append({"case": a[0], "error": f"the process scoring {a[1]} against {a[2]} died (killed for "
                                                   "using too much memory?)"})
        except Exception as e:  # noqa: BLE001
            results.append({"case": a[0], "error": describe_failure(e)})
        bar.update()
    return results


def evaluate_folder(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    out_json: str | os.PathLike | None,
    labels: Sequence[ClassSpec] | None = None,
    nsd_tolerance_mm: float = 1.0,
    workers: int = 1,
    progress: bool = True,
    empty_score: float = float("nan"),
    ignore_labels: Sequence[int] | None = None,
    max_voxels: int | None = None,
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
        ignore_labels: reference values whose voxels are left out of the scores, besides dataset.json's
            ``ignore`` label and (with a warning) undeclared negative values and 255 (module docstring).
        max_voxels: a file whose header declares more voxels is not read and its pair is listed in
            ``errors`` (None: a file whose reading alone would exceed this machine's memory).

    Returns:
        The metrics.json content (NaN as float NaN; the file holds null).

    Raises (before anything is scored):
        FileNotFoundError / NotADirectoryError / OSError: a folder is missing, a file, a link loop.
        ValueError: ``out_json`` is a folder or its folder cannot be written, no reference volumes,
            no prediction matches any reference, bad arguments.
    """
    from tqdm import tqdm

    _check_arguments(nsd_tolerance_mm, workers, max_voxels)
    pred_dir = check_input_path(pred_dir, "prediction folder", kind="dir")
    ref_dir = check_input_path(ref_dir, "reference folder", kind="dir")
    if out_json is not None:
        check_output_file(out_json, "metrics file")
    refs, ref_dups = find_volumes(ref_dir)
    preds, pred_dups = find_volumes(pred_dir)
    if not refs and not ref_dups:
        hint = " (an nnU-Net dataset root: pass its labelsTr or labelsTs folder)" if is_nnunet_dataset(ref_dir) else ""
        raise ValueError(f"{ref_dir}: no reference volumes found{hint}")
    labels, names, labels_source = _classes(labels, ref_dir)
    ignore, notes = _ignore_values(ignore_labels, ref_dir, labels, labels_source == "argument")

    todo, missing, unmatched, errors = _pairs(refs, ref_dups, preds, pred_dups)
    if not todo:
        raise ValueError(f"{pred_dir}: no prediction matches a reference case of {ref_dir} "
                         f"({len(refs)} references, {len(preds)} predictions; files pair by name)")

    args = [(c, str(preds[c]), str(refs[c]), labels, float(nsd_tolerance_mm), float(empty_score), tuple(ignore),
             max_voxels) for c in todo]
    bar = tqdm(total=len(args), desc="evaluate", unit="case", disable=not progress, file=sys.stderr)
    results = _score_all(args, workers, bar)
    bar.close()
    results.sort(key=lambda r: r["case"])

    errors += [{"case": r["case"], "error": r["error"]} for r in results if "error" in r]
    errors.sort(key=lambda e: e["case"])
    scored = [r for r in results if "error" not in r]
    ignored_pred_labels: list[int] = []
    if labels is None:
        labels, ignored_pred_labels = _found_classes(scored)
    keys = [class_key(c) for c in labels]
    cases = _case_rows(scored, keys, names, empty_score)
    undeclared = _undeclared_ignored(scored)
    result = {
        "cases": cases,
        "mean": _means(cases, keys, names, len(scored)),
        "missing": missing,
        "errors": errors,
        "warnings": notes + _undeclared_warnings(undeclared),
        "unmatched_predictions": unmatched,
        "settings": {
            "pred_dir": str(pred_dir.resolve()),
            "ref_dir": str(ref_dir.resolve()),
            "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "classes": {k: names.get(k, k) for k in keys},
            "labels_source": labels_source,
            "ignored_prediction_labels": ignored_pred_labels,
            "empty_score": None if math.isnan(empty_score) else float(empty_score),
            "ignore_labels": sorted(set(ignore) | set(undeclared)),
            "ignore_labels_undeclared": sorted(undeclared),
            "max_voxels": max_voxels,
            "conventions": "class in neither file: empty_score (null = NaN, left out of means); "
                           "in one file only: dice 0, nsd 0; spacing from the reference affine",
        },
    }
    if out_json is not None:
        write_json_atomic(out_json, _nan_to_none(result))
    return result


def _pairs(refs: dict[str, Path], ref_dups: dict[str, list[Path]], preds: dict[str, Path],
           pred_dups: dict[str, list[Path]]) -> tuple[list[str], list[str], list[str], list[dict[str, str]]]:
    """Pair the reference and prediction files (:func:`find_volumes`) by case id.

    Returns:
        ``(cases to score, references without a prediction, predictions without a reference,
        errors of the cases with several files)``, each sorted by case id but the errors.
    """
    errors = [{"case": c, "error": f"several reference files for case {c}: {', '.join(map(str, fs))}"}
              for c, fs in ref_dups.items()]
    errors += [{"case": c, "error": f"several prediction files for case {c}: {', '.join(map(str, fs))}"}
               for c, fs in pred_dups.items() if c in refs]
    missing = sorted(c for c in refs if c not in preds and c not in pred_dups)
    unmatched = sorted(c for c in preds if c not in refs and c not in ref_dups)
    todo = sorted(c for c in refs if c in preds)
    return todo, missing, unmatched, errors


def _found_classes(scored: list[dict[str, Any]]) -> tuple[list[ClassSpec], list[int]]:
    """Without given classes: ``(the nonzero values of the references, values found only in predictions)``."""
    ref_values = sorted({v for r in scored for v in r["ref_labels"]})
    pred_only = {int(k) for r in scored for k in r["scores"]} - set(ref_values)
    return list(ref_values), sorted(pred_only)


def _check_arguments(nsd_tolerance_mm: float, workers: int, max_voxels: int | None) -> None:
    """ValueError for an NSD tolerance (mm) that is not finite and >= 0, ``workers`` < 1 or ``max_voxels`` < 1."""
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_voxels is not None and max_voxels < 1:
        raise ValueError(f"max_voxels must be >= 1, got {max_voxels}")


def _classes(labels: Sequence[ClassSpec] | None, ref_dir: Path
             ) -> tuple[list[ClassSpec] | None, dict[str, str], str]:
    """``(classes, names by class key, where they come from)``: the ``labels`` argument (normalised),
    else the dataset.json of ``ref_dir``, else None (the values found in the reference files)."""
    if labels is not None:
        labels = [tuple(int(v) for v in c) if isinstance(c, (tuple, list)) else int(c) for c in labels]
        if not labels or any(c == 0 for c in labels):
            raise ValueError(f"labels must be non-empty foreground classes (not 0), got {labels}")
        return labels, {}, "argument"
    declared = dataset_labels(ref_dir)
    if declared is not None:
        labels, names, path = declared
        return labels, names, str(path)
    return None, {}, "reference files"


def _ignore_values(ignore_labels: Sequence[int] | None, ref_dir: Path, labels: Sequence[ClassSpec] | None,
                   labels_given: bool) -> tuple[list[int], list[str]]:
    """``(ignore values, notes)``: ``ignore_labels`` plus dataset.json's ``ignore`` label.

    A dataset.json that cannot be read is a note when the classes were given as an argument
    (``labels_given``), else its ValueError. ValueError for 0 or a value that is also a class.
    """
    ignore = sorted({int(v) for v in (ignore_labels or ())})
    notes: list[str] = []
    try:
        dataset_ignore = dataset_ignore_label(ref_dir)
    except ValueError as e:  # classes given as an argument: a broken dataset.json is not needed for them
        if not labels_given:
            raise
        dataset_ignore = None
        notes.append(f"dataset.json not used for its ignore label: {e}")
    if dataset_ignore is not None and dataset_ignore not in ignore:
        ignore.append(dataset_ignore)
    if 0 in ignore:
        raise ValueError("the ignore label cannot be 0 (background)")
    class_values = {int(v) for c in labels or () for v in (c if isinstance(c, tuple) else (c,))}
    clash = sorted(set(ignore) & class_values)
    if clash:
        raise ValueError(f"label value(s) {clash} are both a class to score and an ignore label")
    return ignore, notes


def _case_rows(scored: list[dict[str, Any]], keys: Sequence[str], names: dict[str, str],
               empty_score: float) -> list[dict[str, Any]]:
    """One metrics.json ``cases`` row per scored case and class key (a class in neither file of a case:
    ``empty_score`` for both Dice and NSD)."""
    both_empty = (float(empty_score), float(empty_score))
    cases = []
    for r in scored:
        for k in keys:
            d, s = r["scores"].get(k, both_empty)  # a class in neither file of this case
            row = {"case": r["case"], "class": k, "name": names.get(k, k), "dice": d, "nsd": s}
            if r.get("ignored_voxels"):
                row["ignored_voxels"] = r["ignored_voxels"]
            cases.append(row)
    return cases


def _undeclared_ignored(scored: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Undeclared reference values that were ignored (negative values, 255) -> the cases holding them."""
    undeclared: dict[int, list[str]] = {}
    for r in scored:
        for v in r.get("undeclared_ignored", ()):
            undeclared.setdefault(int(v), []).append(r["case"])
    return undeclared


def _undeclared_warnings(undeclared: dict[int, list[str]]) -> list[str]:
    """The warning sentence of each undeclared ignored value (:func:`_undeclared_ignored`)."""
    return [
        f"reference value {v} is not a declared class; its voxels in {len(cs)} case(s) ({_few(cs)}) were left out "
        f"of the scores as an ignore label (declare it: --ignore-label {v}, or score it as a class: --labels)"
        for v, cs in sorted(undeclared.items())
    ]


def _means(cases: list[dict[str, Any]], keys: Sequence[str], names: dict[str, str], n_cases: int) -> dict[str, Any]:
    """metrics.json ``mean``: per-class means over cases (NaN left out) and their means over classes."""
    per_class = {}
    for k in keys:
        d = np.array([c["dice"] for c in cases if c["class"] == k], dtype=np.float64)
        s = np.array([c["nsd"] for c in cases if c["class"] == k], dtype=np.float64)
        per_class[k] = {"name": names.get(k, k), "dice": _nanmean(d), "nsd": _nanmean(s),
                        "n": int(np.count_nonzero(~np.isnan(d)))}
    return {
        "dice": _nanmean(np.array([v["dice"] for v in per_class.values()], dtype=np.float64)),
        "nsd": _nanmean(np.array([v["nsd"] for v in per_class.values()], dtype=np.float64)),
        "n_cases": n_cases,
        "per_class": per_class,
    }


def _few(items: Sequence[str], n: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read a metrics.json written by :func:`evaluate_folder` (null scores become NaN)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read metrics.json: {describe_failure(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not isinstance(data.get("mean"), dict):
        raise ValueError(f"{path}: not a volssl metrics.json (needs a 'cases' list and a 'mean' object)")

    def score(value: Any, where: str) -> float:
        if value is None:
            return float("nan")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {where} must be a number or null, got {value!r}")
        return float(value)

    for i, c in enumerate(data["cases"]):
        if not isinstance(c, dict):
            raise ValueError(f"{path}: cases[{i}] must be an object with case, class, dice and nsd, got {c!r}")
        for k in ("dice", "nsd"):
            c[k] = score(c.get(k), f"the {k} of case {c.get('case', i)!r} class {c.get('class')!r}")
    for k in ("dice", "nsd"):
        data["mean"][k] = score(data["mean"].get(k), f"mean.{k}")
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
