"""Steps/s and peak GPU memory of the real presets' pre-training step (the device check of the brief).

    python scripts/gpu_check.py [--presets s3d-b,amaes-unet-b,mae-xnt,...] [--steps 10] [--device cuda]
                                [--out gpu_check.json]

For each preset: its method and network at the preset's own patch, batch and precision, on random
z-scored input (no data loading: this is the model's step), ``--warmup`` untimed steps, then
``--steps`` timed ones (forward under autocast, backward, optimiser step, synchronised). A preset whose
batch does not fit is retried at half the batch until it does, and the JSON says which batch ran. Prints
one Markdown row per preset (for docs/benchmarks.md) and writes every number to ``--out``. With
``--device cpu`` and ``-tiny`` presets it runs anywhere (that is how it is tested before a GPU is lent).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

DEFAULT = "s3d-b,amaes-unet-b,mae-xnt,amaes-mednext-m,swinunetr-ssl,models-genesis,volume-fusion,voco,s3d-l"


def measure(preset: str, steps: int, warmup: int, device: torch.device, batch: int | None = None) -> dict:
    from volssl.config import resolve
    from volssl.methods import build_method
    from volssl.training.optim import build_optimizer
    from volssl.training.trainer import autocast_context

    cfg = resolve(preset, [] if batch is None else [f"data.batch_size={batch}"])
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    b, c = cfg.data.batch_size, cfg.model.in_channels
    x = torch.randn(b, c, *cfg.data.patch_size, device=device)
    precision = cfg.train.precision if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with autocast_context(precision, device):
            loss = method(x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"preset": preset, "method": cfg.method.name, "arch": cfg.model.arch, "patch": list(cfg.data.patch_size),
            "batch": b, "preset_batch": resolve(preset).data.batch_size, "precision": precision,
            "params_m": round(sum(p.numel() for p in params) / 1e6, 2), "sec_per_step": round(sec, 4),
            "steps_per_s": round(1 / sec, 3), "samples_per_s": round(b / sec, 2),
            "peak_gib": None if peak is None else round(peak, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    print("| preset | method | arch | patch | batch (preset's) | precision | params M | s/step | samples/s | peak GiB |")
    print("|---|---|---|---|---|---|---:|---:|---:|---:|")
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        batch = None
        while True:
            try:
                r = measure(preset, args.steps, args.warmup, device, batch)
                break
            except torch.OutOfMemoryError:
                from volssl.config import resolve

                batch = (batch or resolve(preset).data.batch_size) // 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if batch < 1:
                    r = {"preset": preset, "error": "out of memory at batch 1"}
                    break
            except Exception as e:  # noqa: BLE001 - one broken preset must not cost the others
                r = {"preset": preset, "error": f"{type(e).__name__}: {e}"}
                break
        rows.append(r)
        if "error" in r:
            print(f"| {preset} | error: {r['error']} |", flush=True)
        else:
            print(f"| {r['preset']} | {r['method']} | {r['arch']} | {'x'.join(map(str, r['patch']))} | {r['batch']} "
                  f"({r['preset_batch']}) | {r['precision']} | {r['params_m']} | {r['sec_per_step']} | "
                  f"{r['samples_per_s']} | {r['peak_gib']} |", flush=True)
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
