"""Does pre-training pay? Each pre-trained method against its own from-scratch twin, paired, with a
bootstrap confidence interval; and the representation-probe curves of the pre-training runs.

Pairing. A method's run and its twin's run form a pair when they share the folder they sit in (one
benchmark draw and dataset: ``finetune/<dataset>/``), the dataset, ``n_train`` and the seed: the
same training cases, the same test cases, the same fine-tuning stream, only the initialisation (and
the twin's own recipe) differ. The difference of a pair is ``Dice(method) - Dice(twin)``.

Interval. Per (method, twin, dataset, n_train): the mean difference over pairs and a percentile
bootstrap 95% interval (``n_boot`` resamples of the pairs with replacement). The verdict is "gain"
when the interval lies above 0, "loss" when below, else "no clear difference".

What a difference is made of. With few labelled cases some runs never leave the floor (they predict
background: Dice below :data:`FLOOR_DICE`), and a few such runs decide a mean difference
(docs/evidence.md). Each row therefore also counts the runs at the floor of either arm and gives the mean
difference over the pairs in which both arms learned.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

VERDICTS = {"gain": "pre-training helps (95% CI above 0)", "loss": "pre-training hurts (95% CI below 0)",
            "none": "no clear difference (95% CI spans 0)"}
#: a run whose mean Dice is below this never left the floor (it predicts background, or nearly)
FLOOR_DICE = 0.05


def bootstrap_ci(diffs: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (NaN-free); ``(nan, nan)`` for none."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan
    if d.size == 1:
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_differences(runs: Sequence[Any], twins: Mapping[str, str], n_boot: int = 2000,
                       seed: int = 0) -> list[dict[str, Any]]:
    """One row per (method, twin, dataset, n_train) with at least one pair (see the module docstring).

    ``runs``: :class:`volssl.reports.report.Run` s; ``twins``: method -> its from-scratch twin.
    Row: ``method, twin, dataset, n_train, n_pairs, method_dice, twin_dice, diff, ci_low, ci_high,
    verdict, method_floor, twin_floor, n_both_learned, diff_both_learned`` (Dice as fractions; ``diff`` = mean
    paired difference; ``*_floor``: runs with Dice below :data:`FLOOR_DICE`; ``diff_both_learned``: the mean
    difference over the ``n_both_learned`` pairs in which neither run is at the floor, NaN for none).
    """
    index = {(r.path.parent, r.dataset, r.n_train, r.seed, r.method): r for r in runs}
    rows = []
    for method, twin in twins.items():
        groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for (folder, dataset, n, s, m), r in index.items():
            if m != method:
                continue
            other = index.get((folder, dataset, n, s, twin))
            if other is not None:
                groups.setdefault((dataset, n), []).append((r.dice, other.dice))
        for (dataset, n), pairs in sorted(groups.items()):
            a = np.array([p[0] for p in pairs], dtype=np.float64)
            b = np.array([p[1] for p in pairs], dtype=np.float64)
            diffs = a - b
            lo, hi = bootstrap_ci(diffs, n_boot, seed)
            verdict = "gain" if lo > 0 else "loss" if hi < 0 else "none"
            learned = (a >= FLOOR_DICE) & (b >= FLOOR_DICE)
            rows.append({"method": method, "twin": twin, "dataset": dataset, "n_train": n, "n_pairs": len(pairs),
                         "method_dice": float(np.nanmean(a)), "twin_dice": float(np.nanmean(b)),
                         "diff": float(np.nanmean(diffs)), "ci_low": lo, "ci_high": hi, "verdict": verdict,
                         "method_floor": int((a < FLOOR_DICE).sum()), "twin_floor": int((b < FLOOR_DICE).sum()),
                         "n_both_learned": int(learned.sum()),
                         "diff_both_learned": float(diffs[learned].mean()) if learned.any() else math.nan})
    return rows


def paired_markdown(rows: Sequence[Mapping[str, Any]], evidence_note: str = "") -> str:
    """The report section of :func:`paired_differences` rows."""
    lines = ["## Pre-training against its from-scratch twin (paired)", "",
             "Each pre-trained run is paired with its twin's run on the same draw, dataset, training cases, "
             "seed and test cases; the difference is Dice(pre-trained) - Dice(twin), x100, with a bootstrap 95% "
             f"interval over the pairs. 'At the floor': runs with Dice below {100 * FLOOR_DICE:g} (they never found "
             "the target); 'where both learn': the mean difference over the other pairs. Also in paired.csv.", "",
             "| Method | Twin | Dataset | n_train | pairs | Dice | twin Dice | difference [95% CI] | at the floor "
             "(method / twin) | where both learn (pairs) | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = VERDICTS[r["verdict"]]
        if r["verdict"] != "gain" and evidence_note:
            note += f"; {evidence_note}"
        both = r.get("diff_both_learned", math.nan)
        both = "-" if both is None or math.isnan(both) else f"{100 * both:+.1f} ({r['n_both_learned']})"
        lines.append(f"| {r['method']} | {r['twin']} | {r['dataset']} | {r['n_train']} | {r['n_pairs']} | "
                     f"{100 * r['method_dice']:.1f} | {100 * r['twin_dice']:.1f} | {100 * r['diff']:+.1f} "
                     f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | {r.get('method_floor', '-')} / "
                     f"{r.get('twin_floor', '-')} | {both} | {note} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- probe curves
def find_probe_runs(dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{run name: probe.csv}`` of every pre-training run under ``dirs`` that holds a probe.csv; a run is
    named by its folder, with as many parent folders as it takes to tell runs apart (``draw1/pretrain/s3d``)."""
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.exists():
            files += sorted([d / "probe.csv"] if (d / "probe.csv").is_file() else d.rglob("probe.csv"))
    files = list(dict.fromkeys(f.resolve() for f in files))
    depth = 1
    while True:
        names = ["/".join(f.parent.parts[-depth:]) for f in files]
        if len(set(names)) == len(names) or depth >= max((len(f.parent.parts) for f in files), default=1):
            return dict(zip(names, files))
        depth += 1


