"""``volssl bench crops``: 64^3 crops straight from huge Zarr / TIFF volumes vs from memory, per worker.

MAE-XNT trains on batches of 320 crops of 64^3 read from volumes far larger than memory; the
loader must keep up with the GPU. This benchmark writes (or, with ``--volume PATH``, reuses) a
``--size``^3 uint8 volume (default 1024^3 = 1 GiB) as

* a Zarr v3 array, chunks ``--chunk``^3 (default 64), Blosc ``--zarr-codec`` (default lz4);
* a BigTIFF per ``--tiff-layouts`` entry: ``striped`` (one strip per page, uncompressed,
  contiguous: read with one ``pread`` per z-slice of the window), ``tiles3d`` (uncompressed
  ``--chunk``^3 volumetric tiles, read through tifffile's Zarr store) or ``tiles2d`` (``--chunk``^2
  tiles per page);

all written slab by slab (``--chunk`` pages at a time; never the whole volume in memory), in a
temporary directory under ``--workdir`` after checking its free space. It then reads ``--crops``
crops from each through ``VolumeCropSampler`` (one process, no DataLoader: the rate of ONE worker;
random cube symmetry + per-crop z-score on, i.e. MAE-XNT's item) and, last, from an in-memory NumPy
copy of the same volume through the same code (the upper bound; ``--no-memory`` skips it).

Timings are medians over groups of 25 crops of process CPU time (decoders on one thread: the cost
a worker pays on its own core; ``*_wall`` keys give the wall clock) and are reported as crops/s per
worker and as the ratio to the in-memory rate. The volumes are written by a forked child process, so
this process's peak resident set size (``ru_maxrss``) before reading is only the interpreter and
libraries; it is recorded again after the file phases, before the in-memory copy exists
(``rss_growth_reading_mib``: what reading crops added), to show the volumes are never loaded whole.
The files are read from the page cache when it holds them (just written: usually).

``workers_for_320_crops_per_s``: worker processes at the best file rate that deliver MAE-XNT's batch
of 320 crops every second; a step of ``T`` s needs ``320 / T`` crops/s, i.e. that number / ``T``.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from volssl.bench.loader import Timer, single_threaded

MAE_XNT_BATCH = 320
TIFF_LAYOUTS = ("striped", "tiles3d", "tiles2d")
ZARR_CODECS = ("lz4", "zstd", "none")
GROUP = 25


def _rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _current_rss_mib() -> float | None:
    """Resident set size of this process now (MiB; None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _write_in_child(*args: Any) -> dict[str, Path]:
    """:func:`write_volumes` in a forked child process where there is fork (so the writer's buffers
    never count in this process's peak RSS), else here."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if "fork" not in mp.get_all_start_methods():  # pragma: no cover - not POSIX
        return write_volumes(*args)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        return pool.submit(write_volumes, *args).result()


def volume_slabs(size: int, slab: int, seed: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """``(z0, uint8 (dz, size, size))`` slabs of a deterministic textured test volume, stored (z, y, x).

    Texture: blocky structure (16^3 blocks of random grey levels) plus uniform noise, so that
    compressed chunks neither vanish nor are incompressible noise.
    """
    nb = -(-size // 16)
    for z0 in range(0, size, slab):
        dz = min(slab, size - z0)
        rng = np.random.default_rng([seed, z0])
        # 16^3 blocks of grey levels: block row b of the volume comes from generator [seed, 1e9 + b]
        rows = [np.random.default_rng([seed, 10**9 + b]).integers(0, 200, (nb, nb), dtype=np.uint8)
                for b in range(z0 // 16, (z0 + dz - 1) // 16 + 1)]
        zi = np.arange(z0, z0 + dz) // 16 - z0 // 16
        block = np.stack(rows)[zi].repeat(16, axis=1)[:, :size].repeat(16, axis=2)[:, :, :size]
        block += rng.integers(0, 48, block.shape, dtype=np.uint8)
        yield z0, block


def _zarr_codec(name: str):
    import zarr

    if name == "none":
        return None
    return zarr.codecs.BloscCodec(cname=name, clevel=5 if name == "lz4" else 1, shuffle="noshuffle")


def write_volumes(folder: Path, size: int, chunk: int, layouts: list[str], codec: str, seed: int = 0,
                  progress: bool = True) -> dict[str, Path]:
    """Write the test volume as Zarr and as one TIFF per layout, slab by slab (each writer regenerates
    the deterministic slabs; at most one slab is in memory); returns name -> path."""
    import tifffile
    import zarr
    from tqdm import tqdm

    shape = (size, size, size)
    n_slabs = -(-size // chunk)
    paths: dict[str, Path] = {"zarr": folder / "volume.zarr"}
    z = zarr.create_array(str(paths["zarr"]), shape=shape, chunks=(chunk,) * 3, dtype="uint8",
                          compressors=_zarr_codec(codec), overwrite=True)
    for z0, slab in tqdm(volume_slabs(size, chunk, seed), total=n_slabs, desc=f"write Zarr {size}^3",
                         file=sys.stderr, disable=not progress):
        z[z0:z0 + slab.shape[0]] = slab
    for layout in layouts:
        paths[f"tiff_{layout}"] = folder / f"volume_{layout}.tif"
        kwargs: dict[str, Any] = {"shape": shape, "dtype": np.uint8}
        if layout == "tiles3d":
            kwargs["tile"] = (chunk, chunk, chunk)
        elif layout == "tiles2d":
            kwargs["tile"] = (chunk, chunk)
        slabs = tqdm(volume_slabs(size, chunk, seed), total=n_slabs, desc=f"write TIFF {layout} {size}^3",
                     file=sys.stderr, disable=not progress)
        with tifffile.TiffWriter(paths[f"tiff_{layout}"], bigtiff=True) as writer:
            writer.write(_tiff_feed(layout, slabs, chunk, size), **kwargs)
    return paths


def _tiff_feed(layout: str, slabs, chunk: int, size: int) -> Iterator[np.ndarray]:
    """Pages (striped) or tiles (tiled) in file order from an iterator of ``(z0, (dz, y, x) slab)``."""
    for _, slab in slabs:
        if layout == "striped":
            yield from slab
        elif layout == "tiles2d":
            for page in slab:
                for y0 in range(0, size, chunk):
                    for x0 in range(0, size, chunk):
                        tile = np.zeros((chunk, chunk), np.uint8)
                        part = page[y0:y0 + chunk, x0:x0 + chunk]
                        tile[: part.shape[0], : part.shape[1]] = part
                        yield tile
        else:
            for y0 in range(0, size, chunk):
                for x0 in range(0, size, chunk):
                    tile = np.zeros((chunk, chunk, chunk), np.uint8)
                    part = slab[:, y0:y0 + chunk, x0:x0 + chunk]
                    tile[: part.shape[0], : part.shape[1], : part.shape[2]] = part
                    yield tile


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(sampler, n_crops: int, array: Any = None, progress: bool = True, desc: str = "") -> dict[str, float]:
    """Crops/s of one process (CPU-time and wall medians over groups of 25 crops) of ``sampler``."""
    from tqdm import tqdm

    for i in range(3):  # warm-up: open files, first reads
        sampler.item(i, array)
    timer = Timer()
    groups = max(2, n_crops // GROUP)
    for g in tqdm(range(groups), desc=desc, file=sys.stderr, disable=not progress):
        with timer():
            for i in range(GROUP):
                sampler.item(3 + g * GROUP + i, array)
    return {"per_s": GROUP / timer.median(), "per_s_wall": GROUP / timer.median("wall"),
            "ms": 1e3 * timer.median() / GROUP}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", type=Path, action="append", default=None,
                        help="measure this existing TIFF / Zarr volume instead of writing new ones (repeatable)")
    parser.add_argument("--size", type=int, default=1024, help="edge of the written uint8 volume (default 1024)")
    parser.add_argument("--crop", type=int, default=64, help="crop edge in voxels (default 64)")
    parser.add_argument("--crops", type=int, default=400, help="crops timed per volume (default 400)")
    parser.add_argument("--chunk", type=int, default=64, help="Zarr chunk / TIFF tile edge and write slab depth (default 64)")
    parser.add_argument("--tiff-layouts", default="striped",
                        help=f"comma-separated TIFF layouts to write and measure, of {', '.join(TIFF_LAYOUTS)} (default striped)")
    parser.add_argument("--zarr-codec", choices=ZARR_CODECS, default="lz4", help="Blosc codec of the Zarr chunks (default lz4)")
    parser.add_argument("--no-symmetries", action="store_true", help="crops without the random cube symmetry")
    parser.add_argument("--no-zscore", action="store_true", help="crops without the per-crop z-score")
    parser.add_argument("--no-memory", action="store_true", help="skip the in-memory upper bound (it holds the volume)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary volumes go (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written volumes (their folder is printed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; returns one flat JSON-able dict."""
    import numcodecs.blosc
    import zarr

    layouts = _check_args(args)
    progress = not args.no_progress
    symmetries, zscore = not args.no_symmetries, not args.no_zscore
    rss_start = _rss_mib()
    tmp: Path | None = None
    result: dict[str, Any] = {}
    try:
        if args.volume:
            paths = {f"volume{i}" if len(args.volume) > 1 else "volume": Path(p) for i, p in enumerate(args.volume)}
            result["source"] = "given: " + ", ".join(str(p) for p in args.volume)
            write_s = None
        else:
            tmp = _work_folder(args, layouts)
            t = time.perf_counter()
            paths = _write_in_child(tmp, args.size, args.chunk, layouts, args.zarr_codec, args.seed, progress)
            write_s = round(time.perf_counter() - t, 1)
            result["source"] = (f"written: {args.size}^3 uint8, Zarr v3 chunks {args.chunk}^3 blosc-{args.zarr_codec}; "
                                f"BigTIFF {', '.join(layouts)}")
        rss_before = _rss_mib()
        result.update({
            "crop": args.crop,
            "symmetries": symmetries,
            "crop_zscore": zscore,
            "timing": "medians of process CPU time over groups of 25 crops, one process = one worker, "
                      "decoders single-threaded; *_wall: wall clock",
            "write_s": write_s,
        })
        samplers = _samplers(paths, args, result)
        old_blosc = numcodecs.blosc.set_nthreads(1)
        try:
            with single_threaded(), zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1}):
                rates = {}
                for key, sampler in samplers.items():
                    m = measure(sampler, args.crops, progress=progress, desc=f"{key} {args.crop}^3 crops")
                    rates[key] = m["per_s"]
                    result[f"{key}_crops_per_s_per_worker"] = round(m["per_s"], 1)
                    result[f"{key}_crops_per_s_wall"] = round(m["per_s_wall"], 1)
                    result[f"{key}_ms_per_crop"] = round(m["ms"], 3)
                _record_rss(result, rss_start, rss_before)
                if not args.no_memory:
                    _measure_memory(samplers, rates, args, progress, result)
                best = max(rates, key=rates.get)
                result["best_source"] = best
                result["mae_xnt_batch"] = MAE_XNT_BATCH
                # workers W deliver W * rate crops/s; a step of T seconds needs 320 / T crops/s
                result["workers_for_320_crops_per_s"] = math.ceil(MAE_XNT_BATCH / rates[best])
                result["workers_for_640_crops_per_s"] = math.ceil(2 * MAE_XNT_BATCH / rates[best])
        finally:
            numcodecs.blosc.set_nthreads(old_blosc)
        if args.keep and tmp is not None:
            result["kept"] = str(tmp)
        return result
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_args(args: argparse.Namespace) -> list[str]:
    """ValueError for a size below 1, a crop larger than the volume or an unknown TIFF layout; returns
    the TIFF layouts of ``--tiff-layouts``."""
    for name in ("size", "crop", "crops", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"bench crops: --{name} must be >= 1, got {getattr(args, name)}")
    if args.crop > args.size:
        raise ValueError(f"bench crops: --crop {args.crop} is larger than --size {args.size}")
    layouts = [s.strip() for s in str(args.tiff_layouts).split(",") if s.strip()]
    bad = [s for s in layouts if s not in TIFF_LAYOUTS]
    if bad:
        raise ValueError(f"bench crops: unknown --tiff-layouts {bad}; known: {', '.join(TIFF_LAYOUTS)}")
    return layouts


