"""``volssl bench loader``: the patch stream against whole-volume decoding, in one run.

Measured on stored phantoms (generated into a temporary directory, or ``--data DIR``, a
preprocessed dataset), every timing single-threaded (one decoder thread = one DataLoader worker)
and, except (d), in process CPU time (see ``Timer``: stable on a shared machine; ``*_wall`` keys
give the wall clock):

(a) whole-volume decoding: decode the whole stored volume, then crop a ``--large-patch`` window;
(b) the same windows read by ``PatchSampler`` (decodes only the blocks the window touches);
(c) ``--small-patch`` patches/s through ``PatchSampler`` in this process (= per worker);
(d) with ``--workers N``: patches/s through ``make_loader`` with N worker processes.

The result carries ``ratio_large_vs_whole`` (b over a) and whether the targets hold (ratio >= 5,
(c) >= 300 patches/s). Timings are medians (the machine may be shared). ``--compare-formats`` also
measures blosc2 and Zarr layouts on one phantom volume (``compare_formats``) and prints a Markdown
table to stderr; docs/benchmarks.md records its output.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

TARGET_RATIO = 5.0
TARGET_SMALL_PER_WORKER = 300.0


# -- phantom data ------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cell: int = 16) -> np.ndarray:
    """Smooth random field (float32, about unit variance): coarse noise linearly up-sampled."""
    from scipy import ndimage

    coarse = rng.standard_normal(tuple(max(2, s // cell + 2) for s in shape), dtype=np.float32)
    zoom = [s / (c - 1) for s, c in zip(shape, coarse.shape)]
    field = ndimage.zoom(coarse, zoom, order=1, grid_mode=False)
    return np.ascontiguousarray(field[tuple(slice(0, s) for s in shape)])


def phantom_like_case(
    rng: np.random.Generator, shape: Sequence[int] = (256, 256, 256), channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """A head-like volume with MRI-like compressibility, and a 2-class label map.

    Smooth tissue texture and a bias field inside an ellipsoidal "brain" in a "skull" shell, a few
    ellipsoidal lesions (labels 1 and 2), Rician noise everywhere (also in the air around the head),
    z-scored per channel (channels differ in tissue contrast).

    Returns:
        image float32 ``(C, X, Y, Z)``, label uint8 ``(X, Y, Z)``.
    """
    shape = tuple(int(s) for s in shape)
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape]
    radii = 0.8 + 0.1 * rng.random(3)
    r = sum((a.reshape([-1 if i == j else 1 for j in range(3)]) / rad) ** 2 for i, (a, rad) in enumerate(zip(axes, radii)))
    brain = r < 0.8
    skull = (r >= 0.8) & (r < 1.0)
    texture = np.tanh(2.0 * _smooth_field(rng, shape, 12))
    bias = 1.0 + 0.1 * _smooth_field(rng, shape, 64)
    label = np.zeros(shape, dtype=np.uint8)
    for cls in (1, 2, 1, 2):
        centre = (rng.random(3) - 0.5) * 0.9 * radii
        size = 0.05 + 0.1 * rng.random(3)
        d = sum(((a.reshape([-1 if i == j else 1 for j in range(3)]) - c) / s) ** 2 for i, (a, c, s) in enumerate(zip(axes, centre, size)))
        label[(d < 1.0) & brain] = cls
    image = np.empty((channels, *shape), dtype=np.float32)
    for c in range(channels):
        sign = 1.0 if c % 2 == 0 else -1.0
        clean = np.where(brain, 0.6 + sign * 0.2 * texture, np.where(skull, 0.25, 0.0)).astype(np.float32)
        clean += np.where(label > 0, 0.3 * sign, 0.0).astype(np.float32)
        clean *= bias
        sigma = np.float32(0.04)
        re = clean + sigma * rng.standard_normal(shape, dtype=np.float32)
        im = sigma * rng.standard_normal(shape, dtype=np.float32)
        mag = np.sqrt(re * re + im * im)
        image[c] = (mag - mag.mean()) / mag.std()
    return image, label


PHANTOMS = ("brain", "smooth")


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score of ``(C, X, Y, Z)`` (the preprocessing default), float32."""
    image = image.astype(np.float32, copy=False)
    mean = image.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = image.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    return ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def phantom_cases(
    n_cases: int, shape: Sequence[int], channels: int = 1, seed: int = 0, kind: str = "brain"
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, image (C, X, Y, Z) z-scored float32, label (X, Y, Z))`` for ``n_cases`` phantoms.

    ``kind="brain"``: ``volssl.data.phantoms.brain_case(rng, shape)`` (MRI-like heads, T1/T2/FLAIR,
    first ``channels`` of them; one axis is thick-sliced, so e.g. 256^3 asks give 256x256x~205);
    ``kind="smooth"``: :func:`phantom_like_case` (exactly ``shape``, faster to make).
    """
    if kind not in PHANTOMS:
        raise ValueError(f"phantom kind must be one of {PHANTOMS}, got {kind!r}")
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        if kind == "brain":
            from volssl.data.phantoms import brain_case

            if not 1 <= channels <= 3:
                raise ValueError(f"brain phantoms have 3 channels (T1, T2, FLAIR); asked for {channels}")
            case = brain_case(rng, tuple(int(s) for s in shape))
            image, label = zscore(case.images[:channels]), case.label
        else:
            image, label = phantom_like_case(rng, shape, channels)
        yield f"{kind}_{i:03d}", image, label


def class_locations(label: np.ndarray, rng: np.random.Generator, max_per_class: int = 10_000) -> dict[str, list]:
    """``{"c": [[x, y, z], ...]}``: up to ``max_per_class`` random voxels of each foreground class."""
    flat = label.reshape(-1)
    out: dict[str, list] = {}
    for cls in np.unique(flat):
        if cls == 0:
            continue
        idx = np.flatnonzero(flat == cls)
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        out[str(int(cls))] = np.stack(np.unravel_index(idx, label.shape), axis=1).tolist()
    return out


def write_dataset(
    root: str | os.PathLike,
    cases: Iterable[tuple[str, np.ndarray, np.ndarray | None]],
    seed: int = 0,
    plan: dict | None = None,
):
    """Write arrays as a preprocessed dataset (the layout of ``data/dataset.py``) and open it.

    Args:
        root: dataset directory (created).
        cases: ``(id, image (C, X, Y, Z) float32, label (X, Y, Z) int or None)`` per case.
        seed: seed of the class-location sub-sampling.
        plan: contents of ``plan.json`` (default: a minimal plan naming this writer).

    Returns:
        ``PreprocessedDataset`` over ``root``.
    """
    from volssl.data.dataset import PreprocessedDataset
    from volssl.data.manifest import CaseRecord, ManifestWriter
    from volssl.data.storage import SUFFIX, save_array
    from volssl.util.atomic import write_json_atomic

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ManifestWriter(root) as writer:
        for case_id, image, label in cases:
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 4:
                raise ValueError(f"write_dataset: image of case {case_id!r} must be (C, X, Y, Z), got {image.shape}")
            save_array(root / "images" / f"{case_id}{SUFFIX}", image)
            props: dict[str, Any] = {"class_locations": {}}
            if label is not None:
                if label.shape != image.shape[1:]:
                    raise ValueError(
                        f"write_dataset: label of case {case_id!r} has shape {label.shape}, image {image.shape}"
                    )
                save_array(root / "labels" / f"{case_id}{SUFFIX}", label)
                props["class_locations"] = class_locations(label, rng)
            write_json_atomic(root / "props" / f"{case_id}.json", props)
            writer.append(
                CaseRecord(
                    id=case_id,
                    shape=list(image.shape),
                    spacing=[1.0, 1.0, 1.0],
                    channels=[f"ch{c}" for c in range(image.shape[0])],
                    has_label=label is not None,
                    split="train",
                )
            )
    write_json_atomic(root / "plan.json", plan or {"name": "volssl-bench-phantoms", "spacing": [1.0, 1.0, 1.0]})
    return PreprocessedDataset(root)


# -- timing helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """blosc2 and torch on one thread (as in a DataLoader worker); restored afterwards."""
    import blosc2
    import torch

    old_b, old_t = blosc2.set_nthreads(1), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        blosc2.set_nthreads(old_b)
        torch.set_num_threads(old_t)


class Timer:
    """Collects wall-clock and process-CPU seconds of timed blocks: ``with timer(): ...``.

    Single-threaded work on an idle core takes as much CPU time as wall time; on a shared machine
    the CPU time is the stable measure (other processes stretch the wall clock, not our CPU time).
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    def median(self, clock: str = "cpu") -> float:
        return float(np.median(self.cpu if clock == "cpu" else self.wall))


