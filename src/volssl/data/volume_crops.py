"""Random crops read straight from large TIFF / Zarr volumes (MAE-XNT's pre-training data path).

MAE-XNT pre-trains on nanotomography volumes far larger than memory (``1024^3`` voxels and up) and
never preprocesses them: every 64^3 crop is read from the source file, z-scored and augmented
with one of the 48 cube symmetries; volumes are drawn in proportion to their size. The z-score uses
the crop's own statistics (``crop_norm="crop"``, the paper's wording and our default) or, as the
public MAE_XNT code does, the statistics of the whole volume (``crop_norm="volume"``: one mean and
standard deviation per volume, estimated once per process from a bounded sample, see
:func:`volume_stats`). :class:`VolumeCropSampler` does exactly that as a map-style dataset whose item ``k`` is
a pure function of ``(seed, k)``, so it plugs into ``patches.make_loader`` (global batches, resume,
data parallelism) like ``PatchSampler``.

Reading a crop touches only the window:

* **Zarr** (``.zarr`` directory: an array, a group with one array or array "0", or OME-Zarr
  ``multiscales``, level 0; Zarr v2 or v3): the chunks the window intersects are decoded.
* **TIFF / BigTIFF** (tifffile): an uncompressed contiguous series (what ``tifffile.imwrite`` writes
  by default, striped or with full-width tiles) is read with one ``os.pread`` per z-slice of the
  window (``RawVolumeArray``; no memory map, so the process never maps the file); any other TIFF
  (compressed, tiled, volumetric tiles, pyramids: series 0, level 0) through
  ``tifffile.imread(path, aszarr=True)``, which decodes the touched strips / tiles.
* **blosc2** ``.b2nd`` arrays (what ``volssl preprocess`` stores; a given path only): the touched
  chunks / blocks.

Axes: TIFF pages and Zarr arrays are stored ``(z, y, x)`` (as in ``data/readers.py``); crops come back
``(X, Y, Z)`` like every other volssl patch (``.b2nd`` arrays are already ``(X, Y, Z)``). Extra axes
of size 1 (OME ``t, c``) are allowed; volumes with another non-singleton axis are not 3D.

Files are opened lazily, per process (an LRU of at most ``max_open`` open volumes); the pickled
sampler carries only paths and shapes, so DataLoader workers (fork or spawn) open their own handles.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from volssl.data.cube_symmetries import N_SYMMETRIES, apply_symmetry, source_shape
from volssl.data.patches import SAMPLING_MODES, _LRU, PatchStream, _patch_size, zscore_crop, zscore_with
from volssl.data.readers import (
    TIFF_SUFFIXES, ZARR_SUFFIXES, VolumeError, _strip_suffix, discover, sanitize_id, volume_suffix,
)

B2ND_SUFFIX = ".b2nd"
KINDS = ("zarr", "tiff-raw", "tiff-zarr", "b2nd")
CROP_NORMS = ("crop", "volume")  # z-score each crop on its own statistics, or on its volume's
STATS_MAX_VOXELS = 1 << 24  # volume statistics: read whole up to this many voxels (64 MiB of float32)
STATS_GRID = 4  # ... else from STATS_GRID^3 windows on a regular grid
STATS_WINDOW = 64  # ... of (at most) STATS_WINDOW^3 voxels each: 4^3 * 64^3 = 2^24 voxels read at most
# (with a smaller budget max_voxels the window edge shrinks so that the grid reads at most max_voxels)
_STATS_SLAB_VOXELS = 1 << 22  # exact statistics are accumulated over slabs of at most this many voxels
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


@dataclass(frozen=True)
class CropVolume:
    """What the sampler knows about one volume (no open handle; picklable).

    ``shape`` is ``(X, Y, Z)``; the stored array has ``stored_shape``, its spatial axes at
    ``spatial_axes`` (stored order), every other axis of size 1. ``zyx``: the stored spatial order is
    ``(z, y, x)`` (TIFF, Zarr) rather than ``(x, y, z)`` (``.b2nd``). ``array_path``: the array inside
    a Zarr group (None: the node itself). ``offset``: byte offset of the contiguous data of a
    ``tiff-raw`` volume.
    """

    name: str
    path: str
    kind: str
    shape: tuple[int, int, int]
    dtype: str
    stored_shape: tuple[int, ...]
    spatial_axes: tuple[int, int, int]
    zyx: bool = True
    array_path: str | None = None
    offset: int | None = None

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# discovery


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (volume_suffix(path) in ZARR_SUFFIXES or any((path / m).exists() for m in _ZARR_MARKERS))


def discover_volumes(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """The TIFF / Zarr volumes of ``path`` as ``(name, path)`` pairs, in a deterministic order.

    ``path`` is one volume (a ``.tif`` / ``.tiff`` file, a ``.zarr`` directory or any directory with
    Zarr metadata, a ``.b2nd`` file) or a folder searched recursively with ``readers.discover`` (so
    names are its sanitised case ids; a multi-channel nnU-Net case gives one volume per channel,
    ``<case>_<channel>``). Other volume files (NIfTI, NRRD, ...) are skipped: they cannot be read by
    window; run ``volssl preprocess`` on them instead.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a single file of another type.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"volume source not found: {p}")
    if p.is_file() and p.name.lower().endswith(B2ND_SUFFIX):
        return [(sanitize_id(p.name[: -len(B2ND_SUFFIX)]), p)]
    if _is_zarr_dir(p):
        return [(sanitize_id(_strip_suffix(p.name)), p)]
    if p.is_file():
        if volume_suffix(p) not in TIFF_SUFFIXES:
            raise ValueError(f"{p}: not a TIFF, Zarr or .b2nd volume; crops are read by window only from those "
                             "(preprocess other formats with `volssl preprocess`)")
        return [(sanitize_id(_strip_suffix(p.name)), p)]
    out: list[tuple[str, Path]] = []
    for case in discover(p):
        for channel, image in zip(case.channels, case.images):
            if volume_suffix(image) in TIFF_SUFFIXES + ZARR_SUFFIXES:
                name = case.id if len(case.images) == 1 else sanitize_id(f"{case.id}_{channel}")
                out.append((name, Path(image)))
    return out


