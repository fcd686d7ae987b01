"""``volssl search``: random search of fine-tuning hyper-parameters (resumable, parallel through the storage)."""
from __future__ import annotations

import argparse
import json
import os

from typing import TYPE_CHECKING

from volssl.cli.launcher import add_launcher_arguments, launch_spec

if TYPE_CHECKING:
    from volssl.search import TrialSetup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="random search of fine-tuning hyper-parameters (MAE-XNT Tables 5, 6, 8, 9)",
        description="Each trial fine-tunes with one random draw of the space's values and scores the fold's "
                    "validation cases. The study is stored in --storage (default OUT/study.db): rerun to resume, "
                    "start the same command in more processes or machines (shared database URL) to run trials "
                    "in parallel. Writes OUT/trials.csv, OUT/best.json, OUT/search.md and OUT/search.png.")
    p.add_argument("--space", help="search space (see --list)")
    p.add_argument("--trials", type=int, default=30, help="completed trials the study should reach (default 30)")
    p.add_argument("--checkpoint", default=None, help="pre-trained checkpoint or run dir; 'none' for scratch spaces")
    p.add_argument("--dataset", help="labeled dataset (nnU-Net v2 raw or preprocessed)")
    p.add_argument("--out", default="volssl_search", help="output folder (default volssl_search)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default=None, help="study name (default volssl-SPACE)")
    p.add_argument("--steps-per-hour", type=float, default=None,
                   help="fine-tuning steps per hour on your hardware, for spaces that search the training time")
    p.add_argument("--n-train", type=int, default=None, help="labeled cases (default: the space's fraction)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override applied to every trial (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampler and fine-tuning seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--list", action="store_true", help="list the search spaces and exit")
    p.add_argument("--json", action="store_true", help="print best.json")
    add_launcher_arguments(p, "trial")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from volssl.search import TrialSetup, describe_spaces, run_search
    from volssl.util.hub import is_hub_reference

    if args.list:
        for s in describe_spaces():
            params = "; ".join(f"{k} {v}" for k, v in s["params"].items())
            print(f"{s['name']:<24} recipe {s['recipe']}, {s['metric']}: {params}")
        return 0
    if not args.space or not args.dataset:
        raise ValueError("give --space NAME and --dataset DIR (see volssl search --list)")
    launcher = launch_spec(args, args.out, "volssl-search", args.device)  # slurm without sbatch: refused here
    _check(args)
    checkpoint = args.checkpoint
    if checkpoint is not None and is_hub_reference(str(checkpoint)):  # downloaded once here, not in every trial
        from volssl.training.exported import locate_exported

        checkpoint = str(locate_exported(checkpoint))
    setup = TrialSetup(checkpoint, args.dataset, steps_per_hour=args.steps_per_hour, seed=args.seed,
                       n_train=args.n_train, overrides=args.overrides, device=args.device)
    if launcher is not None:  # jobs may start in another folder: absolute paths
        setup = _absolute(setup)
    best = run_search(args.space, args.trials, setup, args.out if launcher is None else os.path.abspath(args.out),
                      storage=args.storage, study_name=args.study_name, progress=launcher is None, launcher=launcher)
    if args.json:
        print(json.dumps(best))
    else:
        print(f"best {best.get('metric')}: {best.get('value')} with {best.get('params')} "
              f"({best['n_complete']} completed trials); results in {args.out}")
    return 0


def _absolute(setup: TrialSetup) -> TrialSetup:
    """``setup`` with its dataset and checkpoint paths made absolute (a launcher job may start elsewhere)."""
    import dataclasses

    ckpt = setup.checkpoint
    if ckpt is not None and str(ckpt).lower() != "none":
        ckpt = os.path.abspath(ckpt)
    return dataclasses.replace(setup, dataset=os.path.abspath(setup.dataset), checkpoint=ckpt)


def _check(args: argparse.Namespace) -> None:
    """Everything that can be checked before the study starts (and minutes of fine-tuning are spent)."""
    from volssl.cli.args import check_checkpoint_argument
    from volssl.finetuning.recipes import resolve_recipe
    from volssl.search import SPACES
    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    if args.space not in SPACES:
        raise ValueError(f"--space {args.space!r}: unknown search space; known: {', '.join(sorted(SPACES))}")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    if args.n_train is not None and args.n_train < 1:
        raise ValueError(f"--n-train must be >= 1, got {args.n_train}")
    if args.steps_per_hour is not None and not args.steps_per_hour > 0:
        raise ValueError(f"--steps-per-hour must be a positive number, got {args.steps_per_hour}")
    for item in args.overrides:
        if "=" not in item or not item.partition("=")[0].strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    try:  # a bad --set fails here, not in every trial
        resolve_recipe(SPACES[args.space].recipe, args.overrides)
    except KeyError as e:
        raise ValueError(f"--set: {e.args[0] if e.args else e}") from None
    check_input_path(args.dataset, "--dataset")
    if args.checkpoint is not None and str(args.checkpoint).lower() != "none":
        check_checkpoint_argument(args.checkpoint)  # a local path, or a well-formed hf://ORG/NAME[@REVISION]
    check_output_dir(args.out, "--out folder")
