"""``volssl bench infer``: our sliding-window prediction against MONAI's, in one run.

Both sides get the same network (``build_model`` of ``--arch``, eval mode, same weights), the same
random input volume ``(1, C, *size)``, the same patch, overlap, tile batch size and Gaussian blending
(MONAI: ``sliding_window_inference(..., mode="gaussian", sigma_scale=0.125)``; ours:
:func:`volssl.inference.sliding_window.sliding_window_predict` without mirroring), both under
``torch.inference_mode`` with the same number of CPU threads. Runs alternate (ours, MONAI, MONAI,
ours, ...) so that load from other processes hits both alike, after one untimed single-tile call of
each. Reported: median seconds per volume (process CPU time on the CPU with one thread, where it is
the stable measure on a shared machine; wall clock otherwise; both are in the result), throughputs in
voxels/s, ``ratio`` = ours / MONAI throughput (target >= 1.0) and the largest absolute difference of
the two logit volumes.

With a real network the time is almost all convolutions, so the ratio is close to 1 on the CPU.
``overhead_*`` isolates the machinery around the network (tiling, gathering, weighting, stitching,
normalising): the same comparison with a 1x1x1 convolution as the network.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

from volssl.util.parsing import cubic_size

TARGET_RATIO = 1.0


def _size(text: str) -> tuple[int, int, int]:
    return cubic_size(text, minimum=1, what="size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resenc-tiny", help="architecture (default: resenc-tiny)")
    parser.add_argument("--size", type=_size, default=(160, 160, 160), metavar="N|X,Y,Z",
                        help="input volume (default: 160)")
    parser.add_argument("--patch", type=_size, default=(64, 64, 64), metavar="N|X,Y,Z", help="tile (default: 64)")
    parser.add_argument("--overlap", type=float, default=0.5, help="tile overlap (default: 0.5)")
    parser.add_argument("--batch", type=int, default=1, help="tiles per forward pass (default: 1)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default: 1)")
    parser.add_argument("--classes", type=int, default=2, help="output channels (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed volumes per side (default: 3)")
    parser.add_argument("--overhead-repeats", type=int, default=7,
                        help="timed volumes per side with the 1x1x1 network (default: 7; 0 skips)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(ours: Callable, theirs: Callable, repeats: int, device) -> dict[str, list[float]]:
    """Alternate ``ours`` and ``theirs``; wall and process-CPU seconds of each call."""
    times: dict[str, list[float]] = {"ours_wall": [], "ours_cpu": [], "monai_wall": [], "monai_cpu": []}
    for r in range(repeats):
        order = (("ours", ours), ("monai", theirs)) if r % 2 == 0 else (("monai", theirs), ("ours", ours))
        for name, fn in order:
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
            times[f"{name}_wall"].append(time.perf_counter() - wall)
    return times


def compare(network, x, patch, overlap: float, batch: int, repeats: int, clock: str) -> dict[str, Any]:
    """Time both sliding windows on ``network`` and ``x`` (B, C, *size); medians in seconds."""
    import torch
    from monai.inferers import sliding_window_inference

    from volssl.inference.sliding_window import sliding_window_predict

    def ours():
        return sliding_window_predict(network, x, patch, overlap=overlap, sw_batch_size=batch)

    def theirs():
        return sliding_window_inference(x, patch, batch, network, overlap=overlap, mode="gaussian", sigma_scale=0.125)

    with torch.inference_mode():
        tile = x[(slice(None), slice(None)) + tuple(slice(0, min(p, s)) for p, s in zip(patch, x.shape[2:]))]
        sliding_window_predict(network, tile, patch, overlap=overlap, sw_batch_size=batch)  # warm-up
        sliding_window_inference(tile, patch, batch, network, overlap=overlap, mode="gaussian", sigma_scale=0.125)
        diff = float((ours() - theirs()).abs().max())
        times = _time_pair(ours, theirs, repeats, x.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ours_s": med[f"ours_{clock}"], "monai_s": med[f"monai_{clock}"], "medians": med, "max_abs_diff": diff,
            "times": times}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from volssl.config import ModelConfig
    from volssl.inference.predict import resolve_device
    from volssl.inference.sliding_window import tile_slices
    from volssl.models.registry import build_model, get_arch

    for name in ("repeats", "batch", "channels", "classes", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.overhead_repeats < 0:
        raise ValueError(f"--overhead-repeats must be >= 0, got {args.overhead_repeats}")
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
    stride = get_arch(args.arch).total_stride
    if any(p % stride for p in args.patch):
        raise ValueError(f"--patch {args.patch} must be a multiple of {args.arch}'s total stride {stride}")
    device = resolve_device(args.device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        net = build_model(ModelConfig(arch=args.arch, in_channels=args.channels, out_channels=args.classes))
        net = net.to(device).eval()
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(1, args.channels, *args.size, generator=gen).to(device)
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
        main = compare(net, x, args.patch, args.overlap, args.batch, args.repeats, clock)
        overhead = None
        if args.overhead_repeats:
            trivial = torch.nn.Conv3d(args.channels, args.classes, 1).to(device).eval()
            overhead = compare(trivial, x, args.patch, args.overlap, args.batch, args.overhead_repeats, clock)
    finally:
        torch.set_num_threads(old_threads)

    voxels = int(x[0, 0].numel())
    padded = [max(s, p) for s, p in zip(args.size, args.patch)]
    ratio = main["monai_s"] / main["ours_s"]
    result: dict[str, Any] = {
        "device": str(device),
        "threads": args.threads,
        "clock": clock,
        "arch": args.arch,
        "input_shape": [1, args.channels, *args.size],
        "patch": list(args.patch),
        "overlap": args.overlap,
        "sw_batch_size": args.batch,
        "n_tiles": len(tile_slices(padded, args.patch, args.overlap)),
        "repeats": args.repeats,
        "ours_s": round(main["ours_s"], 4),
        "monai_s": round(main["monai_s"], 4),
        "ours_wall_s": round(main["medians"]["ours_wall"], 4),
        "monai_wall_s": round(main["medians"]["monai_wall"], 4),
        "ours_voxels_per_s": round(voxels / main["ours_s"]),
        "monai_voxels_per_s": round(voxels / main["monai_s"]),
        "ratio": round(ratio, 4),
        "target": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "max_abs_diff": main["max_abs_diff"],
    }
    if overhead is not None:
        result.update({
            "overhead_ours_ms": round(1e3 * overhead["ours_s"], 3),
            "overhead_monai_ms": round(1e3 * overhead["monai_s"], 3),
            "overhead_ratio": round(overhead["monai_s"] / overhead["ours_s"], 4),
            "overhead_max_abs_diff": overhead["max_abs_diff"],
        })
    return result
