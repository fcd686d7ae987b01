"""``volssl report``: methods x datasets results of fine-tuning runs, ranks, rank stability, low-data curves.

Input: run directories (or folders searched recursively for them). A run directory holds
    * ``run.json``: ``{"method": str, "dataset": str, "n_train": int, "seed": int, "fold": int|null}``
      and optionally ``"pretrained": bool`` (default: False for the from-scratch method names of
      :data:`SCRATCH_METHODS`, True otherwise);
    * ``metrics.json``: written by ``volssl evaluate`` (:func:`volssl.evaluation.evaluate_folder`).
A run without a readable metrics.json or with an invalid run.json is skipped and listed in the notes.

Aggregation
    * A run's score is its metrics.json ``mean`` (Dice, NSD: mean over classes of per-class means).
    * Main table (the paper's Table 3): per dataset, the runs with the dataset's largest ``n_train``
      (its full training set); per method and dataset, the mean over those runs (seeds, folds).
      Values are shown x100. Average and ranks use the datasets on which every method has a score;
      per dataset the methods are ranked by mean score (1 = best, ties averaged), the average rank is
      the mean over datasets (:mod:`volssl.reports.ranking`).
    * Rank stability (Fig. 3): a case's score is the mean over classes of its per-class scores
      (NaN classes left out), averaged over the runs that scored the case; per dataset the cases
      every method scored are resampled with replacement (``n_boot`` samples, paired across
      methods), and the per-dataset and aggregated ranks recomputed per sample.
    * Low-data curves (Table 4): per method, dataset and ``n_train``, mean and sample standard
      deviation over runs (seeds) of the run scores. The "average" panel averages the per-dataset
      means over the datasets of the method, at the ``n_train`` values every one of them has.

Outputs in ``out_dir``: results.csv (one row per run), table.csv and table.md (main tables),
ranks.csv and rank_stability.png, low_data.csv and low_data.png, report.md (all of it, images
embedded).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from volssl.evaluation.evaluate import load_metrics
from volssl.reports.ranking import BootstrapRanks, average_ranks, bootstrap_ranks, dataset_ranks
from volssl.util.atomic import atomic_path, write_text_atomic

SCRATCH_METHODS = ("scratch", "none", "no", "no_fixed", "no_dyn", "random", "random_init", "baseline")
METRICS = ("dice", "nsd")
METRIC_NAMES = {"dice": "Dice", "nsd": "NSD"}
#: instance metrics shown for runs evaluated with ``volssl evaluate-instances`` (lower is better for
#: VOI and Rand error, higher for Rand split/merge, ERL fraction and the XPRESS score)
INSTANCE_METRICS = ("voi_split", "voi_merge", "rand_error", "xpress_rand_split", "xpress_rand_merge", "erl_fraction",
                    "xpress")


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: its run.json fields, its scores and per-case scores."""

    path: Path
    method: str
    dataset: str
    n_train: int
    seed: int
    fold: int | None
    pretrained: bool
    dice: float
    nsd: float
    n_cases: int
    n_missing: int
    n_errors: int
    case_scores: dict[str, tuple[float, float]]  # case -> (dice, nsd), means over classes
    instance: dict[str, float] | None = None  # instance runs (evaluate-instances metrics.json): their means


