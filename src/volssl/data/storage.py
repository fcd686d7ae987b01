"""Chunked, compressed storage of preprocessed arrays (blosc2 NDArray, ``.b2nd`` files).

Reading a patch decompresses only the chunks/blocks it touches. See docs/benchmarks.md for the
blosc2-vs-Zarr measurement behind this choice.
"""
from __future__ import annotations

import os
from pathlib import Path

import blosc2
import numpy as np

from volssl.util.atomic import atomic_path

SUFFIX = ".b2nd"


def default_chunks(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and block shapes for an array of ``shape`` (leading channel axis kept whole per chunk=1)."""
    spatial = shape[-3:]
    chunks = tuple(min(s, 64) for s in spatial)
    blocks = tuple(min(s, 16) for s in spatial)
    lead = tuple(1 for _ in shape[:-3])
    return lead + chunks, lead + blocks


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (``.b2nd``) atomically: readers see the old file or the whole new one."""
    array = np.ascontiguousarray(array)
    chunks, blocks = default_chunks(array.shape)
    with atomic_path(path, suffix=SUFFIX) as tmp:
        tmp.unlink(missing_ok=True)
        blosc2.asarray(
            array,
            urlpath=str(tmp),
            mode="w",
            chunks=chunks,
            blocks=blocks,
            cparams={"codec": blosc2.Codec.LZ4, "clevel": 5, "nthreads": 1},
        )


def open_array(path: str | os.PathLike):
    """Open a stored array read-only; slicing it (``a[0, 10:74, ...]``) returns a numpy array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stored array not found: {path}")
    return blosc2.open(str(path), mode="r")


def load_array(path: str | os.PathLike) -> np.ndarray:
    """Decode the whole stored array."""
    return open_array(path)[...]