# -- blosc2 vs Zarr ----------------------------------------------------------------------------

# (format, chunk edge, block edge (blosc2) or shard edge (Zarr), codec name, clevel, shuffle)
FORMAT_CONFIGS: list[tuple[str, int, int | None, str, int, bool]] = [
    ("blosc2", 64, 16, "lz4", 5, True),
    ("blosc2", 64, 32, "lz4", 5, True),
    ("blosc2", 32, 16, "lz4", 5, True),
    ("blosc2", 128, 16, "lz4", 5, True),
    ("blosc2", 64, 16, "zstd", 1, True),
    ("blosc2", 64, 16, "lz4", 5, False),
    ("zarr", 64, None, "lz4", 5, True),
    ("zarr", 32, None, "lz4", 5, True),
    ("zarr", 64, None, "zstd", 1, True),
    ("zarr", 32, 128, "lz4", 5, True),
]


def _write_format(path: Path, array: np.ndarray, fmt: str, chunk: int, block: int | None, codec: str, clevel: int, shuffle: bool):
    """Write ``array`` (C, X, Y, Z) in one layout and return a read-only handle (1 decode thread)."""
    lead = (1,) * (array.ndim - 3)
    if fmt == "blosc2":
        import blosc2

        cparams = {
            "codec": {"lz4": blosc2.Codec.LZ4, "zstd": blosc2.Codec.ZSTD}[codec],
            "clevel": clevel,
            "filters": [blosc2.Filter.SHUFFLE if shuffle else blosc2.Filter.NOFILTER],
            "nthreads": 1,
        }
        blosc2.asarray(array, urlpath=str(path), mode="w", chunks=lead + (chunk,) * 3, blocks=lead + (block,) * 3, cparams=cparams)
        return blosc2.open(str(path), mode="r", mmap_mode="r", dparams=blosc2.DParams(nthreads=1))
    import zarr
    from zarr.codecs import BloscCodec

    compressor = BloscCodec(cname=codec, clevel=clevel, shuffle="shuffle" if shuffle else "noshuffle")
    kwargs = {"shards": lead + (block,) * 3} if block else {}
    z = zarr.create_array(str(path), shape=array.shape, dtype=array.dtype, chunks=lead + (chunk,) * 3, compressors=[compressor], overwrite=True, **kwargs)
    z[...] = array
    return zarr.open_array(str(path), mode="r")


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compare_formats(
    shape: Sequence[int] = (256, 256, 256),
    seed: int = 0,
    configs: Sequence[tuple] = FORMAT_CONFIGS,
    rounds: int = 3,
    large_per_round: int = 3,
    small_per_round: int = 15,
    large: int = 160,
    small: int = 64,
    progress: bool = True,
    kind: str = "brain",
) -> list[dict[str, Any]]:
    """Measure blosc2 and Zarr layouts on one z-scored phantom volume (first channel), single-threaded.

    Every layout is written first (timed once); then, ``rounds`` times, each layout in turn decodes
    the whole volume once and reads ``large_per_round`` random ``large``^3 and ``small_per_round``
    ``small``^3 windows (the same windows for every layout). Interleaving the layouts spreads a
    shared machine's load changes over all of them; reported times are medians of process CPU time
    (see ``Timer``), the write time is wall clock. Zarr runs with one thread
    (``threading.max_workers=1``, blosc nthreads 1). The layouts are written to a temporary
    directory (``tempfile``'s: ``$TMPDIR`` chooses the disk), removed afterwards.

    Returns:
        one dict per layout (keys ``format, chunks, inner, codec, size_mib, compression, write_s,
        whole_ms, large_ms, small_ms, whole_over_large``).
    """
    import numcodecs.blosc
    import zarr
    from tqdm import tqdm

    _, image, _ = next(phantom_cases(1, shape, 1, seed, kind))
    rng = np.random.default_rng([seed, 1])
    spatial = image.shape[1:]
    tmp = Path(tempfile.mkdtemp(prefix="volssl-formats-"))
    old_nb = numcodecs.blosc.set_nthreads(1)
    try:
        with single_threaded(), zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1}):
            layouts = _write_layouts(image, configs, tmp, progress)
            for _ in tqdm(range(rounds), desc="read layouts", file=sys.stderr, disable=not progress):
                o_large = _origins(rng, spatial, large, large_per_round)
                o_small = _origins(rng, spatial, small, small_per_round)
                for _, arr, timers in layouts:
                    with timers["whole"]():
                        np.asarray(arr[...])
                    for o in o_large:
                        with timers["large"]():
                            _read_window(arr, o, large)
                    for o in o_small:
                        with timers["small"]():
                            _read_window(arr, o, small)
            rows = [_timed_row(row, timers) for row, _, timers in layouts]
            del layouts
    finally:
        numcodecs.blosc.set_nthreads(old_nb)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _origins(rng: np.random.Generator, spatial: Sequence[int], size: int, n: int) -> list[list[int]]:
    """``n`` random window origins (x, y, z voxels) of ``size``^3 windows inside ``spatial``."""
    return [[int(rng.integers(0, max(d - size, 0) + 1)) for d in spatial] for _ in range(n)]