def find_runs(run_dirs: Iterable[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """Every run under ``run_dirs`` (each a run directory or a folder searched for run.json).

    Returns:
        ``(runs, problems)``: runs sorted by (dataset, method, n_train, seed, fold, path); problems
        are sentences naming the skipped file and why.

    Raises:
        FileNotFoundError: a given path does not exist.
        ValueError: a given path is a file other than run.json.
    """
    found: dict[Path, None] = {}
    for d in run_dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"{d}: no such run directory")
        if d.is_file() and d.name != "run.json":
            raise ValueError(f"{d}: not a run directory (a folder with run.json) nor a run.json")
        files = [d] if d.is_file() else (
            [d / "run.json"] if (d / "run.json").is_file() else sorted(d.rglob("run.json")))
        for f in files:
            found[f.resolve()] = None
    runs: list[Run] = []
    problems: list[str] = []
    for f in found:
        try:
            runs.append(_read_run(f))
        except ValueError as e:
            problems.append(str(e))
    runs.sort(key=lambda r: (r.dataset, r.method, r.n_train, r.seed, -1 if r.fold is None else r.fold, str(r.path)))
    return runs, problems


def _read_run(run_json: Path) -> Run:
    try:
        meta = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run_json}: cannot read run.json: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{run_json}: run.json is not an object")
    for key, types in (("method", str), ("dataset", str), ("n_train", int), ("seed", int)):
        if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool) or meta.get(key) == "":
            raise ValueError(f"{run_json}: run.json needs {key!r} ({types.__name__}), got {meta.get(key)!r}")
    fold = meta.get("fold")
    if fold is not None and (not isinstance(fold, int) or isinstance(fold, bool)):
        raise ValueError(f"{run_json}: run.json 'fold' must be an integer or null, got {fold!r}")
    pretrained = meta.get("pretrained")
    if pretrained is None:
        pretrained = not is_scratch(meta["method"])
    elif not isinstance(pretrained, bool):
        raise ValueError(f"{run_json}: run.json 'pretrained' must be true or false, got {pretrained!r}")
    metrics_path = run_json.parent / "metrics.json"
    if not metrics_path.is_file():
        raise ValueError(f"{run_json.parent}: no metrics.json (run `volssl evaluate ... --out {metrics_path}`)")
    m = load_metrics(metrics_path)
    per_case: dict[str, list[tuple[float, float]]] = {}
    for c in m["cases"]:
        per_case.setdefault(str(c["case"]), []).append((c["dice"], c["nsd"]))
    case_scores = {case: (_nanmean([v[0] for v in vals]), _nanmean([v[1] for v in vals]))
                   for case, vals in per_case.items()}
    return Run(
        path=run_json.parent, method=meta["method"], dataset=meta["dataset"], n_train=meta["n_train"],
        seed=meta["seed"], fold=fold, pretrained=pretrained, dice=m["mean"]["dice"], nsd=m["mean"]["nsd"],
        n_cases=int(m["mean"].get("n_cases", len(case_scores))), n_missing=len(m.get("missing", [])),
        n_errors=len(m.get("errors", [])), case_scores=case_scores,
        instance=({k: float("nan") if m["mean"].get(k) is None else float(m["mean"][k]) for k in INSTANCE_METRICS
                   if k in m["mean"]} if "voi_split" in m["mean"] else None),
    )


def is_scratch(method: str) -> bool:
    """Whether a method name means training from scratch (no pre-training)."""
    name = method.strip().lower().replace("-", "_").replace(" ", "_")
    return name in SCRATCH_METHODS or name.startswith(("scratch", "no_", "no("))


# ----------------------------------------------------------------------------------------------
# aggregation


