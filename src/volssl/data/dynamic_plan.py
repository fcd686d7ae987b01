"""nnU-Net-style dynamic plan ("No (Dyn.)"): preprocessing, network depth and patch size per dataset,
computed from its fingerprint (:mod:`volssl.data.fingerprint`).

:func:`dynamic_plan` returns a :class:`DynamicPlan`: a :class:`~volssl.data.preprocess.PreprocessPlan`
named "dynamic", the ``ModelConfig`` overrides (``features``, ``blocks``, ``strides``: the first
stages of the base architecture), the training patch size and ``info`` (every intermediate value).

Where it follows nnU-Net v2 (ExperimentPlanner / ResEncUNetPlanner):

* target spacing: the per-axis median of the cases' spacings; when the worst axis is anisotropic
  (its median spacing > 3x the largest other one *and* its median size after cropping x 3 < the
  smallest other one), that axis gets the 10th percentile of its spacings instead, but never less
  than the largest other spacing (+1e-5);
* median shape: the median over cases of the shape after cropping, resampled to the target spacing;
* patch: start from a patch with the aspect ratio of ``1 / spacing`` and the volume of 256^3, clip
  it to the median shape, choose the number of poolings so that the bottleneck feature map is >= 4
  voxels, pad the patch up to a multiple of ``2^poolings``, then while the estimated memory exceeds
  the budget shrink the axis that is largest relative to the median shape by one multiple
  (recomputing the poolings);
* memory estimate: nnU-Net's ``compute_conv_feature_map_size`` count for a ResEnc U-Net, i.e. the
  number of output elements of every convolution for one sample::

      E(patch) = C0 * V0                                   (stem)
               + sum_s [ 2 * b_s * C_s * V_s + C_s * V_s * [s has a projection skip] ]   (encoder blocks)
               + sum_{s >= 1} [ 2 * C_{s-1} * V_{s-1} + K * V_{s-1} ]                  (decoder: transposed
                                                                     conv + conv block + segmentation head)

  with ``C_s`` the width, ``b_s`` the blocks and ``V_s`` the voxels of stage ``s`` (``V_s = prod(patch) /
  8^s``) and ``K`` the classes; the budget is nnU-Net's ResEnc-L reference, ``2.1e9`` elements for
  24 GB at batch 2, i.e. ``E <= 2.1e9 * memory_budget_gb / 24`` (:data:`REFERENCE_ELEMENTS_PER_GB`);
* depth: as many stages as poolings + 1, widths and blocks the base architecture's first ones
  (resenc-l: 32, 64, 128, 256, 320, 320 and 1, 3, 4, 6, 6, 6), at most its stage count;
* normalisation per channel from dataset.json ``channel_names``: "CT" -> clip to the foreground
  percentiles 0.5 / 99.5 of the whole dataset and z-score with its foreground mean and std
  ("ct"); anything else -> per-case z-score, inside the nonzero mask ("zscore_nonzero") when
  cropping to the nonzero box shrinks the median case below 3/4 of its size, else over the whole
  volume ("zscore");
* resampling: cubic images, labels as per-class linear maps + argmax ("linear"; "nearest" for
  instance labels), the low-resolution axis separately (order 0) beyond an anisotropy of 3;
* batch size (recorded in ``info`` only): ``round(budget / E * 2)``, at least 2, at most the
  number of patches that cover the dataset once (ResEnc planners).

Where it simplifies:

* isotropic poolings: our ResEnc U-Net (:mod:`volssl.models.resenc_unet`) takes one stride per
  stage and 3^3 kernels for every axis, so the number of poolings is the same for all axes,
  limited by the shortest patch axis (nnU-Net pools each axis separately, stops pooling an axis
  whose spacing is > 2x the finest, and uses 1x3x3 kernels there); the patch is padded to a multiple
  of ``2^poolings`` on every axis;
* no axis transposition (nnU-Net puts the low-resolution axis first), no 2D / 3D low-res /
  cascade configurations (one 3D full-resolution configuration);
* the shrinking step is one multiple of the current ``2^poolings`` (nnU-Net recomputes the
  divisor before subtracting, which can keep some intermediate sizes);
* the batch size of the recipe is kept (nnU-Net's is only recorded), and the training schedule is
  the recipe's;
* mixed CT / non-CT channels: the non-CT ones get a whole-volume z-score in "ct" mode;
* fingerprint intensities: 10^6 foreground samples by default (nnU-Net: 10^8), a case without
  foreground contributes its nonzero voxels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from volssl.data.fingerprint import STRUCTURAL_RULES
from volssl.data.preprocess import PreprocessPlan

#: nnU-Net's ResEnc-L planner: 2.1e9 feature-map elements correspond to 24 GB at batch 2
REFERENCE_ELEMENTS_PER_GB = 2.1e9 / 24.0
REFERENCE_BATCH = 2
DEFAULT_MEMORY_GB = 24.0
MIN_FEATURE_MAP = 4
INITIAL_PATCH_VOXELS = 256**3
ANISOTROPY_THRESHOLD = 3.0
#: relative size after cropping below which MR channels are normalised inside the nonzero mask
MASK_FOR_NORM_BELOW = 0.75
#: the CPU-sized (-tiny) limits: a 64^3 patch at most and a small budget (resenc-tiny: ~13M elements at 64^3)
TINY_MEMORY_GB = 0.15
TINY_MAX_PATCH = 64


@dataclass(frozen=True)
class ArchWidths:
    """The base architecture a dynamic plan takes its stages from (resolved by the caller, e.g.
    ``ArchWidths("resenc-l", *volssl.models.registry.resolve_widths(ModelConfig("resenc-l")))``).

    ``strides`` must be 1 for the first stage and 2 for the others (isotropic poolings).
    """

    name: str
    features: tuple[int, ...]
    blocks: tuple[int, ...]
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.features)
        if n < 2 or len(self.blocks) != n or len(self.strides) != n:
            raise ValueError(f"ArchWidths {self.name!r}: features, blocks and strides need one entry per stage "
                             f"(>= 2 stages), got {self.features}, {self.blocks}, {self.strides}")
        if int(self.strides[0]) != 1 or any(int(s) != 2 for s in self.strides[1:]):
            raise ValueError(f"ArchWidths {self.name!r}: the dynamic planner needs strides (1, 2, 2, ...), got "
                             f"{tuple(self.strides)}")

    @property
    def max_poolings(self) -> int:
        return len(self.strides) - 1


class DynamicPlan(NamedTuple):
    """A dataset's plan: preprocessing, ``ModelConfig`` overrides, patch (x, y, z voxels), details."""

    plan: PreprocessPlan
    model: dict[str, tuple[int, ...]]
    patch_size: tuple[int, int, int]
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``plan.json`` of a run)."""
        return {"plan": self.plan.to_dict(), "model": {k: list(v) for k, v in self.model.items()},
                "patch_size": list(self.patch_size), "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DynamicPlan":
        return cls(PreprocessPlan.from_dict(d["plan"]), {k: tuple(int(x) for x in v) for k, v in d["model"].items()},
                   tuple(int(p) for p in d["patch_size"]), dict(d.get("info") or {}))


# ---------------------------------------------------------------------------------------------- pieces
def target_spacing(spacings: np.ndarray, shapes_after_crop: np.ndarray,
                   threshold: float = ANISOTROPY_THRESHOLD) -> tuple[np.ndarray, int | None]:
    """nnU-Net's full-resolution target spacing of cases with ``spacings`` (N, 3) mm and
    ``shapes_after_crop`` (N, 3) voxels; returns (spacing (3,), the anisotropic axis or None)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    sizes = np.asarray(shapes_after_crop, dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or spacings.shape != sizes.shape or len(spacings) == 0:
        raise ValueError(f"target_spacing: spacings and shapes must be (N, 3) with N >= 1, got {spacings.shape} and "
                         f"{sizes.shape}")
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(sizes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > threshold * max(target[a] for a in others)
    aniso_voxels = size[worst] * threshold < min(size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(spacings[:, worst], 10))
        largest_other = max(target[a] for a in others)
        target[worst] = low if low >= largest_other else largest_other + 1e-5
        return target, worst
    return target, None


def poolings_for(patch: Sequence[int], max_poolings: int) -> int:
    """Isotropic poolings that keep every axis of ``patch`` >= :data:`MIN_FEATURE_MAP` voxels at the
    bottleneck (at least 1, at most ``max_poolings``)."""
    n = min(int(math.floor(math.log2(max(p, 1) / MIN_FEATURE_MAP))) for p in patch)
    return int(min(max(n, 1), max_poolings))


def feature_map_elements(patch: Sequence[int], features: Sequence[int], blocks: Sequence[int],
                         strides: Sequence[int], out_channels: int) -> int:
    """Output elements of every convolution of a ResEnc U-Net for one sample (module docstring
    formula; nnU-Net's ``compute_conv_feature_map_size``), with deep supervision heads."""
    size = np.asarray(patch, dtype=np.int64)
    total = int(features[0]) * int(np.prod(size))
    cin, voxels = int(features[0]), []
    for f, b, s in zip(features, blocks, strides):
        size = size // int(s)
        v = int(np.prod(size))
        voxels.append(v)
        total += 2 * int(b) * int(f) * v + (int(f) * v if (int(s) != 1 or cin != int(f)) else 0)
        cin = int(f)
    for s in range(len(features) - 1, 0, -1):
        total += 2 * int(features[s - 1]) * voxels[s - 1] + int(out_channels) * voxels[s - 1]
    return int(total)


def normalisation(fingerprint: Mapping[str, Any]) -> tuple[str, list[dict[str, float] | None] | None]:
    """(normalization scheme, ct_intensities) of the plan (module docstring)."""
    modalities = list(fingerprint["modalities"])
    props = list(fingerprint["foreground_intensity_properties_per_channel"])
    if "CT" in modalities:
        ct = []
        for name, modality, p in zip(fingerprint["channel_names"], modalities, props):
            if modality != "CT":
                ct.append(None)
                continue
            if not p.get("n_samples"):
                raise ValueError(f"channel {name!r} is CT but the fingerprint holds no foreground intensities for it")
            ct.append({k: float(p[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")})
        return "ct", ct
    if float(fingerprint["median_relative_size_after_cropping"]) < MASK_FOR_NORM_BELOW:
        return "zscore_nonzero", None
    return "zscore", None


def _patch_cap(max_patch: int | Sequence[int] | None) -> np.ndarray | None:
    """``max_patch`` as a (3,) int64 array (voxels per axis), None for no limit; ValueError when too small."""
    if max_patch is None:
        return None
    cap = np.broadcast_to(np.asarray(max_patch, dtype=np.int64), (3,)).copy()
    if np.any(cap < 2 * MIN_FEATURE_MAP):
        raise ValueError(f"max_patch must be >= {2 * MIN_FEATURE_MAP} voxels per axis, got {max_patch}")
    return cap


def _initial_patch(spacing: np.ndarray, median_shape: np.ndarray, cap: np.ndarray | None) -> np.ndarray:
    """The starting patch (3,) int64 voxels: aspect ratio ``1 / spacing`` (mm), volume 256^3, clipped to
    the median shape and ``cap``, at least ``2 * MIN_FEATURE_MAP`` per axis."""
    tmp = 1.0 / spacing
    patch = np.rint(tmp * (INITIAL_PATCH_VOXELS / np.prod(tmp)) ** (1.0 / 3.0)).astype(np.int64)
    initial = np.minimum(patch, median_shape).astype(np.int64)
    if cap is not None:
        initial = np.minimum(initial, cap)
    return np.maximum(initial, 2 * MIN_FEATURE_MAP)


def _topology(patch: np.ndarray, arch: ArchWidths, cap: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(patch padded up to a multiple of ``2^n`` and kept within ``cap``, poolings ``n``) for a (3,) patch."""
    n = poolings_for(patch, arch.max_poolings)
    div = 2**n
    patch = -(-patch // div) * div  # pad up to a multiple of 2^n (nnU-Net)
    if cap is not None:
        patch = np.where(patch > cap, (cap // div) * div, patch)
    return patch, n


def _estimate(patch: np.ndarray, n: int, arch: ArchWidths, n_classes: int) -> int:
    """Feature-map elements of the first ``n + 1`` stages of ``arch`` for one sample of ``patch``."""
    return feature_map_elements(patch, arch.features[: n + 1], arch.blocks[: n + 1], arch.strides[: n + 1],
                                n_classes)


def _fit_patch(initial: np.ndarray, median_shape: np.ndarray, arch: ArchWidths, cap: np.ndarray | None,
               n_classes: int, budget: float) -> tuple[np.ndarray, int, int, int]:
    """Shrink ``initial`` (3,) until its estimate fits ``budget`` elements (module docstring).

    Returns:
        (patch (3,) int64 voxels, poolings, estimated elements, shrink steps taken).
    """
    patch, n = _topology(initial.copy(), arch, cap)
    est = _estimate(patch, n, arch, n_classes)
    shrinks = 0
    while est > budget:
        div = 2**n
        order = np.argsort(patch / median_shape)[::-1]  # the axis largest relative to the median shape first
        axis = next((int(a) for a in order if patch[a] - div >= 2 * MIN_FEATURE_MAP), None)
        if axis is None:
            break
        patch[axis] -= div
        patch, n = _topology(patch, arch, cap)
        est = _estimate(patch, n, arch, n_classes)
        shrinks += 1
    return patch, n, est, shrinks


# ---------------------------------------------------------------------------------------------- the plan
def dynamic_plan(
    fingerprint: Mapping[str, Any],
    arch: ArchWidths,
    memory_budget_gb: float = DEFAULT_MEMORY_GB,
    max_patch: int | Sequence[int] | None = None,
) -> DynamicPlan:
    """The nnU-Net-style plan of the dataset described by ``fingerprint`` (module docstring).

    Args:
        fingerprint: :func:`volssl.data.fingerprint.dataset_fingerprint` of the training cases.
        arch: the base architecture (its widths, blocks and stage count).
        memory_budget_gb: GPU memory the patch may use (nnU-Net ResEnc-L: 24 GB; -tiny:
            :data:`TINY_MEMORY_GB`).
        max_patch: largest patch per axis (one number or three; -tiny: :data:`TINY_MAX_PATCH`), None:
            no limit besides the median shape and the budget.

    Returns:
        a :class:`DynamicPlan`.
    """
    if not memory_budget_gb > 0:
        raise ValueError(f"memory_budget_gb must be > 0, got {memory_budget_gb}")
    cap = _patch_cap(max_patch)
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    spacing, aniso_axis = target_spacing(spacings, shapes)
    resampled = np.maximum(1, np.rint(shapes * spacings / spacing))
    median_shape = np.median(resampled, axis=0)
    labels = fingerprint.get("labels") or {}
    n_classes = max(2, len(labels))
    in_channels = len(fingerprint["channel_names"])

    initial = _initial_patch(spacing, median_shape, cap)
    budget = REFERENCE_ELEMENTS_PER_GB * float(memory_budget_gb)
    patch, n, est, shrinks = _fit_patch(initial, median_shape, arch, cap, n_classes, budget)
    fits = bool(est <= budget)

    normalization, ct = normalisation(fingerprint)
    instance = bool(fingerprint.get("instance_labels", False))
    plan = PreprocessPlan(
        name="dynamic", target_spacing=tuple(float(s) for s in spacing), clip_percentiles=None,
        normalization=normalization, crop_nonzero=True, anisotropy_threshold=ANISOTROPY_THRESHOLD,
        label_interpolation="nearest" if instance else "linear", rules=STRUCTURAL_RULES, ct_intensities=ct,
    )
    model = {"features": tuple(int(f) for f in arch.features[: n + 1]),
             "blocks": tuple(int(b) for b in arch.blocks[: n + 1]),
             "strides": tuple(int(s) for s in arch.strides[: n + 1])}
    n_voxels = float(np.prod(median_shape)) * int(fingerprint.get("n_cases", len(spacings)))
    batch = max(min(int(round(budget / est * REFERENCE_BATCH)), int(round(n_voxels / float(np.prod(patch))))),
                REFERENCE_BATCH)
    info = {
        "base_arch": arch.name,
        "memory_budget_gb": float(memory_budget_gb),
        "max_patch": [int(c) for c in cap] if cap is not None else None,
        "median_spacing": [float(s) for s in np.median(spacings, axis=0)],
        "target_spacing": [float(s) for s in spacing],
        "anisotropic_axis": aniso_axis,
        "median_shape": [float(s) for s in median_shape],
        "initial_patch": [int(p) for p in initial],
        "poolings": int(n),
        "stages": int(n) + 1,
        "bottleneck": [int(p) // 2**n for p in patch],
        "feature_map_elements": int(est),
        "budget_elements": float(budget),
        "fits_budget": fits,
        "shrink_steps": shrinks,
        "batch_size_nnunet": int(batch),
        "in_channels": in_channels,
        "classes": n_classes,
        "modalities": list(fingerprint["modalities"]),
        "normalization": normalization,
        "estimate": "E = sum of conv output elements per sample (nnU-Net compute_conv_feature_map_size); "
                    f"budget = {REFERENCE_ELEMENTS_PER_GB:.4g} * memory_budget_gb",
    }
    return DynamicPlan(plan, model, (int(patch[0]), int(patch[1]), int(patch[2])), info)