def _read_window(arr, origin: list[int], size: int) -> np.ndarray:
    """The first channel's ``size``^3 window at ``origin`` of a stored (C, X, Y, Z) array, as (1, s, s, s)."""
    return np.asarray(arr[(slice(0, 1),) + tuple(slice(o, o + size) for o in origin)])


def _write_layouts(image: np.ndarray, configs: Sequence[tuple], tmp: Path,
                   progress: bool) -> list[tuple[dict[str, Any], Any, dict[str, Timer]]]:
    """Write ``image`` (C, X, Y, Z) once per layout of ``configs`` under ``tmp`` and check a window
    round-trips; returns ``(row, opened array, timers "whole" / "large" / "small")`` per layout."""
    from tqdm import tqdm

    layouts = []
    for fmt, chunk, block, codec, clevel, shuffle in tqdm(configs, desc="write layouts", file=sys.stderr, disable=not progress):
        path = tmp / f"{fmt}-{chunk}-{block}-{codec}{clevel}-{int(shuffle)}{'.b2nd' if fmt == 'blosc2' else '.zarr'}"
        t = time.perf_counter()
        arr = _write_format(path, image, fmt, chunk, block, codec, clevel, shuffle)
        write_s = time.perf_counter() - t
        window = (slice(0, 1), slice(3, 70), slice(5, 69), slice(10, 40))
        if not np.array_equal(np.asarray(arr[window]), image[window]):
            raise RuntimeError(f"compare_formats: {path.name} did not round-trip")
        inner = f"blocks {block}^3" if fmt == "blosc2" else (f"shards {block}^3" if block else "-")
        row = {
            "format": fmt,
            "chunks": f"{chunk}^3",
            "inner": inner,
            "codec": f"{codec}-{clevel}{'+shuffle' if shuffle else ''}",
            "size_mib": round(_disk_bytes(path) / 2**20, 1),
            "compression": round(image.nbytes / _disk_bytes(path), 2),
            "write_s": round(write_s, 2),
        }
        layouts.append((row, arr, {"whole": Timer(), "large": Timer(), "small": Timer()}))
    return layouts


