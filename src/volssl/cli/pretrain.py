"""``volssl pretrain``: self-supervised pre-training on a preprocessed dataset.

    volssl pretrain --method s3d --preset s3d-b --data PREPROCESSED --out RUN [--set key=value ...]
    volssl pretrain --data PREPROCESSED --out RUN --resume          # continue RUN (its config.json)
    volssl pretrain ... --out RUN --overwrite                       # replace the run in RUN
    torchrun --nproc_per_node 4 -m volssl pretrain ...              # data parallel (global batch split)
    volssl pretrain ... --launcher slurm --nodes 2 --gpus-per-node 4  # the same, as one SLURM job (submitit)

SIGTERM / SIGUSR1 save ``RUN/checkpoints/latest.pt`` and exit 0; rerun with ``--resume``. With
``--launcher slurm`` the job is submitted and the command returns (a job that reaches its time limit or is
preempted saves ``latest.pt`` and is requeued, resuming by itself); ``--launcher local`` runs the job on
this machine through submitit and waits for it (see :mod:`volssl.launch`).
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from volssl.cli.args import add_run_folder_arguments
from volssl.cli.configs import add_set_argument
from volssl.cli.launcher import add_launcher_arguments, launch_spec
from volssl.cli.run_status import exit_code

if TYPE_CHECKING:
    from volssl.config import RunConfig
    from volssl.launch import LaunchSpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train a network with a self-supervised method",
        description="Pre-train on a preprocessed dataset (see `volssl preprocess`). Writes RUN/config.json, "
                    "RUN/checkpoints/{latest,best,final}.pt, RUN/scalars.csv, RUN/tb/ and RUN/previews/.",
        epilog="Data parallel on G GPUs (N nodes): torchrun --nproc_per_node G [--nnodes N --rdzv-endpoint "
               "HOST:PORT] -m volssl pretrain ... (data.batch_size is the global batch). SIGTERM / SIGUSR1 "
               "save RUN/checkpoints/latest.pt and exit 0; rerun the same command with --resume. On SLURM: "
               "--launcher slurm --nodes N --gpus-per-node G submits the same run as one job (requeued and "
               "resumed after a timeout or preemption).",
    )
    p.add_argument("--method", help="the method (must match the preset's method, e.g. s3d)")
    p.add_argument("--preset", help="a preset name (see `volssl presets`); optional with --resume")
    p.add_argument("--data", required=True, help="preprocessed dataset directory (with plan.json)")
    p.add_argument("--out", required=True, help="run directory")
    add_run_folder_arguments(p, "RUN", "its checkpoints, scalars.csv, tb/, previews/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set_argument(p)
    add_launcher_arguments(p, "pre-training", per_job=False)
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

    launcher = launch_spec(args, args.out, "volssl-pretrain")  # slurm without sbatch: refused here
    check_output_dir(args.out, "run folder")  # before any work
    check_input_path(args.data, "--data", kind="dir")  # a missing folder or a link loop: one line
    cfg = resolve_run_config(args)
    if launcher is not None:
        return _launch(args, cfg, launcher)
    try:
        summary = pretrain(cfg, args.data, args.out, resume=args.resume, progress=not args.no_progress,
                           overwrite=args.overwrite)
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", "0") or 0) == 0:  # torchrun: rank 0 reports
        _report(summary)
    return exit_code(summary, "pretrain")


def _launch(args: argparse.Namespace, cfg: RunConfig, launcher: LaunchSpec) -> int:
    """Submit the run as one job (:class:`volssl.launch.PretrainJob`); wait for it with ``--launcher local``.

    The run folder is checked (or, with --overwrite, cleared) here, before anything is queued; the job itself
    always resumes, so a requeued job continues where it stopped."""
    from pathlib import Path

    from volssl.config import config_to_dict
    from volssl.launch import PretrainJob, log_paths, submit, wait
    from volssl.training.distributed import DistInfo
    from volssl.training.trainer import check_train_config, open_run

    world = launcher.nodes * launcher.tasks_per_node
    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {world} data-parallel ranks "
                         f"(--nodes {launcher.nodes} x {launcher.tasks_per_node} tasks per node); choose a multiple")
    check_train_config(cfg.train)
    if not args.resume:  # a run already there: refused unless --overwrite, which removes it now
        open_run(args.out, config_to_dict(cfg), False, DistInfo(), overwrite=args.overwrite, state_key="method_state")
    job = submit(launcher, PretrainJob(cfg, Path(args.data).resolve(), Path(args.out).resolve(),
                                       progress=False))
    print(f"[volssl pretrain] submitted {launcher.kind} job {job.job_id}: {launcher.nodes} node(s) x "
          f"{launcher.tasks_per_node} rank(s), {launcher.gpus_per_node} GPU(s) per node; run {args.out}; "
          f"logs {log_paths(job)}", flush=True)
    if launcher.kind == "slurm":
        print(f"[volssl pretrain] follow it with `squeue -j {job.job_id}`; after a timeout or preemption it is "
              "requeued and resumes from RUN/checkpoints/latest.pt", flush=True)
        return 0
    summary = wait(job, launcher)
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
