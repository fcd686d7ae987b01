"""The pre-training loop: run files, checkpoints, exact resume (signal, SIGTERM, kill -9), loss falls."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training_standins import TinyMAE, make_batches, tiny_config, write_tiny_dataset
from volssl.config import load_config
from volssl.training.checkpoint import load_checkpoint
from volssl.training.logging import read_scalars
from volssl.training.trainer import pretrain, step_seed

HERE = Path(__file__).parent
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-exact comparisons with subprocesses (OMP_NUM_THREADS=1) need the same thread count here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(out, steps=STEPS, resume=False, extra=None, batches=None, data=None):
    cfg = tiny_config(steps, extra=extra)
    torch.manual_seed(cfg.train.seed)
    method = TinyMAE()
    if batches is None and data is None:
        batches = make_batches(cfg.data.batch_size, cfg.data.patch_size)
    summary = pretrain(cfg, data, out, resume=resume, method=method, batches=batches, progress=False)
    return summary, method


def losses(run_dir):
    return [(r["step"], r["loss"], r["loss_ema"], r["lr"]) for r in read_scalars(Path(run_dir) / "scalars.csv")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary, method = run(out)
    return out, summary, {k: v.clone() for k, v in method.state_dict().items()}


def test_a_run_writes_config_scalars_tensorboard_previews_and_checkpoints(reference):
    out, summary, _ = reference
    assert summary["status"] == "finished" and summary["step"] == STEPS
    assert load_config(out / "config.json") == tiny_config(STEPS)
    rows = losses(out)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1))
    assert any((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "previews").glob("*.png")) == [
        "step_000004.png", "step_000008.png", "step_000012.png"]
    for tag in ("latest", "best", "final"):
        ck = load_checkpoint(out / "checkpoints" / f"{tag}.pt")
        assert ck["kind"] == "pretrain" and ck["tag"] == tag and ck["encoder_keys"] == "encoder."
        assert set(ck["network"]) == set(TinyMAE().network.state_dict())  # backbone only
        assert "mask_token" in ck["method_state"]
        assert ck["config"]["train"]["steps"] == STEPS and ck["model"]["arch"] == "resenc-tiny"
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert final["step"] == final["data_position"] == STEPS and final["scheduler"] == {"step": STEPS}
    assert final["metrics"]["loss_ema"] == pytest.approx(rows[-1][2])
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def _signal_at(factory, batch_index, sig=signal.SIGUSR1):
    def batches(start, rank, world):
        for k, batch in enumerate(factory(start, rank, world), start):
            if k == batch_index:
                os.kill(os.getpid(), sig)
            yield batch

    return batches


def test_a_signal_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, reference):
    ref_dir, _, ref_state = reference
    cfg = tiny_config(STEPS)
    stopping = _signal_at(make_batches(cfg.data.batch_size, cfg.data.patch_size), 5)
    summary, _ = run(tmp_path, batches=stopping)
    assert summary["status"] == "stopped" and summary["signal"] == "SIGUSR1" and summary["step"] == 6
    assert json.loads((tmp_path / "STOPPED.json").read_text())["step"] == 6
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 6
    assert not (tmp_path / "checkpoints" / "final.pt").exists()
    summary, method = run(tmp_path, resume=True)
    assert summary["status"] == "finished" and not (tmp_path / "STOPPED.json").exists()
    assert losses(tmp_path) == losses(ref_dir)  # bit-identical losses, EMA and lr, one row per step
    for k, v in method.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_block_sparse_s3d_signalled_and_resumed_equals_uninterrupted(tmp_path):
    """The real S3D with its encoder on the visible blocks: stop by a signal, resume, same run bit for bit."""
    from volssl.methods import build_method

    extra = ["data.patch_size=32,32,32", "method.block_sparse=on", "train.checkpoint_every=2"]

    def s3d_run(out, resume=False, stop_at=None):
        cfg = tiny_config(6, extra=extra)
        torch.manual_seed(cfg.train.seed)
        method = build_method(cfg)
        assert method.block_stages(cfg.data.patch_size) == 3
        batches = make_batches(cfg.data.batch_size, cfg.data.patch_size)
        if stop_at is not None:
            batches = _signal_at(batches, stop_at)
        return pretrain(cfg, None, out, resume=resume, method=method, batches=batches, progress=False), method

    _, whole = s3d_run(tmp_path / "whole")
    summary, _ = s3d_run(tmp_path / "split", stop_at=2)
    assert summary["status"] == "stopped" and summary["step"] == 3
    summary, resumed = s3d_run(tmp_path / "split", resume=True)
    assert summary["status"] == "finished"
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, whole.state_dict()[k]), k


def _start(out, *args, delay=0.3):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(HERE / "training_standins.py"), str(out), "--steps", str(STEPS),
                             "--delay", str(delay), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_step(proc, out, step, timeout=60.0):
    deadline = time.time() + timeout
    csv = Path(out) / "scalars.csv"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if csv.is_file():
            rows = [ln for ln in csv.read_text().splitlines()[1:] if ln.endswith(",") or ln.count(",") >= 6]
            if rows and int(rows[-1].split(",")[0]) >= step:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, reference):
    ref_dir, _, _ = reference
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "stopped"
    stopped = json.loads((tmp_path / "STOPPED.json").read_text())
    assert stopped["signal"] == "SIGTERM" and 3 <= stopped["step"] < STEPS
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == stopped["step"]
    run(tmp_path, resume=True)
    assert losses(tmp_path) == losses(ref_dir)


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_losses(tmp_path, reference):
    ref_dir, _, _ = reference
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 6)
    proc.kill()  # SIGKILL: no chance to save; latest.pt is the step-4 (or step-8) checkpoint
    proc.communicate(timeout=30)
    step = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"]
    assert step in (4, 8)
    run(tmp_path, resume=True)
    assert losses(tmp_path) == losses(ref_dir)


def test_the_loss_falls_on_a_tiny_run(tmp_path):
    summary, _ = run(tmp_path, steps=60, extra=["optim.name=adamw", "optim.lr=3e-3", "optim.schedule=cosine",
                                                "augment.enabled=false", "train.checkpoint_every=60",
                                                "train.preview_every=60"])
    values = [r[1] for r in losses(tmp_path)]
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.9 * first, (first, last)


def test_the_real_patch_stream_feeds_the_loop(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    summary, _ = run(tmp_path / "run", steps=3, data=data)
    assert summary["status"] == "finished" and len(losses(tmp_path / "run")) == 3
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert ck["plan"] == json.loads((data / "plan.json").read_text())


def test_guard_rails_are_clear_errors(tmp_path, reference):
    ref_dir, _, _ = reference
    with pytest.raises(ValueError, match="already holds a run"):
        run(ref_dir)
    with pytest.raises(ValueError, match="optim.lr"):
        run(ref_dir, resume=True, extra=["optim.lr=0.5"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        run(tmp_path / "a", extra=["train.precision=fp16"])
    with pytest.raises(ValueError, match="train.steps"):
        run(tmp_path / "b", steps=0)


def test_step_seeds_differ_per_step_and_stream():
    seeds = {step_seed(0, s, k) for s in range(50) for k in range(3)}
    assert len(seeds) == 150 and step_seed(0, 1) == step_seed(0, 1)


def test_first_ctrl_c_finishes_the_step_and_saves(tmp_path):
    cfg = tiny_config(STEPS)
    interrupting = _signal_at(make_batches(cfg.data.batch_size, cfg.data.patch_size), 2, sig=signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    summary, _ = run(tmp_path, batches=interrupting)
    assert (summary["status"], summary["signal"], summary["step"]) == ("stopped", "SIGINT", 3)
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_validation_loss_drives_the_best_checkpoint(tmp_path):
    run(tmp_path, steps=4, extra=["train.val_every=2", "train.checkpoint_every=2"])
    rows = read_scalars(tmp_path / "scalars.csv")
    vals = {r["step"]: r.get("val_loss") for r in rows}
    assert vals[1] is None and vals[3] is None and vals[2] is not None and vals[4] is not None
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["metrics"]["best"] == pytest.approx(min(vals[2], vals[4]))


def test_autocast_precisions():
    from volssl.training.trainer import autocast_context, make_scaler

    cpu = torch.device("cpu")
    with autocast_context("bf16", cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context("fp32", cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert make_scaler("bf16", cpu).state_dict() == {}
    with pytest.raises(ValueError, match="train.precision"):
        autocast_context("fp8", cpu)
