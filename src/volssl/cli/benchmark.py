"""``volssl benchmark``: pre-train every method, fine-tune each on every dataset, evaluate, report."""
from __future__ import annotations

import argparse
import os

from volssl.cli.launcher import add_launcher_arguments, launch_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="compare pre-training methods on your datasets (pre-train, fine-tune, evaluate, report)",
        description="Pre-trains each method once on the unlabeled pool, fine-tunes it (and the from-scratch "
                    "baselines) on every dataset for each n_train and seed, predicts and evaluates the held-out "
                    "cases, and writes the report (table with average ranks, rank stability, low-data curve, "
                    "generalisation). Rerunning the same command resumes: finished cells are not recomputed.")
    p.add_argument("--methods", default="s3d,no-fixed",
                   help="comma-separated methods (see --list; default: s3d,no-fixed)")
    p.add_argument("--datasets", default="brain",
                   help="comma-separated phantom tasks or nnU-Net v2 raw dataset folders (default: brain)")
    p.add_argument("--out", default="volssl_benchmark", help="benchmark folder (default: volssl_benchmark)")
    p.add_argument("--n-train", default=None, help="comma-separated labeled cases per run: ints, fractions (0.1, "
                                                   "10%%) or 'all' (default: the scale's, 2)")
    p.add_argument("--seeds", default=None, help="comma-separated fine-tuning seeds (default: the scale's: 0,1,2; "
                                                 "evidence: 0-4)")
    p.add_argument("--draws", default=None,
                   help="comma-separated independent phantom draws, each a benchmark in OUT/draw<k>, one report over "
                        "all (default: the scale's: evidence 0,1; else one draw, --seed)")
    p.add_argument("--scale", default="tiny", help="tiny (demo scale, CPU), evidence (does pre-training pay? about 90 "
                                                   "min on 2 cores), quick (CI) or full (real presets)")
    p.add_argument("--generalisation", default="", metavar="A:B[,A:B]",
                   help="runs trained on dataset A also predict dataset B's test cases")
    p.add_argument("--unlabeled", default=None, help="unlabeled pool (default: phantoms of the datasets' domain)")
    p.add_argument("--workers", type=int, default=2,
                   help="fine-tuning runs in parallel (default 2; with --launcher see --max-jobs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (fine-tuning and prediction)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated phantoms and pre-training")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the scale's pre-training steps")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="override the scale's fine-tuning steps (split over a recipe's stages in its proportions)")
    p.add_argument("--n-labeled", type=int, default=None,
                   help="labeled training phantoms generated per phantom task (default: the scale's)")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="fine-tuning recipe override for every arm (repeatable; as `volssl finetune --set`, "
                        "e.g. head_init=small); a new value is a new experiment: use another --out")
    p.add_argument("--list", action="store_true", help="list the methods and scales, then exit")
    add_launcher_arguments(p, "pre-training and each fine-tuning cell")
    p.set_defaults(func=_run)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str, option: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a ValueError naming ``option`` for anything else."""
    values = []
    for t in _split(text):
        try:
            values.append(int(t))
        except ValueError:
            raise ValueError(f"{option} takes comma-separated whole numbers (e.g. 0,1,2), got {text!r}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value, got {text!r}")
    return values


def _n_trains(text: str) -> list:
    from volssl.benchmark import parse_n_train

    out = []
    for t in _split(text):
        try:
            out.append(parse_n_train(t))
        except ValueError as e:
            if "invalid literal" in str(e) or "could not convert" in str(e):
                raise ValueError(f"--n-train {t!r}: expected a number of labeled cases (2), a fraction of them "
                                 "(0.1 or 10%) or 'all'") from None
            raise ValueError(f"--n-train: {e}") from None
    if not out:
        raise ValueError(f"--n-train needs at least one value, got {text!r}")
    return out


def _finetune_set(items: list[str]) -> list[str]:
    """Check ``--finetune-set`` values against the recipe fields (an unknown key or bad value fails now, not
    after pre-training)."""
    if not items:
        return []
    from volssl.finetuning.recipes import resolve_recipe

    for item in items:
        if "=" not in item:
            raise ValueError(f"--finetune-set takes KEY=VALUE, got {item!r}")
        try:
            resolve_recipe("s3d-tiny", [item])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"--finetune-set {item}: {e}") from None
    return list(items)


def _run(args: argparse.Namespace) -> int:
    from volssl.benchmark import SCALES, BenchmarkSpec, run_benchmark
    from volssl.presets.arms import get_arms
    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    if args.list:
        for arm in get_arms().values():
            pre = f"pre-train {arm.preset}" if arm.preset else "from scratch"
            print(f"{arm.name:<26} {pre}; fine-tune {arm.recipe}; plan {arm.plan} -- {arm.label}")
        print("scales: " + ", ".join(SCALES))
        return 0
    if args.scale not in SCALES:
        raise ValueError(f"--scale {args.scale!r}: not one of {', '.join(SCALES)}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    launcher = launch_spec(args, args.out, "volssl-benchmark", args.device)  # slurm without sbatch: refused here
    n_trains = None if args.n_train is None else _n_trains(args.n_train)
    seeds = None if args.seeds is None else _ints(args.seeds, "--seeds")
    draws = None if args.draws is None else _ints(args.draws, "--draws")
    finetune_set = _finetune_set(args.finetune_set)
    for option, value in (("--pretrain-steps", args.pretrain_steps), ("--finetune-steps", args.finetune_steps),
                          ("--n-labeled", args.n_labeled)):
        if value is not None and value < 0:
            raise ValueError(f"{option} must be a positive number (0: the scale's), got {value}")
    datasets = _split(args.datasets)
    if not datasets:
        raise ValueError("--datasets needs at least one phantom task or dataset folder")
    for d in datasets:
        if os.sep in d or os.path.islink(d):  # a path, not a phantom name: it must exist
            check_input_path(d, "--datasets entry", kind="dir")
    if args.unlabeled is not None:
        check_input_path(args.unlabeled, "--unlabeled", kind="dir")
    check_output_dir(args.out, "--out folder")  # before anything is generated or trained
    spec = BenchmarkSpec(_split(args.methods), datasets, n_trains=n_trains, seeds=seeds, scale=args.scale,
                         generalisation=_split(args.generalisation), unlabeled=args.unlabeled, seed=args.seed,
                         pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                         n_labeled=args.n_labeled, draws=draws, finetune_set=finetune_set)
    out = os.path.abspath(args.out) if launcher is not None else args.out  # jobs may start elsewhere
    run_benchmark(out, spec, workers=args.workers, device=args.device, launcher=launcher)
    return 0
