"""``volssl preprocess SRC OUT``: quality filter + preprocessing into a chunked dataset."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _floats(text: str, n: int, what: str) -> tuple[float, ...] | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers or 'none', got {text!r}") from None
    if n == 3 and len(values) == 1:
        values = values * 3
    if len(values) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers or 'none', got {text!r}")
    return values


def _threshold(text: str, what: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number or 'off', got {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {text!r}")
    return value


def _max_voxels(text: str) -> int | str | None:
    """``--max-voxels``: "auto", "off"/"none", an integer (``1e9`` allowed), ``N^3`` or ``AxBxC``."""
    t = text.strip().lower().replace(" ", "").replace("_", "").replace(",", "")
    if t == "auto":
        return "auto"
    if t in ("off", "none"):
        return None
    try:
        if "^3" in t and t.endswith("^3"):
            value = int(t[:-2]) ** 3
        elif "x" in t:
            dims = [int(v) for v in t.split("x")]
            if len(dims) != 3:
                raise ValueError
            value = dims[0] * dims[1] * dims[2]
        else:
            f = float(t)
            if f != int(f):
                raise ValueError
            value = int(f)
    except (ValueError, OverflowError):
        raise ValueError(f"--max-voxels must be a number of voxels (e.g. 268435456, 2.7e8, 640^3 or 512x512x1024), "
                         f"'auto' or 'off', got {text!r}") from None
    if value < 1:
        raise ValueError(f"--max-voxels must be >= 1, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="quality-filter and preprocess volumes (NIfTI, NRRD/MHA, nnU-Net raw datasets, TIFF, Zarr)",
        description=(
            "Reads SRC (a folder searched recursively, or an nnU-Net v2 raw dataset), excludes bad files "
            "(listed with their reason in OUT/report.json and at the end), reorients to RAS, crops to the "
            "nonzero box, resamples, clips and normalises, and writes OUT (chunked arrays + manifest). "
            "Reruns resume; --shard i/n splits the work across machines. For microscopy / nanotomography "
            "use --plan xnt (native spacing, no clinical filter) or switch the filter rules off."
        ),
    )
    p.add_argument("src", help="source folder (or nnU-Net v2 raw dataset folder)")
    p.add_argument("out", help="output folder")
    p.add_argument("--plan", default="s3d", help="named plan: s3d (default), amaes, xnt")
    p.add_argument("--spacing", metavar="X,Y,Z",
                   help="voxel spacing in mm for files that carry none (TIFF, Zarr); x,y,z = the stored "
                        "z,y,x stack transposed")
    p.add_argument("--target-spacing", metavar="X,Y,Z|none", help="resampling target in mm, or 'none' to keep")
    p.add_argument("--clip", metavar="LO,HI|none", help="clip intensities to these percentiles (AMAES: 0,99)")
    p.add_argument("--norm", choices=["zscore", "zscore_nonzero", "none"], help="intensity normalisation")
    p.add_argument("--no-crop", action="store_true", help="do not crop to the nonzero bounding box")
    p.add_argument("--label-interp", choices=["nearest", "linear"], help="label resampling")
    p.add_argument("--min-fov", metavar="MM|off", help="exclude volumes whose field of view is below this (default 50)")
    p.add_argument("--max-spacing", metavar="MM|off", help="exclude volumes with a spacing above this (default 6.5)")
    p.add_argument("--min-file-kb", metavar="KB|off",
                   help="exclude files smaller than this, 1 kB = 1000 B (default 200)")
    p.add_argument("--max-voxels", default="auto", metavar="N|auto|off",
                   help="exclude volumes whose header declares more voxels than this (per file, checked before "
                        "any data is read; e.g. 640^3 or 2.7e8); 'auto' (default): available memory / 32 bytes")
    p.add_argument("--zarr-allow-missing-chunks", action="store_true",
                   help="read chunk files missing from a Zarr store as its fill value (with a warning) instead of "
                        "excluding the volume; for writers that leave out empty chunks (zarr-python 3 does)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="parallel processes (default: CPU count, at most 8)")
    p.add_argument("--shard", default="0/1", metavar="i/n", help="process shard i of n (0-based), e.g. 0/4")
    p.add_argument("--strict", action="store_true", help="exit with code 3 if anything was excluded")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def build_plan(args: argparse.Namespace):
    """The plan named by ``--plan`` with the command-line overrides applied."""
    from volssl.data.preprocess import PreprocessPlan, get_plan

    d = get_plan(args.plan).to_dict()
    if args.target_spacing is not None:
        d["target_spacing"] = _floats(args.target_spacing, 3, "--target-spacing")
    if args.clip is not None:
        d["clip_percentiles"] = _floats(args.clip, 2, "--clip")
    if args.norm is not None:
        d["normalization"] = args.norm
    if args.no_crop:
        d["crop_nonzero"] = False
    if args.label_interp is not None:
        d["label_interpolation"] = args.label_interp
    rules = dict(d["rules"])
    if args.min_fov is not None:
        rules["min_fov_mm"] = _threshold(args.min_fov, "--min-fov")
    if args.max_spacing is not None:
        rules["max_spacing_mm"] = _threshold(args.max_spacing, "--max-spacing")
    if args.min_file_kb is not None:
        kb = _threshold(args.min_file_kb, "--min-file-kb")
        rules["min_file_bytes"] = None if kb is None else int(round(kb * 1000))
    d["rules"] = rules
    return PreprocessPlan.from_dict(d)


def run(args: argparse.Namespace) -> int:
    from volssl.data.preprocess import parse_shard, preprocess
    from volssl.util.paths import check_output_dir

    plan = build_plan(args)
    spacing = _floats(args.spacing, 3, "--spacing") if args.spacing else None
    shard = parse_shard(args.shard)
    max_voxels = _max_voxels(getattr(args, "max_voxels", "auto"))
    check_output_dir(args.out, "output folder")  # a file, or not writable: refused before any work
    summary = preprocess(
        args.src, args.out, plan, shard=shard, workers=args.workers, spacing=spacing,
        strict=args.strict, progress=not args.no_progress, max_voxels=max_voxels,
        allow_missing_chunks=bool(getattr(args, "zarr_allow_missing_chunks", False)),
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.format())
    sys.stdout.flush()
    return summary.exit_code
