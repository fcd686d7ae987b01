"""Paired differences against the from-scratch twin (reports/paired.py) and their place in `volssl report`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from volssl.reports.paired import bootstrap_ci, paired_differences, paired_markdown
from volssl.reports.report import find_runs, make_report


def _run(root: Path, folder: str, method: str, seed: int, dice: float, n_train: int = 2) -> None:
    run = root / folder / f"{method}_n{n_train}_s{seed}"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"method": method, "dataset": "brain", "n_train": n_train,
                                              "seed": seed, "fold": 0}))
    cases = [{"case": f"c{i}", "label": 1, "dice": dice + 0.01 * i, "nsd": dice} for i in range(3)]
    (run / "metrics.json").write_text(json.dumps({"mean": {"dice": dice + 0.01, "nsd": dice, "n_cases": 3},
                                                  "cases": cases, "missing": [], "errors": []}))


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_pairs():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.05, 0.05, 5), rng.normal(0.05, 0.05, 200)
    lo, hi = bootstrap_ci(small, seed=1)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large, seed=1)
    assert hi2 - lo2 < hi - lo and lo2 > 0
    assert bootstrap_ci([0.2]) == (0.2, 0.2)
    assert all(np.isnan(bootstrap_ci([])))


def test_runs_pair_by_folder_dataset_n_train_and_seed(tmp_path):
    # draw 0: s3d wins by 0.10 on every seed; draw 1: by 0.02; a seed without a twin is not paired
    for seed in range(3):
        _run(tmp_path, "draw0", "s3d", seed, 0.5)
        _run(tmp_path, "draw0", "no-fixed", seed, 0.4)
        _run(tmp_path, "draw1", "s3d", seed, 0.42)
        _run(tmp_path, "draw1", "no-fixed", seed, 0.4)
    _run(tmp_path, "draw1", "s3d", 9, 0.9)
    runs, problems = find_runs([tmp_path])
    assert not problems
    rows = paired_differences(runs, {"s3d": "no-fixed"})
    assert len(rows) == 1
    r = rows[0]
    assert r["n_pairs"] == 6 and r["diff"] == pytest.approx(0.06)
    assert r["ci_low"] > 0 and r["verdict"] == "gain"
    # the other way round it is a loss; without the twin's runs nothing is paired
    assert paired_differences(runs, {"no-fixed": "s3d"})[0]["verdict"] == "loss"
    assert paired_differences(runs, {"s3d": "scratch-unet"}) == []


def test_report_shows_the_paired_section_and_the_probe_curves(tmp_path):
    for seed in range(4):
        _run(tmp_path / "ft", "brain", "s3d", seed, 0.40 + 0.05 * (seed % 2))
        _run(tmp_path / "ft", "brain", "no-fixed", seed, 0.42)
    probe = tmp_path / "pretrain" / "s3d@brain"
    probe.mkdir(parents=True)
    (probe / "probe.csv").write_text("step,probe_dice,probe_floor,seconds\n100,0.5,0.45,3\n200,0.55,0.45,3\n")
    out = make_report([tmp_path / "ft"], tmp_path / "report", twins={"s3d": "no-fixed"},
                      probe_dirs=[tmp_path / "pretrain"], evidence_note="see docs/evidence.md")
    assert out["paired"][0]["verdict"] == "none"  # +0.5 points on average, the interval spans 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "from-scratch twin (paired)" in md and "see docs/evidence.md" in md
    assert "| s3d@brain | 45.0 | 50.0 (100) | 55.0 (200) | 55.0 (200) | +10.0 |" in md
    assert (tmp_path / "report" / "probe_curves.png").stat().st_size > 0
    assert (tmp_path / "report" / "paired.csv").read_text().startswith("method,twin,dataset")


def test_probe_runs_of_several_draws_keep_apart(tmp_path):
    from volssl.reports.paired import find_probe_runs

    for draw in ("draw0", "draw1"):
        run = tmp_path / draw / "pretrain" / "s3d@brain"
        run.mkdir(parents=True)
        (run / "probe.csv").write_text("step,probe_dice,probe_floor,seconds\n100,0.5,0.45,3\n")
    found = find_probe_runs([tmp_path / "draw0" / "pretrain", tmp_path / "draw1" / "pretrain"])
    assert sorted(found) == ["draw0/pretrain/s3d@brain", "draw1/pretrain/s3d@brain"]


def test_rows_count_the_runs_at_the_floor_and_the_difference_where_both_learn(tmp_path):
    # seed 0: the twin never leaves the floor (0.01) while s3d learns (0.55); seeds 1-3: both learn, s3d +0.02;
    # seed 4: both at the floor
    dice = {0: (0.55, 0.01), 1: (0.52, 0.50), 2: (0.62, 0.60), 3: (0.42, 0.40), 4: (0.0, 0.02)}
    for seed, (a, b) in dice.items():
        _run(tmp_path, "draw0", "s3d", seed, a)
        _run(tmp_path, "draw0", "no-fixed", seed, b)
    runs, _ = find_runs([tmp_path])
    r = paired_differences(runs, {"s3d": "no-fixed"})[0]
    assert (r["method_floor"], r["twin_floor"], r["n_both_learned"]) == (1, 2, 3)
    assert r["diff_both_learned"] == pytest.approx(0.02)
    assert r["diff"] == pytest.approx((0.54 + 0.02 * 3 - 0.02) / 5)
    md = paired_markdown([r])
    assert "| 1 / 2 | +2.0 (3) |" in md
