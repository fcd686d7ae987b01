"""The 48 symmetries of a cube (the octahedral group O_h): axis permutations x axis flips.

MAE-XNT augments every crop with one of them, drawn uniformly. Symmetry ``index`` is the pair
``CUBE_SYMMETRIES[index] = (perm, flips)`` with ``index = 8 * p + f``: ``perm`` is the ``p``-th of
``itertools.permutations((0, 1, 2))`` and ``flips`` the ``f``-th of
``itertools.product((False, True), repeat=3)``; index 0 is the identity.

Applying ``(perm, flips)`` to the spatial axes ``(X, Y, Z)`` (the last three axes) of ``x``:

    y = transpose(x, perm)          # y.shape[i] = x.shape[perm[i]]
    y = flip(y, [i for i in 0..2 if flips[i]])  # flips refer to the axes of the *output*

On a non-cubic array the output shape is the input shape permuted; :func:`source_shape` gives the
input shape that yields a wanted output shape (read that window, then apply the symmetry).

All functions are stateless and work on NumPy arrays (returning views: no copy) and torch tensors
(``permute`` + ``flip``: a new tensor) of shape ``(..., X, Y, Z)``, e.g. ``(C, X, Y, Z)`` or
``(X, Y, Z)``.
"""
from __future__ import annotations

import itertools
from typing import Sequence, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: the 48 ``(perm, flips)`` pairs; index 0 is the identity
CUBE_SYMMETRIES: tuple[tuple[tuple[int, int, int], tuple[bool, bool, bool]], ...] = tuple(
    (tuple(perm), tuple(flips))  # type: ignore[misc]
    for perm in itertools.permutations((0, 1, 2))
    for flips in itertools.product((False, True), repeat=3)
)
N_SYMMETRIES = len(CUBE_SYMMETRIES)  # 48


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < N_SYMMETRIES:
        raise ValueError(f"symmetry index must be an int in [0, {N_SYMMETRIES}), got {index!r}")
    return int(index)


def _check_array(x) -> None:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ValueError(f"expected a NumPy array or torch tensor, got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(f"expected an array (..., X, Y, Z) with at least 3 dimensions, got shape {tuple(x.shape)}")


def _apply(x: ArrayT, perm: Sequence[int], flips: Sequence[bool]) -> ArrayT:
    lead = x.ndim - 3
    axes = list(range(lead)) + [lead + int(p) for p in perm]
    flip_axes = [lead + i for i in range(3) if flips[i]]
    if isinstance(x, torch.Tensor):
        y = x.permute(*axes)
        return y.flip(flip_axes) if flip_axes else y
    y = x.transpose(axes)
    return np.flip(y, flip_axes) if flip_axes else y


def apply_symmetry(x: ArrayT, index: int) -> ArrayT:
    """Symmetry ``index`` applied to the spatial axes (the last three) of ``x``.

    Args:
        x: NumPy array or torch tensor ``(..., X, Y, Z)``.
        index: in ``[0, 48)`` (see :data:`CUBE_SYMMETRIES`).

    Returns:
        ``(..., S[p0], S[p1], S[p2])`` where ``S = (X, Y, Z)`` and ``perm = (p0, p1, p2)``: a view for
        NumPy (``np.ascontiguousarray`` to copy), a tensor for torch (a view when no axis is flipped).
    """
    _check_array(x)
    perm, flips = CUBE_SYMMETRIES[_check_index(index)]
    return _apply(x, perm, flips)


def inverse_index(index: int) -> int:
    """The index ``j`` with ``apply_symmetry(apply_symmetry(x, index), j) == x`` for every ``x``."""
    return _INVERSE[_check_index(index)]


def invert_symmetry(y: ArrayT, index: int) -> ArrayT:
    """Undo :func:`apply_symmetry`: ``invert_symmetry(apply_symmetry(x, i), i)`` equals ``x``."""
    _check_array(y)
    perm, flips = CUBE_SYMMETRIES[_check_index(index)]
    inv = [0, 0, 0]
    for i, p in enumerate(perm):
        inv[p] = i
    lead = y.ndim - 3
    flip_axes = [lead + i for i in range(3) if flips[i]]
    if flip_axes:
        y = y.flip(flip_axes) if isinstance(y, torch.Tensor) else np.flip(y, flip_axes)
    return _apply(y, inv, (False, False, False))


def compose(first: int, second: int) -> int:
    """The index ``k`` with ``apply_symmetry(apply_symmetry(x, first), second) == apply_symmetry(x, k)``."""
    return _COMPOSE[_check_index(first)][_check_index(second)]


def source_shape(shape: Sequence[int], index: int) -> tuple[int, int, int]:
    """The spatial shape ``(X, Y, Z)`` an array must have so that symmetry ``index`` maps it to ``shape``.

    E.g. to get a ``(64, 32, 16)`` crop under a symmetry that swaps X and Z, read a ``(16, 32, 64)``
    window and apply the symmetry.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries (X, Y, Z), got {tuple(shape)}")
    perm, _ = CUBE_SYMMETRIES[_check_index(index)]
    out = [0, 0, 0]
    for i, p in enumerate(perm):
        out[p] = int(shape[i])
    return tuple(out)  # type: ignore[return-value]


def symmetry_matrix(index: int) -> np.ndarray:
    """The signed permutation matrix ``M`` (3, 3) of symmetry ``index`` on centred coordinates:
    the voxel at centred position ``v`` of the input lands at ``M @ v`` in the output."""
    perm, flips = CUBE_SYMMETRIES[_check_index(index)]
    m = np.zeros((3, 3), dtype=np.int64)
    for i, p in enumerate(perm):
        m[i, p] = -1 if flips[i] else 1
    return m


def _tables() -> tuple[list[int], list[list[int]]]:
    mats = [symmetry_matrix(i) for i in range(N_SYMMETRIES)]
    lookup = {m.tobytes(): i for i, m in enumerate(mats)}
    if len(lookup) != N_SYMMETRIES:  # pragma: no cover - a broken table
        raise RuntimeError("cube symmetries are not distinct")
    compose_table = [[lookup[(mats[b] @ mats[a]).tobytes()] for b in range(N_SYMMETRIES)] for a in range(N_SYMMETRIES)]
    inverse = [lookup[mats[a].T.copy().tobytes()] for a in range(N_SYMMETRIES)]
    return inverse, compose_table


_INVERSE, _COMPOSE = _tables()
