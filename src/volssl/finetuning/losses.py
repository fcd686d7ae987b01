"""Segmentation losses: Dice + cross-entropy (nnU-Net's), deep supervision, label-value mapping.

:func:`dice_ce_loss` is, per sample, ``CE + (1 - mean soft Dice over the foreground classes)``
with ``Dice_k = (2 TP_k + s) / (2 TP_k + FP_k + FN_k + s)`` on softmax probabilities (s = 1e-5),
averaged over the batch: a mean of per-sample losses, so data-parallel gradient averaging equals
the single-process gradient (docs/design.md, "Methods"). It equals MONAI's ``DiceCELoss(
include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)``.

:func:`deep_supervision_loss` applies it to every decoder resolution (full resolution first) with
nnU-Net's weights ``2^-i``, the lowest resolution weighted 0 (its head is not trained, see
:func:`volssl.finetuning.transfer.unused_heads`), normalised to sum 1; the targets are subsampled
(nearest) to each output's grid.

:class:`LabelMap` turns stored label values into class indices: output channel ``k`` is the
``k``-th smallest declared value (docs/design.md, "Fine-tuned model"); instance label maps (every
id >= 1 is the foreground class) map to 0 / 1.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH = 1e-5


def dice_ce_loss(logits: Tensor, target: Tensor, include_background: bool = False, smooth: float = SMOOTH) -> Tensor:
    """Dice + CE of ``logits`` (B, K, *s) against class indices ``target`` (B, 1, *s) int64 in [0, K).

    Computed in float32 whatever the logits' dtype; returns a scalar (mean over samples).
    """
    if logits.ndim < 3 or target.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(f"dice_ce_loss: logits (B, K, *s) and target (B, 1, *s) do not match: "
                         f"{tuple(logits.shape)} vs {tuple(target.shape)}")
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"dice_ce_loss: need at least 2 classes (background + one), got {k}")
    logits = logits.float()
    labels = target[:, 0].long()
    dims = tuple(range(2, logits.ndim))
    ce = F.cross_entropy(logits, labels, reduction="none").flatten(1).mean(1)
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(labels, k).movedim(-1, 1).to(probs.dtype)
    tp = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)  # 2 TP + FP + FN
    dice = (2 * tp + smooth) / (denominator + smooth)
    if not include_background:
        dice = dice[:, 1:]
    return (ce + 1.0 - dice.mean(1)).mean()


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for ``n`` outputs (full resolution first): ``2^-i``, the last 0, sum 1."""
    if n < 1:
        raise ValueError(f"deep_supervision_weights: n must be >= 1, got {n}")
    if n == 1:
        return [1.0]
    w = [2.0 ** -i for i in range(n)]
    w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def downsample_target(target: Tensor, shape: Sequence[int]) -> Tensor:
    """Nearest subsampling of ``target`` (B, 1, *s) to the spatial ``shape`` (each side divides ``s``)."""
    factors = []
    for full, small in zip(target.shape[2:], shape):
        if small < 1 or full % small:
            raise ValueError(f"downsample_target: output grid {tuple(shape)} does not divide the patch "
                             f"{tuple(target.shape[2:])}")
        factors.append(full // small)
    if all(f == 1 for f in factors):
        return target
    return target[(slice(None), slice(None)) + tuple(slice(None, None, f) for f in factors)]


def deep_supervision_loss(outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
    """Dice + CE of one output, or the weighted sum over a list of outputs (full resolution first)."""
    if isinstance(outputs, Tensor):
        return dice_ce_loss(outputs, target)
    weights = deep_supervision_weights(len(outputs))
    total = None
    for w, out in zip(weights, outputs):
        if w == 0.0:
            continue
        term = w * dice_ce_loss(out, downsample_target(target, out.shape[2:]))
        total = term if total is None else total + term
    return total


class LabelMap:
    """Stored label values -> class indices ``0 .. K-1`` (the ``k``-th smallest declared value is ``k``).

    Args:
        labels: dataset.json style ``{"background": 0, "lesion": 1, ...}`` (integer values).
        instance: the label maps hold instance ids (every id >= 1 is class 1; needs 2 labels).
    """

    def __init__(self, labels: Mapping[str, int], instance: bool = False) -> None:
        if len(labels) < 2:
            raise ValueError(f"labels must name at least background and one class, got {dict(labels)}")
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            raise ValueError(f"region-based labels (lists of values) are not supported: {dict(labels)}")
        values = sorted(int(v) for v in labels.values())
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be distinct, got {dict(labels)}")
        if instance and values != [0, 1]:
            raise ValueError(f"instance labels need exactly background 0 and foreground 1, got {dict(labels)}")
        self.values = values
        self.instance = bool(instance)
        self.identity = values == list(range(len(values)))
        self._table = torch.tensor(values, dtype=torch.int64)

    @property
    def n_classes(self) -> int:
        return len(self.values)

    def unknown(self, present: Sequence[int]) -> list[int]:
        """The values of ``present`` that are not declared (always [] for instance labels)."""
        if self.instance:
            return [int(v) for v in present if int(v) < 0]
        known = set(self.values)
        return sorted(int(v) for v in present if int(v) not in known)

    def __call__(self, label: Tensor) -> Tensor:
        """Class indices (int64, same shape) of the stored values in ``label`` (declared values only)."""
        if self.instance:
            return (label > 0).long()
        if self.identity:
            return label.long()
        table = self._table.to(label.device)
        return torch.searchsorted(table, label.long().contiguous())