# ----------------------------------------------------------------------------------------------
# inspecting and opening one volume


def _spatial_axes(path: str, shape: Sequence[int], axes_meta: Any = None) -> tuple[int, int, int]:
    """Positions of the three spatial axes of a stored array (the others must have size 1)."""
    shape = tuple(int(s) for s in shape)
    if axes_meta and len(axes_meta) == len(shape):  # OME-Zarr axes: pick the "space" ones
        space = [i for i, a in enumerate(axes_meta)
                 if (isinstance(a, dict) and (a.get("type") == "space" or a.get("name") in ("x", "y", "z")))
                 or a in ("x", "y", "z")]
        if len(space) == 3 and all(shape[i] == 1 for i in range(len(shape)) if i not in space):
            return tuple(space)  # type: ignore[return-value]
    axes = list(range(len(shape)))
    while len(axes) > 3 and any(shape[a] == 1 for a in axes):  # drop size-1 axes, leading first
        axes.remove(next(a for a in axes if shape[a] == 1))
    if len(axes) != 3:
        raise VolumeError(path, f"array shape {shape} is not 3D (extra axes are allowed only with size 1)", "not_3d")
    return tuple(axes)  # type: ignore[return-value]


def _zarr_array_path(node: Any, path: str) -> tuple[str, Any]:
    """The array of a Zarr group that holds the volume: OME multiscales level 0, else "0", else the only one."""
    attrs = dict(node.attrs)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if multiscales:
        ms = multiscales[0]
        return str(ms["datasets"][0]["path"]), ms.get("axes")
    keys = sorted(node.array_keys())
    if "0" in keys:
        return "0", None
    if len(keys) == 1:
        return keys[0], None
    raise VolumeError(path, f"Zarr group holds {len(keys)} arrays and no OME multiscales metadata; point to one "
                            "array", "unreadable")


