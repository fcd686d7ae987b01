"""Instance evaluation of a folder of segmentations against reference instance labels (``volssl
evaluate-instances``): pairs files by case id, reads any volume format of :mod:`volssl.data.readers`
or ``.npy``, skeletonises the references for ERL when asked, and writes per-case and mean metrics
(:mod:`volssl.evaluation.instance_metrics`) to a metrics.json.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from volssl.evaluation.evaluate import _nan_to_none, _nanmean


def strip_suffix(name: str, suffix: str) -> str:
    return name[: -len(suffix)]


def _label_suffix(path: Path) -> str | None:
    from volssl.data.readers import volume_suffix

    if path.name.lower().endswith(".npy") and len(path.name) > 4:
        return ".npy"
    return volume_suffix(path)


def label_files(src: Path, what: str) -> dict[str, Path]:
    from volssl.util.errors import check_input_path

    src = check_input_path(src, what)
    if src.is_dir() and _label_suffix(src) is None:
        files = [f for f in sorted(src.iterdir()) if not f.name.startswith(".") and _label_suffix(f)]
    else:
        files = [src]
    out: dict[str, Path] = {}
    for f in files:
        case = strip_suffix(f.name, _label_suffix(f))
        if case.lower().endswith(".ome"):
            case = case[:-4]
        if case in out:
            raise ValueError(f"{what}: two files for case {case!r}: {out[case].name} and {f.name}")
        out[case] = f
    return out


def read_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(labels (X, Y, Z) integer, spacing)`` of a label file (.npy: spacing 1)."""
    from volssl.data.readers import VolumeError, read_volume

    if _label_suffix(path) == ".npy":
        try:
            arr, spacing = np.load(path), (1.0, 1.0, 1.0)
        except (OSError, ValueError) as e:
            from volssl.util.errors import describe_failure

            raise ValueError(f"{path}: cannot read as a .npy array: {describe_failure(e)}") from None
    else:
        try:
            arr, affine = read_volume(path, spacing=(1.0, 1.0, 1.0))
        except VolumeError as e:
            raise ValueError(str(e)) from None
        spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    if arr.ndim != 3:
        raise ValueError(f"{path}: labels must be 3D, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.array_equal(np.rint(arr), arr):
            raise ValueError(f"{path}: not a label map: it holds non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{path}: not a label map: dtype {arr.dtype}")
    return arr, spacing  # type: ignore[return-value]


def _skeletons_for(case: str, gt: np.ndarray, mode: str) -> Any:
    from volssl.evaluation.instance_metrics import skeletonize_labels

    if mode == "none":
        return None
    if mode == "gt":
        return skeletonize_labels(gt)
    folder = Path(mode)
    npz = folder / f"{case}.npz"
    if npz.is_file():
        with np.load(npz) as z:
            missing = {"nodes", "edges", "ids"} - set(z.files)
            if missing:
                raise ValueError(f"{npz}: missing arrays {sorted(missing)} (needs nodes, edges, ids)")
            nodes, edges, ids = z["nodes"], z["edges"].astype(np.int64), z["ids"]
        if len(ids) != len(nodes):
            raise ValueError(f"{npz}: ids has {len(ids)} entries for {len(nodes)} nodes")
        out = []
        for k in np.unique(ids):
            sel = np.flatnonzero(ids == k)
            remap = -np.ones(len(nodes), np.int64)
            remap[sel] = np.arange(sel.size)
            e = edges[(ids[edges[:, 0]] == k) & (ids[edges[:, 1]] == k)] if edges.size else edges.reshape(0, 2)
            out.append((nodes[sel], remap[e]))
        return out
    files = label_files(folder, "--skeletons")
    if case not in files:
        raise ValueError(f"--skeletons {folder}: no {case}.npz or skeleton volume for case {case!r}")
    vol, _ = read_labels(files[case])
    return vol


def evaluate_instances_folder(seg_dir: str | os.PathLike, gt_dir: str | os.PathLike, out: str | os.PathLike,
                              skeletons: str = "gt", merge_penalty: str = "skeleton", progress: bool = True,
                              verbose: bool = False) -> dict[str, Any]:
    """Instance metrics of every case of ``seg_dir`` against ``gt_dir`` (paired by case id), written to ``out``.

    ``skeletons``: "gt" (skeletonise the references), "none", or a folder (see the CLI docstring of
    ``volssl evaluate-instances``). Returns the metrics.json content: ``{"cases", "mean", "n_cases",
    "missing", "unmatched_predictions", "errors", "settings"}`` (NaN written as null).
    """
    from tqdm import tqdm

    from volssl.evaluation.evaluate import check_pair_size
    from volssl.evaluation.instance_metrics import evaluate_instances
    from volssl.util.atomic import write_json_atomic
    from volssl.util.errors import check_input_path, check_output_file, describe_failure

    if merge_penalty not in ("skeleton", "segment"):
        raise ValueError(f"merge_penalty must be 'skeleton' or 'segment', got {merge_penalty!r}")
    if skeletons not in ("gt", "none"):
        if not Path(skeletons).exists() and not Path(skeletons).is_symlink():
            raise FileNotFoundError(f"--skeletons {skeletons}: not 'gt', 'none' or a folder")
        check_input_path(skeletons, "--skeletons folder", kind="dir")
    segs = label_files(Path(seg_dir), "SEG_DIR")
    gts = label_files(Path(gt_dir), "GT_DIR")
    check_output_file(out, "metrics file")  # before any case is read
    if len(segs) == 1 and len(gts) == 1 and Path(seg_dir).is_file():  # two single files
        segs = {next(iter(gts)): next(iter(segs.values()))}
    cases, errors = [], []
    missing = sorted(set(gts) - set(segs))
    bar = tqdm(sorted(set(gts) & set(segs)), desc="evaluate-instances", unit="case", disable=not progress,
               file=sys.stderr)
    for case in bar:
        try:
            check_pair_size(segs[case], gts[case])  # from the headers: nothing read yet
            seg, _ = read_labels(segs[case])
            gt, spacing = read_labels(gts[case])
            if seg.shape != gt.shape:
                raise ValueError(f"{segs[case]}: shape {seg.shape} differs from the reference {gts[case]} {gt.shape}")
            skels = _skeletons_for(case, gt, skeletons)
            m = evaluate_instances(seg, gt, skels, spacing=spacing, merge_penalty=merge_penalty)
            cases.append({"case": case, **m})
        except Exception as e:  # noqa: BLE001 - one bad pair must not stop the others
            msg = describe_failure(e)
            if isinstance(e, MemoryError) and str(segs[case]) not in msg and str(gts[case]) not in msg:
                msg = f"out of memory while scoring {segs[case]} against {gts[case]}"
            elif str(segs[case]) not in msg and str(gts[case]) not in msg:
                msg = f"{segs[case]} vs {gts[case]}: {msg}"
            errors.append({"case": case, "error": msg})
            print(f"volssl evaluate-instances: warning: case {case} not scored: {msg}", file=sys.stderr)
    keys = [k for k in (cases[0] if cases else {}) if k != "case"]
    mean = {k: _nanmean(np.array([float(c[k]) for c in cases], dtype=np.float64)) for k in keys}
    result = {
        "cases": _nan_to_none(cases), "mean": _nan_to_none(mean), "n_cases": len(cases), "missing": missing,
        "unmatched_predictions": sorted(set(segs) - set(gts)), "errors": errors,
        "settings": {"skeletons": skeletons, "merge_penalty": merge_penalty, "ignore_gt": [0],
                     "rand_pairs": "distinct voxels (dense); with self-pairs on skeleton nodes (xpress_*)"},
    }
    write_json_atomic(out, result)
    if verbose:
        shown = [k for k in ("voi_split", "voi_merge", "rand_split", "rand_merge", "rand_error", "erl_normalised",
                             "xpress_rand_split", "xpress_rand_merge", "xpress") if k in mean]
        for k in shown:
            print(f"{k:>18} {mean[k]:10.4f}")
        print(f"{'cases':>18} {len(cases):10d}")
        for case in missing:
            print(f"volssl evaluate-instances: warning: no segmentation for case {case}", file=sys.stderr)
        print(f"wrote {out}")
    return result
