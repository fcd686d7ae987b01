"""``volssl demo``: the README's main job on built-in phantoms.

Generates brain phantoms, preprocesses them, streams patches, pre-trains the tiny S3D preset and
writes a short summary (DIR/summary.json) saying what it did and where the files are.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on built-in phantoms")
    p.add_argument("--out", default="volssl_demo", help="output folder (default: volssl_demo)")
    p.add_argument("--quick", action="store_true", help="smaller and shorter (the CI variant)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from volssl.util.paths import check_output_dir

    check_output_dir(args.out, "--out folder")  # before anything is generated or trained
    from volssl.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0