def main_table(runs: Sequence[Run]) -> dict[str, Any]:
    """The main (full training set) table.

    Returns:
        ``{"full_n_train": {dataset: n}, "methods": [...], "datasets": [...],
        "cells": {(method, dataset): {"dice", "nsd", "n_runs"}}, "ranked_datasets": [...],
        "avg": {metric: {method: float}}, "avg_rank": {metric: {method: float}},
        "ranks": {metric: {method: {dataset: rank}}}}``.
    """
    full = {}
    for r in runs:
        full[r.dataset] = max(full.get(r.dataset, r.n_train), r.n_train)
    selected = [r for r in runs if r.n_train == full[r.dataset]]
    methods = _method_order(selected)
    datasets = sorted(full)
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for m in methods:
        for d in datasets:
            group = [r for r in selected if r.method == m and r.dataset == d]
            if group:
                cells[(m, d)] = {"dice": _nanmean([r.dice for r in group]), "nsd": _nanmean([r.nsd for r in group]),
                                 "n_runs": len(group)}
    ranked = [d for d in datasets if all((m, d) in cells and not math.isnan(cells[(m, d)]["dice"])
                                         and not math.isnan(cells[(m, d)]["nsd"]) for m in methods)]
    avg: dict[str, dict[str, float]] = {k: {} for k in METRICS}
    avg_rank: dict[str, dict[str, float]] = {k: {} for k in METRICS}
    ranks: dict[str, dict[str, dict[str, float]]] = {k: {} for k in METRICS}
    if ranked:
        for k in METRICS:
            table = {m: {d: cells[(m, d)][k] for d in ranked} for m in methods}
            avg[k] = {m: float(np.mean(list(table[m].values()))) for m in methods}
            avg_rank[k] = average_ranks(table)
            ranks[k] = dataset_ranks(table)
    return {"full_n_train": full, "methods": methods, "datasets": datasets, "cells": cells,
            "ranked_datasets": ranked, "avg": avg, "avg_rank": avg_rank, "ranks": ranks}


def paired_case_scores(
    runs: Sequence[Run], table: dict[str, Any]
) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, int]]:
    """Per-case scores of the main-table runs, paired across methods.

    Returns:
        ``(scores, n_cases)``: ``scores[metric][dataset][method]`` = array over the cases every method
        scored on that dataset (sorted by case id); ``n_cases[dataset]`` how many. Datasets of
        ``table["ranked_datasets"]`` without a common case are left out.
    """
    methods = table["methods"]
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {k: {} for k in METRICS}
    n_cases: dict[str, int] = {}
    for d in table["ranked_datasets"]:
        per_method = {}
        for m in methods:
            group = [r for r in runs if r.method == m and r.dataset == d and r.n_train == table["full_n_train"][d]]
            merged: dict[str, list[tuple[float, float]]] = {}
            for r in group:
                for case, s in r.case_scores.items():
                    merged.setdefault(case, []).append(s)
            per_method[m] = {c: (_nanmean([v[0] for v in s]), _nanmean([v[1] for v in s])) for c, s in merged.items()}
        common = sorted(set.intersection(*(set(v) for v in per_method.values())))
        if not common:
            continue
        n_cases[d] = len(common)
        for i, k in enumerate(METRICS):
            scores[k][d] = {m: np.array([per_method[m][c][i] for c in common]) for m in methods}
    return scores, n_cases


