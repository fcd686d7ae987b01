"""Instance segmentation from predicted affinities: watershed fragments, then waterz agglomeration.

The MAE-XNT axon pipeline (supplement Sec. 5.2, ../shared/REFERENCE.md "MAE-XNT"):

1. :func:`fragments`: over-segment with a seeded watershed. ``m`` = mean of the three
   nearest-neighbour affinity channels; the foreground mask is ``m > boundary_threshold``; seeds are
   the local maxima of the Euclidean distance transform of that mask (``scipy.ndimage.
   distance_transform_edt``; maxima within a ``seed_window`` cube, plateaus joined, plus the EDT
   maximum of every mask component left without a seed); the watershed
   (``skimage.segmentation.watershed``) floods ``1 - m`` from the seeds inside the mask. Voxels
   outside the mask stay 0 (background).
2. :func:`agglomerate`: ``waterz.agglomerate`` merges adjacent fragments in order of the score
   ``1 - mean affinity over their contact`` (waterz's ``OneMinus<MeanAffinity<...>>``) while the
   lowest score is below the threshold ``t``: two fragments end up together at ``t`` iff they are
   joined by merges of score ``< t`` (higher ``t`` merges more; MAE-XNT searches t in
   {0.5, 0.6, 0.7}). Background (0) is never merged.
3. :func:`segment`: both in one call; :func:`segment_blockwise`: the same block by block, for volumes
   larger than memory (stitching described there).

Array conventions
    ``affinities``: float ``(C, X, Y, Z)``, ``C >= 3``, values in [0, 1] (probabilities, e.g. the
    sigmoid of the network's output); channels 0, 1, 2 are the nearest-neighbour affinities along
    array axes 0, 1, 2, pointing backwards: channel ``a`` at voxel ``p`` is the affinity of ``p`` and
    ``p - e_a`` (:data:`volssl.finetuning.affinities.AFFINITY_OFFSETS`; the long-range channels 3+ are
    training targets only and are ignored here). waterz names the axes (z, y, x); it only needs
    channel ``a`` to belong to array axis ``a``, so ``(C, X, Y, Z)`` arrays are passed as they are.
    Fragments and segmentations are uint64 ``(X, Y, Z)``, 0 = background.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

#: waterz's scoring function: 1 - the mean affinity over the contact of two regions
MEAN_AFFINITY_SCORING = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
#: MAE-XNT's agglomeration thresholds (searched per training run, supplement Sec. 9)
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7)


def _check_affinities(affinities: Any, name: str = "affinities") -> tuple[int, ...]:
    shape = tuple(int(s) for s in np.shape(affinities))
    if len(shape) != 4 or shape[0] < 3:
        raise ValueError(f"{name} must be (C, X, Y, Z) with C >= 3 (channels 0-2 the nearest-neighbour "
                         f"affinities), got shape {shape}")
    if min(shape[1:]) < 1:
        raise ValueError(f"{name} has an empty spatial axis: shape {shape}")
    return shape


def _check_thresholds(thresholds: float | Sequence[float]) -> list[float]:
    values = [thresholds] if isinstance(thresholds, (int, float, np.floating, np.integer)) else list(thresholds)
    if not values:
        raise ValueError("thresholds must not be empty")
    out = []
    for t in values:
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds must be numbers, got {thresholds!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"thresholds must be finite, got {thresholds!r}")
        out.append(v)
    return list(dict.fromkeys(out))  # unique, in the given order


def nn_affinities(affinities: Any) -> np.ndarray:
    """The three nearest-neighbour channels as a C-contiguous float32 ``(3, X, Y, Z)`` array (what
    waterz reads); reads only those channels from an array-like (zarr, memmap)."""
    _check_affinities(affinities)
    return np.ascontiguousarray(np.asarray(affinities[0:3]), dtype=np.float32)


def fragments(
    affinities: Any,
    boundary_threshold: float = 0.5,
    seed_window: int = 5,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Over-segmentation of an affinity volume by a seeded watershed.

    Args:
        affinities: ``(C, X, Y, Z)`` affinities in [0, 1], C >= 3 (module docstring); numpy or any
            array-like supporting ``a[0:3]``.
        boundary_threshold: voxels whose mean nearest-neighbour affinity is ``<= boundary_threshold``
            are boundary/background (fragment id 0).
        seed_window: side (voxels) of the cube in which a seed must be the EDT maximum; larger
            windows give fewer, larger fragments.
        spacing: voxel size per axis for the distance transform (default isotropic 1).

    Returns:
        uint64 ``(X, Y, Z)`` fragment ids ``1..n`` (consecutive), 0 outside the mask; every connected
        component of the mask holds at least one fragment.
    """
    if not 0.0 <= float(boundary_threshold) < 1.0:
        raise ValueError(f"boundary_threshold must be in [0, 1), got {boundary_threshold}")
    if int(seed_window) != seed_window or seed_window < 1:
        raise ValueError(f"seed_window must be a positive integer, got {seed_window}")
    from skimage.segmentation import watershed

    nn = nn_affinities(affinities)
    mean = nn.mean(axis=0)
    mask = mean > boundary_threshold
    if not mask.any():
        return np.zeros(mean.shape, dtype=np.uint64)
    dist = ndimage.distance_transform_edt(mask, sampling=None if spacing is None else tuple(float(s) for s in spacing))
    maxima = (ndimage.maximum_filter(dist, size=int(seed_window), mode="nearest") == dist) & mask
    full = np.ones((3,) * mask.ndim, dtype=bool)
    markers, n = ndimage.label(maxima, structure=full)
    components, n_comp = ndimage.label(mask, structure=full)
    seeded = np.zeros(n_comp + 1, dtype=bool)
    seeded[np.unique(components[markers > 0])] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:  # a component whose EDT maxima all lost to a neighbour's larger ones
        for pos in ndimage.maximum_position(dist, components, missing):
            n += 1
            markers[pos] = n
    frag = watershed(1.0 - mean, markers=markers, mask=mask)
    return _consecutive(frag)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Relabel the non-zero ids of ``labels`` to 1..n (order kept) as uint64."""
    ids, inverse = np.unique(labels, return_inverse=True)
    lut = np.arange(ids.size, dtype=np.uint64) + (0 if ids[0] == 0 else 1)
    return lut[inverse.reshape(labels.shape)]


@contextlib.contextmanager
def quiet_stdout(enabled: bool = True) -> Iterator[None]:
    """Silence what waterz prints (C++ ``std::cout`` on file descriptor 1 and Python ``print``)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            if sys.__stdout__ is not None:
                sys.__stdout__.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no file descriptor 1: nothing to silence there
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


