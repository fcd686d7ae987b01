"""Data parallelism: 2 gloo processes under torchrun give the losses of 1 process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volssl.training.distributed import DistInfo, init_distributed, local_rows
from volssl.training.logging import read_scalars

HERE = Path(__file__).parent


def test_single_process_without_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.enabled


def test_local_rows_split_the_global_batch():
    assert [local_rows(6, DistInfo(r, 3)) for r in range(3)] == [(0, 2), (2, 2), (4, 2)]
    with pytest.raises(ValueError, match="not divisible"):
        local_rows(6, DistInfo(0, 4))


def _run(args, env_extra=None, torchrun=False, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run(launcher + [str(HERE / "training_standins.py")] + args, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    args = ["--steps", "5", "--batch", "4", "--set", "augment.p_rotation=1.0", "--set", "augment.p_scale=0.5"]
    _run([str(tmp_path / "one")] + args)
    _run([str(tmp_path / "two")] + args, torchrun=True)
    one = read_scalars(tmp_path / "one" / "scalars.csv")
    two = read_scalars(tmp_path / "two" / "scalars.csv")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6, rel=0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-6, rel=1e-5)
    w1 = torch.load(tmp_path / "one" / "checkpoints" / "final.pt", weights_only=True)["network"]
    w2 = torch.load(tmp_path / "two" / "checkpoints" / "final.pt", weights_only=True)
    assert w2["world_size"] == 2
    for k, v in w1.items():
        torch.testing.assert_close(w2["network"][k], v, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_block_sparse_s3d(tmp_path):
    """The real S3D step, its encoder computed on the visible blocks of each rank's rows, under DDP."""
    args = ["--steps", "5", "--batch", "4", "--method", "s3d", "--set", "data.patch_size=32,32,32",
            "--set", "augment.p_rotation=1.0"]
    _run([str(tmp_path / "dense")] + args + ["--set", "method.block_sparse=off"])
    _run([str(tmp_path / "one")] + args + ["--set", "method.block_sparse=on"])
    _run([str(tmp_path / "two")] + args + ["--set", "method.block_sparse=on"], torchrun=True)
    runs = {k: read_scalars(tmp_path / k / "scalars.csv") for k in ("dense", "one", "two")}
    weights = {k: torch.load(tmp_path / k / "checkpoints" / "final.pt", weights_only=True)["network"]
               for k in ("dense", "one", "two")}
    for a, b in zip(runs["one"], runs["two"]):  # data parallelism changes nothing on the block path
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6, rel=0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-6, rel=1e-5)
    for k, v in weights["one"].items():
        if not k.endswith(".conv.bias"):  # a pre-norm conv bias: noise gradient; AdamW scales tiny ones up (1e-5)
            torch.testing.assert_close(weights["two"][k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    # against the masked-dense path: the first step is the same up to rounding; AdamW then turns the pre-norm
    # biases' noise gradients into full-size updates, so later steps drift apart by about 1e-4
    first_dense, first_block = runs["dense"][0], runs["one"][0]
    assert first_block["loss"] == pytest.approx(first_dense["loss"], rel=1e-6)
    assert first_block["grad_norm"] == pytest.approx(first_dense["grad_norm"], rel=1e-6)
    for a, b in zip(runs["dense"], runs["one"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
