"""``volssl evaluate PRED_DIR REF_DIR --out metrics.json``: Dice and NSD per case and class."""
from __future__ import annotations

import argparse
import math
import os
import sys


def _labels(text: str | None):
    """``"1,2"`` -> [1, 2]; ``"1+2+3,4"`` -> [(1, 2, 3), 4] (``+`` joins the labels of a region)."""
    if text is None:
        return None
    out = []
    for item in text.split(","):
        try:
            values = tuple(int(v) for v in item.split("+"))
        except ValueError:
            raise ValueError(f"--labels takes comma-separated integers (1+2 for a region), got {text!r}") from None
        out.append(values[0] if len(values) == 1 else values)
    return out


def _empty_score(text: str) -> float:
    value = float(text)
    if not (math.isnan(value) or 0.0 <= value <= 1.0):
        raise ValueError(f"--empty-score must be 'nan' or a number in [0, 1], got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and normalised surface distance of predicted label maps against references",
        description=(
            "Pairs the label maps of PRED_DIR and REF_DIR by file name (NIfTI, NRRD, MHA, TIFF, Zarr), "
            "scores every foreground class (from dataset.json when REF_DIR is part of an nnU-Net "
            "dataset, else the labels found in the references) with Dice and NSD at a tolerance in mm "
            "(the reference's voxel spacing), and writes per-case scores and means to --out. A class "
            "absent from both files scores NaN and is left out of the means (--empty-score 1 to count "
            "it as perfect); a class in only one of them scores 0. Missing predictions and pairs that "
            "cannot be compared (shape or geometry mismatch) are listed, not scored."
        ),
    )
    p.add_argument("pred_dir", help="folder of predicted label maps")
    p.add_argument("ref_dir", help="folder of reference label maps (e.g. Dataset001_X/labelsTr)")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--nsd-tolerance-mm", type=float, default=1.0, metavar="T", help="NSD tolerance in mm (default 1)")
    p.add_argument("--labels", metavar="1,2|1+2+3", help="classes to score (default: dataset.json or all found)")
    p.add_argument("--empty-score", default="nan", help="score of a class absent from both files: nan (default) or 1")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="parallel processes (default: CPU count, at most 8)")
    p.add_argument("--strict", action="store_true", help="exit with code 3 if a case is missing or failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volssl.evaluation.evaluate import evaluate_folder

    result = evaluate_folder(
        args.pred_dir, args.ref_dir, args.out, labels=_labels(args.labels),
        nsd_tolerance_mm=args.nsd_tolerance_mm, workers=args.workers, progress=not args.no_progress,
        empty_score=_empty_score(args.empty_score),
    )
    mean = result["mean"]
    tol = result["settings"]["nsd_tolerance_mm"]
    print(f"{'class':>12} {'name':>20} {'dice':>8} {f'nsd@{tol:g}mm':>10} {'n':>5}")
    for k, v in mean["per_class"].items():
        print(f"{k:>12} {v['name'][:20]:>20} {_fmt(v['dice'])} {_fmt(v['nsd']):>10} {v['n']:>5}")
    print(f"{'mean':>12} {'':>20} {_fmt(mean['dice'])} {_fmt(mean['nsd']):>10} {mean['n_cases']:>5}")
    for case in result["missing"]:
        print(f"volssl evaluate: warning: no prediction for case {case}", file=sys.stderr)
    for e in result["errors"]:
        print(f"volssl evaluate: warning: case {e['case']} not scored: {e['error']}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 3 if args.strict and (result["missing"] or result["errors"]) else 0


def _fmt(x: float) -> str:
    return f"{x:8.4f}" if not math.isnan(x) else f"{'nan':>8}"
