"""volssl benchmark: cell bookkeeping, stage scaling, resume, report (quick scale)."""
from __future__ import annotations

import json

import pytest

from volssl.benchmark import ARMS, BenchmarkSpec, cell_name, parse_n_train, run_benchmark, stage_lengths


def test_parse_n_train():
    assert parse_n_train("all") is None
    assert parse_n_train("2") == 2
    assert parse_n_train("10%") == pytest.approx(0.1)
    assert parse_n_train("0.01") == pytest.approx(0.01)
    assert parse_n_train("100%") is None
    for bad in ("0", "1.5", "-3"):
        with pytest.raises(ValueError):
            parse_n_train(bad)


def test_stage_lengths_keep_proportions_and_total():
    steps = stage_lengths("s3d", 400)  # 12.5k + 12.5k + 250k in the paper
    assert sum(steps) == 400 and len(steps) == 3 and steps[0] == steps[1] and steps[2] > 15 * steps[0]
    assert stage_lengths("scratch-s3d-schedule", 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot cover"):
        stage_lengths("s3d", 2)


def test_cell_names():
    assert cell_name("s3d", None, 0) == "s3d_nall_s0"
    assert cell_name("voco", 2, 1) == "voco_n2_s1"
    assert cell_name("mae-xnt", 0.1, 2) == "mae-xnt_nf0.1_s2"


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark method"):
        run_benchmark(tmp_path, BenchmarkSpec(["nope"], ["brain"], scale="quick"))


@pytest.mark.slow
def test_quick_benchmark_runs_resumes_and_reports(tmp_path, load_script):
    out = tmp_path / "bench"
    spec = BenchmarkSpec(methods=["s3d", "no-fixed"], datasets=["brain"], n_trains=[2], seeds=[0], scale="quick",
                         generalisation=["brain:brain"], finetune_set=["head_init=small"])
    result = run_benchmark(out, spec, workers=1)
    cells = result["cells"]
    for arm in ("s3d", "no-fixed"):  # --finetune-set reaches both sides of the pair
        config = json.loads((out / "finetune" / "brain" / f"{arm}_n2_s0" / "config.json").read_text())
        assert config["recipe"]["head_init"] == "small"
    assert {c["method"] for c in cells} == {"s3d", "no-fixed"}
    assert all(0.0 <= c["dice"] <= 1.0 for c in cells)
    assert all(len(c["generalisation"]) == 1 for c in cells)
    run_json = json.loads((out / "finetune" / "brain->brain" / "s3d_n2_s0" / "run.json").read_text())
    assert run_json["dataset"] == "brain->brain" and run_json["method"] == "s3d"
    report = (out / "report" / "report.md").read_text()
    assert "s3d" in report and "no-fixed" in report
    floor = load_script("floor_runs").run_scores(out / "finetune" / "brain" / "s3d_n2_s0")  # the evidence script
    assert 0.0 <= floor["auc"] <= 1.0 and 0.0 <= floor["p_max"] <= 1.0 and 0.0 <= floor["auc_input"] <= 1.0
    assert floor["dice"] == pytest.approx(100 * next(c["dice"] for c in cells if c["method"] == "s3d"))
    assert floor["reading"] in ("learns", "under-confident", "behind its input")
    metrics = out / "finetune" / "brain" / "s3d_n2_s0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    again = run_benchmark(out, spec, workers=1)  # resume: nothing recomputed
    assert metrics.stat().st_mtime_ns == stamp
    assert [c["dice"] for c in again["cells"]] == [c["dice"] for c in cells]
    assert set(ARMS) >= {"s3d", "no-fixed", "no-dyn", "amaes-unet", "swinunetr-ssl", "mae-xnt", "voco"}


def test_a_failing_cell_is_reported_not_raised(tmp_path):
    from volssl.benchmark import safe_cell

    job = {"method": "s3d", "dataset_name": "d", "n_train": 2, "seed": 0, "run": str(tmp_path / "cell"),
           "checkpoint": None, "dataset": str(tmp_path / "missing"), "recipe": "scratch-tiny", "overrides": [],
           "test_images": str(tmp_path), "test_labels": str(tmp_path)}
    r = safe_cell(job)
    assert "error" in r and "missing" in r["error"] and r["method"] == "s3d"


@pytest.mark.slow
def test_draws_run_apart_and_one_report_pairs_each_method_with_its_twin(tmp_path):
    out = tmp_path / "bench"
    result = run_benchmark(out, BenchmarkSpec(["s3d", "no-fixed"], ["brain"], n_trains=[2], seeds=[0], scale="quick",
                                              draws=[0, 1]), workers=1)
    assert sorted(result["draws"]) == ["0", "1"] and result["failed"] == 0
    for k in (0, 1):  # each draw its own phantoms, pool and pre-training
        assert (out / f"draw{k}" / "pretrain" / "s3d@brain" / "checkpoints" / "final.pt").is_file()
    a = (out / "draw0" / "datasets" / "brain" / "imagesTr").iterdir()
    first = sorted(a)[0]
    assert first.read_bytes() != (out / "draw1" / "datasets" / "brain" / "imagesTr" / first.name).read_bytes()
    paired = result["paired"]
    assert len(paired) == 1 and paired[0]["method"] == "s3d" and paired[0]["twin"] == "no-fixed"
    assert paired[0]["n_pairs"] == 2  # one seed on each of the two draws
    md = (out / "report" / "report.md").read_text()
    assert "from-scratch twin (paired)" in md and "docs/evidence.md" in md or paired[0]["verdict"] == "gain"
    assert json.loads((out / "benchmark.json").read_text())["report"].endswith("report.md")


def test_evidence_scale_meets_the_issue_sizes():
    from volssl.benchmark import SCALES, twins_of

    sc = SCALES["evidence"]
    assert sc.n_unlabeled >= 100 and len(sc.seeds) >= 5 and len(sc.draws) >= 2 and min(sc.n_trains) <= 2
    assert sc.finetune_steps is None and sc.probe_every  # the recipes' own fine-tuning, the probe on
    assert twins_of(["s3d", "no-fixed", "amaes-unet", "scratch-unet", "mae-xnt"]) == {
        "s3d": "no-fixed", "amaes-unet": "scratch-unet"}  # mae-xnt's twin is not in the list


def test_a_phantom_name_is_not_mistaken_for_a_same_named_folder(tmp_path, monkeypatch):
    # `volssl benchmark --datasets nuclei --out nuclei` run from the out folder's parent: the folder
    # "nuclei" (the benchmark's own output, no dataset.json) must not be taken for the dataset, which
    # once made a nuclei benchmark pre-train on a brain pool
    from volssl.benchmark import SCALES, _labeled_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nuclei").mkdir()
    info = _labeled_dataset("nuclei", tmp_path / "out", SCALES["quick"], seed=0)
    assert info["domain"] == "xnt" and info["raw"] == (tmp_path / "out" / "datasets" / "nuclei").resolve()
    # a folder that is not a phantom name and has no dataset.json is refused with its path
    (tmp_path / "mydata").mkdir()
    with pytest.raises(ValueError, match="mydata has no dataset.json"):
        _labeled_dataset("mydata", tmp_path / "out", SCALES["quick"], seed=0)


def test_importing_the_benchmark_does_not_import_torch_or_the_presets():
    # the arms are registered by the preset modules, which import the methods (and torch) only when first used
    import subprocess
    import sys

    code = ("import sys, volssl.benchmark; print('torch' in sys.modules, 'volssl.presets.s3d' in sys.modules); "
            "from volssl.benchmark import ARMS; print('s3d' in ARMS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]
