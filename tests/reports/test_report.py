"""make_report / volssl report on fake run directories: files, numbers, notes."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from volssl.cli import main
from volssl.reports.report import find_runs, is_scratch, make_report


def write_run(root: Path, method: str, dataset: str, n_train: int, seed: int, case_dice: dict[str, float],
              fold=None, classes=("1",), **extra) -> Path:
    """A run whose every class of case ``c`` has Dice ``case_dice[c]`` and NSD ``case_dice[c] / 2``."""
    d = root / f"{dataset}_{method}_n{n_train}_s{seed}" / ("" if fold is None else f"fold{fold}")
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({"method": method, "dataset": dataset, "n_train": n_train,
                                            "seed": seed, "fold": fold, **extra}))
    cases = [{"case": c, "class": k, "name": k, "dice": v, "nsd": v / 2}
             for c, v in case_dice.items() for k in classes]
    mean_d = float(np.mean(list(case_dice.values())))
    metrics = {"cases": cases, "mean": {"dice": mean_d, "nsd": mean_d / 2, "n_cases": len(case_dice),
                                        "per_class": {}},
               "missing": [], "errors": [], "unmatched_predictions": [], "settings": {}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    cases = {"dA": [f"a{i}" for i in range(6)], "dB": [f"b{i}" for i in range(5)]}
    full = {"dA": 50, "dB": 30}
    rng = np.random.default_rng(0)
    for d, ids in cases.items():
        noise = rng.uniform(0, 0.05, len(ids))
        write_run(root, "s3d", d, full[d], 0, {c: 0.8 for c in ids}, classes=("1", "2"))
        write_run(root, "mg", d, full[d], 0, {c: 0.7 + n for c, n in zip(ids, noise)}, classes=("1", "2"))
        for seed, offset in ((0, 0.0), (1, 0.1)):
            write_run(root, "scratch", d, full[d], seed, {c: 0.5 + offset for c in ids}, classes=("1", "2"))
        for n in (10, 20):
            for seed, v in enumerate((0.5, 0.6, 0.7)):
                write_run(root, "scratch", d, n, seed, {c: v - 0.1 for c in ids})
                write_run(root, "s3d", d, n, seed, {c: v for c in ids})
    # problems: a run without metrics.json, a run.json without dataset
    (root / "broken1").mkdir()
    (root / "broken1" / "run.json").write_text(json.dumps({"method": "s3d", "dataset": "dA", "n_train": 5, "seed": 0}))
    (root / "broken2").mkdir()
    (root / "broken2" / "run.json").write_text(json.dumps({"method": "s3d", "n_train": 5, "seed": 0}))
    return root


def test_find_runs(runs_root):
    runs, problems = find_runs([runs_root, runs_root / "dA_s3d_n50_s0"])  # overlap counted once
    assert len(runs) == 2 * (1 + 1 + 2 + 12)
    assert len(problems) == 2 and any("metrics.json" in p for p in problems) and any("'dataset'" in p for p in problems)
    assert {r.method: r.pretrained for r in runs} == {"s3d": True, "mg": True, "scratch": False}


def test_make_report_numbers_and_files(runs_root, tmp_path):
    out = tmp_path / "report"
    res = make_report([runs_root], out, n_boot=200, seed=0)
    for name in ("results.csv", "table.csv", "table.md", "ranks.csv", "rank_stability.png",
                 "low_data.csv", "low_data.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("rank_stability.png", "low_data.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["runs"] == 32 and res["methods"] == ["scratch", "mg", "s3d"] and res["datasets"] == ["dA", "dB"]
    assert len(res["notes"]) == 2

    results = _read_csv(out / "results.csv")
    assert len(results) == 32
    row = next(r for r in results if r["method"] == "scratch" and r["dataset"] == "dA" and r["n_train"] == "50"
               and r["seed"] == "1")
    assert float(row["dice"]) == pytest.approx(0.6) and float(row["nsd"]) == pytest.approx(0.3)

    table = {(r["method"], r["dataset"]): r for r in _read_csv(out / "table.csv")}
    assert float(table[("scratch", "dA")]["dice"]) == pytest.approx(0.55)  # mean over the two seeds
    assert table[("scratch", "dA")]["n_runs"] == "2" and table[("s3d", "dB")]["n_train"] == "30"
    assert res["average_rank"]["dice"] == {"scratch": 3.0, "mg": 2.0, "s3d": 1.0}
    md = (out / "table.md").read_text()
    assert "| s3d | **80.00** | **80.00** | **80.00** | **1.00** |" in md
    assert "| scratch | 55.00 | 55.00 | 55.00 | 3.00 |" in md

    # s3d is best on every case: rank 1 in every bootstrap sample
    assert res["rank_stability"]["s3d"] == {"median": 1.0, "p_best": 1.0}
    ranks = _read_csv(out / "ranks.csv")
    s3d_agg = [r for r in ranks if r["metric"] == "dice" and r["scope"] == "aggregated" and r["method"] == "s3d"]
    assert [(r["rank"], r["count"]) for r in s3d_agg] == [("1.0", "200")]
    assert {r["scope"] for r in ranks} == {"aggregated", "dA", "dB"} and {r["metric"] for r in ranks} == {"dice", "nsd"}

    low = {(r["method"], r["dataset"], r["n_train"]): r for r in _read_csv(out / "low_data.csv")}
    r = low[("s3d", "dA", "20")]
    assert r["n_runs"] == "3" and float(r["dice_mean"]) == pytest.approx(0.6)
    assert float(r["dice_std"]) == pytest.approx(0.1)  # sample std over seeds
    assert float(low[("scratch", "average", "10")]["dice_mean"]) == pytest.approx(0.5)
    assert ("scratch", "average", "50") not in low  # 50 is dA's full set only

    report = (out / "report.md").read_text()
    assert "![rank stability](rank_stability.png)" in report and "![low-data curves](low_data.png)" in report
    assert "broken1" in report


def test_datasets_without_every_method_are_left_out_of_ranks(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "s3d", "d1", 20, 0, {"x": 0.9, "y": 0.8})
    write_run(root, "scratch", "d1", 20, 0, {"x": 0.7, "y": 0.6})
    write_run(root, "s3d", "d2", 20, 0, {"x": 0.9})
    res = make_report([root], tmp_path / "out", n_boot=20)
    assert res["average_rank"]["dice"] == {"scratch": 2.0, "s3d": 1.0}
    assert any("d2" in n for n in res["notes"])
    md = (tmp_path / "out" / "table.md").read_text()
    assert "Avg. Dice (1 datasets)" in md and "—" in md


def test_scratch_names():
    assert is_scratch("scratch") and is_scratch("No (Fixed)") and is_scratch("no_dyn")
    assert not is_scratch("s3d") and not is_scratch("nnssl") and not is_scratch("amaes")


def test_cli(runs_root, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", str(runs_root), "--out", str(out), "--bootstrap", "50", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 32 and (out / "report.md").is_file()
    assert main(["report", str(tmp_path / "empty_nothing"), "--out", str(out)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no usable run" in capsys.readouterr().err
