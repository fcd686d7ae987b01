"""`volssl bench amaes_decoder`: both AMAES steps timed in one run and their ratio (tiny sizes; no
absolute speed is asserted here, the measured numbers are in the report)."""
from __future__ import annotations

import json

import pytest
import torch

from volssl.bench.amaes_decoder import _setup
from volssl.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bench_prints_both_step_times_and_the_speedup(capsys):
    argv = ["bench", "amaes_decoder", "--json", "--patch", "32", "--batch", "1", "--repeats", "2", "--warmup", "1"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["standard_ms"] > 0 and r["light_ms"] > 0 and r["paper_speedup"] == 1.25
    assert r["speedup"] == pytest.approx(r["standard_ms"] / r["light_ms"], rel=0.01)
    assert r["light_decoder_params"] < r["standard_decoder_params"]


def test_both_sides_share_the_encoder_and_differ_in_the_decoder():
    torch.set_num_threads(1)
    standard, light, standard_step, light_step = _setup("unet-tiny", 1, 32, "cpu", 0)
    a, b = standard.network.state_dict(), light.network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same encoder weights
    assert standard.decoder.skip_connections and all(len(s.convs) == 2 for s in standard.decoder.stages)
    assert not light.decoder.skip_connections and all(len(s.convs) == 1 for s in light.decoder.stages)
    before = light.decoder.seg_layers[0].weight.detach().clone()
    light_step()
    standard_step()
    assert not torch.equal(before, light.decoder.seg_layers[0].weight)  # a real optimiser step
