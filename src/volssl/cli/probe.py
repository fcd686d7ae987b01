"""``volssl probe``: the representation probe of a pre-trained encoder (training/probe.py).

    volssl probe --checkpoint RUN_OR_PT --dataset LABELLED [--n-train 4 --n-eval 8] [--seed S] [--json]

Freezes the checkpoint's encoder, fits a linear 1x1x1 head on its multi-scale features of a few
labelled cases and prints the Dice on other labelled cases, next to the same probe on the randomly
initialised network (the floor). A raw nnU-Net dataset is preprocessed with the checkpoint's plan
first (into ``--work``, default ``RUN/probe_data`` beside the checkpoint's run).
"""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="linear probe of a pre-trained encoder against its random-init floor",
        description="Freeze a pre-training checkpoint's encoder, fit a linear 1x1x1 head on its multi-scale "
                    "features of a few labelled cases, and report the Dice on other labelled cases (never the "
                    "dataset's test split), next to the same probe on the randomly initialised network.")
    p.add_argument("--checkpoint", required=True,
                   help="pre-training run directory, checkpoint .pt, exported safetensors folder or "
                        "hf://ORG/NAME[@REVISION]")
    p.add_argument("--dataset", required=True, help="labelled dataset: nnU-Net v2 raw, or preprocessed with the "
                                                    "checkpoint's plan")
    p.add_argument("--work", default=None, help="where a raw dataset is preprocessed (default: RUN/probe_data; "
                                                 "required with an hf:// checkpoint and a raw dataset)")
    p.add_argument("--n-train", type=int, default=4, help="cases the head is fitted on (default 4)")
    p.add_argument("--n-eval", type=int, default=8, help="other cases it is scored on (default 8)")
    p.add_argument("--patches-per-case", type=int, default=4, help="patches per case (default 4)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps of the head (default 200)")
    p.add_argument("--seed", type=int, default=0, help="probe seed: cases, patches, head (default 0)")
    p.add_argument("--no-floor", action="store_true", help="skip the random-init floor")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    # what can be checked is checked before the checkpoint is loaded and the data preprocessed
    for option in ("n_train", "n_eval", "patches_per_case", "steps"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    from volssl.cli.args import check_checkpoint_argument
    from volssl.util.hub import is_hub_reference

    check_checkpoint_argument(args.checkpoint)
    dataset = check_input_path(args.dataset, "--dataset", kind="dir")
    raw = not (dataset / "plan.json").is_file()  # a raw dataset is preprocessed into --work
    if raw and args.work:
        check_output_dir(args.work, "--work folder")
    if raw and not args.work and is_hub_reference(args.checkpoint):
        raise ValueError(f"--work: give a folder for the preprocessed probe data ({args.checkpoint} lives in the "
                         "Hugging Face download cache, not in a run folder)")

    from volssl.finetuning.finetune import load_source
    from volssl.training.probe import Probe, ProbeConfig, prepare_probe_data, run_probe

    source = load_source(args.checkpoint)
    if source is None:
        raise ValueError("--checkpoint: give a pre-training run or checkpoint (the floor alone needs none)")
    if args.work or is_hub_reference(source.path):
        work = Path(args.work or "probe_data")  # hf:// with a preprocessed dataset: --work is not used
    else:
        run_dir = Path(source.path).parent.parent if Path(source.path).parent.name == "checkpoints" else \
            Path(source.path).parent
        work = run_dir / "probe_data"
    if raw and not args.work:
        check_output_dir(work, "probe data folder (--work)")
    root = prepare_probe_data(args.dataset, source.plan, work, progress=not args.json)
    patch = source.patch_size
    if not patch:
        raise ValueError(f"{source.path} does not record its pre-training patch")
    cfg = ProbeConfig(n_train=args.n_train, n_eval=args.n_eval, patches_per_case=args.patches_per_case,
                      steps=args.steps, seed=args.seed)
    probe = Probe(root, source.model, patch, cfg)
    row = run_probe(probe, source.network, floor=not args.no_floor)
    result = {"checkpoint": source.path, "method": source.method, "step": source.step, **row, **probe.describe()}
    if row["probe_floor"] is not None:
        result["gain_over_floor"] = row["probe_dice"] - row["probe_floor"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"probe of {source.method} (step {source.step}) on {root}: {len(probe.train_ids)} fit / "
          f"{len(probe.eval_ids)} scored cases, {probe.n_classes - 1} foreground class(es)")
    print(f"  pre-trained encoder  Dice {row['probe_dice']:.4f}")
    if row["probe_floor"] is not None:
        print(f"  random init (floor)  Dice {row['probe_floor']:.4f}   difference {result['gain_over_floor']:+.4f}")
    print(f"  {row['seconds']:.1f} s")
    return 0
