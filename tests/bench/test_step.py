"""`volssl bench step`: dense, masked-dense and block-sparse steps timed in one run, their ratios, FLOPs, peak memory (tiny sizes; no absolute
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


def test_bench_step_prints_every_side_their_ratios_flops_and_peak_memory(capsys):
    argv = ["bench", "step", "--json", "--patch", "32", "--batch", "1", "--repeats", "2", "--warmup", "1",
            "--ratios", "0.75,0.9"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dense_ms"] > 0 and r["dense_gflop"] > 0 and r["dense_peak_mib"] > 0
    assert "profile_memory" in r["memory_method"]
    assert [row["mask_ratio"] for row in r["rows"]] == [0.75, 0.9]
    for row in r["rows"]:
        assert row["masked_ms"] > 0 and row["block_ms"] > 0
        assert row["block_ratio"] == pytest.approx(row["block_ms"] / r["dense_ms"], rel=0.01)
        assert row["masked_ratio"] == pytest.approx(row["masked_ms"] / r["dense_ms"], rel=0.01)
        assert row["block_vs_flops_limit"] == pytest.approx(row["block_ratio"] / row["flops_ratio"], rel=0.01)
        assert row["masked_peak_mib"] > 0 and row["block_peak_mib"] > 0
        assert row["meets_block_target"] == (row["block_ratio"] <= row["block_target"])
    # the FLOPs model: fewer visible blocks, less encoder work, the decoder's stays
    assert 0.3 < r["rows"][1]["flops_ratio"] < r["rows"][0]["flops_ratio"] < 1.0
    assert r["s3d_ms"] == r["rows"][0]["masked_ms"] and r["target_ratio"] == 1.15
    assert r["meets_target"] == (r["rows"][0]["masked_ratio"] <= 1.15)


def test_the_masked_and_block_sides_of_a_ratio_draw_the_same_masks_and_losses():
    import volssl.methods.s3d as s3d_module

    torch.set_num_threads(1)
    seen = {}
    original = s3d_module.S3D.forward_masked

    def spy(self, images, mask):
        out = original(self, images, mask)
        seen.setdefault(self.cfg.block_sparse, []).append((mask.clone(), out.loss.item()))
        return out

    steps = _setup("resenc-tiny", 1, 32, "cpu", 0, ratios=(0.75,))
    s3d_module.S3D.forward_masked = spy
    try:
        for _ in range(2):
            steps["masked@0.75"]()
            steps["block@0.75"]()
    finally:
        s3d_module.S3D.forward_masked = original
    for (m0, l0), (m1, l1) in zip(seen["off"], seen["on"]):
        assert torch.equal(m0, m1) and l1 == pytest.approx(l0, rel=1e-5)


def test_cpu_peak_grows_with_the_batch():
    torch.set_num_threads(1)
    peaks = [cpu_peak_mib(_setup("resenc-tiny", b, 32, "cpu", 0)["masked@0.75"]) for b in (1, 3)]
    assert peaks[0] > 1 and peaks[1] > 2 * peaks[0]  # activations scale with the batch


def test_patch_not_divisible_by_the_mask_block_is_refused(capsys):
    # resenc-tiny's mask block is its total stride, 8: 36 is not a multiple of it
    assert main(["bench", "step", "--patch", "36", "--repeats", "1", "--no-memory"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_the_flops_model_predicts_the_counted_flops_of_the_block_sparse_step(capsys):
    from volssl.bench.step import count_flops, flops_model

    torch.set_num_threads(1)
    steps = _setup("resenc-tiny", 1, 32, "cpu", 0, ratios=(0.75,))
    counted = count_flops(steps["block@0.75"]) / count_flops(steps["dense"])
    model = flops_model("resenc-tiny", 32, 0.75)
    assert model["flops_ratio"] == pytest.approx(counted, rel=0.01)
    assert model["visible_fraction"] == 0.25 and model["block_stages"] == 3
    assert main(["bench", "step", "--json", "--flops-model", "--arch", "resenc-l", "--patch", "160",
                 "--ratios", "0.75,0.9"]) == 0  # the real S3D-B size: shapes only
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert 0.4 < rows[1]["flops_ratio"] < rows[0]["flops_ratio"] < 0.7
