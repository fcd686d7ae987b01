"""MRI intensity artifacts of the AMAES augmentation, batched on the images' device.

AMAES ("augmentation reversal", papers/amaes.txt Sec. 3 and Appendix B, Table 5) applies spatial
augmentation to the sample, copies it as the reconstruction target, then corrupts the *input* with
these intensity transforms, in this order (the Yucca ``YuccaAugmentationComposer`` order):

1. additive Gaussian noise      ``x + n``, ``n ~ N(0, s^2)`` per voxel            (per channel)
2. Gaussian blur                isotropic ``sigma`` (voxels), scipy ``reflect`` borders (per sample,
                                then per channel)
3. multiplicative Gaussian noise ``x + x * n``                                     (per channel)
4. motion ghosting              every ``r``-th k-space plane along one axis times ``alpha`` (per channel)
5. Gibbs ringing                k-space truncated to a central band along one axis (per channel)
6. simulated low resolution     nearest down-sampling of some axes by ``zoom``, linear up-sampling
                                (per sample, then per channel, then per axis)
7. bias field                   ``x * (1 - sum_a ((t_a - c_a) / N_a)^2)``, random centre (per channel)
8. gamma                        ``((x - min) / range)^gamma * range + min``, optionally on ``-x``
                                (per sample; gamma per channel)

Semantics follow Yucca's transforms (the AMAES code base), with the paper's probabilities. The
paper's Table 5 lists *effective* probabilities: blur 0.1 = 0.2 per sample x 0.5 per channel,
low resolution 0.1 = 0.2 x 0.5 (and 0.33 per axis), gamma inversion 0.01 = 0.2 x 0.05: the
defaults below are Yucca's factors. Deviations, all deliberate:

* Gibbs ringing keeps a *fraction* ``gibbs_keep`` of the axis' k-space lines (Yucca: an absolute
  ``cut_freq`` in {96, ..., 128}, i.e. the fraction 0.75-1.0 of its 128^3 patches; an absolute
  count keeps everything on smaller patches, or — Yucca's negative slice bug — erases most of it);
  the kept count is ``round(fraction * N)`` (Yucca: uniform integers).
* low resolution up-samples (tri)linearly (Yucca: cubic spline; torch has no 3D cubic
  interpolation); the down-sampling is ``nearest-exact`` (centred, as skimage's order 0).

Randomness: :func:`draw_artifact_params` draws every number for ``n`` samples on the CPU in one fixed
layout (28 uniforms per sample and channel, then one seed per sample), whatever the switches;
:func:`artifact_augment` draws for the global batch and keeps rows ``[o, o + B)`` (docs/design.md
"Methods"). The noise fields come from a per-sample generator on the images' device seeded with the
sample's seed. :func:`apply_artifacts` is deterministic given the parameters.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ArtifactConfig:
    """AMAES intensity augmentation of the input (papers/amaes.txt Table 5; Yucca defaults where the
    paper gives no value). Probabilities ``p_*`` are per sample unless named ``*_channel``/``*_axis``;
    ranges are ``(lo, hi)``, drawn uniformly."""

    enabled: bool = True
    p_noise: float = 0.2  # additive Gaussian noise, per channel
    noise_sigma: tuple[float, float] = (1e-4, 1e-3)  # standard deviation (paper "[1e-3, 1e-4]", Yucca's order)
    p_blur: float = 0.2  # Gaussian blur: per sample ...
    p_blur_channel: float = 0.5  # ... then per channel (Yucca default; the paper's 0.1 is the product)
    blur_sigma: tuple[float, float] = (0.0, 1.0)  # voxels, one per sample
    p_mult_noise: float = 0.2  # multiplicative Gaussian noise x + x * n, per channel
    mult_noise_sigma: tuple[float, float] = (1e-4, 1e-3)
    p_ghosting: float = 0.2  # motion ghosting, per channel
    ghosting_alpha: tuple[float, float] = (0.85, 0.95)  # factor on the affected k-space planes
    ghosting_reps: tuple[int, int] = (2, 10)  # every r-th plane, r uniform in [lo, hi] (Yucca randint(2, 11))
    p_gibbs: float = 0.2  # Gibbs ringing, per channel
    gibbs_keep: tuple[float, float] = (0.75, 1.0)  # kept fraction of the axis' k-space (Yucca 96-128 of 128)
    p_low_res: float = 0.2  # simulated low resolution: per sample ...
    p_low_res_channel: float = 0.5  # ... then per channel (Yucca default; the paper's 0.1 is the product)
    p_low_res_axis: float = 0.33  # ... then per axis
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    p_bias: float = 0.33  # quadratic bias field with a random centre voxel, per channel (Yucca)
    p_gamma: float = 0.2  # gamma, per sample (gamma per channel)
    p_gamma_invert: float = 0.05  # gamma of -x (Yucca default; the paper's 0.01 is 0.2 x 0.05)
    gamma_range: tuple[float, float] = (0.5, 2.0)  # below 1 half the time when lo < 1 (batchgenerators)


def check_artifact_config(cfg: ArtifactConfig) -> None:
    """Raise a ValueError naming ``intensity.<field>`` and its value for an invalid setting."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name.startswith("p_"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"intensity.{f.name} must lie in [0, 1], got {value!r}")
        elif f.name != "enabled":
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                    or not value[0] <= value[1]):
                raise ValueError(f"intensity.{f.name} must be (lo, hi) with lo <= hi, got {value!r}")
    bounds = {  # field: (lowest lo, lo inclusive, highest hi)
        "noise_sigma": (0.0, True, math.inf), "mult_noise_sigma": (0.0, True, math.inf),
        "blur_sigma": (0.0, True, math.inf), "ghosting_alpha": (0.0, True, 1.0),
        "gibbs_keep": (0.0, False, 1.0), "low_res_zoom": (0.0, False, 1.0), "gamma_range": (0.0, False, math.inf),
    }
    for name, (lowest, inclusive, highest) in bounds.items():
        lo, hi = getattr(cfg, name)
        if (lo < lowest if inclusive else lo <= lowest) or hi > highest:
            side = "[" if inclusive else "("
            raise ValueError(f"intensity.{name} must lie in {side}{lowest}, {highest}], got {getattr(cfg, name)!r}")
    lo, hi = cfg.ghosting_reps
    if int(lo) != lo or int(hi) != hi or lo < 2:
        raise ValueError(f"intensity.ghosting_reps must be integers >= 2, got {cfg.ghosting_reps!r}")