def inspect_volume(path: str | os.PathLike, name: str | None = None) -> CropVolume:
    """Read the metadata of one volume (no voxel data) into a :class:`CropVolume`.

    Raises:
        VolumeError: (naming the file) missing, unknown type, unreadable, not 3D.
    """
    p = Path(path).expanduser().resolve()
    spath = str(p)
    name = name or sanitize_id(_strip_suffix(p.name) if volume_suffix(p) else p.stem)
    if not p.exists():
        raise VolumeError(p, "file not found", "missing")
    try:
        if _is_zarr_dir(p):
            import zarr

            node = zarr.open(spath, mode="r")
            array_path, axes_meta = (None, None)
            if isinstance(node, zarr.Group):
                array_path, axes_meta = _zarr_array_path(node, spath)
                node = node[array_path]
            stored, dtype = tuple(int(s) for s in node.shape), np.dtype(node.dtype)
            spatial = _spatial_axes(spath, stored, axes_meta)
            kind, zyx, offset = "zarr", True, None
        elif p.is_file() and volume_suffix(p) in TIFF_SUFFIXES:
            import tifffile

            array_path = None
            with tifffile.TiffFile(spath) as tif:
                series = tif.series[0]
                if "S" in series.axes and series.shape[series.axes.index("S")] > 1:
                    raise VolumeError(p, f"array shape {tuple(series.shape)} is not 3D (axes {series.axes}: colour "
                                         "samples per pixel)", "not_3d")
                offset = series.dataoffset
                if series.dtype is None:
                    raise VolumeError(p, "TIFF series has no uniform data type", "unreadable")
                dtype = np.dtype(tif.byteorder + series.dtype.char)
                stored = tuple(int(s) for s in series.shape)
            if offset is not None:  # uncompressed, contiguous: plain reads
                kind = "tiff-raw"
                spatial = _spatial_axes(spath, stored)
            else:
                kind = "tiff-zarr"
                arr = _open_tiff_zarr(spath)
                stored, dtype = tuple(int(s) for s in arr.shape), np.dtype(arr.dtype)
                spatial = _spatial_axes(spath, stored)
                del arr
            zyx = True
        elif p.is_file() and p.name.lower().endswith(B2ND_SUFFIX):
            import blosc2

            arr = blosc2.open(spath, mode="r")
            stored, dtype = tuple(int(s) for s in arr.shape), np.dtype(arr.dtype)
            spatial = _spatial_axes(spath, stored)
            kind, zyx, array_path, offset = "b2nd", False, None, None
        else:
            raise VolumeError(p, "not a TIFF file, Zarr directory or .b2nd array", "unreadable")
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # any library error: truncated, corrupt, wrong format
        raise VolumeError(p, f"cannot open: {type(e).__name__}: {e}", "unreadable") from None
    if dtype.kind not in "biuf":
        raise VolumeError(p, f"data type {dtype} is not a real number type", "unreadable")
    spatial_shape = tuple(stored[a] for a in spatial)
    shape = spatial_shape[::-1] if zyx else spatial_shape
    return CropVolume(name=name, path=spath, kind=kind, shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
                      dtype=dtype.str, stored_shape=stored, spatial_axes=spatial, zyx=zyx,
                      array_path=array_path, offset=int(offset) if offset is not None else None)


def _open_tiff_zarr(path: str):
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=0, level=0)
    return zarr.open(store, mode="r")


