"""``volssl bench amaes_decoder``: AMAES pre-training step with the light-weight decoder vs the standard one.

The AMAES paper (Table 2) reports 1.25x faster pre-training (39 h -> 31 h) with its light-weight
decoder: one conv block per stage, no skip connections, instead of the standard U-Net decoder (two
convs per stage, skips concatenated). Both sides here are the same :class:`~volssl.methods.amaes.AMAES`
step (token mask, encoder, decoder, MSE, backward, AdamW with amsgrad) on the same encoder weights and
batch, differing only in ``decoder_convs`` / ``decoder_skips``; interleaved (standard, light, light,
standard, ...) in one process so that load from other processes hits both alike. The intensity
artifacts are off by default (they cost the same on both sides; ``--artifacts`` turns them on).

Times are wall-clock per step (median and minimum over ``--repeats`` after ``--warmup`` steps of each);
``speedup`` = standard / light (the paper's 1.25 is whole-run wall time on H100s, data loading included).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Any, Callable

from volssl.bench.step import _resolve_device, _timed, add_step_arguments

PAPER_SPEEDUP = 1.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(parser, "unet-tiny")
    parser.add_argument("--artifacts", action="store_true", help="apply the intensity artifacts on both sides")


def _setup(arch: str, batch: int, patch: int, device: str, seed: int, artifacts: bool = False):
    """``(standard, light, standard_step, light_step)``: the two AMAES modules (same encoder weights)
    and their training steps on the same batch."""
    import torch

    from volssl.config import ModelConfig, RunConfig
    from volssl.data.intensity_artifacts import ArtifactConfig
    from volssl.methods.amaes import AMAES, AMAESConfig

    torch.manual_seed(seed)
    cfg = RunConfig(model=ModelConfig(arch=arch), method=AMAESConfig(intensity=ArtifactConfig(enabled=artifacts)))
    cfg.data.patch_size = (patch,) * 3
    light = AMAES.from_config(cfg)
    std_cfg = copy.deepcopy(cfg)
    std_cfg.method.decoder_convs, std_cfg.method.decoder_skips = 2, True
    standard = AMAES(copy.deepcopy(light.network.encoder), std_cfg.method)
    light, standard = light.to(device), standard.to(device)
    x = torch.randn(batch, 1, patch, patch, patch, generator=torch.Generator().manual_seed(seed)).to(device)

    def make_step(method: AMAES) -> Callable[[], None]:
        opt = torch.optim.AdamW(method.parameters(), lr=1e-4, eps=1e-8, weight_decay=3e-5, amsgrad=True)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            method(x).loss.backward()
            opt.step()

        return step

    return standard, light, make_step(standard), make_step(light)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both steps (interleaved); return one flat dict."""
    import torch
    from tqdm import tqdm

    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        raise ValueError("bench amaes_decoder: --repeats, --batch and --threads must be >= 1 and --warmup >= 0")
    device = _resolve_device(args.device)
    torch.set_num_threads(args.threads)
    standard, light, standard_step, light_step = _setup(args.arch, args.batch, args.patch, device, args.seed,
                                                        args.artifacts)
    counts = {"light_decoder_params": sum(p.numel() for p in light.decoder.parameters()),
              "standard_decoder_params": sum(p.numel() for p in standard.decoder.parameters()),
              "encoder_params": sum(p.numel() for p in light.network.parameters())}
    for _ in range(args.warmup):
        standard_step()
        light_step()
    times: dict[str, list[float]] = {"standard": [], "light": []}
    for i in tqdm(range(args.repeats), desc="bench amaes_decoder", unit="pair", file=sys.stderr):
        order = (("standard", standard_step), ("light", light_step))
        for kind, step in order if i % 2 == 0 else order[::-1]:
            times[kind].append(_timed(step, device))
    s_med, l_med = statistics.median(times["standard"]), statistics.median(times["light"])
    s_min, l_min = min(times["standard"]), min(times["light"])
    return {
        "arch": args.arch, "batch": args.batch, "patch": args.patch, "device": device, "threads": args.threads,
        "repeats": args.repeats, "artifacts": bool(args.artifacts), **counts,
        "standard_ms": round(s_med * 1e3, 2), "light_ms": round(l_med * 1e3, 2),
        "speedup": round(s_med / l_med, 3),
        "standard_ms_min": round(s_min * 1e3, 2), "light_ms_min": round(l_min * 1e3, 2),
        "speedup_min": round(s_min / l_min, 3), "paper_speedup": PAPER_SPEEDUP,
    }
