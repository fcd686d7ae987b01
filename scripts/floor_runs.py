"""Why does a fine-tuning run score Dice 0 ("stay at the floor")? Threshold-free scores of its test cases.

A run whose argmax segmentation is empty can still rank the target voxels above the background as well
as its raw input does: then only its output is not yet confident enough to cross p = 0.5
(under-confident); or it ranks them worse than a raw input channel (behind its input). For every fine-tuning run (a benchmark cell: its
``config.json`` names the preprocessed labelled dataset, its ``predictions/`` the held-out cases) this
script predicts foreground probabilities (``1 - p(background)``, sliding window, no mirroring) on those
cases and prints, averaged over the cases:

* ``dice``: the run's own argmax Dice (``metrics.json``);
* ``auc``: probability that a foreground voxel outranks a background voxel (Mann-Whitney, ties 1/2);
* ``auc_input``: the same AUC of the best single input channel's raw intensity (the reference: on
  brain-lesion phantoms the FLAIR intensity alone reaches 0.98-0.99, so a network's ranking only means
  something above it);
* ``p_fg``: the mean foreground probability on foreground voxels; ``p_max``: the largest anywhere;
* ``reading``: ``learns`` (Dice >= 5); below that ``under-confident`` (the run ranks the target at
  least as well as its best input channel, within 0.01, but does not cross p = 0.5 on it) or
  ``behind its input`` (it ranks the target worse than a raw channel does).

Nothing is tuned on the test cases: no threshold is chosen, the numbers only describe the run.

Usage::

    python scripts/floor_runs.py RUN [RUN ...] [--csv OUT.csv]

Results are in docs/evidence.md ("What the floor runs are").
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

FLOOR = 5.0  # Dice points: below this a run "stays at the floor" (docs/evidence.md)


def auc(p: np.ndarray, target: np.ndarray) -> float:
    """Probability that a voxel of ``target`` (bool) gets a higher ``p`` than one outside it (ties count
    1/2); NaN when either side is empty."""
    target = np.asarray(target, bool).ravel()
    n1 = int(target.sum())
    n0 = target.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(p, np.float64).ravel())
    return float((ranks[target].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def case_scores(p_fg: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """``auc``, ``p_fg`` (mean on the target) and ``p_max`` of one case's foreground probabilities."""
    target = np.asarray(target, bool)
    if p_fg.shape != target.shape:
        raise ValueError(f"probabilities {p_fg.shape} and labels {target.shape} differ in shape")
    return {"auc": auc(p_fg, target), "p_fg": float(p_fg[target].mean()) if target.any() else float("nan"),
            "p_max": float(p_fg.max())}


def reading(dice: float, auc_value: float, auc_input: float) -> str:
    """``learns`` / ``under-confident`` / ``behind its input`` (see the module docstring); ``dice`` in points."""
    if dice >= FLOOR:
        return "learns"
    return "under-confident" if auc_value >= auc_input - 0.01 else "behind its input"


def run_scores(run: Path) -> dict[str, object]:
    """The module docstring's numbers for one fine-tuning run folder."""
    from volssl.data.storage import load_array
    from volssl.inference.model import load_finetuned
    from volssl.inference.predict import predict_probabilities

    config = json.loads((run / "config.json").read_text())
    root = Path(config["dataset"])
    cases = sorted(p.name[: -len(".nii.gz")] for p in (run / "predictions").glob("*.nii.gz"))
    if not cases:
        raise ValueError(f"{run}: no predictions/*.nii.gz to name the held-out cases")
    model = load_finetuned(run)
    per_case = []
    for case in cases:
        image = load_array(root / "images" / f"{case}.b2nd")
        labels = load_array(root / "labels" / f"{case}.b2nd")
        probs = predict_probabilities(model, image, mirror_axes=())
        target = labels.reshape(probs.shape[1:]) > 0
        per_case.append({**case_scores(1.0 - probs[0], target),
                         "auc_input": max(auc(channel, target) for channel in image)})
    dice = 100 * json.loads((run / "metrics.json").read_text())["mean"]["dice"]
    mean = {k: float(np.nanmean([c[k] for c in per_case])) for k in per_case[0]}
    return {"run": str(run), "dice": dice, **mean, "reading": reading(dice, mean["auc"], mean["auc_input"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="fine-tuning run folders (benchmark cells)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        r = run_scores(run)
        rows.append(r)
        print(f"{run.parent.parent.parent.name}/{run.name}: dice {r['dice']:.1f}  auc {r['auc']:.3f}  "
              f"(input {r['auc_input']:.3f})  p_fg {r['p_fg']:.2f}  p_max {r['p_max']:.2f}  {r['reading']}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