class RawVolumeArray:
    """A C-ordered array stored uncompressed and contiguously at ``offset`` in a file, read by window.

    ``array[k0, k1, ...]`` (ints or step-1 slices, one per axis) reads the window with one
    ``os.pread`` per row-block of the last two axes' leading index range (for a ``(Z, Y, X)`` TIFF
    stack: one read per z-slice, covering the window's rows), never mapping or reading the whole file.
    The file descriptor is opened on first use in each process. ``bytes_read`` counts the bytes read.
    """

    def __init__(self, path: str | os.PathLike, offset: int, shape: Sequence[int], dtype: Any) -> None:
        self.path = str(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        if self.ndim < 2:
            raise ValueError(f"RawVolumeArray: shape must have at least 2 axes, got {self.shape}")
        self.bytes_read = 0
        self._fd: int | None = None
        self._pid: int | None = None

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, None
        return state

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) != self.ndim:
            raise IndexError(f"RawVolumeArray: index needs {self.ndim} entries, got {len(key)}")
        ranges = []
        for k, n in zip(key, self.shape):
            if isinstance(k, (int, np.integer)):
                k = int(k) + (n if k < 0 else 0)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} out of range for axis of size {n}")
                ranges.append((k, k + 1, True))
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("RawVolumeArray: only step-1 slices")
                ranges.append((start, max(start, stop), False))
            else:
                raise IndexError(f"RawVolumeArray: unsupported index {k!r}")
        out_shape = tuple(b - a for a, b, _ in ranges)
        out = np.empty(out_shape, dtype=self.dtype)
        if out.size:
            (y0, y1, _), (x0, x1, _) = ranges[-2], ranges[-1]
            ny, nx = self.shape[-2:]
            item = self.dtype.itemsize
            span = ((y1 - y0 - 1) * nx + (x1 - x0)) * item  # first to last voxel of a row-block
            fd = self._file()
            flat = out.reshape(-1, y1 - y0, x1 - x0)
            strides = [int(np.prod(self.shape[i + 1:], dtype=np.int64)) for i in range(self.ndim)]
            rows = np.empty((y1 - y0) * nx, dtype=self.dtype)  # one row-block, read from (y0, x0) on
            view = memoryview(rows.view(np.uint8))[:span]
            for j, lead in enumerate(np.ndindex(*out_shape[:-2])):
                index = sum((a + d) * s for (a, _, _), d, s in zip(ranges[:-2], lead, strides[:-2]))
                start = self.offset + (index + y0 * nx + x0) * item
                got = _pread_into(fd, view, start)
                if got != span:
                    raise VolumeError(self.path, f"truncated file: {got} of {span} bytes at offset {start}",
                                      "unreadable")
                self.bytes_read += span
                flat[j] = rows.reshape(y1 - y0, nx)[:, : x1 - x0]
        squeeze = tuple(i for i, (_, _, drop) in enumerate(ranges) if drop)
        return out.reshape(tuple(s for i, s in enumerate(out_shape) if i not in squeeze))


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view`` (fewer only at the end of the file)."""
    total = 0
    while total < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[total:]], offset + total)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(view) - total, offset + total)
            n = len(data)
            view[total:total + n] = data
        if n == 0:
            break
        total += n
    return total


def open_volume(volume: CropVolume) -> Any:
    """An array-like over the stored array of ``volume`` (NumPy-style slicing reads only the window)."""
    try:
        if volume.kind == "zarr":
            import zarr

            node = zarr.open(volume.path, mode="r")
            return node[volume.array_path] if volume.array_path is not None else node
        if volume.kind == "tiff-raw":
            return RawVolumeArray(volume.path, volume.offset or 0, volume.stored_shape, volume.dtype)
        if volume.kind == "tiff-zarr":
            return _open_tiff_zarr(volume.path)
        if volume.kind == "b2nd":
            from volssl.data.storage import open_array

            return open_array(volume.path, nthreads=1)
    except Exception as e:
        raise VolumeError(volume.path, f"cannot open: {type(e).__name__}: {e}", "unreadable") from None
    raise ValueError(f"unknown volume kind {volume.kind!r}; known: {KINDS}")


def read_crop(volume: CropVolume, array: Any, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The window ``[origin, origin + size)`` (X, Y, Z voxels, inside the volume) of ``volume``.

    Returns:
        ``(X, Y, Z)`` array of the stored dtype; possibly a transposed view of the window read.
    """
    origin = [int(o) for o in origin]
    size = [int(s) for s in size]
    if any(o < 0 or o + s > d for o, s, d in zip(origin, size, volume.shape)):
        raise ValueError(f"{volume.path}: window {origin} + {size} is outside the volume {volume.shape}")
    o_st, s_st = (origin[::-1], size[::-1]) if volume.zyx else (origin, size)
    key: list[Any] = [0] * len(volume.stored_shape)
    for k, axis in enumerate(volume.spatial_axes):
        key[axis] = slice(o_st[k], o_st[k] + s_st[k])
    try:
        data = np.asarray(array[tuple(key)])
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(volume.path, f"cannot read window {origin} + {size}: {type(e).__name__}: {e}",
                          "unreadable") from None
    if data.shape != tuple(s_st):
        raise VolumeError(volume.path, f"read a {data.shape} window, expected {tuple(s_st)}", "unreadable")
    return data.transpose(2, 1, 0) if volume.zyx else data


# ----------------------------------------------------------------------------------------------
# per-volume intensity statistics (crop_norm="volume")


