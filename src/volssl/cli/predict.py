"""``volssl predict --model FT --input DIR --output DIR``: segment a folder of volumes."""
from __future__ import annotations

import argparse
import json
import math
import sys

from volssl.cli.args import number, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment volumes with a fine-tuned model (sliding window, mirroring TTA, input geometry kept)",
        description=(
            "Reads every volume under --input (NIfTI, NRRD/MHA, TIFF, Zarr; files <case>_0000, <case>_0001 ... "
            "form one multi-channel case), preprocesses it like the training data, predicts with a "
            "Gaussian-weighted sliding window (and mirroring test-time augmentation), and writes "
            "<case>.nii.gz label maps with exactly the input file's shape and affine (and <case>.npz "
            "probabilities with --probabilities). Files that cannot be read or have the wrong number of "
            "channels are reported and skipped; OUTPUT/predict.json lists everything."
        ),
    )
    p.add_argument("--model", required=True, metavar="FT",
                   help="fine-tuning run directory, checkpoint .pt file, exported safetensors folder or "
                        "hf://ORG/NAME[@REVISION]")
    p.add_argument("--input", required=True, metavar="DIR", help="folder of volumes (or one volume file)")
    p.add_argument("--output", "--out", required=True, metavar="DIR",
                   help="output folder (created; checked to be writable before anything is predicted)")
    p.add_argument("--probabilities", action="store_true", help="also write <case>.npz class probabilities")
    p.add_argument("--overlap", type=number(0.0, 1.0, hi_open=True), default=0.5,
                   help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--no-mirror", action="store_true", help="no mirroring test-time augmentation (8x faster)")
    p.add_argument("--mirror-axes", default="0,1,2", metavar="AXES", help="axes to mirror (default 0,1,2)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=positive_int, default=1, metavar="N", help="tiles per forward pass (default 1)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--spacing", metavar="X,Y,Z", help="voxel spacing (mm) for TIFF/Zarr inputs that carry none")
    p.add_argument("--thresholds", type=number(), nargs="+", default=[0.5], metavar="T",
                   help="affinity models: agglomeration thresholds (first -> OUT/<case>.nii.gz, each -> OUT/t<T>/)")
    p.add_argument("--strict", action="store_true", help="exit with code 3 if any input was skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)





def _axes(text: str) -> tuple[int, ...]:
    try:
        axes = tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"--mirror-axes takes comma-separated axes among 0,1,2, got {text!r}") from None
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"--mirror-axes takes comma-separated axes among 0,1,2, got {text!r}")
    return axes


def run(args: argparse.Namespace) -> int:
    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    # everything that can be checked is checked before the model is loaded and minutes are spent
    spacing = None
    if args.spacing:
        try:
            spacing = tuple(float(v) for v in args.spacing.split(","))
        except ValueError:
            raise ValueError(f"--spacing must be X,Y,Z in mm, got {args.spacing!r}") from None
        if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"--spacing must be three positive numbers X,Y,Z in mm, got {args.spacing!r}")
    mirror_axes = () if args.no_mirror else _axes(args.mirror_axes)
    from volssl.util.hub import is_hub_reference

    if is_hub_reference(args.model):
        from volssl.util.hub import parse_hub_reference

        parse_hub_reference(args.model)  # a malformed address fails now; the download comes with the model
    else:
        check_input_path(args.model, "--model")
    check_input_path(args.input, "--input")
    check_output_dir(args.output, "--output folder")

    from volssl.inference.predict import PredictOptions, predict_folder

    options = PredictOptions(overlap=args.overlap, mirror_axes=mirror_axes, sw_batch_size=args.batch,
                             autocast=args.bf16, device=args.device, save_probabilities=args.probabilities,
                             thresholds=args.thresholds)
    summary = predict_folder(args.model, args.input, args.output, options, spacing=spacing,
                             progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"volssl predict: {summary['n_predicted']} of {summary['n_cases']} case(s) predicted into "
              f"{summary['output']} in {summary['seconds']:.1f} s")
    for f in summary["failed"]:
        print(f"volssl predict: skipped {f['case']}: {f['path']}: {f['reason']}", file=sys.stderr)
    sys.stdout.flush()
    return 3 if args.strict and summary["failed"] else 0