def _timed_row(row: dict[str, Any], timers: dict[str, Timer]) -> dict[str, Any]:
    """``row`` with the median read times (ms) of its layout's timers and whole / large."""
    whole, t_large, t_small = (timers[k].median() for k in ("whole", "large", "small"))
    row.update(
        whole_ms=round(whole * 1e3, 1),
        large_ms=round(t_large * 1e3, 2),
        small_ms=round(t_small * 1e3, 2),
        whole_over_large=round(whole / t_large, 2),
    )
    return row


def format_table(rows: Sequence[dict[str, Any]], large: int = 160, small: int = 64) -> str:
    """The rows of ``compare_formats`` as a Markdown table."""
    head = ["format", "chunks", "inner", "codec", "MiB", "ratio", "write s", "whole ms", f"{large}^3 ms", f"{small}^3 ms", f"whole/{large}^3"]
    keys = ["format", "chunks", "inner", "codec", "size_mib", "compression", "write_s", "whole_ms", "large_ms", "small_ms", "whole_over_large"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# -- the benchmark -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="preprocessed dataset to read (default: generate phantoms in a temporary directory)")
    parser.add_argument("--cases", type=int, default=3, help="phantom volumes to generate (default 3)")
    parser.add_argument("--size", type=int, default=256, help="edge of the generated volumes in voxels (default 256)")
    parser.add_argument("--channels", type=int, default=1, help="channels of the generated volumes (default 1; brain phantoms have up to 3)")
    parser.add_argument("--phantom", choices=PHANTOMS, default="brain", help="generated data: volssl brain phantoms (default) or smooth head-like volumes (faster)")
    parser.add_argument("--large-patch", type=int, default=160, help="patch edge compared with whole-volume decoding (default 160)")
    parser.add_argument("--small-patch", type=int, default=64, help="patch edge of the throughput measurement (default 64)")
    parser.add_argument("--reps", type=int, default=15, help="whole-volume / large-patch repetitions (median; default 15)")
    parser.add_argument("--small-patches", type=int, default=400, help="small patches read per process (default 400)")
    parser.add_argument("--workers", type=int, default=0, help="also measure make_loader with this many worker processes (default 0: skip)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the --workers measurement (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-formats", action="store_true", help="also compare blosc2 and Zarr layouts (Markdown table on stderr)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; returns one flat JSON-able dict."""
    import torch
    from tqdm import tqdm

    from volssl.data.dataset import PreprocessedDataset
    from volssl.data.patches import PatchSampler, read_window
    from volssl.data.storage import BLOCK, CHUNK, load_array

    for name in ("cases", "size", "channels", "large_patch", "small_patch", "reps", "small_patches", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"bench loader: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    tmp = None
    try:
        if args.data is not None:
            ds = PreprocessedDataset(args.data)
            source = str(args.data)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="volssl-bench-loader-"))
            shape = (args.size,) * 3
            cases = phantom_cases(args.cases, shape, args.channels, args.seed, args.phantom)
            ds = write_dataset(tmp, tqdm(cases, total=args.cases, desc="phantoms", file=sys.stderr), seed=args.seed)
            source = f"{args.cases} {args.phantom} phantoms, {args.channels} channel(s), asked {args.size}^3 (generated)"
        if not ds.cases:
            raise ValueError(f"bench loader: {ds.root} has no usable cases")
        result: dict[str, Any] = {
            "data": source,
            "n_cases": len(ds.cases),
            "volume_shape": ds.cases[0].shape,
            "mean_voxels": int(np.mean([r.n_voxels for r in ds.cases])),
            "storage": f"blosc2 chunks {CHUNK}^3 blocks {BLOCK}^3",
            "decode_threads": 1,
            "timing": "medians of process CPU time (one thread: = wall time on an idle core); *_wall: wall clock",
            "large_patch": args.large_patch,
            "small_patch": args.small_patch,
        }
        with single_threaded():
            for rec in ds.cases:  # warm the page cache: both sides then read from memory
                load_array(ds.image_path(rec.id), nthreads=1)
            large = PatchSampler(ds, args.large_patch, seed=args.seed)
            size = large.patch_size
            t_whole, t_large = Timer(), Timer()
            large[0]  # warm-up
            for i in tqdm(range(1, args.reps + 1), desc=f"whole vs {args.large_patch}^3", file=sys.stderr):
                d = large.draw(i)  # the same case and window for both sides
                path = ds.image_path(d["record"].id)
                with t_whole():
                    full = load_array(path, nthreads=1)
                    torch.from_numpy(read_window(full, d["origin"], size, (slice(None),)))
                    del full
                with t_large():
                    large[i]
            whole_s, large_s = t_whole.median(), t_large.median()
            # context: what a loader without a preprocessed store pays, decoding a gzip NIfTI
            nifti_s = _nifti_whole_seconds(ds, large, size, reps=max(1, min(3, args.reps)))
            result.update(
                whole_volume_ms=round(whole_s * 1e3, 2),
                whole_volume_patches_per_s=round(1 / whole_s, 2),
                sampler_large_ms=round(large_s * 1e3, 2),
                sampler_large_patches_per_s=round(1 / large_s, 2),
                ratio_large_vs_whole=round(whole_s / large_s, 2),
                ratio_large_vs_whole_wall=round(t_whole.median("wall") / t_large.median("wall"), 2),
                nifti_gz_whole_ms=round(nifti_s * 1e3, 2),
                ratio_large_vs_nifti_gz=round(nifti_s / large_s, 2),
            )
            small = PatchSampler(ds, args.small_patch, seed=args.seed + 1)
            for i in range(10):
                small[i]
            group = 25
            t_small = Timer()
            for g in tqdm(range(max(1, args.small_patches // group)), desc=f"{args.small_patch}^3 patches", file=sys.stderr):
                with t_small():
                    for i in range(g * group, (g + 1) * group):
                        small[10 + i]
            result["sampler_small_patches_per_s_per_worker"] = round(group / t_small.median(), 1)
            result["sampler_small_patches_per_s_wall"] = round(group / t_small.median("wall"), 1)
        result["loader_workers"] = args.workers
        result["loader_patches_per_s"] = None
        result["loader_patches_per_s_per_worker"] = None
        if args.workers > 0:
            rate = _loader_rate(PatchSampler(ds, args.small_patch, seed=args.seed + 2), args.batch_size, args.workers, args.small_patches)
            result["loader_patches_per_s"] = round(rate, 1)
            result["loader_patches_per_s_per_worker"] = round(rate / args.workers, 1)
        result["target_ratio"] = TARGET_RATIO
        result["target_small_per_worker"] = TARGET_SMALL_PER_WORKER
        result["ratio_target_met"] = bool(result["ratio_large_vs_whole"] >= TARGET_RATIO)
        result["small_target_met"] = bool(result["sampler_small_patches_per_s_per_worker"] >= TARGET_SMALL_PER_WORKER)
        result["targets_met"] = result["ratio_target_met"] and result["small_target_met"]
        if args.compare_formats:
            rows = compare_formats((args.size,) * 3, args.seed, large=args.large_patch, small=args.small_patch, kind=args.phantom)
            print(format_table(rows, args.large_patch, args.small_patch), file=sys.stderr)
            result["formats"] = rows
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _nifti_whole_seconds(ds, sampler, size, reps: int) -> float:
    """Median CPU seconds to decode one stored volume saved as gzip NIfTI and crop the same window.

    Context for the main ratio (which compares against decoding our own blosc2 store): this is what
    a loader that reads the source files (e.g. ``.nii.gz`` through nibabel) pays per patch.
    """
    import nibabel as nib

    from volssl.data.patches import read_window
    from volssl.data.storage import load_array

    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="volssl-bench-nifti-") as tmp:
        d = sampler.draw(1)
        path = Path(tmp) / "case.nii.gz"
        nib.save(nib.Nifti1Image(load_array(ds.image_path(d["record"].id), nthreads=1)[0], np.eye(4)), path)
        for _ in range(reps):
            with timer():
                full = np.asarray(nib.load(path).dataobj, dtype=np.float32)[None]
                read_window(full, d["origin"], size, (slice(None),))
    return timer.median()


def _loader_rate(sampler, batch_size: int, workers: int, n_patches: int) -> float:
    """Patches/s through ``make_loader`` (after two warm-up batches), median over groups of batches."""
    from volssl.data.patches import make_loader

    loader = make_loader(sampler, batch_size, num_workers=workers)
    it = iter(loader)
    for _ in range(2 + workers):
        next(it)
    n_batches = max(4, n_patches // batch_size)
    group = max(1, n_batches // 4)
    rates = []
    for _ in range(n_batches // group):
        t = time.perf_counter()
        for _ in range(group):
            next(it)
        rates.append(group * batch_size / (time.perf_counter() - t))
    del it
    return float(np.median(rates))
