"""``volssl bench step``: the S3D pre-training step, masked-dense and block-sparse, against a dense step.

All sides use the same network (same architecture and initial weights), the same batch, the same SGD
optimiser (Nesterov momentum 0.99, weight decay 3e-5) and run in one process, interleaved in a
rotating order so that load from other processes hits every side alike:

* dense: ``network(x)`` -> L2 loss against ``x`` over the whole patch -> backward -> SGD step;
* masked, per mask ratio: the S3D step with ``block_sparse="off"`` (block mask -> masked input ->
  encoder convolving every voxel, mask re-applied after every conv/pool, visible-only norm statistics
  -> mask tokens -> densification convs -> decoder -> L2 on masked voxels -> backward -> SGD step);
* block, per mask ratio: the same S3D step with ``block_sparse="on"``: the encoder computes the
  visible blocks only (models/block_sparse.py); the decoder stays dense.

The two S3D sides of a ratio draw the same masks (the RNG is reseeded per repetition). Times are
wall-clock per step (median and minimum over ``--repeats`` after ``--warmup`` steps of each).
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one step of each side (forward and backward
convolutions and matmuls); block-sparse FLOPs / dense FLOPs is the time ratio the block-sparse step
would reach if time were proportional to FLOPs (the "FLOPs-model limit"). Peak memory (one extra,
untimed step of each): on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before
the step; on the CPU, where ``tracemalloc`` cannot see torch's allocator, the peak of live tensor
bytes during the step from ``torch.profiler``'s memory events (op granularity; the allocator's
caching and fragmentation are not included).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from typing import Any, Callable

TARGET_RATIO = 1.15  # masked-dense S3D step / dense step
BLOCK_TARGETS = {0.75: 0.7, 0.9: 0.6}  # block-sparse / dense on resenc-s, 128^3, batch 2 (issue 14)


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
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast around every side's forward (default: fp32)")
    parser.add_argument("--ratios", default="0.6,0.75,0.9",
                        help="comma-separated static mask ratios (default: 0.6,0.75,0.9)")
    parser.add_argument("--block-stages", type=int, default=None,
                        help="encoder stages computed on blocks (default: S3D's: those whose blocks are >= 2 voxels)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOPs count")
    parser.add_argument("--flops-model", action="store_true",
                        help="print only the FLOPs-model limit per ratio (shapes only: any size, no step is run)")


def _setup(arch: str, batch: int, patch: int, device: str, seed: int, ratios=(0.75,),
           block_stages: int | None = None, precision: str = "fp32") -> dict[str, Callable[[], None]]:
    """One step function per side: ``dense``, ``masked@R`` and ``block@R`` for each ratio R."""
    import contextlib

    import torch

    def autocast():
        if precision == "bf16":
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    from volssl.config import ModelConfig
    from volssl.methods.s3d import S3D, S3DConfig
    from volssl.models.registry import build_model

    torch.manual_seed(seed)
    net = build_model(ModelConfig(arch=arch, in_channels=1, out_channels=1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, patch, patch, patch, generator=gen).to(device)

    def sgd(params):
        return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    dense = copy.deepcopy(net).to(device)
    opt_dense = sgd(dense.parameters())

    def dense_step() -> None:
        opt_dense.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.mse_loss(dense(x).float(), x)
        loss.backward()
        opt_dense.step()

    steps: dict[str, Callable[[], None]] = {"dense": dense_step}
    for ratio in ratios:
        for kind, switch in (("masked", "off"), ("block", "on")):
            cfg = S3DConfig(mask_ratio_range=None, mask_ratio=float(ratio), block_sparse=switch,
                            block_stages=block_stages if switch == "on" else None)
            torch.manual_seed(seed + 1)  # mask tokens and densification convs: the same initial values on every side
            s3d = S3D(copy.deepcopy(net), cfg).to(device)
            s3d.check_patch((patch,) * 3)
            opt = sgd(s3d.parameters())
            counter = [0]

            def s3d_step(s3d=s3d, opt=opt, counter=counter) -> None:
                opt.zero_grad(set_to_none=True)
                torch.manual_seed(seed + counter[0])  # masked and block sides of a ratio: the same masks
                counter[0] += 1
                with autocast():
                    loss = s3d(x).loss
                loss.backward()
                opt.step()

            steps[f"{kind}@{ratio:g}"] = s3d_step
    return steps


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


def count_flops(step: Callable[[], None]) -> int:
    """Convolution and matmul FLOPs of one ``step`` (forward and backward), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def flops_model(arch: str, patch: int, ratio: float, block_stages: int | None = None) -> dict[str, float]:
    """The FLOPs-model limit of the block-sparse step without running it: shapes only (meta tensors).

    Counts one dense step and one masked-dense S3D step (batch 1, static ``ratio``) and the encoder's
    block-sparse stages alone; the block-sparse step does the masked step's work minus the masked
    fraction of those stages' (a block-sparse conv computes ``visible / all`` of a dense conv's
    outputs). Batch size cancels. Returns GFLOP of each step and ``flops_ratio`` = block / dense.
    """
    import torch

    from volssl.config import ModelConfig
    from volssl.methods.s3d import S3D, S3DConfig
    from volssl.models.registry import build_model

    cfg = S3DConfig(mask_ratio_range=None, mask_ratio=ratio, block_sparse="off", block_stages=block_stages)
    with torch.device("meta"):
        net = build_model(ModelConfig(arch=arch, in_channels=1, out_channels=1))
        s3d = S3D(copy.deepcopy(net), cfg)  # counted on its masked-dense path (nonzero() has no meta kernel)
        x = torch.zeros(1, 1, patch, patch, patch)
        n_stages = S3D(copy.deepcopy(net), dataclasses.replace(cfg, block_sparse="on")).block_stages(x.shape[2:])
    s3d.check_patch(x.shape[2:])
    enc = s3d.network.encoder

    def encoder_part() -> None:
        h = enc.stem(x)
        total = h.sum()
        for stage in enc.stages[:n_stages]:
            h = stage(h)
            total = total + h.sum()
        total.backward()

    dense = count_flops(lambda: torch.nn.functional.mse_loss(net(x), x).backward())
    masked = count_flops(lambda: s3d(x).loss.backward())
    part = count_flops(encoder_part)
    n_blocks = (patch // s3d.block) ** 3
    visible = 1.0 - round(ratio * n_blocks) / n_blocks  # block_mask masks exactly round(r * n) blocks
    block = masked - (1.0 - visible) * part
    return {"dense_gflop": dense / 1e9, "masked_gflop": masked / 1e9, "block_gflop": block / 1e9,
            "visible_fraction": visible, "block_stages": n_stages, "flops_ratio": block / dense}


def _peak(step: Callable[[], None], device: str) -> float:
    return _cuda_peak(step, device) if device.startswith("cuda") else cpu_peak_mib(step)


def _time_sides(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    from tqdm import tqdm

    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in tqdm(range(repeats), desc="bench step", unit="round", file=sys.stderr):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotating order: every side sees the same load on average
            times[name].append(_timed(steps[name], device))
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every side (interleaved), count FLOPs, measure peak memory; return one dict with a row per ratio."""
    import torch

    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        raise ValueError("bench step: --repeats, --batch and --threads must be >= 1 and --warmup >= 0")
    try:
        ratios = [float(r) for r in str(args.ratios).split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"bench step: --ratios must be comma-separated numbers, got {args.ratios!r}") from None
    if not ratios or not all(0.0 <= r < 1.0 for r in ratios):
        raise ValueError(f"bench step: mask ratios must be in [0, 1), got {args.ratios!r}")
    if args.flops_model:
        rows = [{"mask_ratio": r, **{k: round(v, 4) for k, v in flops_model(args.arch, args.patch, r,
                                                                         args.block_stages).items()}}
                for r in ratios]
        return {"arch": args.arch, "patch": args.patch, "model": "FlopCounterMode on meta tensors", "rows": rows}
    device = _resolve_device(args.device)
    torch.set_num_threads(args.threads)
    steps = _setup(args.arch, args.batch, args.patch, device, args.seed, ratios, args.block_stages, args.precision)
    times = _time_sides(steps, args.repeats, args.warmup, device)
    med = {n: statistics.median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}
    flops = {} if args.no_flops else {n: count_flops(step) for n, step in steps.items()}
    peaks = {} if args.no_memory else {n: round(_peak(step, device), 1) for n, step in steps.items()}
    result: dict[str, Any] = {
        "arch": args.arch, "batch": args.batch, "patch": args.patch, "device": device, "threads": args.threads,
        "repeats": args.repeats, "precision": args.precision, "dense_ms": round(med["dense"] * 1e3, 2), "dense_ms_min": round(low["dense"] * 1e3, 2),
    }
    if flops:
        result["dense_gflop"] = round(flops["dense"] / 1e9, 2)
    if peaks:
        result["dense_peak_mib"] = peaks["dense"]
        result["memory_method"] = ("torch.cuda.max_memory_allocated during one step" if device.startswith("cuda")
                                   else "torch.profiler profile_memory: peak live tensor bytes during one step")
    rows = []
    for r in ratios:
        m, b = f"masked@{r:g}", f"block@{r:g}"
        row: dict[str, Any] = {
            "mask_ratio": r, "masked_ms": round(med[m] * 1e3, 2), "block_ms": round(med[b] * 1e3, 2),
            "masked_ratio": round(med[m] / med["dense"], 3), "block_ratio": round(med[b] / med["dense"], 3),
            "block_ratio_min": round(low[b] / low["dense"], 3),
        }
        if flops:
            row["flops_ratio"] = round(flops[b] / flops["dense"], 3)
            row["block_vs_flops_limit"] = round(row["block_ratio"] / row["flops_ratio"], 3)
        if r in BLOCK_TARGETS:
            row["block_target"] = BLOCK_TARGETS[r]
            row["meets_block_target"] = bool(row["block_ratio"] <= BLOCK_TARGETS[r])
        if peaks:
            row["masked_peak_mib"], row["block_peak_mib"] = peaks[m], peaks[b]
        rows.append(row)
    first = rows[0]
    result.update({  # the masked-dense path at the first ratio, under its own target (the S3D step's overhead)
        "s3d_ms": first["masked_ms"], "ratio": first["masked_ratio"], "target_ratio": TARGET_RATIO,
        "meets_target": bool(first["masked_ratio"] <= TARGET_RATIO), "rows": rows,
    })
    return result
