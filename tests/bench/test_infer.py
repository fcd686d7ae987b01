"""`volssl bench infer`: the JSON it prints on tiny sizes (no absolute speed is asserted)."""
from __future__ import annotations

import json

from volssl.cli import main

KEYS = {
    "device", "threads", "clock", "arch", "input_shape", "patch", "overlap", "sw_batch_size", "n_tiles", "repeats",
    "ours_s", "monai_s", "ours_voxels_per_s", "monai_voxels_per_s", "ratio", "target", "target_met", "max_abs_diff",
    "overhead_ours_ms", "overhead_monai_ms", "overhead_ratio", "overhead_max_abs_diff",
}


def test_bench_infer_prints_one_json_object(capsys):
    argv = ["bench", "infer", "--json", "--size", "40,36,32", "--patch", "32", "--repeats", "1",
            "--overhead-repeats", "2", "--classes", "3"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["input_shape"] == [1, 1, 40, 36, 32] and result["n_tiles"] == 4 and result["clock"] == "cpu"
    assert result["max_abs_diff"] < 1e-4 and result["overhead_max_abs_diff"] < 1e-4  # same logits as MONAI
    assert result["ratio"] > 0 and result["ours_voxels_per_s"] > 0 and result["monai_voxels_per_s"] > 0
    assert result["target_met"] == (result["ratio"] >= result["target"])


def test_bench_infer_rejects_a_patch_the_network_cannot_take(capsys):
    assert main(["bench", "infer", "--patch", "20", "--size", "24"]) == 2  # 20: not a multiple of 8
    assert "total stride 8" in capsys.readouterr().err
