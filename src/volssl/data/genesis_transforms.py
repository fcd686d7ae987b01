"""Models Genesis image deformations (Zhou et al., 2021), as stateless functions on torch tensors.

The pretext task restores an image from a deformed copy. The deformations and their probabilities
are those of the official code (MrGiovanni/ModelsGenesis, ``utils.generate_pair``), which the S3D
paper's Appendix A.1 transfers unchanged:

* flip (``flip_rate`` 0.4): up to three flips along random axes, applied to input AND target;
* local pixel shuffling (``local_rate`` 0.5): 10,000 windows of 1 .. ``side // 10`` voxels per
  axis; each window's voxels of the original are permuted and written back (later windows overwrite
  earlier ones);
* non-linear intensity map (``nonlinear_rate`` 0.9): a cubic Bezier curve through (0, 0), two random
  control points in [0, 1]^2 and (1, 1); half of the time the map is inverted (1 - like: f(0) = 1,
  f(1) = 0), exactly as the official code obtains it by sorting only the curve's x values;
* painting (``paint_rate`` 0.9): in-painting (probability 0.2: up to 5 boxes of side/6 .. side/3
  filled with U[0, 1] noise) or out-painting (0.8: U[0, 1] noise everywhere except the union of up to
  5 boxes of side - (3/7 .. 4/7) side voxels, where the original is kept).

Every function takes one sample ``(C, X, Y, Z)`` whose intensities lie in [0, 1] (the deformations
assume that range: the noise is U[0, 1] and the Bezier map is defined on [0, 1]); see
:func:`minmax_rescale`. Random quantities come from explicit ``torch.Generator`` s: scalar decisions
and box geometry from a CPU generator (:func:`draw_genesis`), per-voxel noise (shuffle permutations,
paint noise) from a generator on the tensor's device, both seeded from one integer per sample, so a
sample's deformation is a pure function of ``(seed, image)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, size) per axis, in voxels
PAINT_MODES = ("none", "in", "out")


# --------------------------------------------------------------------------- helpers
def _check_sample(x: Tensor, where: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: expected one sample (C, X, Y, Z), got shape {tuple(x.shape)}")


def _randint(lo: int, hi: int, generator: torch.Generator, n: int | None = None) -> int | Tensor:
    """Uniform integer(s) in [lo, hi] (inclusive, like Python's ``random.randint``); ``hi < lo``: ``lo``."""
    hi = max(int(hi), int(lo))
    out = torch.randint(int(lo), hi + 1, (1 if n is None else n,), generator=generator)
    return int(out[0]) if n is None else out


def minmax_rescale(images: Tensor, eps: float = 1e-8) -> Tensor:
    """Min-max rescale each (sample, channel) of ``images`` (B, C, *s) to [0, 1] (float32).

    z-scored patches (the S3D preprocessing) map their own minimum to 0 and maximum to 1, so the
    Models Genesis deformations (U[0, 1] noise, the Bezier map on [0, 1]) act on the range they were
    designed for; a constant channel becomes 0.
    """
    if images.ndim < 3:
        raise ValueError(f"minmax_rescale: expected (B, C, *spatial), got shape {tuple(images.shape)}")
    x = images.float()
    dims = tuple(range(2, x.ndim))
    lo = x.amin(dims, keepdim=True)
    hi = x.amax(dims, keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(eps)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- flips
def flip_axes(x: Tensor, axes: Sequence[bool]) -> Tensor:
    """Flip the sample ``x`` (C, X, Y, Z) along every spatial axis whose entry of ``axes`` (3 bools) is True."""
    _check_sample(x, "flip_axes")
    dims = [d + 1 for d, f in enumerate(axes) if f]
    return x.flip(dims) if dims else x


# --------------------------------------------------------------------------- local pixel shuffling
def draw_shuffle_windows(shape: Sequence[int], n_blocks: int = 10_000, max_fraction: float = 0.1,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n_blocks`` windows for :func:`local_pixel_shuffle`: ``(starts, sizes)``, each ``(n_blocks, 3)`` int64.

    Sizes are uniform in [1, max(1, int(side * max_fraction))] per axis (official: ``side // 10``),
    starts uniform in [0, side - size] (the window lies inside the patch).
    """
    if n_blocks < 0 or not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"draw_shuffle_windows: need n_blocks >= 0 and 0 < max_fraction <= 1, got {n_blocks}, "
                         f"{max_fraction}")
    shape = [int(s) for s in shape]
    sizes, starts = [], []
    for side in shape:
        hi = max(1, int(side * max_fraction))
        size = torch.randint(1, hi + 1, (n_blocks,), generator=generator)
        start = (torch.rand(n_blocks, generator=generator, dtype=torch.float64) * (side - size + 1)).floor().long()
        sizes.append(size)
        starts.append(start)
    return torch.stack(starts, 1), torch.stack(sizes, 1)


def local_pixel_shuffle(x: Tensor, starts: Tensor, sizes: Tensor, generator: torch.Generator | None = None,
                        chunk: int = 1024) -> Tensor:
    """Local pixel shuffling of the sample ``x`` (C, X, Y, Z), vectorised over windows.

    Window ``n`` (``starts[n]``, ``sizes[n]``: voxels per axis) receives a random permutation of the
    ORIGINAL voxels inside it (the same permutation for every channel); windows are written in order,
    so where they overlap the later one wins (the official loop's result). Windows are processed
    ``chunk`` at a time: within a chunk each voxel's owner is the last window covering it
    (``scatter_reduce`` amax), and later chunks overwrite earlier ones. ``generator`` (on ``x``'s
    device) draws the permutations.
    """
    _check_sample(x, "local_pixel_shuffle")
    if starts.shape != sizes.shape or starts.ndim != 2 or starts.shape[1] != 3:
        raise ValueError(f"local_pixel_shuffle: starts and sizes must both be (N, 3), got {tuple(starts.shape)} "
                         f"and {tuple(sizes.shape)}")
    n = starts.shape[0]
    if n == 0:
        return x
    spatial = x.shape[1:]
    if bool(((starts < 0) | (starts + sizes > torch.tensor(spatial)) | (sizes < 1)).any()):
        raise ValueError(f"local_pixel_shuffle: every window must lie inside the patch {tuple(spatial)}")
    device = x.device
    wmax = [int(sizes[:, d].max()) for d in range(3)]
    m = wmax[0] * wmax[1] * wmax[2]
    grid = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in wmax], indexing="ij"), -1)
    grid = grid.view(1, m, 3)  # every offset of the largest window, in row-major order
    strides = torch.tensor([spatial[1] * spatial[2], spatial[2], 1], device=device)
    slot = torch.arange(m, device=device)
    flat_x = x.reshape(x.shape[0], -1)
    dummy = flat_x.shape[1]  # an extra column that absorbs unused entries (no boolean indexing, no host sync)
    out = torch.cat([flat_x, flat_x[:, :1]], 1)
    starts, sizes = starts.to(device), sizes.to(device)
    for c0 in range(0, n, chunk):
        st, sz = starts[c0:c0 + chunk], sizes[c0:c0 + chunk]
        k = st.shape[0]
        valid = (grid < sz[:, None, :]).all(-1)  # (k, m): the window's own offsets
        flat = ((st[:, None, :] + grid.clamp_max(sz[:, None, :] - 1)) * strides).sum(-1)  # (k, m)
        n_valid = valid.sum(1, keepdim=True)
        # targets: the valid slots in row-major order; sources: the valid slots in random order
        dst_slot = torch.where(valid, slot, m + slot).argsort(1)
        keys = torch.rand(k, m, device=device, generator=generator).masked_fill(~valid, 2.0)
        src_slot = keys.argsort(1)
        used = slot[None, :] < n_valid  # (k, m): entry j of window n is used when j < its voxel count
        dst = torch.where(used, flat.gather(1, dst_slot), dummy).reshape(-1)
        src = torch.where(used, flat.gather(1, src_slot), 0).reshape(-1)
        window = torch.where(used, torch.arange(c0, c0 + k, device=device)[:, None], -1).reshape(-1)
        owner = torch.full((dummy + 1,), -1, dtype=torch.long, device=device)
        owner.scatter_reduce_(0, dst, window, reduce="amax")
        # the last window of this chunk covering a voxel writes it; later chunks overwrite earlier ones
        dst = torch.where((owner[dst] == window) & used.reshape(-1), dst, dummy)
        out.scatter_(1, dst.expand(x.shape[0], -1), flat_x[:, src])
    return out[:, :dummy].reshape(x.shape)


# --------------------------------------------------------------------------- non-linear intensity map
def bezier_curve(points: Tensor, n_times: int = 100_000) -> tuple[Tensor, Tensor]:
    """Cubic Bezier curve of the control points ``points`` (4, 2) sampled at ``n_times`` values of t.

    As in the official code, sample ``j`` is at ``t = j / (n_times - 1)`` and ``points[i]`` has the
    Bernstein weight ``C(3, i) t^(3 - i) (1 - t)^i``: the curve runs from ``points[3]`` (t = 0) to
    ``points[0]`` (t = 1). Returns ``(xs, ys)``, each ``(n_times,)`` float64.
    """
    if points.shape != (4, 2):
        raise ValueError(f"bezier_curve: expected 4 control points (4, 2), got {tuple(points.shape)}")
    if n_times < 2:
        raise ValueError(f"bezier_curve: n_times must be >= 2, got {n_times}")
    t = torch.linspace(0.0, 1.0, n_times, dtype=torch.float64)
    basis = torch.stack([t.pow(3), 3 * t.square() * (1 - t), 3 * t * (1 - t).square(), (1 - t).pow(3)])  # (4, T)
    curve = points.to(torch.float64).T @ basis  # (2, T)
    return curve[0], curve[1]


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``numpy.interp`` on torch: piecewise-linear ``fp`` over the non-decreasing knots ``xp``, constant
    beyond them (``fp[0]`` below ``xp[0]``, ``fp[-1]`` above ``xp[-1]``)."""
    xp, fp = xp.to(x.device, torch.float64), fp.to(x.device, torch.float64)
    v = x.to(torch.float64).clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, v.reshape(-1), right=True).clamp(1, xp.numel() - 1).view_as(v)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    dx = x1 - x0
    w = torch.where(dx > 0, (v - x0) / dx.clamp_min(1e-300), torch.zeros_like(v))
    return (y0 + w * (y1 - y0)).to(x.dtype)


def nonlinear_map(x: Tensor, points: Tensor, inverted: bool, n_times: int = 100_000) -> Tensor:
    """Models Genesis' non-linear intensity transformation of ``x`` (values in [0, 1]).

    The Bezier curve of ``points`` (:func:`bezier_curve`) with its x values sorted; its y values
    sorted too (an increasing map with f(0) = 0, f(1) = 1) or, when ``inverted``, kept in curve order
    (a decreasing map with f(0) = 1, f(1) = 0), then ``numpy.interp``-style interpolation.
    """
    xs, ys = bezier_curve(points, n_times)
    xs = xs.sort().values
    if not inverted:
        ys = ys.sort().values
    return interp(x, xs, ys)


# --------------------------------------------------------------------------- painting
def draw_inpaint_boxes(shape: Sequence[int], generator: torch.Generator | None = None, p_next: float = 0.95,
                       max_boxes: int = 5) -> list[Box]:
    """In-painting boxes (official): while fewer than ``max_boxes`` and U < ``p_next``: a box of
    side/6 .. side/3 voxels per axis, starting in [3, side - size - 3]."""
    boxes: list[Box] = []
    while len(boxes) < max_boxes and float(torch.rand(1, generator=generator)) < p_next:
        size = tuple(_randint(s // 6, s // 3, generator) for s in shape)
        start = tuple(_randint(3, s - z - 3, generator) for s, z in zip(shape, size))
        boxes.append((start, size))
    return boxes


def draw_outpaint_boxes(shape: Sequence[int], generator: torch.Generator | None = None, p_next: float = 0.95,
                        max_extra: int = 4) -> list[Box]:
    """Out-painting boxes (official): one box of side - (3/7 .. 4/7) side voxels per axis starting in
    [3, side - size - 3], then up to ``max_extra`` more while U < ``p_next``."""
    def box() -> Box:
        size = tuple(s - _randint(3 * s // 7, 4 * s // 7, generator) for s in shape)
        start = tuple(_randint(3, s - z - 3, generator) for s, z in zip(shape, size))
        return start, size

    boxes = [box()]
    while len(boxes) < 1 + max_extra and float(torch.rand(1, generator=generator)) < p_next:
        boxes.append(box())
    return boxes


def _box_slices(box: Box, shape: Sequence[int]) -> tuple[slice, ...]:
    (start, size) = box
    if any(a < 0 or a + z > s or z < 1 for a, z, s in zip(start, size, shape)):
        raise ValueError(f"box start {start} size {size} does not fit the patch {tuple(shape)}")
    return (slice(None),) + tuple(slice(a, a + z) for a, z in zip(start, size))


def in_paint(x: Tensor, boxes: Sequence[Box], generator: torch.Generator | None = None) -> Tensor:
    """``x`` (C, X, Y, Z) with every box filled with U[0, 1] noise (the same noise for every channel)."""
    _check_sample(x, "in_paint")
    out = x.clone()
    for box in boxes:
        sl = _box_slices(box, x.shape[1:])
        noise = torch.rand(box[1], device=x.device, dtype=x.dtype, generator=generator)
        out[sl] = noise
    return out


def out_paint(x: Tensor, boxes: Sequence[Box], generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1] noise of ``x``'s shape, with the original kept inside the union of ``boxes``."""
    _check_sample(x, "out_paint")
    out = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    for box in boxes:
        sl = _box_slices(box, x.shape[1:])
        out[sl] = x[sl]
    return out


# --------------------------------------------------------------------------- one sample's deformation
@dataclass
class GenesisDraw:
    """Everything random about one sample's deformation except per-voxel noise."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    shuffle: bool = False
    windows: tuple[Tensor, Tensor] | None = None  # (starts, sizes) of the shuffle windows
    nonlinear: bool = False
    points: Tensor = field(default_factory=lambda: torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.5, 0.5], [1.0, 1.0]]))
    inverted: bool = False
    paint: str = "none"  # "none", "in" or "out"
    boxes: list[Box] = field(default_factory=list)


def draw_genesis(shape: Sequence[int], generator: torch.Generator, flip_rate: float = 0.4, local_rate: float = 0.5,
                 nonlinear_rate: float = 0.9, paint_rate: float = 0.9, inpaint_rate: float = 0.2,
                 shuffle_blocks: int = 10_000, shuffle_max_fraction: float = 0.1) -> GenesisDraw:
    """Draw one sample's deformation with the official probabilities (CPU ``generator``).

    Flips: while U < ``flip_rate`` (at most 3 times) flip a random axis; only the parity per axis
    matters. Then shuffling (``local_rate``), the Bezier map (``nonlinear_rate``, inverted half of
    the time) and painting (``paint_rate``; in-painting with ``inpaint_rate``, else out-painting).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"draw_genesis: expected a 3D spatial shape, got {shape}")
    for name, p in (("flip_rate", flip_rate), ("local_rate", local_rate), ("nonlinear_rate", nonlinear_rate),
                    ("paint_rate", paint_rate), ("inpaint_rate", inpaint_rate)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"draw_genesis: {name} must lie in [0, 1], got {p}")
    d = GenesisDraw()
    parity = [False, False, False]
    for _ in range(3):
        if float(torch.rand(1, generator=generator)) >= flip_rate:
            break
        axis = _randint(0, 2, generator)
        parity[axis] = not parity[axis]
    d.flips = (parity[0], parity[1], parity[2])
    if float(torch.rand(1, generator=generator)) < local_rate:
        d.shuffle = True
        d.windows = draw_shuffle_windows(shape, shuffle_blocks, shuffle_max_fraction, generator)
    if float(torch.rand(1, generator=generator)) < nonlinear_rate:
        d.nonlinear = True
        inner = torch.rand(2, 2, generator=generator, dtype=torch.float64)
        d.points = torch.cat([torch.zeros(1, 2, dtype=torch.float64), inner, torch.ones(1, 2, dtype=torch.float64)])
        d.inverted = float(torch.rand(1, generator=generator)) < 0.5
    if float(torch.rand(1, generator=generator)) < paint_rate:
        if float(torch.rand(1, generator=generator)) < inpaint_rate:
            d.paint, d.boxes = "in", draw_inpaint_boxes(shape, generator)
        else:
            d.paint, d.boxes = "out", draw_outpaint_boxes(shape, generator)
    return d


def apply_genesis(x: Tensor, draw: GenesisDraw, generator: torch.Generator | None = None,
                  n_times: int = 100_000) -> tuple[Tensor, Tensor]:
    """Deform the sample ``x`` (C, X, Y, Z; values in [0, 1]) -> ``(input, target)``.

    ``target`` is ``x`` flipped per ``draw.flips``; ``input`` is the target shuffled, mapped and
    painted per ``draw`` (in the official order). ``generator`` (on ``x``'s device) draws the
    per-voxel noise.
    """
    _check_sample(x, "apply_genesis")
    if draw.paint not in PAINT_MODES:
        raise ValueError(f"apply_genesis: paint must be one of {PAINT_MODES}, got {draw.paint!r}")
    target = flip_axes(x, draw.flips)
    y = target
    if draw.shuffle and draw.windows is not None:
        y = local_pixel_shuffle(y, *draw.windows, generator=generator)
    if draw.nonlinear:
        y = nonlinear_map(y, draw.points, draw.inverted, n_times)
    if draw.paint == "in":
        y = in_paint(y, draw.boxes, generator)
    elif draw.paint == "out":
        y = out_paint(y, draw.boxes, generator)
    return y, target
