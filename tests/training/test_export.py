"""export_run (training/export.py) on a real 2-step S3D run, and the safetensors folder / hf:// loader
(training/exported.py, util/hub.py) behind load_checkpoint: round trips give identical networks.

nnU-Net's key rule and DNA's layout are checked against a reference network in
tests/models/test_export.py; here the files are checked end to end."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from training_standins import write_tiny_dataset
from volssl.config import ModelConfig, RunConfig, config_to_dict, resolve
from volssl.models.checkpoint_import import convert_nnssl
from volssl.models.dna_export import to_dna_state_dict
from volssl.models.registry import build_model
from volssl.training.checkpoint import load_checkpoint, save_checkpoint
from volssl.training.export import export_run
from volssl.training.exported import read_exported
from volssl.training.probe import append_probe_row
from volssl.util.hub import HubUnreachable, parse_hub_reference


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real s3d-b-tiny pre-training run: 2 steps, 32^3 patches (resenc-tiny)."""
    from volssl.training.trainer import pretrain

    root = tmp_path_factory.mktemp("export")
    data = write_tiny_dataset(root / "data", n_cases=2, shape=(40, 40, 40))
    cfg = resolve("s3d-b-tiny", ["train.steps=2", "data.patch_size=32,32,32", "data.num_workers=0",
                                 "train.device=cpu", "train.checkpoint_every=2", "train.preview_every=2"])
    torch.set_num_threads(1)
    pretrain(cfg, data, root / "run", progress=False)
    return root / "run"


def _net(payload, **over):
    net = build_model(ModelConfig(**{**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in payload["model"].items()}, **over})).eval()
    return net


