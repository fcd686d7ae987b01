"""``volssl bench augment``: the AMAES augmentation, batched on the device vs per-sample MONAI/TorchIO.

Both sides augment the same random z-scored patches with the AMAES pipeline (papers/amaes.txt,
Table 5) and the paper's probabilities (``--always``: every transform on every sample, a fixed
worst-case workload):

* batched (ours): :func:`volssl.training.augment.spatial_augment` (elastic p .33 alpha 200-600
  sigma 20-30, rotation p .2 +-30 deg, scaling p .2 0.9-1.1: one ``grid_sample``) then
  :func:`volssl.data.intensity_artifacts.artifact_augment` on the whole ``(B, 1, S, S, S)`` batch on
  ``--device``;
* per sample: what a data-loader worker would run on each ``(1, S, S, S)`` CPU tensor — MONAI
  ``Rand3DElastic`` (same alpha/sigma semantics; MONAI truncates its Gaussian at 3 sigma),
  ``RandAffine`` (rotation and scaling, p .36 = 1 - .8 x .8), ``RandGaussianNoise``,
  ``RandGaussianSmooth``, multiplicative noise (``RandLambda``), TorchIO ``RandomGhosting``, MONAI
  ``RandGibbsNoise``, ``RandSimulateLowResolution``, ``RandBiasField``, ``RandAdjustContrast``.

Throughput is samples per second over ``--repeats`` batches (after ``--warmup``), the two sides
interleaved so that load from other processes hits both alike; ``ratio`` = batched / per-sample.
The per-sample side is one worker: ``W`` loader workers on free cores would multiply its rate by
up to ``W`` (and take those cores from the training process).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2, help="samples per batch (default: 2; the paper: 16)")
    parser.add_argument("--size", type=int, default=64, help="cubic patch side in voxels (default: 64; the paper: 128)")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches of each side (default: 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches of each side first (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", default="cpu", help="device of the batched side: cpu, cuda, cuda:N or auto")
    parser.add_argument("--always", action="store_true", help="apply every transform to every sample")
    parser.add_argument("--no-elastic", action="store_true",
                        help="leave the elastic deformation out on both sides (MONAI's dominates per-sample time)")
    parser.add_argument("--seed", type=int, default=0)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"bench augment: device {name!r} requested but CUDA is not available")
    return name


def amaes_configs(always: bool = False, elastic: bool = True):
    """(AugmentConfig, ArtifactConfig) of the AMAES pre-training augmentation (every p = 1 if ``always``;
    no elastic deformation unless ``elastic``)."""
    import dataclasses

    from volssl.config import AugmentConfig
    from volssl.data.intensity_artifacts import ArtifactConfig

    spatial = AugmentConfig(enabled=True, p_rotation=0.2, rotation_deg=30.0, p_scale=0.2, scale_range=(0.9, 1.1),
                            p_mirror=0.0, p_elastic=0.33, elastic_alpha=(200.0, 600.0), elastic_sigma=(20.0, 30.0))
    artifacts = ArtifactConfig()
    if always:
        spatial = dataclasses.replace(spatial, p_rotation=1.0, p_scale=1.0, p_elastic=1.0)
        artifacts = dataclasses.replace(artifacts, **{f.name: 1.0 for f in dataclasses.fields(artifacts)
                                                      if f.name.startswith("p_") and f.name != "p_gamma_invert"})
    if not elastic:
        spatial = dataclasses.replace(spatial, p_elastic=0.0)
    return spatial, artifacts


def per_sample_pipeline(always: bool = False, seed: int = 0, elastic: bool = True) -> Callable:
    """The AMAES augmentation as MONAI/TorchIO per-sample transforms: ``(1, S, S, S)`` -> same shape."""
    import numpy as np
    import torch
    import torchio as tio
    from monai.transforms import (
        Compose,
        Rand3DElastic,
        RandAdjustContrast,
        RandAffine,
        RandBiasField,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandGibbsNoise,
        RandLambda,
        RandSimulateLowResolution,
    )

    def p(value: float) -> float:
        return 1.0 if always else value

    rng = np.random.default_rng(seed)

    def mult_noise(x):
        sigma = rng.uniform(1e-4, 1e-3)
        return x + x * torch.as_tensor(rng.normal(0.0, sigma, tuple(x.shape)), dtype=x.dtype)

    monai_spatial_intensity = Compose([
        Rand3DElastic(sigma_range=(20.0, 30.0), magnitude_range=(200.0, 600.0), prob=p(0.33) if elastic else 0.0,
                      padding_mode="zeros"),
        RandAffine(prob=p(1 - 0.8 * 0.8), rotate_range=(math.pi / 6,) * 3, scale_range=(0.1,) * 3,
                   padding_mode="zeros"),
        RandGaussianNoise(prob=p(0.2), std=1e-3),
        RandGaussianSmooth(sigma_x=(0.01, 1.0), sigma_y=(0.01, 1.0), sigma_z=(0.01, 1.0), prob=p(0.1)),
        RandLambda(func=mult_noise, prob=p(0.2)),
    ])
    ghosting = tio.RandomGhosting(num_ghosts=(2, 10), intensity=(0.05, 0.15), restore=0.0, p=p(0.2))
    monai_rest = Compose([
        RandGibbsNoise(prob=p(0.2), alpha=(0.0, 0.3)),
        RandSimulateLowResolution(prob=p(0.1), zoom_range=(0.5, 1.0)),
        RandBiasField(prob=p(0.33)),
        RandAdjustContrast(prob=p(0.2), gamma=(0.5, 2.0)),
    ])
    monai_spatial_intensity.set_random_state(seed)
    monai_rest.set_random_state(seed + 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(monai_spatial_intensity(x))
        x = ghosting(x)
        return torch.as_tensor(monai_rest(x))

    return run


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both sides (interleaved, one batch each per repeat); return one flat dict."""
    import torch
    from tqdm import tqdm

    from volssl.data.intensity_artifacts import artifact_augment
    from volssl.training.augment import spatial_augment

    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1 or args.size < 4:
        raise ValueError("bench augment: --repeats, --batch and --threads must be >= 1, --warmup >= 0, --size >= 4")
    device = _resolve_device(args.device)
    torch.set_num_threads(args.threads)
    elastic = not getattr(args, "no_elastic", False)
    spatial_cfg, artifact_cfg = amaes_configs(args.always, elastic)
    shape = (args.batch, 1, args.size, args.size, args.size)
    data_gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randn(shape, generator=data_gen) for _ in range(2)]
    on_device = [b.to(device) for b in batches]
    aug_gen = torch.Generator().manual_seed(args.seed)
    per_sample = per_sample_pipeline(args.always, args.seed, elastic)

    def batched(k: int) -> None:
        x = spatial_augment(on_device[k % 2], spatial_cfg, aug_gen)
        artifact_augment(x, artifact_cfg, aug_gen)

    def looped(k: int) -> None:
        for sample in batches[k % 2]:
            per_sample(sample.clone())

    def timed(fn: Callable[[int], None], k: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn(k)
        _sync(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        for k in range(args.warmup):
            batched(k)
            looped(k)
        total = {"batched": 0.0, "per_sample": 0.0}
        for k in tqdm(range(args.repeats), desc="bench augment", unit="pair", file=sys.stderr):
            order = (("batched", batched), ("per_sample", looped))
            for name, fn in order if k % 2 == 0 else order[::-1]:
                total[name] += timed(fn, k)
    n = args.batch * args.repeats
    batched_rate, loop_rate = n / total["batched"], n / total["per_sample"]
    return {
        "batch": args.batch, "size": args.size, "device": device, "threads": args.threads,
        "repeats": args.repeats, "always": bool(args.always), "elastic": elastic,
        "batched_samples_per_s": round(batched_rate, 3),
        "per_sample_samples_per_s": round(loop_rate, 3),
        "ratio": round(batched_rate / loop_rate, 2),
        "batched_ms_per_batch": round(total["batched"] / args.repeats * 1e3, 2),
        "per_sample_ms_per_batch": round(total["per_sample"] / args.repeats * 1e3, 2),
    }
