"""The representation probe (training/probe.py): features, the linear head, the floor, the pre-training hook
and `volssl probe`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from volssl.config import ModelConfig, resolve
from volssl.training.logging import read_scalars
from volssl.training.probe import (
    Probe, ProbeConfig, encoder_from_state, patch_features, probe_cases, read_probe_csv, sample_grid,
)

SMALL = ["train.steps=4", "data.patch_size=32,32,32", "data.num_workers=0", "train.device=cpu",
         "train.checkpoint_every=4", "train.preview_every=4", "train.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Brain phantoms (raw and preprocessed with the S3D plan): 6 training + 1 test case, 40^3."""
    from volssl.data.phantoms import generate_phantoms
    from volssl.data.preprocess import get_plan
    from volssl.finetuning.finetune import prepare_dataset

    root = tmp_path_factory.mktemp("probe")
    raw = generate_phantoms(root / "raw", "brain", n=6, n_test=1, seed=0, shape=(40, 40, 40), progress=False)
    pre = prepare_dataset(raw, get_plan("s3d").to_dict(), root, root / "pre", progress=False)
    return raw, pre


def test_sample_grid_and_case_choice():
    assert sample_grid((32, 32, 32), 32_768) == (1, 1, 1)
    assert sample_grid((32, 32, 32), 4_096) == (2, 2, 2)
    assert sample_grid((160, 160, 160), 4_096) == (10, 10, 10)

    class R:
        def __init__(self, i, split="train", has_label=True):
            self.id, self.split, self.has_label = f"c{i}", split, has_label

    records = [R(i) for i in range(6)] + [R(6, "test"), R(7, has_label=False)]
    train, ev = probe_cases(records, 2, 3, seed=0)
    assert len(train) == 2 and len(ev) == 3 and not set(train) & set(ev)
    assert "c6" not in train + ev and "c7" not in train + ev  # never the test split, never unlabelled
    assert probe_cases(records, 2, 3, seed=0) == (train, ev)


def test_features_cover_every_stage_and_channel():
    enc = encoder_from_state(ModelConfig(arch="resenc-tiny"), None, seed=0)
    img = torch.randn(3, 32, 32, 32)
    f = patch_features(enc, img, (2, 2, 2))
    widths = sum(enc.output_channels)
    assert f.shape == (16 ** 3, 3 * widths)
    # per stage, channel c's block equals the encoder run on that channel alone (stage-major layout)
    one = patch_features(enc, img[1:2], (2, 2, 2))
    cols, start = [], 0
    for w in enc.output_channels:
        cols += range(start + w, start + 2 * w)
        start += 3 * w
    torch.testing.assert_close(f[:, cols], one)
    vit = encoder_from_state(ModelConfig(arch="vit-unetr-tiny"), None, seed=0)
    g = patch_features(vit, img[:1, :16, :16, :16], (1, 1, 1))
    assert g.shape == (16 ** 3, 2 * vit.dim)  # final tokens + the middle block's tokens


def test_encoder_from_state_loads_every_tensor_and_refuses_a_mismatch():
    cfg = ModelConfig(arch="resenc-tiny")
    a = encoder_from_state(cfg, None, seed=1)
    state = {f"encoder.{k}": v + 1.0 for k, v in a.state_dict().items()}
    b = encoder_from_state(cfg, state, seed=2)
    assert all(torch.equal(b.state_dict()[k[8:]], v) for k, v in state.items())
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="lack"):
        encoder_from_state(cfg, state)


def test_the_probe_is_deterministic_and_informative(data):
    _, pre = data
    probe = Probe(pre, ModelConfig(arch="resenc-tiny"), (32, 32, 32), ProbeConfig(n_train=2, n_eval=2, steps=60))
    floor = probe.floor()
    assert 0.0 <= floor <= 1.0 and probe.score(None) == floor
    # an encoder that is told the answer: stage-0 features carry the label -> the linear head finds it
    enc = encoder_from_state(ModelConfig(arch="resenc-tiny"), None)
    (xtr, ytr, _), (xev, yev, cases) = probe._features_both(enc)
    cheat = lambda x, y: torch.cat([x, 5.0 * y[:, None].float()], 1)  # noqa: E731
    assert probe.fit_and_score(cheat(xtr, ytr), ytr, cheat(xev, yev), yev, cases) > 0.95
    rng_before = torch.get_rng_state()
    probe.score({f"encoder.{k}": v for k, v in enc.state_dict().items()})
    assert torch.equal(torch.get_rng_state(), rng_before)  # a probe never moves the training RNG


def test_pretraining_with_the_probe_logs_it_and_trains_identically(data, tmp_path):
    from volssl.training.trainer import pretrain

    raw, pre = data
    a = pretrain(resolve("s3d-b-tiny", SMALL), pre, tmp_path / "plain", progress=False)
    b = pretrain(resolve("s3d-b-tiny", SMALL + [f"train.probe_dataset={raw}", "train.probe_every=2"]), pre,
                 tmp_path / "probed", progress=False)
    assert a["loss"] == b["loss"]  # the probe does not disturb the training stream
    rows = read_probe_csv(tmp_path / "probed" / "probe.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(0.0 <= r["probe_dice"] <= 1.0 and 0.0 <= r["probe_floor"] <= 1.0 for r in rows)
    assert (tmp_path / "probed" / "probe.png").stat().st_size > 0
    scal = {int(r["step"]): r for r in read_scalars(tmp_path / "probed" / "scalars.csv")}
    assert scal[2]["probe_dice"] == pytest.approx(rows[0]["probe_dice"]) and "probe_dice" not in scal[1]
    assert (tmp_path / "probed" / "probe_data" / "plan.json").is_file()  # raw dataset preprocessed with the plan


def test_cli_probe(data, tmp_path, capsys):
    from volssl.cli import main as cli
    from volssl.training.trainer import pretrain

    raw, pre = data
    pretrain(resolve("s3d-b-tiny", SMALL), pre, tmp_path / "run", progress=False)
    assert cli(["probe", "--checkpoint", str(tmp_path / "run"), "--dataset", str(pre), "--n-eval", "2",
                "--steps", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "s3d" and out["step"] == 4 and len(out["eval_cases"]) == 2
    assert out["gain_over_floor"] == pytest.approx(out["probe_dice"] - out["probe_floor"])
    assert np.isfinite(out["probe_dice"])