def low_data_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Mean and standard deviation over runs per (method, dataset, n_train), plus the "average"
    rows (mean over the method's datasets of the per-dataset means, where every dataset has that
    n_train; std there is the std over datasets)."""
    rows = []
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.method, r.dataset, r.n_train), []).append(r)
    for (m, d, n), group in sorted(groups.items()):
        row = {"method": m, "dataset": d, "n_train": n, "pretrained": group[0].pretrained, "n_runs": len(group)}
        for k in METRICS:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([getattr(r, k) for r in group])
        rows.append(row)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    for m, mrows in by_method.items():
        dsets = {row["dataset"] for row in mrows}
        if len(dsets) < 2:
            continue
        for n in sorted({row["n_train"] for row in mrows}):
            at_n = [row for row in mrows if row["n_train"] == n]
            if {row["dataset"] for row in at_n} != dsets:
                continue
            avg = {"method": m, "dataset": "average", "n_train": n, "pretrained": at_n[0]["pretrained"],
                   "n_runs": sum(row["n_runs"] for row in at_n)}
            for k in METRICS:
                avg[f"{k}_mean"], avg[f"{k}_std"] = _mean_std([row[f"{k}_mean"] for row in at_n])
            rows.append(avg)
    return rows


# ----------------------------------------------------------------------------------------------
# the report


def make_report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    n_boot: int = 1000,
    seed: int = 0,
    twins: Mapping[str, str] | None = None,
    probe_dirs: Sequence[str | os.PathLike] = (),
    evidence_note: str = "",
) -> dict[str, Any]:
    """Write the report of the runs under ``run_dirs`` into ``out_dir`` (see the module docstring).

    Args:
        run_dirs: run directories, or folders searched recursively for run.json.
        out_dir: output folder (created).
        n_boot: bootstrap samples of the rank stability analysis.
        seed: seed of the bootstrap.
        twins: method -> its from-scratch twin: adds the paired differences with bootstrap 95% intervals
            (:mod:`volssl.reports.paired`; paired.csv).
        probe_dirs: pre-training runs (or folders holding them) whose probe.csv curves are plotted
            (probe_curves.png, probe.csv).
        evidence_note: said next to every paired difference that is not a clear gain.

    Returns:
        ``{"runs": int, "methods": [...], "datasets": [...], "average_rank": {"dice": {...},
        "nsd": {...}}, "rank_stability": {method: {"median": float, "p_best": float}},
        "files": {name: path}, "notes": [...]}``.

    Raises:
        ValueError: no usable run was found.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    out_dir = Path(out_dir)
    runs, notes = find_runs(run_dirs)
    if not runs:
        detail = ("; " + "; ".join(notes)) if notes else ""
        raise ValueError(f"no usable run (run.json + metrics.json) under {', '.join(map(str, run_dirs))}{detail}")
    instance_runs = [r for r in runs if r.instance is not None]
    runs = [r for r in runs if r.instance is None]
    if not runs:
        return _instance_only_report(instance_runs, Path(out_dir), notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = _Outputs(out_dir)
    _write_results(runs, out, notes)
    table, table_md = _write_main_table(runs, out, notes)
    stability, n_cases = _write_rank_stability(runs, table, n_boot, seed, out, notes)
    low = low_data_rows(runs)
    _write_csv(out("low_data.csv"), ["method", "dataset", "n_train", "pretrained", "n_runs", "dice_mean",
                                     "dice_std", "nsd_mean", "nsd_std"], low)
    _plot_low_data(out("low_data.png"), low, methods=_method_order(runs))

    md = _report_md(runs, table, table_md, stability, n_cases, n_boot, seed, low, notes)
    paired_rows: list[dict[str, Any]] = []
    if twins:
        paired_rows, paired_md = _write_paired(runs, twins, seed, evidence_note, out)
        md += paired_md
    probe_rows, probe_md = _write_probes(probe_dirs, out)
    md += probe_md
    if instance_runs:
        md += "\n" + _instance_section(instance_runs, out("instances.csv"))
    write_text_atomic(out("report.md"), md)
    return {
        "runs": len(runs), "methods": table["methods"], "datasets": table["datasets"],
        "average_rank": table["avg_rank"], "rank_stability": stability,
        "files": {k: str(v) for k, v in out.files.items()}, "notes": notes, "paired": paired_rows,
        "probe": probe_rows,
    }


class _Outputs:
    """The files of a report: ``out(name)`` is ``out_dir / name``, recorded in ``files`` in call order."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir
        self.files: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        self.files[name] = self.dir / name
        return self.files[name]


def _write_results(runs: Sequence[Run], out: _Outputs, notes: list[str]) -> None:
    """results.csv (one row per run); a note per run with missing or unscored cases."""
    fields = ["run", "method", "dataset", "n_train", "seed", "fold", "pretrained", "dice", "nsd",
              "n_cases", "n_missing", "n_errors"]
    _write_csv(out("results.csv"), fields, [
        {"run": str(r.path), "method": r.method, "dataset": r.dataset, "n_train": r.n_train, "seed": r.seed,
         "fold": "" if r.fold is None else r.fold, "pretrained": r.pretrained, "dice": r.dice, "nsd": r.nsd,
         "n_cases": r.n_cases, "n_missing": r.n_missing, "n_errors": r.n_errors} for r in runs])
    for r in runs:
        if r.n_missing or r.n_errors:
            notes.append(f"{r.path}: {r.n_missing} case(s) without prediction, {r.n_errors} not scored "
                         "(see its metrics.json)")


def _write_main_table(runs: Sequence[Run], out: _Outputs, notes: list[str]) -> tuple[dict[str, Any], str]:
    """table.csv and table.md (:func:`main_table`); returns ``(the table, its markdown)``."""
    table = main_table(runs)
    excluded = [d for d in table["datasets"] if d not in table["ranked_datasets"]]
    if excluded:
        notes.append("left out of averages and ranks (not every method has a score there): " + ", ".join(excluded))
    _write_csv(out("table.csv"), ["method", "dataset", "n_train", "n_runs", "dice", "nsd"], [
        {"method": m, "dataset": d, "n_train": table["full_n_train"][d], "n_runs": c["n_runs"],
         "dice": c["dice"], "nsd": c["nsd"]} for (m, d), c in table["cells"].items()])
    table_md = "\n\n".join(_markdown_table(table, k) for k in METRICS) + "\n"
    write_text_atomic(out("table.md"), table_md)
    return table, table_md


def _write_rank_stability(runs: Sequence[Run], table: dict[str, Any], n_boot: int, seed: int, out: _Outputs,
                          notes: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """ranks.csv and rank_stability.png (bootstrap of the paired case scores).

    Returns:
        ``(stability, n_cases)``: per method the median aggregated Dice rank and the probability of
        rank 1; per dataset the number of cases every method scored.
    """
    scores, n_cases = paired_case_scores(runs, table)
    boot: dict[str, BootstrapRanks] = {}
    if scores["dice"]:
        for k in METRICS:
            boot[k] = bootstrap_ranks(scores[k], n_boot=n_boot, seed=seed)
    no_cases = [d for d in table["ranked_datasets"] if d not in n_cases]
    if no_cases:
        notes.append("left out of the rank stability analysis (no case scored by every method): " + ", ".join(no_cases))
    rank_rows_ = []
    for k, b in boot.items():
        for scope in [None, *b.datasets]:
            for m, freq in b.frequencies(scope).items():
                for rank, f in sorted(freq.items()):
                    rank_rows_.append({"metric": k, "scope": "aggregated" if scope is None else scope, "method": m,
                                       "rank": rank, "count": int(round(f * n_boot)), "frequency": f})
    _write_csv(out("ranks.csv"), ["metric", "scope", "method", "rank", "count", "frequency"], rank_rows_)
    stability = {}
    if "dice" in boot:
        b = boot["dice"]
        for j, m in enumerate(b.methods):
            stability[m] = {"median": float(np.median(b.aggregated[:, j])),
                            "p_best": float(np.mean(b.aggregated[:, j] == 1.0))}
    _plot_rank_stability(out("rank_stability.png"), boot.get("dice"), table["methods"], n_cases, n_boot)
    return stability, n_cases


def _write_paired(runs: Sequence[Run], twins: Mapping[str, str], seed: int, evidence_note: str,
                  out: _Outputs) -> tuple[list[dict[str, Any]], str]:
    """paired.csv (:func:`volssl.reports.paired.paired_differences`); returns ``(rows, markdown section)``."""
    from volssl.reports.paired import paired_differences, paired_markdown

    paired_rows = paired_differences(runs, twins, seed=seed)
    _write_csv(out("paired.csv"), ["method", "twin", "dataset", "n_train", "n_pairs", "method_dice", "twin_dice",
                                   "diff", "ci_low", "ci_high", "verdict", "method_floor", "twin_floor",
                                   "n_both_learned", "diff_both_learned"], paired_rows)
    return paired_rows, ("\n" + paired_markdown(paired_rows, evidence_note) if paired_rows else "")


def _write_probes(probe_dirs: Sequence[str | os.PathLike], out: _Outputs) -> tuple[list[dict[str, Any]], str]:
    """probe_curves.png and probe.csv of the pre-training runs under ``probe_dirs`` (when any has a
    probe.csv); returns ``(summary rows, markdown section)``."""
    from volssl.reports.paired import find_probe_runs, plot_probe_curves, probe_markdown, probe_summary

    probe_runs = find_probe_runs(probe_dirs)
    probe_rows = probe_summary(probe_runs)
    if not probe_rows:
        return probe_rows, ""
    plot_probe_curves(probe_runs, out("probe_curves.png"))
    _write_csv(out("probe.csv"), list(probe_rows[0]), probe_rows)
    return probe_rows, "\n" + probe_markdown(probe_rows)


def _markdown_table(table: dict[str, Any], metric: str) -> str:
    """Methods x datasets table of ``metric`` x100 with average and average rank; best per column bold."""
    methods, datasets, ranked = table["methods"], table["datasets"], table["ranked_datasets"]
    name = METRIC_NAMES[metric]
    avg_label = f"Avg. {name}" + ("" if len(ranked) == len(datasets) else f" ({len(ranked)} datasets)")
    header = ["Method", *[f"{d} (n={table['full_n_train'][d]})" for d in datasets], avg_label, f"Avg. {name} rank"]
    columns = []  # per column: displayed strings per method, numbers to compare, higher better?
    for d in datasets:
        vals = [table["cells"].get((m, d), {}).get(metric, math.nan) * 100 for m in methods]
        columns.append((vals, True))
    columns.append(([table["avg"][metric].get(m, math.nan) * 100 for m in methods], True))
    columns.append(([table["avg_rank"][metric].get(m, math.nan) for m in methods], False))
    cells = [[m] for m in methods]
    for vals, higher in columns:
        shown = [round(v, 2) if not math.isnan(v) else math.nan for v in vals]
        finite = [v for v in shown if not math.isnan(v)]
        best = (max(finite) if higher else min(finite)) if finite else None
        for i, v in enumerate(shown):
            text = "—" if math.isnan(v) else f"{v:.2f}"
            cells[i].append(f"**{text}**" if best is not None and v == best else text)
    lines = [f"**{name}** (x100; mean over runs at each dataset's full training set; ranks: 1 = best)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _report_md(runs, table, table_md, stability, n_cases, n_boot, seed, low, notes) -> str:
    methods = table["methods"]
    lines = [
        "# volssl report", "",
        f"{len(runs)} runs, {len({r.method for r in runs})} methods, {len(table['datasets'])} datasets. "
        "Per-run scores: results.csv. Dice and NSD from `volssl evaluate` (a class absent from both maps "
        "is left out of the means; a class in only one of them scores 0).", "",
        "## Results", "", table_md.rstrip(), "",
        "Average and ranks over the datasets on which every method has a score; per dataset the methods "
        "are ranked by mean score, ties share the average rank. Also in table.csv.", "",
        "## Rank stability", "",
    ]
    if stability:
        lines += [
            f"Bootstrap over test cases ({n_boot} samples, seed {seed}; cases per dataset: "
            + ", ".join(f"{d} {n}" for d, n in n_cases.items()) + "). Each sample resamples the cases of every "
            "dataset with replacement (the same cases for every method), ranks the methods by mean Dice per "
            "dataset, and ranks their average rank (the aggregated rank). Circle area: fraction of samples. "
            "Frequencies per rank: ranks.csv (Dice and NSD).", "",
            "![rank stability](rank_stability.png)", "",
            "| Method | Avg. Dice rank | Median aggregated rank | P(rank 1) |", "|---|---:|---:|---:|",
        ]
        for m in methods:
            lines.append(f"| {m} | {table['avg_rank']['dice'].get(m, math.nan):.2f} | "
                         f"{stability[m]['median']:.1f} | {stability[m]['p_best']:.2f} |")
    else:
        lines += ["No dataset with cases scored by every method: no rank stability analysis.", "",
                  "![rank stability](rank_stability.png)"]
    lines += ["", "## Low-data regime", "",
              "Dice (x100) against the number of training cases; mean ± standard deviation over runs "
              "(seeds); dashed: from scratch, solid: pre-trained. Also in low_data.csv.", "",
              "![low-data curves](low_data.png)", "",
              "| Method | Dataset | n_train | runs | Dice | NSD |", "|---|---|---:|---:|---:|---:|"]
    for row in low:
        lines.append(f"| {row['method']} | {row['dataset']} | {row['n_train']} | {row['n_runs']} | "
                     f"{_pm(row['dice_mean'], row['dice_std'], row['n_runs'])} | "
                     f"{_pm(row['nsd_mean'], row['nsd_std'], row['n_runs'])} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def instance_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per (dataset, method, n_train): runs and the mean and std over runs of each instance metric."""
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset, r.method, r.n_train), []).append(r)
    rows = []
    for (d, m, n), rs in sorted(groups.items()):
        row: dict[str, Any] = {"dataset": d, "method": m, "n_train": n, "n_runs": len(rs)}
        for k in INSTANCE_METRICS:
            mean, std = _mean_std([(r.instance or {}).get(k, math.nan) for r in rs])
            row[f"{k}_mean"], row[f"{k}_std"] = mean, std
        rows.append(row)
    return rows


