"""`volssl bench loader`: the JSON it prints, the format comparison and the dataset writer (tiny sizes;
no absolute speed is asserted)."""
from __future__ import annotations

import json

import numpy as np

from volssl.bench.loader import class_locations, compare_formats, format_table, phantom_like_case, write_dataset
from volssl.cli import main
from volssl.data.storage import load_array

KEYS = {
    "whole_volume_ms",
    "whole_volume_patches_per_s",
    "sampler_large_patches_per_s",
    "ratio_large_vs_whole",
    "sampler_small_patches_per_s_per_worker",
    "loader_patches_per_s",
    "loader_patches_per_s_per_worker",
    "nifti_gz_whole_ms",
    "ratio_large_vs_nifti_gz",
    "ratio_target_met",
    "small_target_met",
    "targets_met",
}


def test_bench_prints_one_json_object(capsys):
    argv = ["bench", "loader", "--json", "--cases", "2", "--size", "40", "--channels", "2", "--large-patch", "24"]
    argv += ["--small-patch", "12", "--reps", "2", "--small-patches", "30", "--workers", "1", "--batch-size", "2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    shape = result["volume_shape"]
    assert shape[0] == 2 and max(shape[1:]) == 40 and result["n_cases"] == 2 and "brain" in result["data"]
    assert result["ratio_large_vs_whole"] > 0 and result["loader_patches_per_s"] > 0
    assert result["targets_met"] == (result["ratio_target_met"] and result["small_target_met"])


def test_bench_reads_an_existing_dataset(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_dataset(tmp_path, [("a", rng.standard_normal((1, 20, 18, 16)).astype(np.float32), None)])
    argv = ["bench", "loader", "--json", "--data", str(tmp_path), "--large-patch", "24", "--small-patch", "8"]
    assert main(argv + ["--reps", "2", "--small-patches", "25"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == str(tmp_path) and result["loader_patches_per_s"] is None


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "loader", "--size", "0"]) == 2
    assert "--size" in capsys.readouterr().err


def test_compare_formats_rows_and_table():
    configs = [("blosc2", 16, 8, "lz4", 5, True), ("zarr", 16, None, "lz4", 5, True), ("zarr", 8, 16, "zstd", 1, True)]
    rows = compare_formats((32, 32, 32), configs=configs, rounds=1, large_per_round=1, small_per_round=2, large=20, small=8, progress=False)
    assert [r["format"] for r in rows] == ["blosc2", "zarr", "zarr"]
    for r in rows:
        assert r["size_mib"] > 0 and r["whole_ms"] > 0 and r["large_ms"] > 0 and r["compression"] > 0
    table = format_table(rows, 20, 8).splitlines()
    assert len(table) == 2 + len(rows) and "20^3 ms" in table[0]


def test_phantom_is_zscored_and_labelled():
    image, label = phantom_like_case(np.random.default_rng(1), (32, 40, 36), channels=2)
    assert image.shape == (2, 32, 40, 36) and image.dtype == np.float32
    assert np.allclose(image.mean(axis=(1, 2, 3)), 0, atol=1e-4) and np.allclose(image.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert set(np.unique(label)) <= {0, 1, 2} and (label > 0).any()


def test_write_dataset_layout_and_class_locations(tmp_path):
    rng = np.random.default_rng(2)
    label = np.zeros((12, 10, 8), np.uint8)
    label[2:4, 3:5, 1:3] = 1
    label[9, 9, 7] = 3
    ds = write_dataset(tmp_path, [("c0", rng.standard_normal((1, 12, 10, 8)).astype(np.float32), label)])
    assert [r.id for r in ds.cases] == ["c0"] and ds.cases[0].shape == [1, 12, 10, 8] and ds.cases[0].has_label
    assert np.array_equal(load_array(ds.label_path("c0")), label)
    locs = ds.props("c0")["class_locations"]
    assert set(locs) == {"1", "3"} and len(locs["1"]) == 8 and locs["3"] == [[9, 9, 7]]
    assert all(label[tuple(p)] == 1 for p in locs["1"])
    capped = class_locations(label, rng, max_per_class=3)
    assert len(capped["1"]) == 3 and all(label[tuple(p)] == 1 for p in capped["1"])
