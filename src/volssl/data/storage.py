"""Chunked, compressed storage of preprocessed arrays (blosc2 NDArray, ``.b2nd`` files).

Reading a patch decompresses only the chunks/blocks it touches. Spatial chunks are 64^3 voxels split
into 16^3-voxel blocks (blosc2 decodes single blocks of a chunk), one channel per chunk; codec LZ4
(level 5) with byte shuffle. See docs/benchmarks.md ("Storage and patch loading") for the
blosc2-vs-Zarr measurement behind this choice and ``volssl bench loader --compare-formats`` to
re-run it.

Decoding threads: ``open_array`` decodes with one thread by default, the right setting inside a
DataLoader worker (N workers = N cores); ``load_array`` (whole volumes, e.g. inference) uses the
blosc2 default (all cores) unless told otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path

import blosc2
import numpy as np

from volssl.util.atomic import atomic_path

SUFFIX = ".b2nd"
CHUNK = 64  # spatial chunk edge (voxels)
BLOCK = 16  # spatial block edge (voxels): the unit blosc2 decodes
CPARAMS = {"codec": blosc2.Codec.LZ4, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE]}


def default_chunks(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and block shapes for an array of ``shape``: spatial (last three) axes in ``CHUNK``^3
    chunks of ``BLOCK``^3 blocks (clipped to the array), every leading (channel) axis 1 per chunk."""
    spatial = shape[-3:]
    chunks = tuple(min(s, CHUNK) for s in spatial)
    blocks = tuple(min(s, BLOCK) for s in spatial)
    lead = tuple(1 for _ in shape[:-3])
    return lead + chunks, lead + blocks


def save_array(path: str | os.PathLike, array: np.ndarray, nthreads: int | None = None) -> None:
    """Write ``array`` (at least 3-D; spatial axes last) to ``path`` (``.b2nd``) atomically: readers
    see the old file or the whole new one. ``nthreads`` compression threads (default 1: preprocessing
    parallelises over volumes)."""
    array = np.ascontiguousarray(array)
    if array.ndim < 3:
        raise ValueError(f"save_array({path}): need an array with >= 3 axes, got shape {array.shape}")
    chunks, blocks = default_chunks(array.shape)
    with atomic_path(path, suffix=SUFFIX) as tmp:
        tmp.unlink(missing_ok=True)
        blosc2.asarray(
            array,
            urlpath=str(tmp),
            mode="w",
            chunks=chunks,
            blocks=blocks,
            cparams=dict(CPARAMS, nthreads=int(nthreads or 1)),
        )


def open_array(path: str | os.PathLike, nthreads: int = 1, mmap: bool = True):
    """Open a stored array read-only; slicing it (``a[0, 10:74, ...]``) returns a numpy array and
    decodes only the blocks the slice touches, with ``nthreads`` threads. ``mmap`` reads the file
    through a read-only memory map (fewer system calls per chunk than buffered reads)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stored array not found: {path}")
    kwargs = {"mmap_mode": "r"} if mmap else {}
    try:
        return blosc2.open(str(path), mode="r", dparams=blosc2.DParams(nthreads=max(1, int(nthreads))), **kwargs)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable blosc2 array ({e})") from e


def load_array(path: str | os.PathLike, nthreads: int | None = None) -> np.ndarray:
    """Decode the whole stored array (``nthreads`` decoder threads; default: blosc2's, all cores)."""
    return open_array(path, nthreads=nthreads or blosc2.nthreads)[...]