def agglomerate(
    affinities: Any,
    fragments: np.ndarray,
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
    scoring_function: str = MEAN_AFFINITY_SCORING,
    verbose: bool = False,
) -> dict[float, np.ndarray]:
    """Agglomerate ``fragments`` with waterz up to each threshold.

    Args:
        affinities: ``(C, X, Y, Z)`` affinities in [0, 1], C >= 3 (channels 0-2 used).
        fragments: ``(X, Y, Z)`` non-negative integer fragment ids (0 = background), e.g. from
            :func:`fragments`; not modified.
        thresholds: score threshold(s); a pair of regions is merged while ``1 - mean affinity`` of
            their contact is below it (higher merges more).
        scoring_function: waterz scoring function (default: 1 - mean affinity; other spellings are
            compiled by waterz on first use, which needs a C++ compiler and boost).
        verbose: let waterz print its progress.

    Returns:
        ``{threshold: segmentation}`` in the order of ``thresholds`` (duplicates dropped); each
        segmentation is a uint64 ``(X, Y, Z)`` array whose ids are fragment ids (a merged segment
        takes the id of one of its fragments), 0 where the fragments are 0.
    """
    import waterz

    shape = _check_affinities(affinities)
    values = _check_thresholds(thresholds)
    frag = np.asarray(fragments)
    if frag.shape != shape[1:]:
        raise ValueError(f"fragments must have the spatial shape of the affinities {shape[1:]}, got {frag.shape}")
    if frag.dtype.kind not in "iu" or (frag.dtype.kind == "i" and frag.size and frag.min() < 0):
        raise ValueError(f"fragments must hold non-negative integer ids, got dtype {frag.dtype}")
    affs = nn_affinities(affinities)
    if not np.all(np.isfinite(affs)):
        raise ValueError("affinities hold NaN or infinite values")
    # waterz allocates per id up to the largest one and writes into the array it is given
    ids, inverse = np.unique(frag, return_inverse=True)
    compact = ids.size and int(ids[-1]) > 2 * ids.size + 1024
    if compact:
        work = inverse.reshape(frag.shape).astype(np.uint64) + (0 if ids[0] == 0 else 1)
        back = ids.astype(np.uint64) if ids[0] == 0 else np.concatenate([[0], ids]).astype(np.uint64)
    else:
        work = np.array(frag, dtype=np.uint64, order="C", copy=True)
    result: dict[float, np.ndarray] = {}
    with quiet_stdout(not verbose):
        for t, seg in zip(sorted(values), waterz.agglomerate(affs, sorted(values), fragments=work,
                                                             scoring_function=scoring_function)):
            result[t] = back[seg] if compact else seg.copy()
    return {t: result[t] for t in values}


