"""`volssl pretrain --launcher`: torchrun's variables from submitit's JobEnvironment, the requeue path
(checkpoint() -> a DelayedSubmission whose rerun resumes), a local job from the CLI, SLURM parameters
(through a stand-in sbatch) and a clear refusal without sbatch."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from training_standins import fake_slurm, write_tiny_dataset
from volssl.cli import main
from volssl.launch import PretrainJob, graceful_requeue, master_port, torch_environment
from volssl.training.checkpoint import load_checkpoint
from volssl.training.logging import read_scalars

FAST = ["--set", "data.patch_size=32,32,32", "--set", "data.num_workers=0", "--set", "train.log_every=1",
        "--set", "train.preview_every=100", "--set", "train.checkpoint_every=1", "--no-progress"]
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n_cases=2, shape=(40, 40, 40))


def test_torch_variables_come_from_the_job_environment(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = SimpleNamespace(num_nodes=2, num_tasks=8, global_rank=5, local_rank=1, hostnames=["node07", "node08"],
                          job_id="1234")
    assert torch_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                      "MASTER_ADDR": "node07", "MASTER_PORT": str(master_port("1234"))}
    assert 20000 <= master_port("1234") < 40000 and master_port("1234") != master_port("1235")
    one = SimpleNamespace(num_nodes=1, num_tasks=1, global_rank=0, local_rank=0, hostnames=["x"], job_id="9")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert torch_environment(one)["MASTER_ADDR"] == "127.0.0.1" and torch_environment(one)["MASTER_PORT"] == "29500"


def test_the_requeue_signal_stops_a_training_loop_gracefully_first():
    calls = []
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR2, lambda s, f: calls.append("submitit"))  # submitit's handler in a job
        signal.signal(signal.SIGUSR1, lambda s, f: calls.append("loop"))  # the step loop's graceful stop
        with graceful_requeue() as state:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert calls == ["loop"] and state["signal"] == "SIGUSR2"
        assert calls == ["loop", "submitit"]  # requeued once the body returned
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # no loop running: submitit requeues at once
        with graceful_requeue() as state:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert calls == ["loop", "submitit", "submitit"] and state["signal"] is None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_checkpoint_returns_a_delayed_submission_whose_rerun_resumes(tmp_path, dataset, monkeypatch):
    """A job stopped by submitit's requeue signal after step 2 of 4 saves latest.pt; its checkpoint() hook
    gives a DelayedSubmission that continues from step 2 (in this process, as submitit's debug job)."""
    from submitit.helpers import DelayedSubmission

    import volssl.methods as methods
    from volssl.config import apply_overrides, resolve

    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "DEBUG_1")
    for name in TORCH_VARS:  # the job exports them; the test process gets them back afterwards
        monkeypatch.setenv(name, "")
    build = methods.build_method

    def build_with_preemption(cfg):  # submitit's signal arrives during step 2 of the first attempt
        method = build(cfg)
        forward, seen = method.forward, []

        def preempted_forward(*a, **k):
            seen.append(1)
            if len(seen) == 2 and not requeued:
                os.kill(os.getpid(), signal.SIGUSR2)
            return forward(*a, **k)

        method.forward = preempted_forward
        return method

    monkeypatch.setattr(methods, "build_method", build_with_preemption)
    cfg = apply_overrides(resolve("s3d-b-tiny"), ["train.steps=4", "data.patch_size=32,32,32", "data.num_workers=0",
                                                  "train.log_every=1", "train.preview_every=100",
                                                  "train.checkpoint_every=100"])
    run = tmp_path / "run"
    job = PretrainJob(cfg, dataset, run)
    requeued: list[DelayedSubmission] = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: requeued.append(job.checkpoint()))  # submitit's part
    try:
        first = job()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert first["status"] == "stopped" and first["step"] == 2
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 2  # saved although checkpoint_every=100
    assert len(requeued) == 1 and isinstance(requeued[0], DelayedSubmission)
    again = requeued[0].function
    assert isinstance(again, PretrainJob) and again is not job and (again.out, again.data) == (job.out, job.data)
    second = requeued[0].result()  # the requeued job
    assert second["status"] == "finished" and second["step"] == 4
    assert [r["step"] for r in read_scalars(run / "scalars.csv")] == [1, 2, 3, 4]  # resumed, not restarted


def test_pretrain_through_the_local_launcher(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--method", "s3d", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(run),
            "--set", "train.steps=2", "--launcher", "local", "--cpus-per-task", "1"] + FAST
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "submitted local job" in captured.out and "finished at step 2" in captured.out
    assert load_checkpoint(run / "checkpoints" / "final.pt")["step"] == 2
    assert list((run / "launcher").glob("*_log.out"))  # submitit's logs, in RUN/launcher by default
    assert main(args) == 2  # the folder holds a run: refused before anything is submitted
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_of_one_local_job_train_data_parallel(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    rc = main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(run), "--set",
               "train.steps=2", "--set", "data.batch_size=2", "--launcher", "local", "--tasks-per-node", "2",
               "--cpus-per-task", "1"] + FAST)
    assert rc == 0, capsys.readouterr().err
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    assert final["step"] == 2 and final["world_size"] == 2  # RANK / WORLD_SIZE / MASTER_* from the job


def test_slurm_submission_gets_the_requested_resources(tmp_path, dataset, capsys, monkeypatch):
    bin_dir = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    rc = main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(run), "--set",
               "data.batch_size=8", "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition",
               "gpu", "--mem-gb", "64", "--time-min", "90", "--slurm-setup", "source ~/venv/bin/activate",
               "--slurm-param", "account=abc", "--launcher-dir", str(tmp_path / "jobs")])
    out = capsys.readouterr().out
    assert rc == 0 and "submitted slurm job 4242" in out and "squeue -j 4242" in out
    script = (bin_dir / "submitted.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu",
                 "--mem=64GB", "--time=90", "--account=abc", "--signal=USR2@120", "--job-name=volssl-pretrain"):
        assert f"#SBATCH {line}\n" in script, line
    assert "source ~/venv/bin/activate" in script and "srun" in script
    assert (tmp_path / "jobs" / "4242_submitted.pkl").is_file()
    assert not (run / "checkpoints").exists()  # nothing ran here
    # a global batch the ranks cannot share is refused before submitting
    assert main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(tmp_path / "r2"),
                 "--set", "data.batch_size=6", "--launcher", "slurm", "--gpus-per-node", "4"]) == 2
    assert "not divisible by the 4 data-parallel ranks" in capsys.readouterr().err


def test_slurm_without_sbatch_fails_with_one_clear_line(tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    rc = main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(tmp_path / "run"),
               "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("volssl pretrain: error: --launcher slurm: sbatch and srun are not on PATH")
    assert not (tmp_path / "run").exists()  # refused before any work
    assert main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(tmp_path / "run"),
                 "--launcher", "local", "--nodes", "2"]) == 2
    assert "--launcher local runs on this machine: one node, not 2" in capsys.readouterr().err
