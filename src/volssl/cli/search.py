"""``volssl search``: random search of fine-tuning hyper-parameters (resumable, parallel through the storage)."""
from __future__ import annotations

import argparse
import json


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
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from volssl.search import describe_spaces, run_search

    if args.list:
        for s in describe_spaces():
            params = "; ".join(f"{k} {v}" for k, v in s["params"].items())
            print(f"{s['name']:<24} recipe {s['recipe']}, {s['metric']}: {params}")
        return 0
    if not args.space or not args.dataset:
        raise ValueError("give --space NAME and --dataset DIR (see volssl search --list)")
    best = run_search(args.space, args.trials, args.checkpoint, args.dataset, args.out, storage=args.storage,
                      study_name=args.study_name, seed=args.seed, steps_per_hour=args.steps_per_hour,
                      n_train=args.n_train, overrides=args.overrides, device=args.device)
    if args.json:
        print(json.dumps(best))
    else:
        print(f"best {best.get('metric')}: {best.get('value')} with {best.get('params')} "
              f"({best['n_complete']} completed trials); results in {args.out}")
    return 0
