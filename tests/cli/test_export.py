"""`volssl export` on the command line, and hf:// addresses in every checkpoint option: what is printed,
exit codes, and one clear line when the Hub cannot be reached (HF_HUB_OFFLINE=1 for real, and a
snapshot_download that raises)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from volssl.cli import main
from volssl.config import ModelConfig, config_to_dict, resolve
from volssl.models.registry import build_model
from volssl.training.checkpoint import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    """A pre-training checkpoint of the s3d-b-tiny configuration (untrained resenc-tiny weights)."""
    cfg = resolve("s3d-b-tiny", ["data.patch_size=32,32,32"])
    net = build_model(cfg.model)
    path = tmp_path / "run" / "checkpoints" / "final.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, kind="pretrain", config=config_to_dict(cfg), model=config_to_dict(cfg.model),
                    network={k: v for k, v in net.state_dict().items() if ".seg_layers." not in k},
                    plan={"name": "s3d", "target_spacing": [1.0, 1.0, 1.0], "normalization": "zscore"}, step=7,
                    metrics={"loss": 0.5, "loss_ema": 0.6})
    return path


def test_the_cli_lists_the_formats_of_the_api():
    from volssl.cli.export import FORMATS as CLI_FORMATS
    from volssl.training.export import FORMATS

    assert CLI_FORMATS == FORMATS


def test_export_nnunet_prints_the_files_the_plans_and_the_next_command(checkpoint, tmp_path, capsys):
    out = tmp_path / "nn"
    assert main(["export", str(checkpoint.parent.parent), str(out), "--format", "nnunet"]) == 0
    text = capsys.readouterr().out
    assert f"exported pretrain checkpoint {checkpoint} (s3d, resenc-tiny, step 7) as nnunet to {out}:" in text
    assert str(out / "nnunet_pretrained_weights.pth") in text and str(out / "nnunet_plans.json") in text
    assert '"patch_size": [32, 32, 32]' in text and '"features_per_stage": [8, 16, 32, 64]' in text
    assert "must match:" in text and "input channels: 1" in text and "spacing: [1.0, 1.0, 1.0] mm" in text
    assert (f"nnUNetv2_train DATASET 3d_fullres_volssl FOLD -p PLANS -pretrained_weights "
            f"{out / 'nnunet_pretrained_weights.pth'}") in text
    assert main(["export", str(checkpoint), str(tmp_path / "st"), "--format", "safetensors", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["files"]["card"] == str(tmp_path / "st" / "README.md") and record["step"] == 7


def test_errors_are_one_line_naming_the_problem(checkpoint, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert main(["export", str(missing), str(tmp_path / "o"), "--format", "safetensors"]) == 2
    assert capsys.readouterr().err == f"volssl export: error: RUN not found: {missing}\n"
    assert main(["export", str(checkpoint), str(tmp_path / "o"), "--format", "nnssl"]) == 0
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "o"), "--format", "nnssl"]) == 2
    assert "checkpoint_final.pth already exists" in capsys.readouterr().err
    unet = tmp_path / "unet.pt"
    save_checkpoint(unet, kind="pretrain", config={}, model=config_to_dict(ModelConfig(arch="unet-tiny")),
                    network=build_model(ModelConfig(arch="unet-tiny")).state_dict(), plan=None, step=1, metrics={})
    assert main(["export", str(unet), str(tmp_path / "u"), "--format", "nnunet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "architecture 'unet-tiny'" in err and "--format safetensors" in err
    assert main(["export", "hf://only-org", str(tmp_path / "h"), "--format", "nnunet"]) == 2
    assert "not a valid Hub reference" in capsys.readouterr().err


def test_hf_offline_is_one_clear_line(tmp_path):
    """A real huggingface_hub with HF_HUB_OFFLINE=1 and an empty cache (its own process: the hub reads the
    variable when it is imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("VOLSSL_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "volssl", "export", "hf://volssl-tests/absent@v1",
                           str(tmp_path / "out"), "--format", "safetensors"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("volssl export: error: hf://volssl-tests/absent@v1: could not reach the Hugging Face "
                               "Hub to download volssl-tests/absent (revision v1) (HF_HUB_OFFLINE is set)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "predict", "probe", "export", "search"])
def test_hf_in_every_checkpoint_option_fails_in_one_line(command, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def unreachable(repo_id, revision=None, **kw):
        raise ConnectionError("[Errno -2] Name or service not known\n(while resolving huggingface.co)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    data = tmp_path / "data"
    data.mkdir()
    ref = "hf://my-lab/s3d-resenc-l@v2"
    argv = {"finetune": ["finetune", "--checkpoint", ref, "--dataset", str(data), "--out", str(tmp_path / "ft")],
            "predict": ["predict", "--model", ref, "--input", str(data), "--output", str(tmp_path / "pred")],
            "probe": ["probe", "--checkpoint", ref, "--dataset", str(data), "--work", str(tmp_path / "w")],
            "export": ["export", ref, str(tmp_path / "out"), "--format", "nnunet"],
            "search": ["search", "--space", "xnt-nuclei-tiny", "--trials", "1", "--checkpoint", ref,
                       "--dataset", str(data), "--out", str(tmp_path / "s")]}[command]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"volssl {command}: error: {ref}: could not reach the Hugging Face Hub to download "
                          "my-lab/s3d-resenc-l (revision v2)")
