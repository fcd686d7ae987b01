"""``volssl phantoms OUT --kind brain|nuclei|axons --n N``: synthetic nnU-Net v2 raw datasets."""
from __future__ import annotations

import argparse

from volssl.cli.args import cubic_size


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"64"`` -> (64, 64, 64); ``"64,64,48"`` -> (64, 64, 48); every size >= 16."""
    return cubic_size(text, minimum=16, what="--shape")


def register(sub: argparse._SubParsersAction) -> None:
    from volssl.data.phantoms import KINDS

    p = sub.add_parser(
        "phantoms",
        help="write synthetic data (brain MRI with lesions, XNT nuclei or axons) as an nnU-Net v2 raw dataset",
        description="Write N training + K test synthetic cases as an nnU-Net v2 raw dataset "
        "(dataset.json, imagesTr, labelsTr, imagesTs, labelsTs). The same seed gives identical files.",
    )
    p.add_argument("out", help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--kind", choices=KINDS, default="brain", help="what to simulate (default: brain)")
    p.add_argument("--n", type=int, default=20, help="training cases (default: 20)")
    p.add_argument("--n-test", type=int, default=None, help="held-out cases (default: max(1, n // 5))")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--shape", type=parse_shape, default=None, metavar="X,Y,Z",
                   help="voxels per axis (brain: RAS grid at the in-plane spacing of 1.5-2 mm; default: "
                        "brain 160-190 mm field of view at 0.8-1 mm, nuclei/axons 128^3)")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png (first training case)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from volssl.data.phantoms import generate_phantoms, render_phantom_preview

    out = generate_phantoms(args.out, args.kind, args.n, seed=args.seed, n_test=args.n_test, shape=args.shape,
                            progress=not args.no_progress, overwrite=args.overwrite)
    n_test = args.n_test if args.n_test is not None else max(1, args.n // 5)
    print(f"wrote {args.n} training + {n_test} test {args.kind} phantoms to {out}")
    print(f"  {out / 'dataset.json'}")
    print(f"  {out / 'imagesTr'}  {out / 'labelsTr'}")
    if n_test:
        print(f"  {out / 'imagesTs'}  {out / 'labelsTs'}")
    if args.preview:
        png = render_phantom_preview(out, out / "preview.png")
        print(f"  {png}")
    return 0