def _instance_section(runs: Sequence[Run], csv_path: Path) -> str:
    rows = instance_rows(runs)
    _write_csv(csv_path, list(rows[0]) if rows else ["dataset"], rows)
    lines = ["## Instance segmentation", "",
             "Runs evaluated with `volssl evaluate-instances` (affinities + agglomeration): mean ± std over "
             "runs (seeds). VOI split/merge (bits) and Rand error: lower is better; Rand split/merge on skeleton "
             "nodes (XPRESS), ERL fraction and the XPRESS score: higher is better. Also in instances.csv.", "",
             "| Dataset | Method | n_train | runs | " + " | ".join(INSTANCE_METRICS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(INSTANCE_METRICS)]
    for row in rows:
        cells = []
        for k in INSTANCE_METRICS:
            mean, std = row[f"{k}_mean"], row[f"{k}_std"]
            cells.append("-" if math.isnan(mean) else f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}"))
        lines.append(f"| {row['dataset']} | {row['method']} | {row['n_train']} | {row['n_runs']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _instance_only_report(runs: Sequence[Run], out_dir: Path, notes: list[str]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "# volssl report\n\n" + _instance_section(runs, out_dir / "instances.csv")
    if notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text_atomic(out_dir / "report.md", md)
    return {"runs": len(runs), "methods": sorted({r.method for r in runs}),
            "datasets": sorted({r.dataset for r in runs}), "average_rank": {}, "rank_stability": {},
            "files": {"report.md": str(out_dir / "report.md"), "instances.csv": str(out_dir / "instances.csv")},
            "notes": notes}


def _pm(mean: float, std: float, n_runs: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean * 100:.2f}" if n_runs == 1 else f"{mean * 100:.2f} ± {std * 100:.2f}"


# ----------------------------------------------------------------------------------------------
# plots


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _plot_rank_stability(path: Path, boot: BootstrapRanks | None, methods: list[str], n_cases: dict[str, int],
                         n_boot: int) -> None:
    from matplotlib.figure import Figure

    if boot is None:
        fig = Figure(figsize=(6, 2.5))
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "No rank stability analysis:\nno dataset with cases scored by every method",
                ha="center", va="center")
        _save(fig, path)
        return
    order = [m for m in methods if m in boot.methods]
    j_of = {m: boot.methods.index(m) for m in order}
    scopes = [None, *boot.datasets]
    ncols = min(4, len(scopes))
    nrows = math.ceil(len(scopes) / ncols)
    width = max(2.6, 0.55 * len(order) + 1.2)
    fig = Figure(figsize=(width * ncols, 3.2 * nrows + 0.8), layout="constrained")
    colors = _colors(order)
    m_count = len(order)
    for s, scope in enumerate(scopes):
        ax = fig.add_subplot(nrows, ncols, s + 1)
        ranks = boot.aggregated if scope is None else boot.dataset_ranks[:, boot.datasets.index(scope)]
        for x, m in enumerate(order):
            values, counts = np.unique(ranks[:, j_of[m]], return_counts=True)
            ax.scatter(np.full(values.shape, x), values, s=450 * counts / ranks.shape[0], color=colors[m],
                       alpha=0.75, edgecolors="black", linewidths=0.4, zorder=2)
            ax.scatter([x], [np.median(ranks[:, j_of[m]])], marker="x", color="black", s=30, zorder=3)
        ax.set_xticks(range(m_count), order, rotation=40, ha="right")
        ax.set_yticks(range(1, m_count + 1))
        ax.set_ylim(m_count + 0.6, 0.4)  # rank 1 on top
        ax.set_xlim(-0.6, m_count - 0.4)
        ax.grid(axis="y", alpha=0.3)
        title = "Aggregated (all datasets)" if scope is None else f"{scope} ({n_cases.get(scope, 0)} cases)"
        ax.set_title(title, fontsize=10)
        if s % ncols == 0:
            ax.set_ylabel("rank (1 = best)")
    fig.suptitle(f"Rank stability of mean Dice over {n_boot} bootstrap samples of the test cases "
                 "(circle area = frequency, x = median)", fontsize=10)
    _save(fig, path)


def _plot_low_data(path: Path, rows: list[dict[str, Any]], methods: list[str]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = sorted({r["dataset"] for r in rows if r["dataset"] != "average"})
    if any(r["dataset"] == "average" for r in rows):
        panels.append("average")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    colors = _colors(methods)
    for p, dataset in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        prow = [r for r in rows if r["dataset"] == dataset]
        xs = sorted({r["n_train"] for r in prow})
        pos = {n: i for i, n in enumerate(xs)}  # evenly spaced: n_train values span orders of magnitude
        for m in methods:
            mrows = sorted((r for r in prow if r["method"] == m), key=lambda r: r["n_train"])
            if not mrows:
                continue
            x = np.array([pos[r["n_train"]] for r in mrows], dtype=float)
            y = np.array([r["dice_mean"] for r in mrows]) * 100
            e = np.array([r["dice_std"] for r in mrows]) * 100
            style = "-" if mrows[0]["pretrained"] else "--"
            ax.plot(x, y, style, marker="o" if mrows[0]["pretrained"] else "s", color=colors[m], lw=1.8, ms=5)
            if dataset != "average":  # there the std is across datasets, not runs: no band
                ax.fill_between(x, y - e, y + e, color=colors[m], alpha=0.15, lw=0)
        ax.set_xticks(range(len(xs)), [str(n) for n in xs])
        ax.set_xlim(-0.3, len(xs) - 0.7)
        ax.set_xlabel("training cases")
        ax.set_ylabel("Dice (x100)")
        ax.set_title("Average of the dataset means" if dataset == "average" else dataset, fontsize=10)
        ax.grid(alpha=0.3)
    handles = []
    for m in methods:
        pre = next((r["pretrained"] for r in rows if r["method"] == m), True)
        handles.append(Line2D([], [], color=colors[m], ls="-" if pre else "--", marker="o" if pre else "s", label=m))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=9,
               title="solid: pre-trained, dashed: from scratch", title_fontsize=9)
    fig.suptitle("Low-data regime: Dice vs training cases\n(mean ± std over runs)", fontsize=10)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)


# ----------------------------------------------------------------------------------------------
# helpers


def _method_order(runs: Sequence[Run]) -> list[str]:
    """Scratch baselines first, then pre-trained methods, each alphabetically (the paper's order)."""
    names = {r.method: r.pretrained for r in runs}
    return sorted(names, key=lambda m: (names[m], m))


def _nanmean(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())
