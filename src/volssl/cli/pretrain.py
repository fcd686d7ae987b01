"""``volssl pretrain``: self-supervised pre-training on a preprocessed dataset.

    volssl pretrain --method s3d --preset s3d-b --data PREPROCESSED --out RUN [--set key=value ...]
    volssl pretrain --data PREPROCESSED --out RUN --resume          # continue RUN (its config.json)
    volssl pretrain ... --out RUN --overwrite                       # replace the run in RUN
    torchrun --nproc_per_node 4 -m volssl pretrain ...              # data parallel (global batch split)

SIGTERM / SIGUSR1 save ``RUN/checkpoints/latest.pt`` and exit 0; rerun with ``--resume``.
"""
from __future__ import annotations

import argparse
import os

from volssl.cli.args import add_run_folder_arguments
from volssl.cli.configs import add_set_argument
from volssl.cli.run_status import exit_code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train a network with a self-supervised method",
        description="Pre-train on a preprocessed dataset (see `volssl preprocess`). Writes RUN/config.json, "
                    "RUN/checkpoints/{latest,best,final}.pt, RUN/scalars.csv, RUN/tb/ and RUN/previews/.",
        epilog="Data parallel on G GPUs (N nodes): torchrun --nproc_per_node G [--nnodes N --rdzv-endpoint "
               "HOST:PORT] -m volssl pretrain ... (data.batch_size is the global batch). SIGTERM / SIGUSR1 "
               "save RUN/checkpoints/latest.pt and exit 0; rerun the same command with --resume.",
    )
    p.add_argument("--method", help="the method (must match the preset's method, e.g. s3d)")
    p.add_argument("--preset", help="a preset name (see `volssl presets`); optional with --resume")
    p.add_argument("--data", required=True, help="preprocessed dataset directory (with plan.json)")
    p.add_argument("--out", required=True, help="run directory")
    add_run_folder_arguments(p, "RUN", "its checkpoints, scalars.csv, tb/, previews/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set_argument(p)
    p.set_defaults(func=_run)


def resolve_run_config(args: argparse.Namespace):
    """The RunConfig of ``args``: preset + overrides, or (with --resume and no --preset) RUN/config.json
    + overrides. ValueError when --method does not match the preset's method."""
    from pathlib import Path

    from volssl.config import apply_overrides, load_config, resolve

    if args.preset:
        cfg = resolve(args.preset, args.overrides)
    elif args.resume and (Path(args.out) / "config.json").is_file():
        cfg = apply_overrides(load_config(Path(args.out) / "config.json"), args.overrides)
    elif args.resume:
        raise ValueError(f"--resume without --preset needs {Path(args.out) / 'config.json'}, which does not exist")
    else:
        raise ValueError("give --preset NAME (see `volssl presets`), or --resume to continue a run")
    if args.method and args.method != cfg.method.name:
        where = f"preset {args.preset!r}" if args.preset else f"{args.out}/config.json"
        raise ValueError(f"--method {args.method} does not match {where}, whose method is {cfg.method.name!r}; "
                         f"pick a {args.method} preset (see `volssl presets`)")
    return cfg


def _run(args: argparse.Namespace) -> int:
    from volssl.training import distributed
    from volssl.training.trainer import pretrain
    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    check_output_dir(args.out, "run folder")  # before any work
    check_input_path(args.data, "--data", kind="dir")  # a missing folder or a link loop: one line
    cfg = resolve_run_config(args)
    try:
        summary = pretrain(cfg, args.data, args.out, resume=args.resume, progress=not args.no_progress,
                           overwrite=args.overwrite)
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", "0") or 0) == 0:  # torchrun: rank 0 reports
        _report(summary)
    return exit_code(summary, "pretrain")


def _report(s: dict) -> None:
    loss = "n/a" if s.get("loss") is None else f"{s['loss']:.5f}"
    print(f"{s['status']} at step {s['step']} (loss {loss}) in {s['seconds']:.1f} s")
    print(f"  config       {s['config']}")
    print(f"  checkpoints  {s['checkpoints']}/{{latest,best,final}}.pt")
    print(f"  scalars      {s['csv']}")
    print(f"  tensorboard  tensorboard --logdir {s['tensorboard']}")
    print(f"  previews     {s['previews']}/")
