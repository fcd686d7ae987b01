"""``volssl evaluate PRED_DIR REF_DIR --out metrics.json``: Dice and NSD per case and class."""
from __future__ import annotations

import argparse
import math
import os
import sys

from volssl.cli.args import number, positive_int


def _labels(text: str | None):
    """``"1,2"`` -> [1, 2]; ``"1+2+3,4"`` -> [(1, 2, 3), 4] (``+`` joins the labels of a region)."""
    if text is None:
        return None
    out = []
    for item in text.split(","):
        try:
            values = tuple(int(v) for v in item.split("+"))
            if not values or 0 in values:
                raise ValueError
        except ValueError:
            raise ValueError(f"--labels takes comma-separated foreground labels, not 0 (1+2 for a region), "
                             f"got {text!r}") from None
        out.append(values[0] if len(values) == 1 else values)
    return out


def _empty_score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isnan(value) or 0.0 <= value <= 1.0):
        raise ValueError(f"--empty-score must be 'nan' or a number in [0, 1], got {text!r}")
    return value


def _ignore_labels(items: list[str]) -> list[int]:
    out = []
    for text in items:
        for item in str(text).split(","):
            try:
                value = int(item)
            except ValueError:
                raise ValueError(f"--ignore-label takes integer label values (e.g. 255 or -1), got {text!r}") from None
            if value == 0:
                raise ValueError("--ignore-label cannot be 0 (background)")
            out.append(value)
    return out




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
            "cannot be scored (unreadable, too large for this machine according to the file header, shape or "
            "geometry mismatch, out of memory) are listed with their reason, not scored; every other pair is "
            "scored, and the exit code is 3 when a pair failed. Reference voxels with an ignore label "
            "(dataset.json's 'ignore', --ignore-label, or -- with a warning -- an undeclared negative value or 255) "
            "are left out of the scores, as nnU-Net does."
        ),
    )
    p.add_argument("pred_dir", help="folder of predicted label maps")
    p.add_argument("ref_dir", help="folder of reference label maps (e.g. Dataset001_X/labelsTr)")
    p.add_argument("--out", required=True, help="metrics.json to write (its folder is checked before scoring)")
    p.add_argument("--nsd-tolerance-mm", type=number(0.0, example="1 or 2.5", unit="distance in mm"), default=1.0,
                   metavar="T",
                   help="NSD tolerance in mm (default 1)")
    p.add_argument("--labels", metavar="1,2|1+2+3", help="classes to score (default: dataset.json or all found)")
    p.add_argument("--empty-score", default="nan", help="score of a class absent from both files: nan (default) or 1")
    p.add_argument("--ignore-label", action="append", default=[], metavar="V",
                   help="reference value whose voxels are left out of the scores (repeatable; besides "
                        "dataset.json's 'ignore' label)")
    p.add_argument("--max-voxels", type=positive_int, default=None, metavar="N",
                   help="do not read a file whose header declares more voxels (default: what this machine's "
                        "memory can hold)")
    p.add_argument("--workers", type=positive_int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="parallel processes (default: CPU count, at most 8)")
    p.add_argument("--strict", action="store_true",
                   help="also exit with code 3 if a reference case has no prediction (a failed pair always does)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volssl.evaluation.evaluate import evaluate_folder

    result = evaluate_folder(
        args.pred_dir, args.ref_dir, args.out, labels=_labels(args.labels),
        nsd_tolerance_mm=args.nsd_tolerance_mm, workers=args.workers, progress=not args.no_progress,
        empty_score=_empty_score(args.empty_score), ignore_labels=_ignore_labels(args.ignore_label),
        max_voxels=args.max_voxels,
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
    for w in result["warnings"]:
        print(f"volssl evaluate: warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}")
    if result["errors"]:
        print(f"volssl evaluate: {len(result['errors'])} case(s) failed and were not scored; "
              f"{mean['n_cases']} scored", file=sys.stderr)
        return 3
    return 3 if args.strict and result["missing"] else 0


def _fmt(x: float) -> str:
    return f"{x:8.4f}" if not math.isnan(x) else f"{'nan':>8}"
