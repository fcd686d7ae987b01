"""``volssl bench loader|step|...``: one module of volssl.bench per benchmark."""
from __future__ import annotations

import argparse
import importlib
import json

BENCHMARKS = {
    "loader": "patch stream vs whole-volume decoding (patches/s)",
    "step": "S3D step, masked-dense and block-sparse, vs dense step at several mask ratios (time, FLOPs, memory)",
    "infer": "our sliding-window prediction vs MONAI's sliding_window_inference (voxels/s)",
    "augment": "AMAES augmentation batched on the device vs per-sample MONAI/TorchIO (samples/s)",
    "amaes_decoder": "AMAES pre-training step: light-weight decoder vs standard U-Net decoder (time)",
    "crops": "64^3 crops per worker from huge Zarr / TIFF volumes vs in memory (crops/s, peak RSS)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (both sides in one run; prints the ratio)")
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, help_ in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"volssl.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"volssl.bench.{name}":
                continue
            raise
        b = bsub.add_parser(name, help=help_)
        b.add_argument("--json", action="store_true", help="print one JSON object")
        module.add_arguments(b)
        b.set_defaults(func=_runner(module))


def _runner(module):
    def run(args: argparse.Namespace) -> int:
        result = module.run(args)
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                if isinstance(v, list) and v and isinstance(v[0], dict):  # one line per row (bench step's ratios)
                    print(f"{k:>28}:")
                    for row in v:
                        print(" " * 30 + ", ".join(f"{rk} {rv}" for rk, rv in row.items()))
                else:
                    print(f"{k:>28}: {v}")
        return 0

    return run