# --------------------------------------------------------------------------- drawing
N_DRAWS = 28  # uniforms per (sample, channel); the layout is fixed, whatever the switches


def draw_artifact_params(n: int, cfg: ArtifactConfig, generator: torch.Generator | None = None,
                         channels: int = 1) -> dict[str, torch.Tensor]:
    """All random draws of :func:`apply_artifacts` for ``n`` samples of ``channels`` channels, on the CPU.

    ``torch.rand(n, channels, 28)`` then ``torch.randint(2**62, (n,))`` from ``generator`` (None:
    the global torch RNG), in that order for any switches, so that rows ``[o, o + B)`` of a draw for
    ``n`` equal a draw for the global batch sliced. Per-sample coins live in channel 0's draws.

    Returns (``[n, C]`` float64 unless noted; every coin already includes its per-sample coin):
    ``noise`` bool, ``noise_sigma``; ``blur`` bool, ``blur_sigma`` (one per sample); ``mult_noise``
    bool, ``mult_noise_sigma``; ``ghosting`` bool, ``ghosting_alpha``, ``ghosting_reps`` int64,
    ``ghosting_axis`` int64 (0-2); ``gibbs`` bool, ``gibbs_keep`` (fraction), ``gibbs_axis`` int64;
    ``low_res`` bool, ``low_res_zoom``, ``low_res_axes`` bool ``[n, C, 3]``; ``bias`` bool,
    ``bias_centre`` ``[n, C, 3]`` in [0, 1) (voxel ``floor(f * N)``); ``gamma`` bool, ``gamma_value``,
    ``gamma_invert`` bool (one per sample); ``seed`` int64 ``[n]`` (noise fields).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"draw_artifact_params: n must be an int >= 0, got {n!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"draw_artifact_params: channels must be an int >= 1, got {channels!r}")
    check_artifact_config(cfg)
    u = torch.rand(n, channels, N_DRAWS, generator=generator, dtype=torch.float64)
    seed = torch.randint(0, 2**62, (n,), generator=generator)
    per_sample = u[:, :1]  # (n, 1, 28): broadcast over channels

    def pick(col: torch.Tensor, bounds) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * col

    glo, ghi = cfg.gamma_range
    below = (u[..., 26] < 0.5) & (glo < 1)  # batchgenerators: gamma < 1 half of the time
    gamma = torch.where(below, pick(u[..., 27], (glo, min(ghi, 1.0))), pick(u[..., 27], (max(glo, 1.0), ghi)))
    rlo, rhi = int(cfg.ghosting_reps[0]), int(cfg.ghosting_reps[1])
    shape = (n, channels)
    return {
        "noise": u[..., 0] < cfg.p_noise,
        "noise_sigma": pick(u[..., 1], cfg.noise_sigma),
        "blur": (per_sample[..., 2] < cfg.p_blur) & (u[..., 4] < cfg.p_blur_channel),
        "blur_sigma": pick(per_sample[..., 3], cfg.blur_sigma).expand(shape).contiguous(),
        "mult_noise": u[..., 5] < cfg.p_mult_noise,
        "mult_noise_sigma": pick(u[..., 6], cfg.mult_noise_sigma),
        "ghosting": u[..., 7] < cfg.p_ghosting,
        "ghosting_alpha": pick(u[..., 8], cfg.ghosting_alpha),
        "ghosting_reps": (rlo + (u[..., 9] * (rhi - rlo + 1)).floor()).clamp(max=rhi).long(),
        "ghosting_axis": (u[..., 10] * 3).floor().clamp(max=2).long(),
        "gibbs": u[..., 11] < cfg.p_gibbs,
        "gibbs_keep": pick(u[..., 12], cfg.gibbs_keep),
        "gibbs_axis": (u[..., 13] * 3).floor().clamp(max=2).long(),
        "low_res": (per_sample[..., 14] < cfg.p_low_res) & (u[..., 15] < cfg.p_low_res_channel),
        "low_res_zoom": pick(u[..., 16], cfg.low_res_zoom),
        "low_res_axes": u[..., 17:20] < cfg.p_low_res_axis,
        "bias": u[..., 20] < cfg.p_bias,
        "bias_centre": u[..., 21:24].clone(),
        "gamma": (per_sample[..., 24] < cfg.p_gamma).expand(shape).contiguous(),
        "gamma_invert": (per_sample[..., 25] < cfg.p_gamma_invert).expand(shape).contiguous(),
        "gamma_value": gamma,
        "seed": seed,
    }


# --------------------------------------------------------------------------- the transforms
def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on both sides with scipy's ``reflect`` mode
    (``d c b a | a b c d | d c b a``, repeated for pads longer than the axis)."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur_rows(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 4.0) -> torch.Tensor:
    """Isotropic Gaussian blur of R volumes ``(R, X, Y, Z)``, one ``sigma`` (voxels, ``(R,)``) each.

    Equals ``scipy.ndimage.gaussian_filter(volume, sigma)`` (``mode="reflect"``, kernel radius
    ``int(truncate * sigma + 0.5)``, normalised), as Yucca's blur: separable, every row at once
    (shifted weighted sums with per-row taps, zero beyond a row's own radius).
    """
    if x.ndim != 4 or sigma.shape != (x.shape[0],):
        raise ValueError(f"gaussian_blur_rows: x must be (R, X, Y, Z) with sigma (R,), got {tuple(x.shape)}, "
                         f"{tuple(sigma.shape)}")
    sig = sigma.detach().to("cpu", torch.float64)
    radius = torch.floor(truncate * sig + 0.5).clamp(min=0)
    rmax = int(radius.max().item()) if sig.numel() else 0
    if rmax == 0:
        return x
    taps = torch.arange(-rmax, rmax + 1, dtype=torch.float64)[None]
    w = torch.exp(-0.5 * (taps / sig.clamp(min=1e-12)[:, None]) ** 2) * (taps.abs() <= radius[:, None])
    w = (w / w.sum(1, keepdim=True)).to(device=x.device, dtype=x.dtype)
    out = x
    for axis in (1, 2, 3):
        n = out.shape[axis]
        padded = out.index_select(axis, _reflect_index(n, rmax, out.device))
        acc = torch.zeros_like(out)
        for t in range(2 * rmax + 1):
            acc += w[:, t].view(-1, 1, 1, 1) * padded.narrow(axis, t, n)
        out = acc
    return out


def _axis_masks(shape: tuple[int, int, int], axis: torch.Tensor, masks_1d: list[torch.Tensor]) -> torch.Tensor:
    """Per-row 3D multiplier (R, X, Y, Z) that is ``masks_1d[a]`` (R, N_a) along the row's ``axis``
    and 1 along the others."""
    r = axis.shape[0]
    out = None
    for a in range(3):
        m = torch.where((axis == a)[:, None], masks_1d[a], torch.ones_like(masks_1d[a]))
        view = [r, 1, 1, 1]
        view[1 + a] = shape[a]
        out = m.view(view) if out is None else out * m.view(view)
    return out


def motion_ghosting_rows(x: torch.Tensor, alpha: torch.Tensor, reps: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Yucca's motion ghosting of R volumes ``(R, X, Y, Z)``: shift to a non-negative minimum, scale the
    k-space planes ``0, r, 2r, ...`` (all but the last index, unshifted ``fftn``) along ``axis`` by
    ``alpha``, back, magnitude, shift back. ``alpha``/``reps``/``axis``: ``(R,)``."""
    shape = tuple(x.shape[1:])
    dev = x.device
    masks = []
    for a in range(3):
        idx = torch.arange(shape[a], device=dev)[None]
        planes = (idx % reps.to(dev)[:, None] == 0) & (idx < shape[a] - 1)
        masks.append(torch.where(planes, alpha.to(dev, x.dtype)[:, None], torch.ones((), device=dev, dtype=x.dtype)))
    return _kspace_filter(x, _axis_masks(shape, axis.to(dev), masks))


def gibbs_ringing_rows(x: torch.Tensor, keep: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Yucca's Gibbs ringing of R volumes ``(R, X, Y, Z)``: shift to a non-negative minimum, keep the
    central ``[ceil(N/2) - ceil(k/2), ceil(N/2) + ceil(k/2))`` lines of the ``fftshift``-ed k-space
    along ``axis`` (``k = round(keep * N)``), back, magnitude, shift back. ``keep``/``axis``: ``(R,)``."""
    shape = tuple(x.shape[1:])
    dev = x.device
    masks = []
    for a in range(3):
        n = shape[a]
        k = torch.round(keep.detach().to("cpu", torch.float64) * n).clamp(1, n)
        half_k = torch.ceil(k / 2)
        lo = (math.ceil(n / 2) - half_k).clamp(min=0)
        hi = (math.ceil(n / 2) + half_k).clamp(max=n)
        idx = torch.arange(n, dtype=torch.float64)[None]
        shifted = (idx >= lo[:, None]) & (idx < hi[:, None])  # in fftshift order
        masks.append(torch.fft.ifftshift(shifted, dim=1).to(device=dev, dtype=x.dtype))
    return _kspace_filter(x, _axis_masks(shape, axis.to(dev), masks))


def _kspace_filter(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``|ifftn(fftn(x + m) * mask)| - m`` per row with ``m = |min(0, min(x))|`` (Yucca's recipe)."""
    shift = x.amin(dim=(1, 2, 3)).clamp(max=0).abs().view(-1, 1, 1, 1)
    spectrum = torch.fft.fftn(x + shift, dim=(1, 2, 3)) * mask
    return torch.fft.ifftn(spectrum, dim=(1, 2, 3)).abs().to(x.dtype) - shift


_LOWRES_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def _lowres_matrix(n: int, small: int) -> torch.Tensor:
    """(n, n) float64 matrix of 1D ``nearest-exact`` down-sampling to ``small`` then ``linear``
    (``align_corners=False``) up-sampling to ``n``: ``F.interpolate`` applied to unit impulses."""
    key = (n, small)
    if key not in _LOWRES_CACHE:
        eye = torch.eye(n, dtype=torch.float64)[:, None, :]  # n impulses of length n
        low = F.interpolate(eye, size=small, mode="nearest-exact")
        up = F.interpolate(low, size=n, mode="linear", align_corners=False)[:, 0, :]  # row j: response to e_j
        _LOWRES_CACHE[key] = up.T.contiguous()
    return _LOWRES_CACHE[key]


def simulate_low_res_rows(x: torch.Tensor, zoom: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Simulated low resolution of R volumes ``(R, X, Y, Z)``: the axes selected in ``axes`` (R, 3)
    are down-sampled (``nearest-exact``) to ``max(1, round(N * zoom))`` voxels and up-sampled back
    linearly, as ``F.interpolate`` would in 3D (it is separable): one ``(N, N)`` matrix per row and
    axis, applied with batched matrix products."""
    shape = tuple(x.shape[1:])
    out = x
    for a in range(3):
        n = shape[a]
        mats = []
        for z, on in zip(zoom.tolist(), axes[:, a].tolist()):
            small = max(1, int(round(n * z))) if on else n
            mats.append(_lowres_matrix(n, small) if small != n else torch.eye(n, dtype=torch.float64))
        m = torch.stack(mats).to(device=x.device, dtype=x.dtype)
        if a == 0:
            out = torch.einsum("rij,rjyz->riyz", m, out)
        elif a == 1:
            out = torch.einsum("rij,rxjz->rxiz", m, out)
        else:
            out = torch.einsum("rij,rxyj->rxyi", m, out)
    return out


def bias_field_rows(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Yucca's bias field on R volumes ``(R, X, Y, Z)``: ``x * (1 - sum_a ((t_a - c_a) / N_a)^2)`` with
    ``t_a = 0 .. N_a - 1`` and centre voxel ``c_a = floor(centre_a * N_a)`` (``centre``: (R, 3) in
    [0, 1)). The field is 1 at the centre and may turn negative far from it (as in Yucca)."""
    shape = tuple(x.shape[1:])
    field = torch.ones((), device=x.device, dtype=x.dtype)
    for a in range(3):
        n = shape[a]
        c = torch.floor(centre[:, a].detach().to("cpu", torch.float64) * n).clamp(max=n - 1)
        t = torch.arange(n, dtype=torch.float64)[None]
        term = (((t - c[:, None]) / n) ** 2).to(device=x.device, dtype=x.dtype)
        view = [-1, 1, 1, 1]
        view[1 + a] = n
        field = field - term.view(view)
    return x * field


def gamma_rows(x: torch.Tensor, gamma: torch.Tensor, invert: torch.Tensor, epsilon: float = 1e-7) -> torch.Tensor:
    """batchgenerators/Yucca gamma of R volumes ``(R, X, Y, Z)`` (per channel):
    ``((x - min) / (range + eps))^gamma * (range + eps) + min``, computed on ``-x`` (and negated
    back) where ``invert``. ``gamma``/``invert``: ``(R,)``."""
    sign = torch.where(invert.to(x.device), -1.0, 1.0).to(x.dtype).view(-1, 1, 1, 1)
    y = x * sign
    lo = y.amin(dim=(1, 2, 3), keepdim=True)
    span = y.amax(dim=(1, 2, 3), keepdim=True) - lo + epsilon
    g = gamma.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return (((y - lo) / span).clamp(min=0) ** g * span + lo) * sign


def apply_artifacts(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the artifacts of :func:`draw_artifact_params` (one row per sample) to ``(B, C, X, Y, Z)``.

    The transforms run in the paper's order (module docstring), each on the (sample, channel)
    volumes it selects, batched; the others are untouched. Computation is in float32 (float64 for
    float64 input) on the images' device; the result has the input's dtype and device.
    """
    if images.ndim != 5:
        raise ValueError(f"apply_artifacts: images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    b, c = images.shape[:2]
    if tuple(params["noise"].shape) != (b, c):
        raise ValueError(f"apply_artifacts: parameters for {tuple(params['noise'].shape)} (samples, channels), "
                         f"images have {(b, c)}")
    dev = images.device
    work = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32).clone()
    vol = work.view(b * c, *images.shape[2:])  # one row per (sample, channel)

    def rows(key: str) -> torch.Tensor:
        return torch.nonzero(params[key].reshape(-1)).flatten()

    def flat(key: str) -> torch.Tensor:
        v = params[key]
        return v.reshape(b * c, *v.shape[2:])

    # 1-3: noise (fields from a per-sample generator on the device), blur, multiplicative noise
    add, mult = params["noise"], params["mult_noise"]
    fields: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for i in range(b):
        if bool(add[i].any()) or bool(mult[i].any()):
            gen = torch.Generator(device=dev).manual_seed(int(params["seed"][i]))
            n_add = torch.randn(work.shape[1:], generator=gen, device=dev, dtype=work.dtype)
            n_mult = torch.randn(work.shape[1:], generator=gen, device=dev, dtype=work.dtype)
            fields[i] = (n_add, n_mult)
    for i, (n_add, _) in fields.items():
        s = torch.where(add[i], params["noise_sigma"][i], 0.0).to(dev, work.dtype).view(-1, 1, 1, 1)
        work[i] += s * n_add
    sel = rows("blur")
    if sel.numel():
        vol[sel.to(dev)] = gaussian_blur_rows(vol[sel.to(dev)], flat("blur_sigma")[sel])
    for i, (_, n_mult) in fields.items():
        s = torch.where(mult[i], params["mult_noise_sigma"][i], 0.0).to(dev, work.dtype).view(-1, 1, 1, 1)
        work[i] += work[i] * (s * n_mult)
    # 4-5: k-space artifacts
    sel = rows("ghosting")
    if sel.numel():
        d = sel.to(dev)
        vol[d] = motion_ghosting_rows(vol[d], flat("ghosting_alpha")[sel], flat("ghosting_reps")[sel],
                                      flat("ghosting_axis")[sel])
    sel = rows("gibbs")
    if sel.numel():
        d = sel.to(dev)
        vol[d] = gibbs_ringing_rows(vol[d], flat("gibbs_keep")[sel], flat("gibbs_axis")[sel])
    # 6-8: low resolution, bias field, gamma
    sel = rows("low_res")
    if sel.numel():
        d = sel.to(dev)
        vol[d] = simulate_low_res_rows(vol[d], flat("low_res_zoom")[sel], flat("low_res_axes")[sel])
    sel = rows("bias")
    if sel.numel():
        d = sel.to(dev)
        vol[d] = bias_field_rows(vol[d], flat("bias_centre")[sel])
    sel = rows("gamma")
    if sel.numel():
        d = sel.to(dev)
        vol[d] = gamma_rows(vol[d], flat("gamma_value")[sel], flat("gamma_invert")[sel])
    return work.to(images.dtype)


def artifact_augment(images: torch.Tensor, cfg: ArtifactConfig, generator: torch.Generator | None = None,
                     sample_offset: int = 0, global_batch: int | None = None) -> torch.Tensor:
    """AMAES intensity artifacts for a (local) batch ``(B, C, X, Y, Z)`` that is rows
    ``[sample_offset, sample_offset + B)`` of a global batch of ``global_batch`` samples (default: B).

    Draws :func:`draw_artifact_params` for the global batch from ``generator`` (a CPU generator;
    None: the global torch RNG), keeps this batch's rows and applies them (:func:`apply_artifacts`).
    Returns ``images`` itself when ``cfg.enabled`` is False, else a new tensor of the same dtype and
    device.
    """
    if not cfg.enabled:
        return images
    if images.ndim != 5:
        raise ValueError(f"artifact_augment: images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
    b, c = images.shape[:2]
    total = b if global_batch is None else int(global_batch)
    if sample_offset < 0 or sample_offset + b > total:
        raise ValueError(f"artifact_augment: rows [{sample_offset}, {sample_offset + b}) outside a global batch "
                         f"of {total}")
    params = draw_artifact_params(total, cfg, generator, channels=c)
    params = {k: v[sample_offset:sample_offset + b] for k, v in params.items()}
    return apply_artifacts(images, params)
