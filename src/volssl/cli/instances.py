"""``volssl agglomerate`` (affinities -> instance segmentations) and ``volssl evaluate-instances``.

File conventions
    Affinities (``AFFINITIES``: one file or a folder of them, one case each) hold ``C >= 3`` channels,
    channels 0-2 the nearest-neighbour affinities along volssl axes x, y, z
    (:mod:`volssl.inference.agglomerate`):
    * ``.npy``: ``(C, X, Y, Z)`` (memory-mapped);
    * ``.nii`` / ``.nii.gz``: 4D ``(X, Y, Z, C)`` (NIfTI keeps the channels last);
    * ``.zarr``: an array stored ``(C, Z, Y, X)`` (OME-Zarr's c, z, y, x order, as
      :mod:`volssl.data.readers` reads Zarr volumes), read lazily block by block.
    Segmentations go to ``OUT/t<threshold>/<case><same suffix>``: ``.npy`` ``(X, Y, Z)`` uint64,
    ``.nii.gz`` (uint32 when the ids fit, the affinities' affine), ``.zarr`` stored ``(Z, Y, X)``
    uint64 (what ``volssl evaluate`` / ``evaluate-instances`` read back as ``(X, Y, Z)``), plus
    ``OUT/agglomerate.json``. Zarr inputs are processed blockwise by default (``--block 256``), so a
    volume never needs to fit in memory; other inputs are read whole unless ``--block`` is given.

``evaluate-instances SEG_DIR GT_DIR`` pairs files by case id (file name without its suffix; any
volume format of :mod:`volssl.data.readers`, or ``.npy``) and writes per-case and mean instance
metrics (:mod:`volssl.evaluation.instance_metrics`). Reference skeletons for ERL come from
skeletonising the reference labels (``--skeletons gt``, default), from ``--skeletons DIR``
(``<case>.npz`` with ``nodes`` (N, 3) voxel coordinates x, y, z, ``edges`` (E, 2) node indices and
``ids`` (N,) the skeleton id of each node; or a skeleton label volume ``<case><suffix>``), or are
skipped (``--skeletons none``; then no ERL and no XPRESS score).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

AFFINITY_SUFFIXES = (".nii.gz", ".nii", ".npy", ".zarr")


def register(sub: argparse._SubParsersAction) -> None:
    from volssl.cli.args import cubic_size

    p = sub.add_parser(
        "agglomerate",
        help="instance segmentations from affinities: watershed fragments + waterz agglomeration",
        description=(
            "Segments predicted affinities (channels 0-2: nearest-neighbour affinities along x, y, z; "
            ".npy (C, X, Y, Z), .nii.gz (X, Y, Z, C), .zarr stored (C, Z, Y, X)) into instances: a "
            "seeded watershed makes fragments, waterz merges them while 1 - mean boundary affinity is "
            "below each threshold (higher merges more). Writes OUT/t<threshold>/<case> in the input's "
            "format and OUT/agglomerate.json. Zarr inputs are processed blockwise (never whole in memory)."
        ),
    )
    p.add_argument("affinities", help="affinity file (.npy, .nii.gz, .zarr) or a folder of them")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7], metavar="T",
                   help="agglomeration thresholds (default: 0.5 0.6 0.7, MAE-XNT's search)")
    p.add_argument("--block", type=lambda t: cubic_size(t, minimum=0, what="--block"), default=None,
                   metavar="N|X,Y,Z", help="blockwise with this core block (default: 256 for .zarr, whole "
                                           "volume otherwise; 0: whole volume)")
    p.add_argument("--overlap", type=lambda t: cubic_size(t, minimum=0, what="--overlap"), default=(32, 32, 32),
                   metavar="N|X,Y,Z", help="context per block side in voxels (default 32)")
    p.add_argument("--boundary-threshold", type=float, default=0.5,
                   help="mean nearest-neighbour affinity at or below which a voxel is boundary (default 0.5)")
    p.add_argument("--seed-window", type=int, default=5, help="window (voxels) of the watershed seeds (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_agglomerate)

    q = sub.add_parser(
        "evaluate-instances",
        help="instance metrics (VOI, adapted Rand, ERL, XPRESS score) of segmentations against references",
        description=(
            "Pairs the instance segmentations of SEG_DIR with the reference instance labels of GT_DIR by "
            "case id (file name without suffix; NIfTI, NRRD/MHA, TIFF, Zarr or .npy) and writes VOI "
            "split/merge, adapted Rand error and Rand split/merge (dense, background ignored), and with "
            "skeletons the expected run length and the XPRESS score (Rand on skeleton nodes) per case "
            "and their means to --out."
        ),
    )
    q.add_argument("seg_dir", help="folder of segmentations (or one file)")
    q.add_argument("gt_dir", help="folder of reference instance labels (or one file)")
    q.add_argument("--out", required=True, help="metrics.json to write")
    q.add_argument("--skeletons", default="gt", metavar="gt|none|DIR",
                   help="reference skeletons: gt (skeletonise the references, default), none, or a folder "
                        "of <case>.npz (nodes, edges, ids) / skeleton label volumes")
    q.add_argument("--merge-penalty", choices=("skeleton", "segment"), default="skeleton",
                   help="ERL: a merge zeroes the whole skeleton (funlib/XPRESS, default) or the segment's runs")
    q.add_argument("--strict", action="store_true",
                   help="also exit with code 3 if a reference case has no segmentation (a failed pair always does)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_evaluate)


# ----------------------------------------------------------------------------------------------
# files


def affinity_suffix(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    for s in AFFINITY_SUFFIXES:
        if name.endswith(s) and len(name) > len(s):
            return s
    return None


class ReversedAxes:
    """Array-like view of a Zarr array stored ``(..., Z, Y, X)`` as ``(..., X, Y, Z)``: indexing with
    slices in volssl order reads / writes the matching stored region (leading axes, e.g. channels,
    are kept). Only tuples of slices (or fewer, padded with ``:``) are supported."""

    def __init__(self, array: Any, lead: int = 0) -> None:
        self.array, self.lead = array, lead
        shape = tuple(int(s) for s in array.shape)
        self.shape = shape[:lead] + shape[lead:][::-1]
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def _key(self, key: Any) -> tuple[slice, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[-1] is Ellipsis:
            key = key[:-1]
        if len(key) > self.ndim or not all(isinstance(k, slice) for k in key):
            raise IndexError(f"ReversedAxes supports tuples of slices only, got {key!r}")
        key = key + (slice(None),) * (self.ndim - len(key))
        return key[: self.lead] + key[self.lead:][::-1]

    def _perm(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(self.lead)) + tuple(range(ndim - 1, self.lead - 1, -1))

    def __getitem__(self, key: Any) -> np.ndarray:
        data = np.asarray(self.array[self._key(key)])
        return np.ascontiguousarray(data.transpose(self._perm(data.ndim)))

    def __setitem__(self, key: Any, value: Any) -> None:
        value = np.asarray(value)
        self.array[self._key(key)] = value.transpose(self._perm(value.ndim)) if value.ndim == self.ndim else value


def open_affinities(path: str | os.PathLike) -> tuple[Any, np.ndarray]:
    """``(array-like (C, X, Y, Z), affine (4, 4))`` of an affinity file (module docstring)."""
    path = Path(path)
    suffix = affinity_suffix(path)
    if suffix is None:
        raise ValueError(f"{path}: not an affinity file (known: {', '.join(AFFINITY_SUFFIXES)})")
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    affine = np.eye(4)
    try:
        if suffix == ".npy":
            arr: Any = np.load(path, mmap_mode="r")
        elif suffix == ".zarr":
            import zarr

            node = zarr.open(str(path), mode="r")
            if not isinstance(node, zarr.Array):
                raise ValueError("a Zarr group; point to the array holding the affinities")
            arr = ReversedAxes(node, lead=1)
        else:
            import nibabel as nib

            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
            if data.ndim != 4:
                raise ValueError(f"a NIfTI affinity file must be 4D (X, Y, Z, C), got shape {data.shape}")
            arr, affine = np.moveaxis(data, -1, 0), img.affine
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read affinities: {e}") from None
    shape = tuple(arr.shape)
    if len(shape) != 4 or shape[0] < 3:
        raise ValueError(f"{path}: affinities must be (C, X, Y, Z) with C >= 3 (as stored: {suffix} convention "
                         f"in `volssl agglomerate --help`), got shape {shape}")
    if np.dtype(arr.dtype).kind != "f":
        raise ValueError(f"{path}: affinities must be floating point in [0, 1], got dtype {arr.dtype}")
    return arr, affine


def _threshold_dir(out: Path, t: float) -> Path:
    return out / f"t{t:g}"


def _zarr_output(path: Path, shape: tuple[int, ...], block: tuple[int, int, int] | None) -> Any:
    import zarr

    chunks = tuple(min(s, 64 if block is None else min(b, 128)) for s, b in zip(shape, block or (64,) * 3))
    arr = zarr.create_array(str(path), shape=tuple(shape[::-1]), chunks=chunks[::-1], dtype="uint64",
                            fill_value=0, overwrite=True)
    return ReversedAxes(arr, lead=0)


def _write_volume(path: Path, seg: np.ndarray, affine: np.ndarray) -> None:
    from volssl.util.atomic import atomic_path

    suffix = affinity_suffix(path)
    if suffix == ".npy":
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, seg)
    elif suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        data = seg.astype(np.uint32) if seg.size == 0 or seg.max() < 2**32 else seg
        img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with atomic_path(path, suffix=suffix) as tmp:
            nib.save(img, str(tmp))
    else:  # zarr, whole volume at once
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _zarr_output(tmp, seg.shape, None)[...] = seg
        _replace_dir(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


def _affinity_cases(src: Path) -> list[tuple[str, Path]]:
    from volssl.evaluation.instance_evaluate import strip_suffix

    from volssl.util.errors import check_input_path

    src = check_input_path(src, "affinities")
    if src.is_dir() and affinity_suffix(src) is None:
        files = [f for f in sorted(src.iterdir()) if not f.name.startswith(".") and affinity_suffix(f)]
        if not files:
            raise FileNotFoundError(f"{src}: no affinity files ({', '.join(AFFINITY_SUFFIXES)})")
    elif src.exists():
        files = [src]
    else:
        raise FileNotFoundError(f"{src}: not found")
    return [(strip_suffix(f.name, affinity_suffix(f)), f) for f in files]


# ----------------------------------------------------------------------------------------------
# volssl agglomerate


def agglomerate_case(
    path: Path, case: str, out: Path, thresholds: list[float], block: tuple[int, int, int] | None,
    overlap: tuple[int, int, int], boundary_threshold: float, seed_window: int, progress: bool,
) -> dict[str, Any]:
    """Segment one affinity file; returns its entry of agglomerate.json."""
    from volssl.inference.agglomerate import segment, segment_blockwise

    affs, affine = open_affinities(path)
    suffix = affinity_suffix(path)
    out_suffix = ".nii.gz" if suffix == ".nii" else suffix
    if block is None:
        block = (256, 256, 256) if suffix == ".zarr" else (0, 0, 0)
    targets = {t: _threshold_dir(out, t) / f"{case}{out_suffix}" for t in thresholds}
    for target in targets.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    spatial = tuple(int(s) for s in affs.shape[1:])
    counts: dict[float, int] = {}
    if min(block) == 0:  # whole volume
        segs = segment(np.asarray(affs[0:3], dtype=np.float32), thresholds,
                       boundary_threshold=boundary_threshold, seed_window=seed_window)
        for t, seg in segs.items():
            _write_volume(targets[t], seg, affine)
            counts[t] = int(np.unique(seg).size - (1 if (seg == 0).any() else 0))
    elif out_suffix == ".zarr":  # streamed into the output arrays
        tmps = {t: p.with_name(f".{p.name}.tmp") for t, p in targets.items()}
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        outs = [_zarr_output(tmps[t], spatial, block) for t in thresholds]
        counts = segment_blockwise(affs, outs, thresholds, block=block, overlap=overlap,
                                   boundary_threshold=boundary_threshold, seed_window=seed_window, progress=progress)
        for t in thresholds:
            _replace_dir(tmps[t], targets[t])
    else:  # blockwise, output in memory
        outs = [np.zeros(spatial, np.uint64) for _ in thresholds]
        counts = segment_blockwise(affs, outs, thresholds, block=block, overlap=overlap,
                                   boundary_threshold=boundary_threshold, seed_window=seed_window, progress=progress)
        for t, seg in zip(thresholds, outs):
            _write_volume(targets[t], seg, affine)
    return {"case": case, "input": str(path), "shape": list(spatial),
            "segmentations": {f"{t:g}": {"path": str(targets[t]), "n_segments": int(counts[t])} for t in thresholds}}


def run_agglomerate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from volssl.util.atomic import write_json_atomic
    from volssl.util.errors import describe_failure
    from volssl.util.paths import check_output_dir

    thresholds = list(dict.fromkeys(float(t) for t in args.thresholds))
    if any(not math.isfinite(t) for t in thresholds):
        raise ValueError(f"--thresholds must be finite numbers, got {args.thresholds}")
    if not 0.0 <= args.boundary_threshold < 1.0:
        raise ValueError(f"--boundary-threshold must be in [0, 1), got {args.boundary_threshold}")
    if args.seed_window < 1:
        raise ValueError(f"--seed-window must be >= 1, got {args.seed_window}")
    cases = _affinity_cases(Path(args.affinities))
    out = check_output_dir(args.out, "output folder")  # before any case is segmented
    done, errors = [], []
    bar = tqdm(cases, desc="agglomerate", unit="case", disable=args.no_progress, file=sys.stderr)
    for case, path in bar:
        try:
            done.append(agglomerate_case(path, case, out, thresholds, args.block, args.overlap,
                                         args.boundary_threshold, args.seed_window, not args.no_progress))
        except (ValueError, OSError, MemoryError) as e:
            reason = "out of memory while segmenting" if isinstance(e, MemoryError) else describe_failure(e)
            msg = reason if str(path) in reason else f"{path}: {reason}"
            errors.append({"case": case, "error": msg})
            print(f"volssl agglomerate: warning: {msg}", file=sys.stderr)
    write_json_atomic(out / "agglomerate.json", {
        "cases": done, "errors": errors,
        "settings": {"thresholds": thresholds, "block": list(args.block) if args.block else None,
                     "overlap": list(args.overlap), "boundary_threshold": args.boundary_threshold,
                     "seed_window": args.seed_window},
    })
    for t in thresholds:
        print(f"t={t:g}: {len(done)} segmentation(s) in {_threshold_dir(out, t)}")
    return 3 if errors else 0


# ----------------------------------------------------------------------------------------------
# volssl evaluate-instances


def run_evaluate(args: argparse.Namespace) -> int:
    from volssl.evaluation.instance_evaluate import evaluate_instances_folder

    result = evaluate_instances_folder(args.seg_dir, args.gt_dir, args.out, skeletons=args.skeletons,
                                       merge_penalty=args.merge_penalty, progress=not args.no_progress, verbose=True)
    if result["errors"]:
        print(f"volssl evaluate-instances: {len(result['errors'])} case(s) failed and were not scored; "
              f"{result['n_cases']} scored", file=sys.stderr)
        return 3
    return 3 if args.strict and result["missing"] else 0
