"""`volssl pretrain`: the real S3D method on a tiny preprocessed dataset, resume, argument errors."""
import json

import pytest

from training_standins import write_tiny_dataset
from volssl.cli import main
from volssl.training.checkpoint import load_checkpoint
from volssl.training.logging import read_scalars

FAST = ["--set", "data.patch_size=32,32,32", "--set", "data.num_workers=0", "--set", "train.log_every=1",
        "--set", "train.preview_every=2", "--set", "train.checkpoint_every=2", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n_cases=2, shape=(40, 40, 40))


def test_pretrain_s3d_from_the_cli_then_resume(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    rc = main(["pretrain", "--method", "s3d", "--preset", "s3d-b-tiny", "--data", str(dataset), "--out", str(run),
               "--set", "train.steps=2"] + FAST)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "checkpoints" in out and "scalars.csv" in out and "tensorboard --logdir" in out and "previews" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "s3d-b-tiny" and cfg["method"]["name"] == "s3d" and cfg["data"]["patch_size"] == [32] * 3
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    assert final["step"] == 2 and final["plan"] == json.loads((dataset / "plan.json").read_text())
    assert any(k.startswith("encoder.") for k in final["network"])
    assert not any("mask_token" in k for k in final["network"])  # pre-training-only parts stay out
    assert (run / "previews" / "step_000002.png").is_file()
    # --resume without --preset continues from RUN/config.json (here: two more steps)
    rc = main(["pretrain", "--data", str(dataset), "--out", str(run), "--resume", "--set", "train.steps=3"] + FAST)
    assert rc == 0, capsys.readouterr().err
    assert [r["step"] for r in read_scalars(run / "scalars.csv")] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 3


def test_argument_errors_are_clear(tmp_path, dataset, capsys):
    common = ["--data", str(dataset), "--out", str(tmp_path / "r")]
    assert main(["pretrain", "--method", "amaes", "--preset", "s3d-b-tiny"] + common) == 2
    assert "--method amaes does not match preset 's3d-b-tiny'" in capsys.readouterr().err
    assert main(["pretrain"] + common) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "s3d-b-tiny", "--set", "train.precision=fp16", "--set",
                 "train.device=cpu"] + common) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err