def _stats_windows(shape: Sequence[int], zyx: bool, max_voxels: int) -> list[tuple[list[int], list[int]]]:
    """The ``(origin, size)`` windows (X, Y, Z voxels) that :func:`volume_stats` reads."""
    shape = [int(d) for d in shape]
    if int(np.prod(shape, dtype=np.int64)) <= max_voxels:  # the whole volume, in slabs of the stored first axis
        axis = 2 if zyx else 0
        plane = int(np.prod(shape, dtype=np.int64)) // shape[axis]
        step = max(1, _STATS_SLAB_VOXELS // max(plane, 1))
        out = []
        for start in range(0, shape[axis], step):
            origin, size = [0, 0, 0], list(shape)
            origin[axis], size[axis] = start, min(step, shape[axis] - start)
            out.append((origin, size))
        return out
    edge = STATS_WINDOW  # the window edge: 64 at the default budget, smaller so that the windows fit max_voxels
    while edge > 1 and STATS_GRID ** 3 * edge ** 3 > max_voxels:
        edge -= 1
    size = [min(d, edge) for d in shape]
    # one window centred in each of STATS_GRID equal strata per axis (the midpoint rule; clipped to the volume)
    starts = [sorted({min(max(int(round((k + 0.5) * d / STATS_GRID - w / 2)), 0), d - w) for k in range(STATS_GRID)})
              for d, w in zip(shape, size)]
    return [([x, y, z], list(size)) for x in starts[0] for y in starts[1] for z in starts[2]]


def volume_stats(volume: CropVolume, array: Any, max_voxels: int = STATS_MAX_VOXELS) -> tuple[float, float]:
    """Mean and standard deviation (population, ``ddof=0``) of a volume's intensities, read by window.

    A volume of at most ``max_voxels`` voxels is read whole (in slabs of at most 2^22 voxels), so
    the values are numpy's ``mean()`` / ``std()`` of the array up to float64 rounding. A larger
    volume is never read whole: the statistics are *estimated* from ``STATS_GRID^3`` = 64 windows of
    ``min(w, D)`` voxels per axis (``w`` = 64 at the default budget; the largest ``w <= 64`` with
    ``64 w^3 <= max_voxels`` otherwise) on a regular grid: per axis, one window centred in each of
    4 equal strata of the axis (centres at ``(k + 1/2) D / 4``) -- at most ``max_voxels`` read,
    deterministic (no random numbers) and spread over the whole volume (a stratified sample, so a
    smooth intensity drift across the volume is represented). Values are accumulated in float64
    with Chan et al.'s pairwise update (no catastrophic cancellation).

    Args:
        volume: the :class:`CropVolume`.
        array: its open stored array (:func:`open_volume`).
        max_voxels: the exact / estimated threshold (and the bound on voxels read), >= 1.

    Returns:
        ``(mean, std)`` in the stored intensity units (floats; NaN if the volume holds NaN).
    """
    if int(max_voxels) < 1:
        raise ValueError(f"max_voxels must be >= 1, got {max_voxels}")
    count, mean, m2 = 0, 0.0, 0.0
    for origin, size in _stats_windows(volume.shape, volume.zyx, int(max_voxels)):
        block = read_crop(volume, array, origin, size).astype(np.float64)
        n_b = block.size
        mean_b = float(block.mean())
        m2_b = float(np.square(block - mean_b).sum())
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    return mean, float(np.sqrt(m2 / count)) if count else 0.0


# ----------------------------------------------------------------------------------------------
# the sampler


class VolumeCropSampler(PatchStream):
    """Random crops of large volumes; item ``k`` is a pure function of ``(seed, k)``.

    For item ``k`` a generator ``np.random.default_rng([seed, k])`` draws, in this order:

    1. the volume: with probability proportional to its voxel count (``sampling="size"``, MAE-XNT)
       or uniformly (``sampling="uniform"``);
    2. with ``symmetries``, one of the 48 cube symmetries (uniform; ``data/cube_symmetries.py``);
    3. the crop origin, uniform over every position where the window
       ``source_shape(patch_size, symmetry)`` lies inside the volume.

    The window is read (only it; see the module docstring), turned ``(X, Y, Z)``, the symmetry
    applied, converted to float32 and, with ``zscore``, z-scored: with ``crop_norm="crop"`` on the
    crop's own mean and standard deviation (a constant crop becomes zeros); with
    ``crop_norm="volume"`` on its volume's (:meth:`volume_stats`: computed on the first crop of
    that volume in each process, then cached), so every crop of one volume gets the same affine map.

    Args:
        volumes: a folder or a single volume (see :func:`discover_volumes`), or a sequence of volume
            paths (TIFF, Zarr, ``.b2nd``).
        patch_size: crop size in voxels, an int (cube) or three ints (X, Y, Z).
        seed: stream seed (a non-negative int).
        sampling: "size" (proportional to X*Y*Z) or "uniform" over volumes.
        symmetries: apply a random cube symmetry to every crop.
        zscore: z-score every crop (True: MAE-XNT; raw volumes carry no normalisation).
        crop_norm: which statistics ``zscore`` uses: "crop" (each crop's own; the MAE-XNT paper)
            or "volume" (its volume's mean and std; the public MAE_XNT code). Ignored without ``zscore``.
        max_open: at most this many volumes kept open per process (LRU).

    Every volume must hold the crop: ``(X, Y, Z) >= patch_size`` (with ``symmetries``, for every axis
    permutation of ``patch_size``); a smaller one raises :class:`VolumeError` naming the file.

    Item ``k`` is a dict: ``"image"`` float32 tensor ``(1, *patch_size)``, ``"case"`` str (the
    volume's name), ``"origin"`` int64 tensor ``(3,)`` (window start, X, Y, Z voxels),
    ``"symmetry"`` int (0: identity) and ``"index"`` int (``k``).
    """

    def __init__(
        self,
        volumes: str | os.PathLike | Sequence[str | os.PathLike],
        patch_size: int | Sequence[int],
        seed: int = 0,
        sampling: str = "size",
        symmetries: bool = False,
        zscore: bool = True,
        max_open: int = 16,
        crop_norm: str = "crop",
    ) -> None:
        self.patch_size = _patch_size(patch_size)
        if isinstance(seed, bool) or int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        self.seed = int(seed)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        self.symmetries = bool(symmetries)
        self.zscore = bool(zscore)
        if crop_norm not in CROP_NORMS:
            raise ValueError(f"crop_norm must be one of {CROP_NORMS}, got {crop_norm!r}")
        self.crop_norm = crop_norm
        self._stats: dict[int, tuple[float, float]] = {}  # volume -> (mean, std); plain numbers, pickled along
        if int(max_open) < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = int(max_open)
        if isinstance(volumes, (str, os.PathLike)):
            self.source = str(Path(volumes).expanduser().resolve())
            sources = discover_volumes(volumes)
            if not sources:
                raise ValueError(f"{self.source}: no TIFF (.tif, .tiff) or Zarr (.zarr) volumes found")
        else:
            self.source = None
            sources = _named(volumes)
            if not sources:
                raise ValueError("volumes: empty sequence; give at least one TIFF / Zarr / .b2nd volume")
        self.volumes: list[CropVolume] = [inspect_volume(path, name) for name, path in sources]
        self._check_sizes()
        sizes = np.asarray([v.n_voxels for v in self.volumes], dtype=np.float64)
        cum = np.cumsum(sizes)
        self._cum_weights = cum / cum[-1] if sampling == "size" else None
        self._init_caches()

    def _check_sizes(self) -> None:
        indices = range(0, N_SYMMETRIES, 8) if self.symmetries else [0]  # one per axis permutation
        windows = sorted({source_shape(self.patch_size, s) for s in indices})
        for v in self.volumes:
            for w in windows:
                if any(d < p for d, p in zip(v.shape, w)):
                    extra = (" under the cube symmetries (every axis permutation of the crop must fit)"
                             if self.symmetries and len(windows) > 1 else "")
                    raise VolumeError(v.path, f"volume shape (X, Y, Z) {v.shape} is smaller than the crop "
                                              f"{tuple(w)}{extra}", "too_small")

    def _init_caches(self) -> None:
        self._arrays = _LRU(self.max_open)

    @property
    def total_voxels(self) -> int:
        return int(sum(v.n_voxels for v in self.volumes))

    def array(self, i: int) -> Any:
        """The (per-process, cached) open stored array of volume ``i``."""
        return self._arrays.get(i, lambda: open_volume(self.volumes[i]))

    def volume_stats(self, i: int) -> tuple[float, float]:
        """``(mean, std)`` of volume ``i`` (:func:`volume_stats`), computed once and cached."""
        if i not in self._stats:
            self._stats[i] = volume_stats(self.volumes[i], self.array(i))
        return self._stats[i]

    def draw(self, index: int) -> dict[str, Any]:
        """The random choices of item ``index`` without reading voxels: ``volume`` (its position in
        :attr:`volumes`), ``symmetry``, ``window`` (X, Y, Z size read) and ``origin`` (X, Y, Z)."""
        if isinstance(index, bool) or int(index) < 0:
            raise IndexError(f"VolumeCropSampler index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        if self._cum_weights is None:
            i = int(rng.integers(len(self.volumes)))
        else:
            i = min(int(np.searchsorted(self._cum_weights, rng.random(), side="right")), len(self.volumes) - 1)
        symmetry = int(rng.integers(N_SYMMETRIES)) if self.symmetries else 0
        window = source_shape(self.patch_size, symmetry)
        origin = [int(rng.integers(0, d - w + 1)) for d, w in zip(self.volumes[i].shape, window)]
        return {"volume": i, "symmetry": symmetry, "window": window, "origin": origin}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def item(self, index: int, array: Any = None) -> dict[str, Any]:
        """Item ``index``; ``array`` (optional) replaces the stored array of the drawn volume, e.g. an
        in-memory copy with the same stored shape (what ``volssl bench crops`` compares against)."""
        d = self.draw(index)
        volume = self.volumes[d["volume"]]
        if array is not None and tuple(array.shape) != volume.stored_shape:
            raise ValueError(f"array shape {tuple(array.shape)} differs from the stored shape {volume.stored_shape} "
                             f"of {volume.path}")
        crop = read_crop(volume, self.array(d["volume"]) if array is None else array, d["origin"], d["window"])
        if d["symmetry"]:
            crop = apply_symmetry(crop, d["symmetry"])
        patch = np.empty((1, *self.patch_size), dtype=np.float32)
        patch[0] = crop  # the one copy: cast + transpose/flip in a single pass
        if self.zscore and self.crop_norm == "volume":
            zscore_with(patch, *self.volume_stats(d["volume"]))
        elif self.zscore:
            zscore_crop(patch, inplace=True)
        return {
            "image": torch.from_numpy(patch),
            "case": volume.name,
            "origin": torch.tensor(d["origin"], dtype=torch.int64),
            "symmetry": d["symmetry"],
            "index": int(index),
        }

    def describe(self, max_listed: int = 100) -> dict[str, Any]:
        """A JSON-able description of the source (for a run's plan): settings and the volumes
        (the first ``max_listed`` of them with name, path, kind, shape, dtype)."""
        return {
            "source": self.source,
            "reader": "volume_crops",
            "n_volumes": len(self.volumes),
            "total_voxels": self.total_voxels,
            "patch_size": list(self.patch_size),
            "sampling": self.sampling,
            "symmetries": self.symmetries,
            "crop_zscore": self.zscore,
            "crop_norm": self.crop_norm,
            "volumes": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(vol).items()
                         if k in ("name", "path", "kind", "shape", "dtype")} for vol in self.volumes[:max_listed]],
        }


