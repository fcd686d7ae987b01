"""``volssl bench step``: one S3D sparse pre-training step vs one plain dense training step.

Both sides use the same network (same architecture and initial weights), the same batch, the same
SGD optimiser (Nesterov momentum 0.99, weight decay 3e-5) and run in one process, interleaved
(dense, S3D, S3D, dense, ...) so that load from other processes hits both alike:

* dense: ``network(x)`` -> L2 loss against ``x`` over the whole patch -> backward -> SGD step;
* S3D: block mask drawn -> masked input -> sparse encoder (mask re-applied after every conv/pool,
  visible-only norm statistics) -> mask tokens -> densification convs -> decoder -> L2 on masked
  voxels -> backward -> SGD step.

Times are wall-clock per step (median and minimum over ``--repeats`` after ``--warmup`` steps of
each). Peak memory (one extra, untimed step of each): on CUDA ``torch.cuda.max_memory_allocated``
above what was allocated before the step; on the CPU, where ``tracemalloc`` cannot see torch's
allocator, the peak of live tensor bytes during the step from ``torch.profiler``'s memory events
(op granularity; the allocator's caching and fragmentation are not included).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any, Callable

TARGET_RATIO = 1.15


def add_step_arguments(parser: argparse.ArgumentParser, arch: str) -> None:
    """The options every step-time benchmark shares (architecture, batch, patch, repeats, device)."""
    parser.add_argument("--arch", default=arch, help=f"architecture (default: {arch})")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side in voxels (default: 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(parser, "resenc-tiny")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")


def _setup(arch: str, batch: int, patch: int, device: str, seed: int):
    """Network copies, optimisers and the batch shared by both sides."""
    import torch

    from volssl.config import ModelConfig
    from volssl.methods.s3d import S3D, S3DConfig
    from volssl.models.registry import build_model

    torch.manual_seed(seed)
    net = build_model(ModelConfig(arch=arch, in_channels=1, out_channels=1))
    dense = copy.deepcopy(net).to(device)
    s3d = S3D(copy.deepcopy(net), S3DConfig()).to(device)
    s3d.check_patch((patch,) * 3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, patch, patch, patch, generator=gen).to(device)

    def sgd(params):
        return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    opt_dense, opt_s3d = sgd(dense.parameters()), sgd(s3d.parameters())

    def dense_step() -> None:
        opt_dense.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(dense(x), x)
        loss.backward()
        opt_dense.step()

    def s3d_step() -> None:
        opt_s3d.zero_grad(set_to_none=True)
        s3d(x).loss.backward()
        opt_s3d.step()

    return dense_step, s3d_step


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"bench step: device {name!r} requested but CUDA is not available")
    return name


def _cuda_peak(step: Callable[[], None], device: str) -> float:
    import torch

    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_mib(step: Callable[[], None]) -> float:
    """Peak of live tensor memory (MiB) allocated during one ``step`` on the CPU.

    ``tracemalloc`` cannot see torch's allocator, so this runs the step under ``torch.profiler``
    with ``profile_memory=True`` and sums every op's own allocations and frees in start-time order;
    the maximum of that running sum is the step's peak above what was allocated before it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both steps (interleaved) and measure their peak memory; return one flat dict."""
    import torch
    from tqdm import tqdm

    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        raise ValueError("bench step: --repeats, --batch and --threads must be >= 1 and --warmup >= 0")
    device = _resolve_device(args.device)
    torch.set_num_threads(args.threads)
    dense_step, s3d_step = _setup(args.arch, args.batch, args.patch, device, args.seed)
    for _ in range(args.warmup):
        dense_step()
        s3d_step()
    times: dict[str, list[float]] = {"dense": [], "s3d": []}
    for i in tqdm(range(args.repeats), desc="bench step", unit="pair", file=sys.stderr):
        order = (("dense", dense_step), ("s3d", s3d_step))
        for kind, step in order if i % 2 == 0 else order[::-1]:
            times[kind].append(_timed(step, device))
    d_med, s_med = statistics.median(times["dense"]), statistics.median(times["s3d"])
    d_min, s_min = min(times["dense"]), min(times["s3d"])
    result: dict[str, Any] = {
        "arch": args.arch, "batch": args.batch, "patch": args.patch, "device": device, "threads": args.threads,
        "repeats": args.repeats,
        "dense_ms": round(d_med * 1e3, 2), "s3d_ms": round(s_med * 1e3, 2),
        "ratio": round(s_med / d_med, 3),
        "dense_ms_min": round(d_min * 1e3, 2), "s3d_ms_min": round(s_min * 1e3, 2),
        "ratio_min": round(s_min / d_min, 3),
        "target_ratio": TARGET_RATIO, "meets_target": bool(s_med / d_med <= TARGET_RATIO),
    }
    if not args.no_memory:
        if device.startswith("cuda"):
            result["dense_peak_mib"] = round(_cuda_peak(dense_step, device), 1)
            result["s3d_peak_mib"] = round(_cuda_peak(s3d_step, device), 1)
            result["memory_method"] = "torch.cuda.max_memory_allocated during one step"
        else:
            result["dense_peak_mib"] = round(cpu_peak_mib(dense_step), 1)
            result["s3d_peak_mib"] = round(cpu_peak_mib(s3d_step), 1)
            result["memory_method"] = "torch.profiler profile_memory: peak live tensor bytes during one step"
        if result["dense_peak_mib"] > 0:
            result["memory_ratio"] = round(result["s3d_peak_mib"] / result["dense_peak_mib"], 3)
    return result
