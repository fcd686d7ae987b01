"""``volssl finetune``: fine-tune a pre-trained checkpoint (or train from scratch) on labelled data;
``volssl recipes``: the fine-tuning recipes.

    volssl finetune --checkpoint RUN_OR_CKPT --dataset DATASET --out FT [--recipe s3d] [--fold K]
                    [--n-train N | --fraction F] [--seed S] [--preprocessed-dir DIR] [--set key=value ...]
    volssl finetune --checkpoint none --recipe scratch --dataset DATASET --out FT      # "No (Fixed)"
    volssl finetune ... --resume                      # continue FT (same arguments)
    volssl finetune ... --overwrite                   # replace the run in FT

SIGTERM / SIGUSR1 save ``FT/checkpoints/latest.pt`` and exit 0; rerun with ``--resume``.
"""
from __future__ import annotations

import argparse
import json
import os

from volssl.cli.args import add_run_folder_arguments, check_checkpoint_argument
from volssl.cli.configs import add_set_argument
from volssl.cli.run_status import exit_code


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pre-trained network (or train from scratch) on a labelled dataset",
        description="Fine-tune CHECKPOINT on DATASET (an nnU-Net v2 raw dataset, preprocessed with the checkpoint's "
                    "plan, or an already preprocessed one) with a recipe of the S3D paper's Table 2. Writes "
                    "FT/run.json, FT/splits.json, FT/config.json, FT/checkpoints/{latest,best,final}.pt (what "
                    "`volssl predict --model FT` loads), FT/scalars.csv and FT/tb/.",
        epilog="Recipes: `volssl recipes`. Data parallel: torchrun --nproc_per_node G -m volssl finetune ... "
               "(batch_size is the global batch; preprocess the dataset beforehand). SIGTERM / SIGUSR1 save "
               "FT/checkpoints/latest.pt and exit 0; rerun the same command with --resume.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="pre-training run directory, checkpoint .pt (or an imported one), exported safetensors "
                        "folder or hf://ORG/NAME[@REVISION]; 'none': from scratch")
    p.add_argument("--dataset", required=True, help="nnU-Net v2 raw dataset, or a preprocessed volssl dataset")
    p.add_argument("--out", required=True, metavar="FT", help="fine-tuning run directory")
    p.add_argument("--recipe", default=None, help="fine-tuning recipe (default: s3d; scratch with --checkpoint none)")
    p.add_argument("--fold", type=int, default=0, help="cross-validation fold, 0-4 (default 0)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--n-train", type=int, default=None, metavar="N",
                      help="train on N cases drawn (seeded) from the fold's training cases")
    size.add_argument("--fraction", type=float, default=None, metavar="F",
                      help="train on this fraction of the fold's training cases")
    p.add_argument("--seed", type=int, default=0, help="run seed: subset, initialisation, patches (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 5 folds (default 0; keep it fixed)")
    p.add_argument("--preprocessed-dir", default=None, metavar="DIR",
                   help="preprocess a raw dataset here, shared between runs (default: FT/preprocessed)")
    p.add_argument("--workers", type=int, default=1, help="preprocessing processes (default 1)")
    p.add_argument("--plan", default=None, help="preprocessing plan without a checkpoint (default: s3d)")
    p.add_argument("--arch", default=None, help="architecture without a checkpoint (default: the recipe's)")
    p.add_argument("--stage-steps", type=_ints, default=None, metavar="A,B,...",
                   help="length of each stage of the recipe, in order (e.g. 200,200,4000)")
    p.add_argument("--method-name", default=None,
                   help="'method' recorded in run.json (default: the pre-training method [+ recipe])")
    add_run_folder_arguments(p, "FT", "its checkpoints, scalars.csv, tb/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_set_argument(p)
    p.set_defaults(func=_run)

    r = sub.add_parser("recipes", help="list the fine-tuning recipes (the S3D paper's Table 2 rows)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=_recipes)


def _run(args: argparse.Namespace) -> int:
    from volssl.finetuning.finetune import finetune
    from volssl.training import distributed
    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    check_output_dir(args.out, "run folder")  # before any work (loading the checkpoint, preprocessing)
    scratch = str(args.checkpoint).lower() == "none"
    if not scratch:  # a missing path, a dangling link or a link loop: one line now, not a traceback later
        check_checkpoint_argument(args.checkpoint)
    check_input_path(args.dataset, "--dataset", kind="dir")
    recipe = args.recipe or ("scratch" if scratch else "s3d")
    overrides = list(args.overrides)
    for flag, key in ((args.plan, "plan"), (args.arch, "arch")):
        if flag is not None:
            if not scratch:
                raise ValueError(f"--{key} applies only with --checkpoint none: a checkpoint brings its own {key}")
            overrides.append(f"{key}={flag}")
    try:
        summary = finetune(None if scratch else args.checkpoint, args.dataset, args.out, recipe=recipe,
                           fold=args.fold, n_train=args.n_train, fraction=args.fraction, seed=args.seed,
                           preprocessed_dir=args.preprocessed_dir, overrides=overrides,
                           progress=not args.no_progress, resume=args.resume, split_seed=args.split_seed,
                           stage_steps=args.stage_steps, method_name=args.method_name, workers=args.workers,
                           overwrite=args.overwrite)
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        loss = "n/a" if summary.get("loss") is None else f"{summary['loss']:.5f}"
        print(f"{summary['status']} at step {summary['step']} (loss {loss}) in {summary['seconds']:.1f} s: "
              f"{summary['method']} ({summary['recipe']}), {summary['n_train']} training cases")
        print(f"  checkpoints  {summary['checkpoints']}/{{latest,best,final}}.pt")
        print(f"  run.json     {summary['run_json']}")
        print(f"  splits       {summary['splits']}")
        print(f"  data         {summary['preprocessed']}")
        print(f"  scalars      {summary['csv']}")
    return exit_code(summary, "finetune")


def _recipes(args: argparse.Namespace) -> int:
    from volssl.finetuning.recipes import describe_recipes

    rows = describe_recipes()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        stages = " + ".join(f"{s['name']} {s['steps']} ({s['trainable']}, {s['lr']})" for s in r["stages"])
        print(f"{r['name']:<{width}}  transfer {r['transfer']:<7} lr {r['peak_lr']:<7g} {stages}")
    return 0
