"""Affinity targets and the class-balanced affinity loss (MAE-XNT axon segmentation).

An *affinity* tells whether two voxels belong to the same object. The network predicts one channel
per offset ``d`` (a vector of voxel steps); channel ``c`` at voxel ``p`` is the affinity of the pair
``(p, p + d_c)``.

Sign convention and channel order (:data:`AFFINITY_OFFSETS`)
    Offsets point *backwards* (negative steps), as in waterz and funlib/gunpowder: channel ``c`` at
    ``p`` pairs ``p`` with ``p + d_c``, e.g. ``(-1, 0, 0)`` pairs ``p`` with its neighbour one voxel
    lower along the first array axis. The affinity of a pair is symmetric, so the 12 channels of
    "offsets +-1, 3, 9, 27 per axis" (MAE-XNT supplement, Sec. 5.2) are the 4 distances x 3 axes:
    channel ``3 k + a`` is axis ``a`` (0, 1, 2 = the array axes X, Y, Z) at distance
    ``(1, 3, 9, 27)[k]``. Channels 0, 1, 2 are therefore the nearest-neighbour affinities in exactly
    the layout ``waterz.agglomerate`` reads (``affs[a][p]`` = affinity of ``p`` and ``p - e_a``),
    which :mod:`volssl.inference.agglomerate` uses.

Targets (:func:`affinity_targets`)
    ``1`` where ``p`` and ``p + d`` carry the same non-zero instance id, ``0`` across an instance
    boundary, where either voxel is background (id 0), and where ``p + d`` lies outside the volume.
    The last case is not a real negative: the returned validity mask is 0 there and the loss
    ignores those pairs.

Loss (:func:`affinity_loss`)
    Class-balanced MSE (the MAE-XNT recipe, after funlib/gunpowder's ``BalanceLabels``): for every
    sample and channel the valid positive pairs and the valid negative pairs get equal total weight,
    i.e. the channel's loss is ``(mean_{pos} (y - 1)^2 + mean_{neg} y^2) / 2`` (a class absent from
    the channel's valid pairs: the mean over the present class alone; a channel without valid pairs:
    left out). A sample's loss is the mean over its channels; the loss is the mean over samples of
    per-sample losses (docs/design.md, "Methods"), so it lies in ``[0, 1]`` for predictions in
    ``[0, 1]``. gunpowder's ``BalanceLabels`` weights each class by ``1 / (2 frac)`` and sums; that
    is the same up to a constant factor per patch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

#: default offsets: channel ``3 k + a`` = axis ``a`` at distance ``(1, 3, 9, 27)[k]``, pointing backwards
AFFINITY_DISTANCES: tuple[int, ...] = (1, 3, 9, 27)
AFFINITY_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    tuple(-d if axis == a else 0 for axis in range(3)) for d in AFFINITY_DISTANCES for a in range(3)
)


def make_offsets(distances: Sequence[int] = AFFINITY_DISTANCES, ndim: int = 3) -> tuple[tuple[int, ...], ...]:
    """Axis-aligned backward offsets in the channel order of :data:`AFFINITY_OFFSETS`:
    for each distance (outer loop), one offset per axis (inner loop)."""
    if ndim < 1:
        raise ValueError(f"make_offsets: ndim must be >= 1, got {ndim}")
    out = []
    for d in distances:
        if int(d) != d or d < 1:
            raise ValueError(f"make_offsets: distances must be positive integers, got {list(distances)}")
        out.extend(tuple(-int(d) if axis == a else 0 for axis in range(ndim)) for a in range(ndim))
    return tuple(out)


def check_offsets(offsets: Sequence[Sequence[int]], ndim: int) -> tuple[tuple[int, ...], ...]:
    """Validate ``offsets`` (non-empty, each ``ndim`` integers, not all zero) and return them as tuples."""
    out = []
    for off in offsets:
        t = tuple(int(v) for v in off)
        if len(t) != ndim or any(int(v) != v for v in off):
            raise ValueError(f"offsets must be {ndim} integers each, got {list(map(tuple, offsets))}")
        if not any(t):
            raise ValueError("an affinity offset must not be all zeros")
        out.append(t)
    if not out:
        raise ValueError("offsets must not be empty")
    return tuple(out)


def _pair_slices(offset: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(src, dst)`` such that ``x[src]`` holds the voxels ``p`` whose partner ``p + offset``
    is inside the volume and ``x[dst]`` holds those partners (same shape)."""
    src, dst = [], []
    for d in offset:
        if d > 0:
            src.append(slice(0, -d))
            dst.append(slice(d, None))
        elif d < 0:
            src.append(slice(-d, None))
            dst.append(slice(0, d))
        else:
            src.append(slice(None))
            dst.append(slice(None))
    return tuple(src), tuple(dst)


