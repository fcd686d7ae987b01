"""``volssl phantoms OUT --kind brain|nuclei|axons|organs --n N`` or ``volssl phantoms --task NAME --out
DIR``: synthetic nnU-Net v2 raw datasets (``--list-tasks`` lists the named tasks)."""
from __future__ import annotations

import argparse

from volssl.cli.args import cubic_size


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"64"`` -> (64, 64, 64); ``"64,64,48"`` -> (64, 64, 48); every size >= 16."""
    return cubic_size(text, minimum=16, what="--shape")


def register(sub: argparse._SubParsersAction) -> None:
    from volssl.data.phantoms import KINDS, PHANTOM_TASKS

    p = sub.add_parser(
        "phantoms",
        help="write synthetic data (brain MRI with lesions / tumours / lacunes, CT organs, XNT nuclei or axons) "
             "as an nnU-Net v2 raw dataset",
        description="Write N training + K test synthetic cases as an nnU-Net v2 raw dataset "
        "(dataset.json, imagesTr, labelsTr, imagesTs, labelsTs). The same seed gives identical files. "
        "Either a --kind, or a named --task: " + ", ".join(PHANTOM_TASKS) + ".",
    )
    p.add_argument("out", nargs="?", default=None, help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--out", dest="out_option", default=None, metavar="DIR", help="the output directory (same as OUT)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--kind", choices=KINDS, default=None, help="what to simulate (default: brain)")
    what.add_argument("--task", choices=list(PHANTOM_TASKS), default=None,
                      help="a named phantom task (its own variant, labels and default seed)")
    what.add_argument("--list-tasks", action="store_true", help="list the named tasks and exit")
    p.add_argument("--n", type=int, default=20, help="training cases (default: 20)")
    p.add_argument("--n-test", type=int, default=None, help="held-out cases (default: max(1, n // 5))")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 0; a task's own seed for --task)")
    p.add_argument("--shape", type=parse_shape, default=None, metavar="X,Y,Z",
                   help="voxels per axis (brain: RAS grid at the in-plane spacing of 1.5-2 mm; default: "
                        "brain 160-190 mm field of view at 0.8-1 mm, nuclei/axons 128^3, organs 128x128x96)")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png (first training case)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, _parser=p)


def _run(args: argparse.Namespace) -> int:
    from volssl.data.phantoms import PHANTOM_TASKS, generate_phantoms, generate_task, render_phantom_preview

    if args.list_tasks:
        for name, task in PHANTOM_TASKS.items():
            labels = ", ".join(f"{k}={v}" for k, v in task.labels.items())
            print(f"{name}: {task.kind}, channels {'/'.join(task.channel_names)}, labels {labels}, seed {task.seed}")
            print(f"    {task.description}")
        return 0
    if args.out is not None and args.out_option is not None and args.out != args.out_option:
        args._parser.error(f"two output directories given: {args.out} and --out {args.out_option}")
    target = args.out or args.out_option
    if target is None:
        args._parser.error("an output directory is required (OUT or --out DIR)")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1 training case, got {args.n}")
    if args.n_test is not None and args.n_test < 0:
        raise ValueError(f"--n-test must be >= 0, got {args.n_test}")
    from volssl.util.paths import check_output_dir

    check_output_dir(target, "output folder")  # before any phantom is generated
    if args.task:
        out = generate_task(target, args.task, args.n, seed=args.seed, n_test=args.n_test, shape=args.shape,
                            progress=not args.no_progress, overwrite=args.overwrite)
        what = f"{args.task} (seed {args.seed if args.seed is not None else PHANTOM_TASKS[args.task].seed})"
    else:
        kind = args.kind or "brain"
        out = generate_phantoms(target, kind, args.n, seed=args.seed or 0, n_test=args.n_test, shape=args.shape,
                                progress=not args.no_progress, overwrite=args.overwrite)
        what = kind
    n_test = args.n_test if args.n_test is not None else max(1, args.n // 5)
    print(f"wrote {args.n} training + {n_test} test {what} phantoms to {out}")
    print(f"  {out / 'dataset.json'}")
    print(f"  {out / 'imagesTr'}  {out / 'labelsTr'}")
    if n_test:
        print(f"  {out / 'imagesTs'}  {out / 'labelsTs'}")
    if args.preview:
        png = render_phantom_preview(out, out / "preview.png")
        print(f"  {png}")
    return 0