def segment(
    affinities: Any,
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
    boundary_threshold: float = 0.5,
    seed_window: int = 5,
    spacing: Sequence[float] | None = None,
    verbose: bool = False,
) -> dict[float, np.ndarray]:
    """:func:`fragments` then :func:`agglomerate`: ``{threshold: uint64 (X, Y, Z) segmentation}``."""
    frag = fragments(affinities, boundary_threshold=boundary_threshold, seed_window=seed_window, spacing=spacing)
    return agglomerate(affinities, frag, thresholds, verbose=verbose)


# ----------------------------------------------------------------------------------------------
# blockwise


def _triple(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int, int]:
    vals = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(vals) != 3 or any(int(v) != v or v < minimum for v in vals):
        raise ValueError(f"{name} must be an integer >= {minimum} or three of them, got {value!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


class _UnionFind:
    """Union-find over ids 1..n that grow as blocks are added (numpy-backed)."""

    def __init__(self) -> None:
        self.parent = np.zeros(1024, dtype=np.int64)
        self.size = 1  # id 0 unused

    def add(self, n: int) -> int:
        """Add ``n`` fresh ids; return the first one."""
        first = self.size
        need = self.size + n
        if need > self.parent.size:
            grown = np.zeros(max(need, 2 * self.parent.size), dtype=np.int64)
            grown[: self.size] = self.parent[: self.size]
            self.parent = grown
        self.parent[first:need] = np.arange(first, need)
        self.size = need
        return first

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def final_lut(self) -> tuple[np.ndarray, int]:
        """``lut[id]`` = consecutive id 1..m of the id's set (lut[0] = 0), and m."""
        roots = np.array([self.find(i) for i in range(self.size)], dtype=np.int64)
        uniq, inverse = np.unique(roots[1:], return_inverse=True)
        lut = np.zeros(self.size, dtype=np.uint64)
        lut[1:] = inverse.astype(np.uint64) + 1
        return lut, int(uniq.size)


def block_grid(shape: Sequence[int], block: Sequence[int]) -> list[tuple[tuple[int, int, int], tuple[slice, ...]]]:
    """The core blocks of ``shape`` in raster order: ``[(block index (i, j, k), core slices), ...]``."""
    counts = [max(1, -(-s // b)) for s, b in zip(shape, block)]
    out = []
    for idx in np.ndindex(*counts):
        out.append((tuple(int(i) for i in idx),
                    tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, block, shape))))
    return out  # type: ignore[return-value]


def segment_blockwise(
    affinities: Any,
    out: Any | Sequence[Any],
    thresholds: float | Sequence[float] = 0.5,
    block: int | Sequence[int] = 256,
    overlap: int | Sequence[int] = 32,
    boundary_threshold: float = 0.5,
    seed_window: int = 5,
    spacing: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[float, int]:
    """:func:`segment` block by block, stitched into one consistent labelling.

    Only one block plus its context (``block + 2 overlap`` per axis, three channels) of the
    affinities is in memory at a time; ``out`` is read back only in the context regions.

    Algorithm
        1. Blocks of size ``block`` tile the volume in raster order. Each is segmented with
           :func:`segment` on its *context window* (the block grown by ``overlap`` per side, clipped
           to the volume); only the block's *core* is written to ``out``, with ids made globally
           unique by an offset.
        2. Stitching: in the part ``R`` of the context window that belongs to cores already written
           (earlier in raster order; faces, edges and corners alike), a segment ``L`` of the current
           block that reaches its core is joined with a written id ``M`` (!= 0) when their overlap
           is more than half of ``L``'s voxels in ``R`` or more than half of ``M``'s voxels in
           ``R`` (the second joins an object that reaches ``R`` through several earlier blocks).
           Both sides saw ``R`` with context, so they agree on it unless the context is too small.
        3. A second pass maps every written id to the consecutive id (1..n) of its joined set.

    Args:
        affinities: array-like ``(C, X, Y, Z)``, C >= 3, values in [0, 1] (numpy, memmap, zarr, ...;
            only ``affinities[0:3, x0:x1, y0:y1, z0:z1]`` reads are made).
        out: one writable array-like ``(X, Y, Z)`` of an unsigned (or wide signed) integer dtype per
            threshold (a single one for a single threshold), e.g. a numpy array or a zarr array
            (uint64 recommended); its initial content is ignored.
        thresholds: agglomeration threshold(s) (see :func:`agglomerate`).
        block: core block size (int or 3 ints, voxels). Zarr outputs write fastest when it is a
            multiple of their chunks.
        overlap: context per side (int or 3 ints, voxels, >= 0); a few object diameters is plenty.
        boundary_threshold, seed_window, spacing: see :func:`fragments`.
        progress: tqdm bars on stderr.

    Returns:
        ``{threshold: number of segments}``.
    """
    shape = _check_affinities(affinities)
    spatial = shape[1:]
    values = _check_thresholds(thresholds)
    outs = [out] if hasattr(out, "shape") and hasattr(out, "dtype") else list(out)
    if len(outs) != len(values):
        raise ValueError(f"out must hold one array per threshold: {len(values)} thresholds, {len(outs)} outputs")
    for o in outs:
        if tuple(int(s) for s in o.shape) != spatial:
            raise ValueError(f"out must have the spatial shape of the affinities {spatial}, got {tuple(o.shape)}")
        if np.dtype(o.dtype).kind not in "iu" or np.dtype(o.dtype).itemsize < 2:
            raise ValueError(f"out must have an integer dtype of at least 16 bits, got {o.dtype}")
    blk = _triple(block, "block", 1)
    ovl = _triple(overlap, "overlap", 0)
    from tqdm import tqdm

    grid = block_grid(spatial, blk)
    counts = [max(1, -(-s // b)) for s, b in zip(spatial, blk)]
    uf = [_UnionFind() for _ in values]
    for index, core in tqdm(grid, desc="segment blocks", unit="block", disable=not progress, file=sys.stderr):
        ctx = tuple(slice(max(0, c.start - o), min(s, c.stop + o)) for c, o, s in zip(core, ovl, spatial))
        inner = tuple(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, ctx))
        segs = segment(affinities[(slice(0, 3),) + ctx], values, boundary_threshold=boundary_threshold,
                       seed_window=seed_window, spacing=spacing)
        earlier = _earlier_mask(ctx, index, blk, counts)
        for k, t in enumerate(values):
            local = segs[t]
            core_ids = np.unique(local[inner])
            core_ids = core_ids[core_ids != 0]
            first = uf[k].add(core_ids.size)
            limit = np.iinfo(np.dtype(outs[k].dtype)).max
            if first + core_ids.size - 1 > limit:
                raise ValueError(f"out dtype {outs[k].dtype} cannot hold {first + core_ids.size - 1} ids; use uint64")
            # local id -> global id (0 for background and for segments that miss the core)
            glob = np.zeros(local.shape, dtype=np.int64)
            if core_ids.size:
                pos = np.minimum(np.searchsorted(core_ids, local), core_ids.size - 1)
                hit = core_ids[pos] == local
                glob[hit] = pos[hit].astype(np.int64) + first
            if earlier.any() and core_ids.size:
                prev = np.asarray(outs[k][ctx]).astype(np.int64)
                _stitch(uf[k], glob[earlier], prev[earlier])
            outs[k][core] = glob[inner].astype(np.dtype(outs[k].dtype))
    result = {}
    for k, t in enumerate(values):
        lut, n = uf[k].final_lut()
        for _, core in tqdm(grid, desc=f"relabel t={t:g}", unit="block", disable=not progress, file=sys.stderr):
            outs[k][core] = lut[np.asarray(outs[k][core]).astype(np.int64)].astype(np.dtype(outs[k].dtype))
        result[t] = n
    return result


def _earlier_mask(ctx: tuple[slice, ...], index: tuple[int, ...], block: tuple[int, ...],
                  counts: Sequence[int]) -> np.ndarray:
    """Boolean mask over the context window: voxels in cores written before block ``index``."""
    lin = np.zeros((1, 1, 1), dtype=np.int64)
    for a, (w, b) in enumerate(zip(ctx, block)):
        bi = np.arange(w.start, w.stop) // b
        shape = [1, 1, 1]
        shape[a] = -1
        lin = lin * counts[a] + bi.reshape(shape)
    own = int(np.ravel_multi_index(index, counts))
    return lin < own


def _stitch(uf: _UnionFind, current: np.ndarray, written: np.ndarray) -> None:
    """Join global ids ``current`` (this block's segments, 0 = none) and ``written`` (ids written
    by earlier blocks, 0 = background) over the same voxels where one holds the majority of the
    other's voxels there."""
    pairs_mask = (current > 0) & (written > 0)
    if not pairs_mask.any():
        return
    cur_ids, cur_sizes = np.unique(current[current > 0], return_counts=True)
    wri_ids, wri_sizes = np.unique(written[written > 0], return_counts=True)
    pairs, counts = np.unique(np.stack([current[pairs_mask], written[pairs_mask]]), axis=1, return_counts=True)
    size_cur = cur_sizes[np.searchsorted(cur_ids, pairs[0])]
    size_wri = wri_sizes[np.searchsorted(wri_ids, pairs[1])]
    join = (2 * counts > size_cur) | (2 * counts > size_wri)
    for a, b in pairs[:, join].T:
        uf.union(int(a), int(b))