def affinity_targets(
    labels: Tensor | np.ndarray, offsets: Sequence[Sequence[int]] = AFFINITY_OFFSETS
) -> tuple[Tensor, Tensor] | tuple[np.ndarray, np.ndarray]:
    """Affinity targets and validity mask of an instance label map.

    Args:
        labels: instance ids (0 = background), integer (or integral float):
            a torch tensor ``(B, 1, X, Y, Z)`` (e.g. the fine-tuning patch labels), or a numpy array
            ``(X, Y, Z)`` (one volume) or ``(B, 1, X, Y, Z)``. Any number of spatial axes works if every
            offset has that many entries.
        offsets: ``C`` offsets (voxel steps, one per spatial axis); default :data:`AFFINITY_OFFSETS`
            (12 channels, backward steps 1, 3, 9, 27 per axis; channel order in the module docstring).

    Returns:
        ``(target, valid)``, both float32 of shape ``(B, C, X, Y, Z)`` for a ``(B, 1, ...)`` input and
        ``(C, X, Y, Z)`` for an ``(X, Y, Z)`` array, torch tensors on the input's device for a tensor
        input and numpy arrays for a numpy input. ``target`` is 1 where ``p`` and ``p + d_c`` share a
        non-zero id, else 0; ``valid`` is 1 where ``p + d_c`` is inside the volume, else 0 (the same
        for every sample; for a tensor input it is an expanded view, do not write into it).
    """
    is_numpy = isinstance(labels, np.ndarray)
    if not is_numpy and not isinstance(labels, Tensor):
        raise ValueError(f"affinity_targets: labels must be a torch tensor or numpy array, got {type(labels).__name__}")
    if is_numpy:
        arr = np.asarray(labels)
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
            arr = arr.view(np.int64)  # equality of ids is all that matters: keep the bits
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64, copy=False)
        lab = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        lab = labels
        if lab.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few kernels for these dtypes
            lab = lab.view(torch.int64) if lab.dtype == torch.uint64 else lab.to(torch.int64)
    n_off = len(offsets[0]) if len(offsets) else 3
    single = bool(is_numpy and not (lab.ndim == n_off + 2 and lab.shape[1] == 1))
    if single:
        lab = lab[None, None]
    if lab.ndim < 3 or lab.shape[1] != 1:
        raise ValueError(f"affinity_targets: labels must be (B, 1, *spatial) (or a numpy (*spatial) volume), "
                         f"got shape {tuple(labels.shape)}")
    if lab.is_floating_point():
        if not torch.equal(lab, torch.round(lab)):
            raise ValueError("affinity_targets: labels hold non-integer values; pass instance ids")
        lab = lab.long()
    elif lab.dtype == torch.bool or lab.is_complex():
        raise ValueError(f"affinity_targets: labels must be integer instance ids, got dtype {lab.dtype}")
    spatial = tuple(lab.shape[2:])
    offs = check_offsets(offsets, len(spatial))
    b = lab.shape[0]
    lab = lab[:, 0]
    target = torch.zeros((b, len(offs), *spatial), dtype=torch.float32, device=lab.device)
    valid = torch.zeros((1, len(offs), *spatial), dtype=torch.float32, device=lab.device)
    for c, off in enumerate(offs):
        src, dst = _pair_slices(off)
        a = lab[(slice(None),) + src]
        n = lab[(slice(None),) + dst]
        target[(slice(None), c) + src] = ((a == n) & (a != 0)).to(torch.float32)
        valid[(0, c) + src] = 1.0
    valid = valid.expand_as(target)
    if is_numpy:
        target_np, valid_np = target.numpy(), np.ascontiguousarray(valid.numpy())
        return (target_np[0], valid_np[0]) if single else (target_np, valid_np)
    return target, valid


def affinity_loss(
    pred: Tensor, target: Tensor, valid: Tensor | None = None, logits: bool = True
) -> Tensor:
    """Class-balanced weighted MSE between predicted and target affinities.

    Args:
        pred: ``(B, C, *spatial)`` network output; logits (``logits=True``, a sigmoid is applied) or
            probabilities in [0, 1] (``logits=False``).
        target: ``(B, C, *spatial)`` 0/1 affinities (from :func:`affinity_targets`).
        valid: ``(B, C, *spatial)`` (or broadcastable, e.g. ``(1, C, *spatial)``) 0/1 mask of the
            pairs to score; None: all pairs.
        logits: whether ``pred`` holds logits.

    Returns:
        A float32 scalar: the mean over samples of ``mean over channels of (mean over positive
        pairs of (p - 1)^2 + mean over negative pairs of p^2) / 2`` (see the module docstring for
        channels with one class or no valid pair; a sample without any valid pair contributes 0).
    """
    if pred.ndim < 3 or pred.shape != target.shape:
        raise ValueError(f"affinity_loss: pred and target must both be (B, C, *spatial) of the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    p = torch.sigmoid(pred.float()) if logits else pred.float()
    t = target.to(p.dtype)
    w = torch.ones_like(t) if valid is None else valid.to(p.dtype).expand_as(t)
    dims = tuple(range(2, p.ndim))
    err = (p - t) ** 2
    pos = w * t
    neg = w * (1.0 - t)
    n_pos = pos.sum(dims)
    n_neg = neg.sum(dims)
    mean_pos = (err * pos).sum(dims) / n_pos.clamp_min(1.0)
    mean_neg = (err * neg).sum(dims) / n_neg.clamp_min(1.0)
    has_pos = (n_pos > 0).to(p.dtype)
    has_neg = (n_neg > 0).to(p.dtype)
    n_classes = has_pos + has_neg  # (B, C)
    per_channel = (mean_pos * has_pos + mean_neg * has_neg) / n_classes.clamp_min(1.0)
    channel_used = (n_classes > 0).to(p.dtype)
    per_sample = (per_channel * channel_used).sum(1) / channel_used.sum(1).clamp_min(1.0)
    return per_sample.mean()
