"""The patch stream: random patches from a preprocessed dataset, reproducible from ``(seed, index)``.

``PatchSampler`` is a map-style dataset whose item ``k`` depends only on ``(seed, k)`` (a NumPy
generator keyed on both), never on the worker that computes it or on what was drawn before. Reading
a patch decodes only the stored chunks/blocks its window touches (see ``storage.py``).

``make_loader`` turns it into an infinite ``DataLoader`` over *global* batches: global batch ``b``
holds items ``b*B .. b*B+B-1``; rank ``r`` of ``W`` gets rows ``[r*B/W, (r+1)*B/W)``. ``W``
processes therefore see exactly the batch one process sees, and resuming at step ``s`` is
``start_batch=s``.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from volssl.data.cube_symmetries import N_SYMMETRIES, apply_symmetry, source_shape
from volssl.data.dataset import PreprocessedDataset
from volssl.data.manifest import CaseRecord
from volssl.data.storage import open_array

SAMPLING_MODES = ("uniform", "size")
CHANNEL_MODES = ("all", "single")


def read_window(
    array: Any,
    origin: Sequence[int],
    size: Sequence[int],
    lead: tuple = (),
    pad_value: float = 0.0,
) -> np.ndarray:
    """Read the window ``[origin, origin + size)`` over the last three axes of ``array``.

    ``array`` is anything with ``.shape`` and NumPy-style slicing (a blosc2 NDArray, a Zarr array, a
    NumPy array); only the intersection of the window with the array is sliced, so a chunked array
    decodes only the chunks it touches. The part of the window outside the array (``origin`` may be
    negative, ``origin + size`` may pass the edge) is filled with ``pad_value``.

    Args:
        array: array of shape ``(*lead_dims, X, Y, Z)``.
        origin: window start in voxels along X, Y, Z (may be negative).
        size: window size in voxels along X, Y, Z.
        lead: index applied to the leading axes (e.g. ``(slice(c, c + 1),)`` for one channel).
        pad_value: fill value for voxels outside the array.

    Returns:
        A C-contiguous NumPy array ``(*lead_dims', *size)`` with the dtype of ``array``.
    """
    spatial = tuple(int(s) for s in array.shape[-3:])
    if len(origin) != 3 or len(size) != 3:
        raise ValueError(f"read_window: origin {tuple(origin)} and size {tuple(size)} must have 3 entries")
    lo = [max(int(o), 0) for o in origin]
    hi = [min(int(o) + int(s), d) for o, s, d in zip(origin, size, spatial)]
    size = tuple(int(s) for s in size)
    if any(h <= l for l, h in zip(lo, hi)):  # window entirely outside the volume
        lead_shape = np.empty(array.shape[:-3], dtype=np.uint8)[lead].shape if lead else array.shape[:-3]
        return np.full(tuple(lead_shape) + size, pad_value, dtype=array.dtype)
    data = np.asarray(array[lead + tuple(slice(l, h) for l, h in zip(lo, hi))])
    if data.shape[-3:] == size:
        return np.ascontiguousarray(data)
    out = np.full(data.shape[:-3] + size, pad_value, dtype=data.dtype)
    dst = tuple(slice(l - int(o), h - int(o)) for l, h, o in zip(lo, hi, origin))
    out[(Ellipsis,) + dst] = data
    return out


def zscore_crop(patch: np.ndarray, eps: float = 1e-8, inplace: bool = False) -> np.ndarray:
    """Z-score each channel of one patch on its own statistics (MAE-XNT's per-crop normalisation).

    Args:
        patch: ``(C, X, Y, Z)`` array of any real dtype (any memory layout, e.g. a flipped view).
        eps: a channel whose standard deviation is at most ``eps`` (or ``1e-7 * |mean|``, float32
            resolution) is constant and becomes zeros (never NaN).
        inplace: normalise ``patch`` itself (it must then be a C-contiguous float32 array).

    Returns:
        float32 ``(C, X, Y, Z)``, C-contiguous (a new array unless ``inplace``); every non-constant
        channel has mean 0 and std 1 (statistics accumulated in float64).
    """
    if patch.ndim != 4:
        raise ValueError(f"zscore_crop: patch must be (C, X, Y, Z), got shape {patch.shape}")
    if inplace:
        if patch.dtype != np.float32 or not patch.flags.c_contiguous or not patch.flags.writeable:
            raise ValueError("zscore_crop: inplace=True needs a writeable C-contiguous float32 patch, got "
                             f"{patch.dtype} (c_contiguous={patch.flags.c_contiguous})")
        out = patch
    else:
        out = np.array(patch, dtype=np.float32, order="C")
    for c in range(out.shape[0]):
        x = out[c]
        zscore_with(x, float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64)), eps)
    return out


def zscore_with(patch: np.ndarray, mean: float, std: float, eps: float = 1e-8) -> np.ndarray:
    """Normalise a C-contiguous float32 patch in place as ``(x - mean) / std`` (fixed statistics).

    ``std`` at most ``eps`` (or ``1e-7 * |mean|``, float32 resolution) or not finite: the patch
    becomes zeros (never NaN), as :func:`zscore_crop` does for a constant crop. Returns ``patch``.
    """
    if patch.dtype != np.float32 or not patch.flags.c_contiguous or not patch.flags.writeable:
        raise ValueError(f"zscore_with: patch must be a writeable C-contiguous float32 array, got {patch.dtype}")
    if not (np.isfinite(std) and np.isfinite(mean)) or std <= max(eps, 1e-7 * abs(mean)):
        patch[...] = 0.0
    else:
        patch -= np.float32(mean)
        patch *= np.float32(1.0 / std)
    return patch


class _LRU:
    """A small per-process LRU cache; emptied when used in a new (forked) process.

    Open file handles must not be shared between processes (a forked worker would share the parent's
    file offsets), so a cache notices ``os.getpid()`` changing and starts afresh.
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max(1, int(max_items))
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._pid = os.getpid()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():
            self._items = OrderedDict()
            self._pid = os.getpid()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class PatchStream(Dataset):
    """Base of the map-style patch streams: an unbounded index space, and per-process caches (open
    arrays, ...) named in ``_transient`` that are dropped when pickled for a worker and rebuilt by
    ``_init_caches`` there (open handles never travel to another process)."""

    _transient: tuple[str, ...] = ("_arrays",)

    def _init_caches(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._transient:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def __len__(self) -> int:
        """The stream is unbounded; ``len`` is only there for code that insists on one."""
        return sys.maxsize


class PatchSampler(PatchStream):
    """Random patches of a preprocessed dataset; item ``k`` is a pure function of ``(seed, k)``.

    For item ``k`` a generator ``np.random.default_rng([seed, k])`` draws, in this order:

    1. the case: uniformly (``sampling="uniform"``) or with probability proportional to its voxel
       count from the manifest (``sampling="size"``, as MAE-XNT samples its volumes);
    2. a foreground coin: with probability ``foreground_prob`` (or, with ``foreground_batch`` B, as
       nnU-Net decides it: item ``k`` is foreground iff its place in its batch, ``k % B``, is at least
       ``round(B * (1 - foreground_prob))``, so the last 33% of every batch and at least one of a batch
       of 2; the coin is still drawn, so the other draws do not move), and when the case's
       ``props["class_locations"]`` has samples, the patch is centred on a random stored voxel of a
       random label class (classes equally likely), shifted to stay inside the valid range below;
    3. otherwise the patch origin, uniform over the valid origins: per axis ``[0, D - P]`` when the
       volume is at least as large as the patch, else ``[D - P, 0]`` (the volume lies somewhere
       inside the patch; the rest is padding);
    4. the channel, with ``channel_mode="single"`` (one random channel per patch, C = 1);
       ``channel_mode="all"`` returns every channel;
    5. with ``symmetries``, one of the 48 cube symmetries (``data/cube_symmetries.py``), applied to
       image and label; the window read is ``source_shape(patch_size, symmetry)`` (the patch size
       permuted), so every item still has ``patch_size``. Without ``symmetries`` nothing is drawn
       and the stream is the same as before the option existed.

    With ``crop_zscore`` every image patch is z-scored per channel on its own statistics
    (:func:`zscore_crop`, after padding); otherwise patches keep the stored intensities.

    Padding: image voxels outside the volume are ``pad_value`` (default 0.0, the mean of a z-scored
    volume, as nnU-Net pads), label voxels outside are 0 (background).

    Args:
        dataset: a ``PreprocessedDataset`` or its root directory.
        patch_size: patch size in voxels, an int (cube) or three ints (X, Y, Z).
        foreground_prob: probability of a patch centred on a labelled voxel (0 for pre-training).
        foreground_batch: the batch size, for nnU-Net's per-batch-position oversampling (see 2.);
            None: an independent coin per item.
        seed: stream seed (a non-negative int).
        sampling: "uniform" over cases, or "size" (proportional to X*Y*Z of each case).
        channel_mode: "all" (C channels) or "single" (one random channel, C = 1).
        with_labels: also return the label patch; restricts the pool to cases with a label map.
        cases: optional case ids to draw from (default: every usable case of the dataset).
        pad_value: image fill value outside the volume.
        max_open: at most this many stored arrays kept open per process (LRU).
        decode_threads: blosc2 decoder threads per read (1 inside DataLoader workers).
        symmetries: apply a random one of the 48 cube symmetries to every patch (MAE-XNT).
        crop_zscore: z-score every image patch on its own (MAE-XNT).

    Item ``k`` is a dict: ``"image"`` float32 tensor ``(C, *patch)``, ``"label"`` int64 tensor
    ``(1, *patch)`` (only with ``with_labels``), ``"case"`` str, ``"origin"`` int64 tensor ``(3,)``
    (window start in voxels, negative where padded; the window has ``source_shape(patch_size,
    symmetry)``), ``"symmetry"`` int (0: identity) and ``"index"`` int (``k``).
    """

    _transient = ("_arrays", "_locations")

    def __init__(
        self,
        dataset: PreprocessedDataset | str | os.PathLike,
        patch_size: int | Sequence[int],
        foreground_prob: float = 0.0,
        seed: int = 0,
        sampling: str = "uniform",
        channel_mode: str = "all",
        with_labels: bool = False,
        cases: Sequence[str] | None = None,
        pad_value: float = 0.0,
        max_open: int = 16,
        decode_threads: int = 1,
        symmetries: bool = False,
        crop_zscore: bool = False,
        foreground_batch: int | None = None,
    ) -> None:
        """See the class docstring. Exempt from the size rule: every option is a keyword with a default, one
        per sampling feature (pre-training, fine-tuning, MAE-XNT crops); grouping them would only rename them."""
        if not isinstance(dataset, PreprocessedDataset):
            dataset = PreprocessedDataset(dataset)
        self.dataset = dataset
        self.patch_size = _patch_size(patch_size)
        if not 0.0 <= float(foreground_prob) <= 1.0:
            raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob}")
        self.foreground_prob = float(foreground_prob)
        if foreground_batch is not None and int(foreground_batch) < 1:
            raise ValueError(f"foreground_batch must be a batch size >= 1 or None, got {foreground_batch}")
        self.foreground_batch = None if foreground_batch is None else int(foreground_batch)
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        self.seed = int(seed)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}")
        self.channel_mode = channel_mode
        self.with_labels = bool(with_labels)
        self.pad_value = float(pad_value)
        self.max_open = int(max_open)
        self.decode_threads = int(decode_threads)
        self.symmetries = bool(symmetries)
        self.crop_zscore = bool(crop_zscore)
        self.records: list[CaseRecord] = self._select(cases)
        self._cum_weights = self._weights()
        self._check_channels()
        self._init_caches()

    # -- set-up ---------------------------------------------------------------------------------

    def _select(self, cases: Sequence[str] | None) -> list[CaseRecord]:
        root = self.dataset.root
        if cases is None:
            records = list(self.dataset.cases)
        else:
            by_id = {r.id: r for r in self.dataset.cases}
            missing = [c for c in cases if c not in by_id]
            if missing:
                raise KeyError(f"{root}: cases not in the manifest (or excluded): {missing[:5]}")
            records = [by_id[c] for c in cases]
        if self.with_labels:
            records = [r for r in records if r.has_label]
        if not records:
            what = "labelled cases" if self.with_labels else "usable cases"
            raise ValueError(f"{root}: no {what} to sample patches from")
        return records

    def _weights(self) -> np.ndarray | None:
        if self.sampling == "uniform":
            return None
        sizes = []
        for r in self.records:
            if not r.shape or len(r.shape) < 3:
                raise ValueError(
                    f"{self.dataset.root}: manifest row of case {r.id!r} has no shape; sampling='size' needs it"
                )
            sizes.append(r.n_voxels)
        cum = np.cumsum(np.asarray(sizes, dtype=np.float64))
        return cum / cum[-1]

    def _check_channels(self) -> None:
        if self.channel_mode != "all":
            return
        counts = {tuple(r.shape[:-3]) for r in self.records if r.shape and len(r.shape) == 4}
        if len(counts) > 1:
            raise ValueError(
                f"{self.dataset.root}: cases have different channel counts {sorted(counts)}; "
                "channel_mode='all' needs one count (use channel_mode='single')"
            )

    def _init_caches(self) -> None:
        self._arrays = _LRU(self.max_open)
        self._locations = _LRU(4 * self.max_open)

    # -- access ---------------------------------------------------------------------------------

    def _array(self, path: Path):
        return self._arrays.get(path, lambda: open_array(path, nthreads=self.decode_threads))

    def _class_locations(self, case_id: str) -> list[np.ndarray]:
        """Per-class voxel samples ``(N_c, 3)`` (classes with at least one sample), cached."""

        def load() -> list[np.ndarray]:
            path = self.dataset.props_path(case_id)
            if not path.exists():
                return []
            locs = self.dataset.props(case_id).get("class_locations") or {}
            out = []
            for key in sorted(locs, key=lambda k: (len(k), k)):  # "1" < "2" < "10"
                a = np.asarray(locs[key], dtype=np.int64).reshape(-1, 3)
                if len(a):
                    out.append(a)
            return out

        return self._locations.get(case_id, load)

    def draw(self, index: int) -> dict[str, Any]:
        """The random choices of item ``index`` without reading voxels: case, origin, channel,
        symmetry and ``window`` (the size of the window to read, X, Y, Z)."""
        if index < 0:
            raise IndexError(f"PatchSampler index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        if self._cum_weights is None:
            i = int(rng.integers(len(self.records)))
        else:
            i = min(int(np.searchsorted(self._cum_weights, rng.random(), side="right")), len(self.records) - 1)
        record = self.records[i]
        symmetry = int(rng.integers(N_SYMMETRIES)) if self.symmetries else 0
        window = source_shape(self.patch_size, symmetry)
        image = self._array(self.dataset.image_path(record.id))
        spatial = tuple(int(s) for s in image.shape[-3:])
        lo = [min(0, d - p) for d, p in zip(spatial, window)]
        hi = [max(0, d - p) for d, p in zip(spatial, window)]
        coin = rng.random()
        if self.foreground_batch is None:
            foreground = coin < self.foreground_prob
        else:  # nnU-Net's get_do_oversample: not (place < round(B * (1 - p)))
            b = self.foreground_batch
            foreground = int(index) % b >= round(b * (1.0 - self.foreground_prob))
        locations = self._class_locations(record.id) if foreground else []
        if locations:
            cls = locations[int(rng.integers(len(locations)))]
            voxel = cls[int(rng.integers(len(cls)))]
            origin = [int(np.clip(v - p // 2, l, h)) for v, p, l, h in zip(voxel, window, lo, hi)]
        else:
            origin = [int(rng.integers(l, h + 1)) for l, h in zip(lo, hi)]
        n_channels = int(image.shape[0]) if image.ndim == 4 else 1
        channel = int(rng.integers(n_channels)) if self.channel_mode == "single" else None
        return {"record": record, "image": image, "origin": origin, "channel": channel, "symmetry": symmetry,
                "window": window}

    def __getitem__(self, index: int) -> dict[str, Any]:
        d = self.draw(index)
        record, image, origin, channel = d["record"], d["image"], d["origin"], d["channel"]
        symmetry, window = d["symmetry"], d["window"]
        if image.ndim == 4:
            lead = (slice(None),) if channel is None else (slice(channel, channel + 1),)
        else:  # a (X, Y, Z) image is one channel
            lead = ()
        patch = read_window(image, origin, window, lead, self.pad_value)
        if patch.ndim == 3:
            patch = patch[None]
        if symmetry:
            patch = apply_symmetry(patch, symmetry)
        patch = zscore_crop(patch) if self.crop_zscore else np.asarray(patch, dtype=np.float32, order="C")
        item: dict[str, Any] = {
            "image": torch.from_numpy(patch),
            "case": record.id,
            "origin": torch.tensor(origin, dtype=torch.int64),
            "symmetry": symmetry,
            "index": int(index),
        }
        if self.with_labels:
            label_arr = self._array(self.dataset.label_path(record.id))
            if tuple(label_arr.shape[-3:]) != tuple(image.shape[-3:]):
                raise ValueError(
                    f"{self.dataset.label_path(record.id)}: label shape {tuple(label_arr.shape)} does not "
                    f"match image shape {tuple(image.shape)}"
                )
            lead = (slice(0, 1),) if label_arr.ndim == 4 else ()
            label = read_window(label_arr, origin, window, lead, 0)
            if label.ndim == 3:
                label = label[None]
            if symmetry:
                label = apply_symmetry(label, symmetry)
            item["label"] = torch.from_numpy(np.asarray(label, dtype=np.int64, order="C"))
        return item


def _patch_size(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (patch_size,) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise ValueError(f"patch_size must be a positive int or three positive ints, got {patch_size!r}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields, forever, this rank's rows of global batches ``start_batch, start_batch + 1, ...``.

    Global batch ``b`` is items ``b*B .. b*B+B-1``; rank ``r`` of ``W`` gets
    ``b*B + [r*B/W, (r+1)*B/W)``.
    """

    def __init__(self, batch_size: int, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if int(batch_size) % int(world_size):
            raise ValueError(
                f"global batch size {batch_size} is not divisible by world size {world_size}: "
                "every rank must get the same number of rows"
            )
        if int(start_batch) < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.batch_size = int(batch_size)
        self.start_batch = int(start_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.batch_size // self.world_size
        b = self.start_batch
        while True:
            first = b * self.batch_size + self.rank * rows
            yield list(range(first, first + rows))
            b += 1


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one compute/decode thread per worker (N workers = N cores)."""
    import blosc2

    torch.set_num_threads(1)
    blosc2.set_nthreads(1)
    try:  # Zarr volumes (volume_crops): decode chunks on this thread, not a pool per worker
        import numcodecs.blosc
        import zarr

        zarr.config.set({"threading.max_workers": 1})
        numcodecs.blosc.set_nthreads(1)
    except ImportError:  # pragma: no cover - zarr is a dependency; tolerate a minimal install
        pass


def make_loader(
    sampler: Dataset,
    batch_size: int,
    num_workers: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int | None = 4,
) -> DataLoader:
    """An infinite DataLoader over this rank's rows of global batches ``start_batch, ...``.

    ``sampler`` is any map-style dataset whose item ``k`` is a pure function of its seed and ``k``
    (:class:`PatchSampler`, ``volume_crops.VolumeCropSampler``). Each element is the default
    collation of ``batch_size // world_size`` items: ``"image"`` ``(B/W, C, *patch)``, ``"label"``
    ``(B/W, 1, *patch)`` when present, ``"case"`` list of str, ``"origin"`` ``(B/W, 3)``,
    ``"symmetry"`` ``(B/W,)``, ``"index"`` ``(B/W,)``. The batches do not depend on ``num_workers``.
    ``len()`` of the loader is undefined (the stream never ends); stop after the steps you need.
    """
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    batches = GlobalBatchSampler(batch_size, start_batch, rank, world_size)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=worker_init)
    return DataLoader(sampler, batch_sampler=batches, num_workers=int(num_workers), pin_memory=pin_memory, **kwargs)
