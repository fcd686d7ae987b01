"""A run's history is never lost by accident: checkpoint checksums, --resume falling back to the newest intact
checkpoint (or refusing), a new run refusing to start over an existing one unless --overwrite."""
import os
import signal
from pathlib import Path

import pytest
import torch

from training_standins import TinyMAE, make_batches, tiny_config, write_tiny_dataset
from volssl.cli import main
from volssl.training import checkpoint as ck
from volssl.training.logging import read_scalars
from volssl.training.trainer import pretrain

STEPS = 12  # checkpoint_every=4 (tiny_config)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-exact comparisons need the same thread count in every run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(out, steps=STEPS, resume=False, overwrite=False, stop_at=None, starts=None):
    """The stand-in pre-training; ``stop_at``: SIGUSR1 while fetching that batch (the run saves latest.pt after
    the step and stops); ``starts`` collects the ``start_batch`` the loop asks the data stream for."""
    cfg = tiny_config(steps)
    torch.manual_seed(cfg.train.seed)
    method = TinyMAE()
    factory = make_batches(cfg.data.batch_size, cfg.data.patch_size)

    def batches(start, rank, world):
        if starts is not None:
            starts.append(start)
        for k, batch in enumerate(factory(start, rank, world), start):
            if k == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch

    summary = pretrain(cfg, None, out, resume=resume, method=method, batches=batches, progress=False,
                       **({"overwrite": True} if overwrite else {}))
    return summary, method


def rows(out):
    return read_scalars(Path(out) / "scalars.csv")


def losses(out):
    return [(r["step"], r["loss"], r["loss_ema"], r["lr"]) for r in rows(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    _, method = run(out)
    return out, {k: v.clone() for k, v in method.state_dict().items()}


def stopped_run(out):
    """A run stopped at step 6: latest.pt at step 6, best.pt at step 4, scalars.csv rows 1..6."""
    summary, _ = run(out, stop_at=5)
    assert summary["status"] == "stopped" and summary["step"] == 6
    assert ck.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 6
    assert ck.load_checkpoint(out / "checkpoints" / "best.pt")["step"] == 4
    return rows(out)


def flip_a_bit_in_a_tensor(path: Path) -> None:
    """Flip one bit inside the stored bytes of a weight (torch.load does not notice)."""
    weight = ck.load_checkpoint(path)["method_state"]["network.encoder.0.weight"]
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 17] ^= 0x10
    path.write_bytes(bytes(raw))


def assert_resumed_like_the_reference(out, reference, method, before, starts):
    ref_dir, ref_state = reference
    assert starts[-1] == 4  # the data stream restarted at batch 4: a resume, not a new run
    assert rows(out)[:4] == before[:4]  # history kept: the first attempt's rows (timings included) are untouched
    assert losses(out) == losses(ref_dir)  # and the resumed run is bit-identical to an uninterrupted one
    for k, v in method.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


# --------------------------------------------------------------------------- checksums
def test_a_bit_flip_in_tensor_data_fails_the_checksum(tmp_path):
    w = torch.full((64,), 1234.5678)
    path = ck.save_checkpoint(tmp_path / "a.pt", network={"w": w}, step=3, metrics={"loss": 0.25, "best": None})
    data = ck.load_checkpoint(path)
    assert data["checksum"].startswith("sha256:") and torch.equal(data["network"]["w"], w)
    raw = bytearray(path.read_bytes())
    raw[raw.find(w.numpy().tobytes()) + 10] ^= 0x04
    bad = tmp_path / "b.pt"
    bad.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(bad, weights_only=True)["network"]["w"], w)  # torch.load does not notice
    with pytest.raises(ValueError, match=r"b\.pt: checksum mismatch: the file is corrupt"):
        ck.load_checkpoint(bad)


def test_checksums_cover_plain_values_and_survive_resaving(tmp_path):
    payload = {"step": 3, "rng": ck.rng_state(), "metrics": {"loss": 0.5, "best": float("inf")},
               "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2, dtype=torch.bfloat16)}},
                             "param_groups": [{"lr": 0.1, "params": [0], "nesterov": True}]}}
    path = ck.save_checkpoint(tmp_path / "a.pt", **payload)
    data = ck.load_checkpoint(path)
    again = ck.load_checkpoint(ck.save_checkpoint(tmp_path / "b.pt", **data))  # re-saving a loaded checkpoint
    assert again["checksum"] == data["checksum"]
    data["step"] = 4  # a changed plain value no longer matches
    with pytest.raises(ValueError, match="checksum mismatch"):
        ck.verify_checksum(data, "x.pt")


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    old = tmp_path / "old.pt"  # written before checksums existed (or by another tool)
    torch.save({"format": "volssl", "version": 1, "network": {"w": torch.ones(3)}, "step": 2}, old)
    assert ck.load_checkpoint(old)["step"] == 2


