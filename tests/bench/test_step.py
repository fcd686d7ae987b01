"""`volssl bench step`: both steps timed in one run, their ratio, peak memory (tiny sizes; no absolute
speed is asserted here; the measured numbers are in the report)."""
from __future__ import annotations

import json

import pytest
import torch

from volssl.bench.step import _setup, cpu_peak_mib
from volssl.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bench_step_prints_both_times_their_ratio_and_peak_memory(capsys):
    argv = ["bench", "step", "--json", "--patch", "32", "--batch", "1", "--repeats", "2", "--warmup", "1"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dense_ms"] > 0 and r["s3d_ms"] > 0
    assert r["ratio"] == pytest.approx(r["s3d_ms"] / r["dense_ms"], rel=0.01)
    assert r["target_ratio"] == 1.15 and r["meets_target"] == (r["s3d_ms"] / r["dense_ms"] <= 1.15)
    assert r["dense_peak_mib"] > 0 and r["s3d_peak_mib"] > 0 and "profile_memory" in r["memory_method"]


def test_cpu_peak_grows_with_the_batch():
    torch.set_num_threads(1)
    peaks = [cpu_peak_mib(_setup("resenc-tiny", b, 32, "cpu", 0)[1]) for b in (1, 3)]
    assert peaks[0] > 1 and peaks[1] > 2 * peaks[0]  # activations scale with the batch


def test_patch_not_divisible_by_the_mask_block_is_refused(capsys):
    # resenc-tiny's mask block is its total stride, 8: 36 is not a multiple of it
    assert main(["bench", "step", "--patch", "36", "--repeats", "1", "--no-memory"]) == 2
    assert "divisible" in capsys.readouterr().err