def _same_function(a: torch.nn.Module, b: torch.nn.Module, channels: int = 1, size: int = 16) -> bool:
    x = torch.randn(1, channels, size, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_safetensors_round_trip_config_and_model_card(run, tmp_path):
    result = export_run(run, tmp_path / "out", "safetensors")
    out = tmp_path / "out"
    assert set(result.files) == {"weights", "config", "card"} and (out / "model.safetensors").is_file()
    original = load_checkpoint(run / "checkpoints" / "final.pt")
    loaded = load_checkpoint(out)  # the folder, through the one loader every command uses
    assert loaded["kind"] == "pretrain" and loaded["step"] == 2 and loaded["model"] == original["model"]
    assert loaded["plan"] == original["plan"] and loaded["optimizer"] is None
    assert loaded["network"].keys() == original["network"].keys()
    assert all(torch.equal(loaded["network"][k], original["network"][k]) for k in original["network"])
    a, b = _net(original), _net(loaded)
    a.load_state_dict(original["network"], strict=False)
    b.load_state_dict(loaded["network"], strict=False)
    b.decoder.seg_layers.load_state_dict(a.decoder.seg_layers.state_dict())  # S3D exports no heads
    assert _same_function(a, b)
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "volssl-safetensors" and config["architecture"]["arch"] == "resenc-tiny"
    assert (config["preset"], config["method"], config["step"]) == ("s3d-b-tiny", "s3d", 2)
    assert config["final_loss"] == pytest.approx(original["metrics"]["loss"]) and config["probe"] is None
    assert config["plan"] == original["plan"] and config["patch_size"] == [32, 32, 32]
    card = (out / "README.md").read_text()
    assert "**s3d**" in card and "2 steps" in card and "final loss" in card and "nnUNetv2_train" in card
    assert "volssl finetune --checkpoint" in card and card.startswith("---\nlibrary_name: volssl")


def test_the_probe_score_goes_into_config_and_card(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    append_probe_row(copy, {"step": 2, "probe_dice": 0.42, "probe_floor": 0.3, "seconds": 1.0})
    export_run(copy, tmp_path / "out", "safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["probe"] == {
        "step": 2, "probe_dice": 0.42, "probe_floor": 0.3}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "linear-probe Dice 0.4200 at step 2 (random-init floor 0.3000)" in card
    export_run(tmp_path / "out", tmp_path / "again", "safetensors")  # an exported folder re-exports, probe kept
    assert json.loads((tmp_path / "again" / "config.json").read_text())["probe"]["probe_dice"] == 0.42


def test_nnunet_export_holds_every_dna_key_and_the_plans(run, tmp_path):
    result = export_run(run, tmp_path, "nnunet")
    weights = torch.load(tmp_path / "nnunet_pretrained_weights.pth", weights_only=True)["network_weights"]
    original = load_checkpoint(run / "checkpoints" / "final.pt")["network"]
    expected = to_dna_state_dict(original)
    assert list(weights) == list(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert "decoder.encoder.stem.convs.0.all_modules.0.weight" in weights
    plans = json.loads((tmp_path / "nnunet_plans.json").read_text())
    conf = plans["configuration"]
    assert conf["inherits_from"] == "3d_fullres" and conf["patch_size"] == [32, 32, 32]
    assert conf["spacing"] == [1.0, 1.0, 1.0] and conf["normalization_schemes"] == ["ZScoreNormalization"]
    kw = conf["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 4 and kw["features_per_stage"] == [8, 16, 32, 64]
    assert kw["n_blocks_per_stage"] == [1, 1, 2, 2]
    assert plans["input_channels"] == 1 and any("input channels: 1" in m for m in plans["must_match"])
    assert result.plans == plans and not result.notes


def test_nnssl_export_round_trips_through_convert_nnssl(run, tmp_path):
    export_run(run, tmp_path, "nnssl")
    payload, report = convert_nnssl(tmp_path / "checkpoint_final.pth")  # weights_only=True inside
    original = load_checkpoint(run / "checkpoints" / "final.pt")
    assert report.missing == [] and payload["network"].keys() == original["network"].keys()
    assert all(torch.equal(payload["network"][k], original["network"][k]) for k in original["network"])
    assert payload["config"]["data"]["patch_size"] == [32, 32, 32]
    assert payload["source"]["adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"]["spacing"] == [1.0] * 3
    assert json.loads((tmp_path / "adaptation_plan.json").read_text())["trainer_name"] == "volssl-s3d"
    a, b = _net(original), _net(payload)
    a.load_state_dict(original["network"], strict=False)
    b.load_state_dict(payload["network"], strict=False)
    b.decoder.seg_layers.load_state_dict(a.decoder.seg_layers.state_dict())
    assert _same_function(a, b)


def _checkpoint(path, model: ModelConfig, network=None, method: str = "s3d"):
    cfg = RunConfig(model=model)
    cfg.method.name = method
    net = build_model(model)
    save_checkpoint(path, kind="pretrain", config=config_to_dict(cfg), model=config_to_dict(model),
                    network=net.state_dict() if network is None else network(net), plan={"normalization": "zscore"},
                    step=5, metrics={"loss": 1.0})
    return path, net


def test_encoder_only_weights_get_a_fresh_decoder_for_nnunet(tmp_path):
    ckpt, _ = _checkpoint(tmp_path / "voco.pt", ModelConfig(arch="resenc-tiny"),
                          network=lambda n: {k: v for k, v in n.state_dict().items() if k.startswith("encoder.")})
    result = export_run(ckpt, tmp_path / "nn", "nnunet")
    assert result.notes and "freshly initialised" in result.notes[0]
    weights = torch.load(tmp_path / "nn" / "nnunet_pretrained_weights.pth", weights_only=True)["network_weights"]
    assert "decoder.stages.0.convs.0.all_modules.0.weight" in weights
    assert "decoder.stages.0.convs.0.conv.weight" in result.plans["volssl"]["freshly_initialised"]
    result = export_run(ckpt, tmp_path / "ssl", "nnssl")
    assert result.notes and "encoder only" in result.notes[0]


def test_other_architectures_export_only_as_safetensors(tmp_path):
    ckpt, net = _checkpoint(tmp_path / "unet.pt", ModelConfig(arch="unet-tiny"))
    for fmt in ("nnunet", "nnssl"):
        with pytest.raises(ValueError, match=f"architecture 'unet-tiny'.*only ResEnc U-Nets"):
            export_run(ckpt, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists() or not any((tmp_path / fmt).iterdir())
    export_run(ckpt, tmp_path / "st", "safetensors")
    loaded = load_checkpoint(tmp_path / "st")
    back = _net(loaded)
    back.load_state_dict(loaded["network"])
    assert _same_function(net.eval(), back, size=32)


def test_existing_files_are_kept_unless_overwrite(run, tmp_path):
    export_run(run, tmp_path, "nnssl")
    with pytest.raises(FileExistsError, match="checkpoint_final.pth already exists.*--overwrite"):
        export_run(run, tmp_path, "nnssl")
    export_run(run, tmp_path, "nnssl", overwrite=True)
    export_run(run, tmp_path, "nnunet")  # other formats' files do not clash
    with pytest.raises(ValueError, match="config.json belongs to a run or another model"):
        export_run(run, run, "safetensors", overwrite=True)  # the run's own config.json is never replaced


def test_bad_run_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"RUN not found: {tmp_path / 'nope'}"):
        export_run(tmp_path / "nope", tmp_path / "out", "safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}: no checkpoint found"):
        export_run(tmp_path / "empty", tmp_path / "out", "safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{tmp_path / 'junk.pt'}: not a plain volssl checkpoint"):
        export_run(tmp_path / "junk.pt", tmp_path / "out", "safetensors")
    with pytest.raises(ValueError, match="--format must be one of"):
        export_run(tmp_path / "junk.pt", tmp_path / "out", "onnx")


def test_a_changed_or_foreign_folder_is_refused(run, tmp_path):
    export_run(run, tmp_path / "out", "safetensors")
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights}: checksum mismatch"):
        load_checkpoint(tmp_path / "out")
    (tmp_path / "out" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="config.json: not a volssl export"):
        load_checkpoint(tmp_path / "out")


# --------------------------------------------------------------------------- hf://
def test_hub_reference_resolves_through_snapshot_download(run, tmp_path, monkeypatch):
    import huggingface_hub

    export_run(run, tmp_path / "snapshot", "safetensors")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    payload = load_checkpoint("hf://my-lab/s3d-tiny@v1.0")
    assert calls == [("my-lab/s3d-tiny", "v1.0")] and payload["source"]["reference"] == "hf://my-lab/s3d-tiny@v1.0"
    from volssl.finetuning.finetune import load_source

    source = load_source("hf://my-lab/s3d-tiny")
    assert source.path == "hf://my-lab/s3d-tiny" and source.method == "s3d" and source.step == 2
    assert calls[-1] == ("my-lab/s3d-tiny", None) and source.patch_size == (32, 32, 32)
    assert read_exported(tmp_path / "snapshot")["network"].keys() == source.network.keys()
    (tmp_path / "other").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "other"))
    with pytest.raises(ValueError, match="hf://my-lab/x: the repository holds no volssl export"):
        load_checkpoint("hf://my-lab/x")


@pytest.mark.parametrize("error", ["offline", "connection", "missing"])
def test_hub_failures_are_one_line_naming_the_repo(monkeypatch, error):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(repo_id, revision=None, **kw):
        if error == "offline":
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified "
                                          "revision on the local disk and outgoing traffic has been disabled.\n"
                                          "To enable repo look-ups and downloads online, set 'HF_HUB_OFFLINE=0'.")
        if error == "connection":
            raise ConnectionError("Name or service not known")
        raise RuntimeError("some transport error\nwith a second line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubUnreachable) as info:
        load_checkpoint("hf://my-lab/s3d@main")
    text = str(info.value)
    assert "\n" not in text and text.startswith("hf://my-lab/s3d@main: could not")
    assert "my-lab/s3d (revision main)" in text


def test_malformed_hub_references():
    assert parse_hub_reference("hf://a-b/c.d_e@3f2a") == ("a-b/c.d_e", "3f2a")
    assert parse_hub_reference("hf://org/name") == ("org/name", None)
    for bad in ("hf://org", "hf://org/name/extra", "hf://org/name@", "hf:///name", "hf://org/na me"):
        with pytest.raises(ValueError, match="not a valid Hub reference"):
            parse_hub_reference(bad)