def _work_folder(args: argparse.Namespace, layouts: list[str]) -> Path:
    """A new temporary folder under ``--workdir`` (default: the system's) for the volumes, after checking
    that its disk holds them (``--size``^3 bytes per volume, the Zarr one and one per TIFF layout, +10%)."""
    parent = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = args.size ** 3 * (1 + len(layouts)) * 1.1
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ValueError(f"bench crops: {parent} has {free / 2**30:.1f} GiB free, the volumes need about "
                         f"{need / 2**30:.1f} GiB; pass --workdir on a larger disk or a smaller --size")
    return Path(tempfile.mkdtemp(prefix="volssl-bench-crops-", dir=parent))


def _samplers(paths: dict[str, Path], args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """One ``VolumeCropSampler`` per volume; records each volume's reader, shape and disk size (MiB) and
    the first one's shape and size in memory (MiB) in ``result``."""
    from volssl.data.volume_crops import VolumeCropSampler

    samplers = {}
    for key, path in paths.items():
        samplers[key] = VolumeCropSampler([path], args.crop, seed=args.seed, sampling="uniform",
                                          symmetries=not args.no_symmetries, zscore=not args.no_zscore, max_open=1)
        vol = samplers[key].volumes[0]
        result[f"{key}_reader"] = vol.kind
        result[f"{key}_shape"] = list(vol.shape)
        result[f"{key}_disk_mib"] = round(_disk_bytes(path) / 2**20, 1)
    first = next(iter(samplers.values())).volumes[0]
    result["volume_shape"] = list(first.shape)
    result["volume_mib"] = round(first.n_voxels * np.dtype(first.dtype).itemsize / 2**20, 1)
    return samplers


def _record_rss(result: dict[str, Any], rss_start: float, rss_before: float) -> None:
    """The resident set sizes (MiB) after the file phases, before any in-memory copy exists, and
    whether reading grew it by half the volume or more (``volume_loaded_whole``)."""
    result["rss_start_mib"] = round(rss_start, 1)
    result["peak_rss_before_reading_mib"] = round(rss_before, 1)
    result["peak_rss_files_mib"] = round(_rss_mib(), 1)  # before any in-memory copy exists
    result["rss_growth_reading_mib"] = round(_rss_mib() - rss_before, 1)
    current = _current_rss_mib()
    result["rss_now_mib"] = round(current, 1) if current is not None else None
    result["volume_loaded_whole"] = bool(result["rss_growth_reading_mib"] >= 0.5 * result["volume_mib"])


def _measure_memory(samplers: dict[str, Any], rates: dict[str, float], args: argparse.Namespace, progress: bool,
                    result: dict[str, Any]) -> None:
    """The in-memory upper bound: the first volume loaded whole, read through the same sampler; records
    its rates and each file's rate relative to it (``rates``: crops/s per volume)."""
    key0 = next(iter(samplers))
    array = _load_whole(samplers[key0], progress)
    m = measure(samplers[key0], args.crops, array=array, progress=progress, desc=f"in-memory {args.crop}^3 crops")
    del array
    memory_rate = m["per_s"]
    result["memory_crops_per_s_per_worker"] = round(m["per_s"], 1)
    result["memory_crops_per_s_wall"] = round(m["per_s_wall"], 1)
    result["memory_ms_per_crop"] = round(m["ms"], 3)
    result["peak_rss_with_memory_copy_mib"] = round(_rss_mib(), 1)
    for key, rate in rates.items():
        result[f"ratio_{key}_vs_memory"] = round(rate / memory_rate, 3)


def _load_whole(sampler, progress: bool) -> np.ndarray:
    """The stored array of the sampler's volume in memory (read slab by slab through the sampler's reader)."""
    from tqdm import tqdm

    vol = sampler.volumes[0]
    reader = sampler.array(0)
    out = np.empty(vol.stored_shape, dtype=np.dtype(vol.dtype))
    axis = vol.spatial_axes[0]
    n = vol.stored_shape[axis]
    step = 64
    for a in tqdm(range(0, n, step), desc="load in memory", file=sys.stderr, disable=not progress):
        key: list[Any] = [slice(None)] * len(vol.stored_shape)
        key[axis] = slice(a, min(a + step, n))
        out[tuple(key)] = np.asarray(reader[tuple(key)])
    return out
