"""volssl.launch: submitit jobs for the benchmark's cells and the search's trials (the local launcher runs
them as LocalExecutor subprocesses), the SLURM parameters, and the refusals."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "training"))  # the trainer stand-ins, as tests/methods do
from training_standins import fake_slurm  # noqa: E402

from volssl.cli import build_parser, main
from volssl.launch import (LaunchSpec, LauncherUnavailable, check_launcher, executor_parameters, map_jobs,
                           parse_slurm_params)


def _local(folder: Path, **kw) -> LaunchSpec:
    return LaunchSpec("local", str(folder), poll_s=0.2, **kw)


# ---------------------------------------------------------------------------------------------- the interface
def test_a_launch_spec_checks_its_values(tmp_path):
    with pytest.raises(ValueError, match="unknown launcher 'pbs'"):
        LaunchSpec("pbs", str(tmp_path))
    with pytest.raises(ValueError, match="one node, not 2"):
        LaunchSpec("local", str(tmp_path), nodes=2)
    with pytest.raises(ValueError, match="GPUs must be a whole number >= 0"):
        LaunchSpec("slurm", str(tmp_path), gpus_per_node=-1)
    with pytest.raises(ValueError, match="jobs at once must be >= 1"):
        LaunchSpec("slurm", str(tmp_path), max_parallel=0)
    assert parse_slurm_params(["account=abc", "--qos=high", "exclusive", "mail-type=END"]) == (
        ("account", "abc"), ("qos", "high"), ("exclusive", True), ("mail_type", "END"))
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_slurm_params(["=x"])


def test_map_jobs_keeps_the_order_and_reports_each_failed_job(tmp_path, monkeypatch):
    import submitit

    def failed(job, why):
        return ("failed", why)

    monkeypatch.setattr(submitit.Job, "_results_timeout_s", 1)  # submitit waits for a slow file system

    out = map_jobs(int, ["1", "x", "3", "4"], _local(tmp_path / "a", max_parallel=2), failed)
    assert out[0] == 1 and out[2:] == [3, 4]
    assert out[1][0] == "failed" and out[1][1].startswith("ValueError: invalid literal for int()")
    assert "_log.err" in out[1][1]  # where the job's own traceback is
    killed = map_jobs(os._exit, [3], _local(tmp_path / "b"), failed)  # a job that dies without a result
    assert killed[0][0] == "failed" and "has not produced any output (state: FINISHED)" in killed[0][1]
    assert map_jobs(abs, [-2, 5], LaunchSpec("debug", str(tmp_path / "c")), failed) == [2, 5]  # in this process


def test_slurm_parameters_of_a_benchmark_and_its_sbatch_script(tmp_path, monkeypatch):
    from volssl.cli.launcher import launch_spec
    from volssl.launch import submit

    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    args = build_parser("benchmark").parse_args(
        ["benchmark", "--out", str(tmp_path / "b"), "--device", "cuda", "--launcher", "slurm", "--partition", "gpu",
         "--cpus-per-job", "6", "--mem-gb", "32", "--time-min", "180", "--slurm-param", "account=abc",
         "--slurm-param", "exclusive", "--slurm-setup", "module load cuda"])
    spec = launch_spec(args, args.out, "volssl-benchmark", args.device)
    assert spec.folder == str((tmp_path / "b" / "launcher").resolve()) and spec.max_parallel is None
    assert executor_parameters(spec) == {
        "name": "volssl-benchmark", "timeout_min": 180, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1,
        "cpus_per_task": 6, "mem_gb": 32.0, "slurm_signal_delay_s": 120, "slurm_partition": "gpu",
        "slurm_setup": ["module load cuda"], "slurm_additional_parameters": {"account": "abc", "exclusive": True}}
    job = submit(spec, abs, -1)  # through submitit's SlurmExecutor and the stand-in sbatch
    assert job.job_id == "4242"
    script = (tmp_path / "bin" / "submitted.sh").read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=6", "--mem=32GB", "--time=180",
                 "--account=abc", "--exclusive", "--signal=USR2@120", "--job-name=volssl-benchmark"):
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda" in script
    local = launch_spec(build_parser("benchmark").parse_args(["benchmark", "--launcher", "local"]), "o", "n")
    assert local.gpus_per_node == 0 and local.max_parallel == 2 and local.cpus_per_task == 1


@pytest.mark.parametrize("command", [
    ["benchmark", "--methods", "no-fixed"],
    ["search", "--space", "xnt-nuclei-scratch-tiny", "--dataset", "missing", "--checkpoint", "none"],
])
def test_slurm_without_sbatch_fails_with_one_clear_line(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    out = tmp_path / "out"
    rc = main(command + ["--out", str(out), "--launcher", "slurm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"volssl {command[0]}: error: --launcher slurm: sbatch and srun are not on PATH")
    assert not out.exists()  # refused before any work
    with pytest.raises(LauncherUnavailable, match="sbatch and srun are not on PATH"):
        check_launcher(LaunchSpec("slurm", str(tmp_path)))


# ---------------------------------------------------------------------------------------------- the benchmark
SPEC = dict(methods=["no-fixed", "scratch-unet"], datasets=["brain"], n_trains=[2], seeds=[0, 1], scale="quick",
            finetune_steps=3)


@pytest.fixture(scope="module")
def two_benchmarks(tmp_path_factory):
    """The same 2 methods x 1 dataset x 2 seeds benchmark through the process pool and the local launcher."""
    from volssl.benchmark import BenchmarkSpec, run_benchmark

    root = tmp_path_factory.mktemp("bench")
    spec = BenchmarkSpec(**SPEC)
    pool = run_benchmark(root / "pool", spec, workers=2, report=False)
    launched = run_benchmark(root / "launched", spec, report=False,
                             launcher=_local(root / "jobs", max_parallel=2))
    return pool, launched, root


def _scores(cells):
    keys = ("method", "dataset", "n_train", "seed", "dice", "nsd", "generalisation", "error")
    return [{k: c.get(k) for k in keys} for c in cells]


@pytest.mark.slow
def test_the_local_launcher_gives_the_cells_of_the_process_pool(two_benchmarks):
    pool, launched, root = two_benchmarks
    assert len(launched["cells"]) == 4 and launched["failed"] == 0
    assert _scores(launched["cells"]) == _scores(pool["cells"])  # number for number
    saved = json.loads((root / "launched" / "benchmark.json").read_text())
    assert _scores(saved["cells"]) == _scores(pool["cells"])
    assert len(list((root / "jobs").glob("*_result.pkl"))) == 4  # four submitit jobs, one per cell


@pytest.mark.slow
def test_a_rerun_through_the_launcher_skips_finished_cells(two_benchmarks, capsys):
    from volssl.benchmark import BenchmarkSpec, run_benchmark

    pool, launched, root = two_benchmarks
    stamps = {p: p.stat().st_mtime_ns for p in (root / "launched" / "finetune").rglob("*.json")}
    again = run_benchmark(root / "launched", BenchmarkSpec(**SPEC), report=False,
                          launcher=_local(root / "jobs-rerun", max_parallel=2))
    assert "4 finished cell(s) read back; 0 to run as jobs" in capsys.readouterr().out
    assert _scores(again["cells"]) == _scores(pool["cells"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    assert not list((root / "jobs-rerun").glob("*_result.pkl"))  # nothing submitted


@pytest.mark.slow
def test_a_failing_cell_is_reported_and_the_others_finish(two_benchmarks, capsys):
    from volssl.benchmark import BenchmarkSpec, run_benchmark

    pool, launched, root = two_benchmarks
    cells = root / "launched" / "finetune" / "brain"
    for name in ("no-fixed_n2_s1", "scratch-unet_n2_s1"):  # e.g. cells whose jobs were cancelled
        (cells / name / "metrics.json").unlink()
    (cells / "no-fixed_n2_s1" / "run.json").unlink()
    (cells / "no-fixed_n2_s1" / "run.json").mkdir()  # this cell now fails in its job
    again = run_benchmark(root / "launched", BenchmarkSpec(**SPEC), report=False,
                          launcher=_local(root / "jobs-failing", max_parallel=2))
    out = capsys.readouterr().out
    assert "2 finished cell(s) read back; 2 to run as jobs" in out
    assert again["failed"] == 1 and out.count("FAILED") == 1 and "(rerun to retry)" in out
    broken = again["cells"][1]
    assert broken["seed"] == 1 and broken["method"] == "no-fixed" and "IsADirectoryError" in broken["error"]
    others = [c for k, c in enumerate(again["cells"]) if k != 1]
    assert _scores(others) == _scores([c for k, c in enumerate(pool["cells"]) if k != 1])  # the others finished
    assert (cells / "scratch-unet_n2_s1" / "metrics.json").is_file()
    assert json.loads((root / "launched" / "benchmark.json").read_text())["failed"] == 1


# ---------------------------------------------------------------------------------------------- the search
@pytest.mark.slow
def test_a_search_runs_its_trials_as_local_jobs_and_resumes(tmp_path, capsys):
    import csv

    from volssl.data.phantoms import generate_phantoms
    from volssl.data.preprocess import get_plan
    from volssl.finetuning.finetune import prepare_dataset
    from volssl.search import SearchSpace, TrialSetup, run_search

    raw = generate_phantoms(tmp_path / "raw", "brain", n=5, n_test=0, seed=2, shape=(40, 40, 40), progress=False)
    plan = get_plan("s3d")  # preprocessed once, at 2 mm: the trials' validation predictions stay small
    plan.rules.min_file_bytes, plan.target_spacing = None, (2.0, 2.0, 2.0)
    pre = prepare_dataset(raw, plan.to_dict(), tmp_path, tmp_path / "pre", progress=False)
    space = SearchSpace("t", "test", "scratch-s3d-schedule-tiny", {"lr": (1e-3, 2e-3), "steps": (3,)})
    setup = TrialSetup(checkpoint=None, dataset=str(pre), n_train=2, device="cpu",
                       overrides=["patch_size=32,32,32", "arch=resenc-tiny", "num_workers=0", "train.val_every=0"])
    launcher = _local(tmp_path / "jobs")
    best = run_search(space, 2, setup, tmp_path / "s", progress=False, launcher=launcher)
    assert best["n_complete"] == 2 and 0.0 <= best["value"] <= 1.0
    rows = list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))
    done = [r for r in rows if r["state"] == "COMPLETE"]  # (a repeated draw is PRUNED and drawn anew)
    assert len(done) == 2 and {r["lr"] for r in done} == {"0.001", "0.002"}
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert len(list((tmp_path / "jobs").glob("*_result.pkl"))) == 2
    assert "2 trial(s) as local jobs" in capsys.readouterr().out
    again = run_search(space, 3, setup, tmp_path / "s", progress=False, launcher=launcher)  # nothing left to draw
    assert again["n_complete"] == 2 and len(list((tmp_path / "jobs").glob("*_result.pkl"))) == 2
    with pytest.raises(RuntimeError, match="3 trials in a row failed"):  # a failed job is a failed trial
        run_search(SearchSpace("u", "test", "scratch-s3d-schedule-tiny", {"lr": (1e-3, 2e-3, 3e-3, 4e-3)}), 3,
                   TrialSetup(None, str(tmp_path / "missing"), n_train=2, device="cpu"), tmp_path / "u",
                   progress=False, launcher=LaunchSpec("debug", str(tmp_path / "debug")))