def test_folders_and_dangling_links_are_named_clearly(tmp_path):
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ValueError, match=r"dir\.pt: a folder, not a checkpoint file"):
        ck.load_checkpoint(tmp_path / "dir.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match=r"link\.pt is a link to a missing file"):
        ck.load_checkpoint(tmp_path / "link.pt")


@pytest.mark.timeout(120)  # a regression blocks torch.load on the pipe: fail instead of hanging
def test_pipes_and_link_loops_are_named_clearly_and_never_opened(tmp_path):
    """Acceptance corpus: both were "checkpoint not found", which they are not."""
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(ValueError, match=r"pipe\.pt: a named pipe \(FIFO\), not a checkpoint file; not opened"):
        ck.load_checkpoint(tmp_path / "pipe.pt")
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"a\.pt: a symbolic link loop"):
        ck.load_checkpoint(tmp_path / "a.pt")


# --------------------------------------------------------------------------- --resume falls back, never starts over
@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", ["missing", "dangling link", "named pipe"])
def test_resume_without_latest_continues_from_best_and_keeps_history(tmp_path, reference, damage, capsys):
    before = stopped_run(tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    latest.unlink()
    if damage == "dangling link":
        latest.symlink_to(tmp_path / "elsewhere" / "latest.pt")
    if damage == "named pipe":
        os.mkfifo(latest)
    starts = []
    summary, method = run(tmp_path, resume=True, starts=starts)
    err = capsys.readouterr().err
    assert summary["status"] == "finished"
    assert "latest.pt" in err and f"resuming from {tmp_path / 'checkpoints' / 'best.pt'} (step 4)" in err
    if damage == "named pipe":
        assert "latest.pt: a named pipe (FIFO), not a checkpoint file" in err
    assert_resumed_like_the_reference(tmp_path, reference, method, before, starts)


def test_resume_with_latest_a_folder_continues_from_best(tmp_path, reference, capsys):
    before = stopped_run(tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    latest.unlink()
    latest.mkdir()
    starts = []
    summary, method = run(tmp_path, resume=True, starts=starts)
    err = capsys.readouterr().err
    assert summary["status"] == "finished" and "latest.pt: a folder, not a checkpoint file" in err
    assert "resuming from" in err and "best.pt (step 4)" in err and "latest.pt -> latest.pt.broken" in err
    assert (tmp_path / "checkpoints" / "latest.pt.broken").is_dir()  # set aside, so latest.pt can be written
    assert ck.load_checkpoint(latest)["step"] == STEPS
    assert_resumed_like_the_reference(tmp_path, reference, method, before, starts)


def test_resume_with_a_bit_flipped_latest_continues_from_best(tmp_path, reference, capsys):
    before = stopped_run(tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    flip_a_bit_in_a_tensor(latest)
    starts = []
    summary, method = run(tmp_path, resume=True, starts=starts)
    err = capsys.readouterr().err
    assert summary["status"] == "finished" and "latest.pt: checksum mismatch: the file is corrupt" in err
    assert "best.pt (step 4)" in err
    assert_resumed_like_the_reference(tmp_path, reference, method, before, starts)


def test_resume_picks_the_newest_intact_checkpoint_by_step(tmp_path, capsys):
    stopped_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000006.pt").write_bytes((ckpts / "latest.pt").read_bytes())  # a kept copy at step 6
    (ckpts / "latest.pt").write_bytes((ckpts / "latest.pt").read_bytes()[:1000])  # truncated
    starts = []
    run(tmp_path, resume=True, starts=starts)
    assert "step_000006.pt (step 6)" in capsys.readouterr().err and starts[-1] == 6


def test_resume_refuses_when_no_checkpoint_is_intact_and_changes_nothing(tmp_path):
    stopped_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    flip_a_bit_in_a_tensor(ckpts / "latest.pt")
    (ckpts / "best.pt").write_bytes((ckpts / "best.pt").read_bytes()[:5000])
    snapshot = {p: p.read_bytes() for p in [tmp_path / "scalars.csv", *ckpts.iterdir()]}
    with pytest.raises(ValueError, match="no intact checkpoint") as e:
        run(tmp_path, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "latest.pt: checksum mismatch" in msg and "best.pt: corrupt or truncated" in msg
    assert "--overwrite" in msg
    assert {p: p.read_bytes() for p in [tmp_path / "scalars.csv", *ckpts.iterdir()]} == snapshot


def test_resume_refuses_over_scalars_without_any_checkpoint(tmp_path):
    (tmp_path / "scalars.csv").write_text("step,loss\n1,0.5\n2,0.4\n")  # killed before its first checkpoint
    with pytest.raises(ValueError, match=r"latest\.pt is missing.*holds a run"):
        run(tmp_path, resume=True)
    assert (tmp_path / "scalars.csv").read_text() == "step,loss\n1,0.5\n2,0.4\n"


def test_resume_does_not_use_a_checkpoint_without_optimizer_state(tmp_path):
    stopped_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "latest.pt").unlink()
    best = ck.load_checkpoint(ckpts / "best.pt")
    del best["optimizer"]
    ck.save_checkpoint(ckpts / "best.pt", **best)
    with pytest.raises(ValueError, match=r"best\.pt lacks optimizer, which resuming needs"):
        run(tmp_path, resume=True)


def test_resume_in_an_empty_folder_starts_a_new_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    starts = []
    summary, _ = run(tmp_path / "run", steps=2, resume=True, starts=starts)
    assert summary["status"] == "finished" and starts == [0]
    assert "starting a new run" in capsys.readouterr().err


# --------------------------------------------------------------------------- a new run never overwrites one
def _trace(out: Path, kind: str) -> None:
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    if kind == "best.pt only":
        ck.save_checkpoint(ckpts / "best.pt", kind="pretrain", step=4)
    elif kind == "scalars.csv only":
        (out / "scalars.csv").write_text("step,loss\n1,0.5\n")
    elif kind == "dangling latest link":
        (ckpts / "latest.pt").symlink_to(out / "gone.pt")
    elif kind == "latest.pt folder":
        (ckpts / "latest.pt").mkdir()


@pytest.mark.parametrize("kind", ["best.pt only", "scalars.csv only", "dangling latest link", "latest.pt folder"])
def test_a_new_run_refuses_a_folder_with_a_run_unless_overwrite(tmp_path, kind):
    _trace(tmp_path, kind)
    (tmp_path / "checkpoints" / "old_step_000100.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        run(tmp_path, steps=2)
    summary, _ = run(tmp_path, steps=2, overwrite=True)
    assert summary["status"] == "finished" and [r["step"] for r in rows(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "final.pt", "latest.pt"]


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="give one"):
        run(tmp_path, resume=True, overwrite=True)


# --------------------------------------------------------------------------- the commands
def test_pretrain_cli_checks_the_run_folder_first_and_overwrites_on_request(tmp_path, capsys):
    out = tmp_path / "run.txt"
    out.write_text("not a folder")
    # the data folder does not exist either: the run folder is checked before any work
    assert main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(tmp_path / "nodata"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "existing file" in err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
              "--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

    data = write_tiny_dataset(tmp_path / "data", n_cases=2, shape=(40, 40, 40))
    run_dir = tmp_path / "r"
    args = ["pretrain", "--preset", "s3d-b-tiny", "--data", str(data), "--out", str(run_dir), "--set",
            "train.steps=1", "--set", "data.patch_size=32,32,32", "--set", "data.num_workers=0", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err
    assert main(args + ["--overwrite"]) == 0, capsys.readouterr().err


def test_finetune_cli_checks_the_run_folder_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "ft"
    out.write_text("not a folder")
    assert main(["finetune", "--checkpoint", str(tmp_path / "missing.pt"), "--dataset", str(tmp_path / "nodata"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "missing.pt" not in err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--checkpoint", "none", "--dataset", str(tmp_path), "--out", str(tmp_path / "x"),
              "--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_disposable_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    # a benchmark cell / search trial / demo run killed before its first checkpoint leaves scalars.csv
    # and nothing to resume from: --resume refuses it (a user's run), resume_or_start_over starts it over
    from volssl.training.trainer import NoIntactCheckpoint, resume_or_start_over

    out = tmp_path / "cell"
    summary, _ = run(out)
    for p in (out / "checkpoints").iterdir():
        p.unlink()
    with pytest.raises(NoIntactCheckpoint, match="no intact checkpoint"):
        run(out, resume=True)
    calls = []

    def cell(out, resume=False, overwrite=False):
        calls.append((resume, overwrite))
        return run(out, resume=resume, overwrite=overwrite)[0]

    again = resume_or_start_over(cell, out)
    assert calls == [(True, False), (False, True)]
    assert again["step"] == summary["step"] == STEPS and (out / "checkpoints" / "latest.pt").is_file()
    steps = [r["step"] for r in rows(out)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # the old rows were replaced, not appended to


def test_a_run_stopped_by_a_signal_stops_its_caller(tmp_path, monkeypatch):
    # SIGTERM on a benchmark once ended the cell's fine-tuning early; the cell then predicted with the
    # half-trained network and wrote metrics.json as if it had finished. A stopped disposable run now raises
    # RunStopped, which a benchmark's failed-cell handler does not swallow
    from volssl import benchmark
    from volssl.training.trainer import RunStopped, resume_or_start_over

    def cell(out, resume=False, overwrite=False):
        return run(out, resume=resume, overwrite=overwrite, stop_at=5)[0]

    with pytest.raises(RunStopped, match="SIGUSR1 at step 6"):
        resume_or_start_over(cell, tmp_path / "cell")

    def stopped(job):
        raise RunStopped("stopped")

    monkeypatch.setattr(benchmark, "run_cell", stopped)
    with pytest.raises(RunStopped):
        benchmark.safe_cell({"method": "m", "dataset_name": "d", "n_train": 2, "seed": 0, "run": str(tmp_path)})
