"""`volssl bench augment`: both sides timed in one run (tiny sizes; no absolute speed is asserted here;
the measured numbers are in the report)."""
from __future__ import annotations

import json

import pytest
import torch

from volssl.bench.augment import amaes_configs, per_sample_pipeline
from volssl.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bench_augment_prints_both_rates_and_their_ratio(capsys):
    argv = ["bench", "augment", "--json", "--size", "12", "--batch", "2", "--repeats", "2", "--warmup", "0"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"batched_samples_per_s", "per_sample_samples_per_s", "ratio", "batched_ms_per_batch",
            "per_sample_ms_per_batch", "device", "batch", "size"} <= set(r)
    assert r["batched_samples_per_s"] > 0 and r["per_sample_samples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["batched_samples_per_s"] / r["per_sample_samples_per_s"], rel=0.01)
    assert (r["batch"], r["size"], r["device"], r["elastic"]) == (2, 12, "cpu", True)


def test_always_and_no_elastic_switch_the_configs_and_both_sides_change_the_sample():
    spatial, artifacts = amaes_configs(always=True, elastic=False)
    assert spatial.p_elastic == 0.0 and spatial.p_rotation == 1.0 and artifacts.p_ghosting == 1.0
    assert artifacts.p_gamma_invert == 0.05
    spatial, artifacts = amaes_configs()
    assert (spatial.p_elastic, spatial.scale_range, artifacts.p_bias) == (0.33, (0.9, 1.1), 0.33)
    x = torch.randn(1, 10, 10, 10)
    out = per_sample_pipeline(always=True, elastic=False)(x.clone())
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_bad_arguments_are_refused(capsys):
    assert main(["bench", "augment", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
