"""`volssl bench crops`: the JSON it prints on a small written volume and on a given one, the slab
writer, argument errors (tiny sizes; no absolute speed is asserted)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import tifffile
import zarr

from volssl.bench.crops import add_arguments, run, volume_slabs, write_volumes
from volssl.cli import main

KEYS = {
    "zarr_crops_per_s_per_worker", "tiff_striped_crops_per_s_per_worker", "memory_crops_per_s_per_worker",
    "ratio_zarr_vs_memory", "ratio_tiff_striped_vs_memory", "peak_rss_files_mib", "rss_growth_reading_mib", "rss_now_mib",
    "volume_loaded_whole", "volume_shape", "volume_mib", "workers_for_320_crops_per_s", "best_source",
    "zarr_reader", "tiff_striped_reader",
}


def test_bench_prints_one_json_object(capsys, tmp_path):
    argv = ["bench", "crops", "--json", "--size", "128", "--crop", "32", "--crops", "50", "--no-progress",
            "--tiff-layouts", "striped,tiles3d", "--workdir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["volume_shape"] == [128, 128, 128] and result["volume_mib"] == 2.0
    assert result["zarr_reader"] == "zarr" and result["tiff_striped_reader"] == "tiff-raw"
    assert result["tiff_tiles3d_reader"] == "tiff-zarr"
    for key in ("zarr", "tiff_striped", "tiff_tiles3d", "memory"):
        assert result[f"{key}_crops_per_s_per_worker"] > 0 and result[f"{key}_crops_per_s_wall"] > 0
    assert result["ratio_zarr_vs_memory"] > 0 and result["workers_for_320_crops_per_s"] >= 1
    assert result["symmetries"] and result["crop_zscore"]
    assert list(tmp_path.iterdir()) == []  # the temporary volumes are gone


def test_bench_on_a_given_volume(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (48, 40, 56), dtype=np.uint8)
    z = zarr.create_array(str(tmp_path / "given.zarr"), shape=a.shape, chunks=(16, 16, 16), dtype="u1")
    z[...] = a
    p = argparse.ArgumentParser()
    add_arguments(p)
    result = run(p.parse_args(["--volume", str(tmp_path / "given.zarr"), "--crop", "16", "--crops", "50",
                               "--no-progress", "--no-symmetries"]))
    assert result["volume_reader"] == "zarr" and result["volume_shape"] == [56, 40, 48]
    assert result["volume_crops_per_s_per_worker"] > 0 and result["ratio_volume_vs_memory"] > 0
    assert result["symmetries"] is False and result["write_s"] is None
    assert (tmp_path / "given.zarr").is_dir()  # a given volume is never removed


def test_written_volumes_hold_the_slabs(tmp_path):
    paths = write_volumes(tmp_path, 40, 16, ["striped", "tiles3d", "tiles2d"], "zstd", seed=3, progress=False)
    expected = np.concatenate([s for _, s in volume_slabs(40, 16, seed=3)])
    assert expected.shape == (40, 40, 40) and expected.dtype == np.uint8 and expected.std() > 10
    assert np.array_equal(zarr.open_array(str(paths["zarr"]), mode="r")[...], expected)
    for layout in ("striped", "tiles3d", "tiles2d"):
        assert np.array_equal(tifffile.imread(paths[f"tiff_{layout}"]), expected), layout


def test_argument_errors(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(ValueError, match="--crop 64 is larger than --size 32"):
        run(p.parse_args(["--size", "32"]))
    with pytest.raises(ValueError, match="tiff-layouts"):
        run(p.parse_args(["--size", "32", "--crop", "8", "--tiff-layouts", "striped,zigzag"]))
    with pytest.raises(ValueError, match="--crops must be >= 1"):
        run(p.parse_args(["--crops", "0"]))