def _named(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """``(name, path)`` for explicit volume paths: sanitised stems, made unique with ``-<n>``."""
    out, seen = [], set()
    for raw in paths:
        p = Path(raw).expanduser().resolve()
        low = p.name.lower()
        stem = p.name[: -len(B2ND_SUFFIX)] if low.endswith(B2ND_SUFFIX) else (_strip_suffix(p.name) if volume_suffix(p) else p.stem)
        name, n = sanitize_id(stem), 1
        while name in seen:
            n += 1
            name = f"{sanitize_id(stem)}-{n}"
        seen.add(name)
        out.append((name, p))
    return out


def volume_plan(sampler: VolumeCropSampler) -> dict[str, Any]:
    """The plan a pre-training run on raw volumes records: the "xnt" preprocessing plan (native
    spacing, no normalisation, no crop: what fine-tuning on such data applies) plus ``"source"``,
    :meth:`VolumeCropSampler.describe` (``PreprocessPlan.from_dict`` ignores the extra key)."""
    from volssl.data.preprocess import get_plan

    plan = get_plan("xnt").to_dict()
    plan["source"] = sampler.describe()
    return plan


__all__ = [
    "CROP_NORMS", "CropVolume", "RawVolumeArray", "VolumeCropSampler", "discover_volumes", "inspect_volume",
    "open_volume", "read_crop", "volume_plan", "volume_stats", "zscore_with",
]
