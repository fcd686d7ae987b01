"""The ``--launcher`` options of ``volssl benchmark``, ``volssl search`` and ``volssl pretrain`` (one place),
and the :class:`volssl.launch.LaunchSpec` they describe."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from volssl.cli.args import positive_int

#: default time limit of one job, minutes: a cell or trial, and a pre-training (requeued after a timeout)
JOB_TIME_MIN = 240
PRETRAIN_TIME_MIN = 1440
#: default jobs at once with --launcher local (this machine); SLURM: all, the scheduler queues them
LOCAL_MAX_JOBS = 2


def _gpus(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, e.g. 32, got {text!r}")
    return value


def add_launcher_arguments(p: argparse.ArgumentParser, what: str, per_job: bool = True) -> None:
    """The launcher options; ``what`` names a job ("cell", "trial", "run"); ``per_job``: one task per job
    (--gpus-per-job, --cpus-per-job, --max-jobs), else a multi-node run (--nodes, --gpus-per-node, ...)."""
    jobs = f"each {what} as a job" if per_job else f"the {what} as one job, its tasks the data-parallel ranks"
    g = p.add_argument_group("launcher (submitit)", f"run {jobs}: --launcher local (submitit's LocalExecutor, "
                                                    "this machine) or slurm (sbatch)")
    g.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help=f"run {jobs} (default: none"
                        + (", this machine's process pool)" if per_job else ", this process)"))
    g.add_argument("--launcher-dir", default=None, metavar="DIR",
                   help="submitit's folder: job pickles and logs (default: OUT/launcher; on SLURM a shared "
                        "file system)")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    if per_job:
        g.add_argument("--gpus-per-job", type=_gpus, default=None, metavar="N",
                       help="GPUs of each job (default: 1 with --device cuda..., else 0)")
        g.add_argument("--cpus-per-job", type=positive_int, default=1, metavar="N",
                       help="CPUs of each job, also its torch threads (default 1)")
        g.add_argument("--max-jobs", type=positive_int, default=None, metavar="N",
                       help=f"jobs submitted at once (default: {LOCAL_MAX_JOBS} with local, all with slurm)")
    else:
        g.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
        g.add_argument("--gpus-per-node", type=_gpus, default=0, metavar="G",
                       help="GPUs per node, one data-parallel rank each (default 0: CPU)")
        g.add_argument("--tasks-per-node", type=positive_int, default=None, metavar="T",
                       help="data-parallel ranks per node (default: --gpus-per-node, at least 1)")
        g.add_argument("--cpus-per-task", type=positive_int, default=8, metavar="N",
                       help="CPUs per rank, for its data loader workers (default 8)")
    g.add_argument("--mem-gb", type=_gb, default=None, metavar="GB",
                   help="memory per job (per node) in GB (default: the partition's)")
    g.add_argument("--time-min", type=positive_int, default=JOB_TIME_MIN if per_job else PRETRAIN_TIME_MIN,
                   metavar="MIN", help="time limit of one job in minutes; a job that reaches it is requeued and "
                                       f"resumes (default {JOB_TIME_MIN if per_job else PRETRAIN_TIME_MIN})")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="shell line run before each SLURM job (repeatable), e.g. 'source ~/venv/bin/activate'")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch parameter (repeatable), e.g. account=abc, qos=high, constraint=a100")


def launch_spec(args: argparse.Namespace, out: str | Path, name: str, device: str = "cpu") -> Any:
    """The :class:`volssl.launch.LaunchSpec` of ``args`` (None without --launcher), checked
    (:func:`volssl.launch.check_launcher`: ``slurm`` without ``sbatch`` is refused in one line).

    ``out``: the command's output folder (the default launcher folder is ``out/launcher``); ``name``: the
    jobs' name; ``device``: the cells' device (a CUDA device gives each job one GPU by default).
    """
    if not getattr(args, "launcher", None):
        return None
    from volssl.launch import LaunchSpec, check_launcher, parse_slurm_params

    folder = Path(args.launcher_dir or Path(out) / "launcher").expanduser().resolve()
    common: dict[str, Any] = dict(kind=args.launcher, folder=str(folder), name=name, partition=args.partition,
                                  mem_gb=args.mem_gb, time_min=args.time_min, setup=tuple(args.slurm_setup),
                                  slurm_params=parse_slurm_params(args.slurm_param))
    if hasattr(args, "gpus_per_job"):
        gpus = args.gpus_per_job if args.gpus_per_job is not None else int(str(device).startswith("cuda"))
        max_jobs = args.max_jobs or (LOCAL_MAX_JOBS if args.launcher == "local" else None)
        spec = LaunchSpec(**common, gpus_per_node=gpus, cpus_per_task=args.cpus_per_job, max_parallel=max_jobs)
    else:
        tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
        spec = LaunchSpec(**common, nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
                          cpus_per_task=args.cpus_per_task, max_requeues=30)
    check_launcher(spec)
    return spec