def probe_summary(probe_runs: Mapping[str, Path]) -> list[dict[str, Any]]:
    """Per run: the floor, the first, best and last probe Dice, and the step of the best."""
    from volssl.training.probe import read_probe_csv

    rows = []
    for name, path in probe_runs.items():
        data = [r for r in read_probe_csv(path) if "probe_dice" in r]
        if not data:
            continue
        best = max(data, key=lambda r: r["probe_dice"])
        floor = float(np.mean([r["probe_floor"] for r in data if "probe_floor" in r])) if any(
            "probe_floor" in r for r in data) else math.nan
        rows.append({"run": name, "floor": floor, "first": data[0]["probe_dice"], "first_step": int(data[0]["step"]),
                     "best": best["probe_dice"], "best_step": int(best["step"]), "last": data[-1]["probe_dice"],
                     "last_step": int(data[-1]["step"]), "above_floor": data[-1]["probe_dice"] - floor})
    return rows


def plot_probe_curves(probe_runs: Mapping[str, Path], path: str | os.PathLike) -> None:
    """Every run's probe Dice against the pre-training step (solid) and its random-init floor (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volssl.training.probe import read_probe_csv
    from volssl.util.atomic import atomic_path

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, (name, f) in enumerate(probe_runs.items()):
        data = [r for r in read_probe_csv(f) if "probe_dice" in r]
        if not data:
            continue
        color = f"C{k % 10}"
        ax.plot([r["step"] for r in data], [r["probe_dice"] for r in data], "o-", color=color, label=name, ms=3)
        floors = [r["probe_floor"] for r in data if "probe_floor" in r]
        if floors:
            ax.axhline(float(np.mean(floors)), color=color, ls="--", lw=0.8)
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("linear-probe Dice")
    ax.set_title("representation probe (dashed: each run's random-init floor)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def probe_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["## Representation probe during pre-training", "",
             "A linear 1x1x1 head on the frozen encoder's multi-scale features, fitted on a few labelled cases "
             "and scored (Dice x100) on others (`volssl probe`); the floor is the same probe on the randomly "
             "initialised network. Curves: probe_curves.png.", "", "![probe curves](probe_curves.png)", "",
             "| Pre-training run | floor | first (step) | best (step) | last (step) | last - floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {100 * r['floor']:.1f} | {100 * r['first']:.1f} ({r['first_step']}) | "
                     f"{100 * r['best']:.1f} ({r['best_step']}) | {100 * r['last']:.1f} ({r['last_step']}) | "
                     f"{100 * r['above_floor']:+.1f} |")
    return "\n".join(lines) + "\n"
