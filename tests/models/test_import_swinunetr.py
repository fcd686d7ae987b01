"""SwinUNETR -> volssl checkpoint import: each released key layout (module. / swinViT. / swin_vit. prefixes,
fc1/fc2 MLP names, SSL heads, MONAI fine-tuned state dicts) maps onto swinunetr weights; bad files are
refused naming the key and shapes. The files are written here from MONAI's own SwinUNETR modules."""
import json

import pytest
import torch
from monai.networks.nets import SwinUNETR

from volssl.cli import main
from volssl.config import ModelConfig
from volssl.finetuning.transfer import transfer_weights
from volssl.models.import_formats import IMPORT_FORMATS, convert_checkpoint
from volssl.models.import_swinunetr import convert_swinunetr, map_key
from volssl.models.registry import build_model
from volssl.training.checkpoint import load_checkpoint, save_checkpoint

TINY = dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


@pytest.fixture(scope="module")
def monai_net():
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=3, **TINY)


def ssl_heads(dim=192):
    return {"rotation_head.weight": torch.randn(4, dim), "rotation_head.bias": torch.randn(4),
            "contrastive_head.weight": torch.randn(512, dim), "contrastive_head.bias": torch.randn(512),
            "conv.0.weight": torch.randn(dim // 2, dim, 3, 3, 3), "conv.0.bias": torch.randn(dim // 2)}


def released_swinvit(net):
    """The authors' model_swinvit.pt layout: module.<SwinTransformer key>, MLP as fc1/fc2."""
    sd = {}
    for k, v in net.swinViT.state_dict().items():
        sd["module." + k.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2.")] = v
    return {"state_dict": sd}


def ssl_head_checkpoint(net, prefix, entry="state_dict", ddp=True):
    """What the authors' pre-training script saves: SSLHead's swinViT / swin_vit plus its heads."""
    sd = {f"{prefix}{k}": v for k, v in net.swinViT.state_dict().items()}
    sd.update(ssl_heads())
    if ddp:
        sd = {f"module.{k}": v for k, v in sd.items()}
    return {entry: sd, "global_step": 1200, "optimizer": {"state": {}, "param_groups": []}}


def dae_layout(net):
    """MONAI's ssl_pretrained_weights.pth layout: encoder.layersN.0.0.*, plus mask token / norm / out."""
    sd = {}
    for k, v in net.swinViT.state_dict().items():
        if k.startswith("layers"):
            k = k[:len("layers1.0.")] + "0." + k[len("layers1.0."):]
        sd["encoder." + k] = v
    sd.update({"encoder.mask_token": torch.zeros(1, 1, 12), "encoder.norm.weight": torch.ones(192),
               "encoder.norm.bias": torch.zeros(192), "out.conv.conv.weight": torch.randn(1, 12, 1, 1, 1)})
    return {"model": sd}


VARIANTS = {
    "model_swinvit (module. + fc1/fc2)": released_swinvit,
    "SSLHead swinViT. under DDP": lambda net: ssl_head_checkpoint(net, "swinViT."),
    "SSLHead swin_vit. under DDP": lambda net: ssl_head_checkpoint(net, "swin_vit."),
    "SSLHead swin_vit. in 'model', no DDP": lambda net: ssl_head_checkpoint(net, "swin_vit.", "model", ddp=False),
    "MONAI fine-tuned SwinUNETR (bare)": lambda net: net.state_dict(),
    "MONAI ssl_pretrained_weights layout": dae_layout,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_release_layout_imports_the_swin_encoder(variant, monai_net, tmp_path):
    src = tmp_path / "src.pt"
    torch.save(VARIANTS[variant](monai_net), src)
    payload, report = convert_swinunetr(src)
    assert payload["kind"] == "import" and payload["model"]["arch"] == "swinunetr-tiny"
    assert payload["model"]["in_channels"] == 1 and payload["model"]["features"] is None
    assert payload["source"]["architecture"]["feature_size"] == 12
    expected = {f"encoder.{k}": v for k, v in monai_net.swinViT.state_dict().items()}
    encoder = {k: v for k, v in payload["network"].items() if k.startswith("encoder.")}
    assert set(encoder) == set(expected)
    assert all(torch.equal(encoder[k], expected[k]) for k in expected)
    decoder = {k for k in payload["network"] if k.startswith("decoder.")}
    if variant.startswith("MONAI fine-tuned"):
        assert decoder and not any(k.startswith("decoder.seg_layers.") for k in decoder)
        assert torch.equal(payload["network"]["decoder.encoder1.layer.conv1.conv.weight"],
                           monai_net.encoder1.layer.conv1.conv.weight)
        assert "out.conv.conv.weight" in report.dropped
    else:
        assert not decoder and report.missing and all(k.startswith("decoder.") for k in report.missing)
    if variant.startswith("SSLHead"):
        assert any("rotation_head" in k for k in report.dropped) and any("conv.0" in k for k in report.dropped)
        assert payload["source"]["global_step"] == 1200
    # the written checkpoint loads safely and its weights go into a fine-tuning network
    dst = save_checkpoint(tmp_path / "imported.pt", **payload)
    data = load_checkpoint(dst)
    net = build_model(ModelConfig(arch="swinunetr-tiny", in_channels=2, out_channels=4))
    moved = transfer_weights(net, data["network"], transfer="encoder")
    assert set(moved.moved) | set(moved.replicated) == set(expected)


def test_key_mapping_rules():
    assert map_key("swinViT.layers2.0.blocks.1.mlp.fc2.weight") == ("encoder.layers2.0.blocks.1.mlp.linear2.weight",
                                                                     "encoder")
    assert map_key("swin_vit.patch_embed.proj.bias") == ("encoder.patch_embed.proj.bias", "encoder")
    assert map_key("decoder5.transp_conv.conv.weight") == ("decoder.decoder5.transp_conv.conv.weight", "decoder")
    assert map_key("contrastive_head.weight") == (None, "dropped")
    assert map_key("classifier.weight") == (None, "unknown")


def test_feature_size_comes_from_the_patch_embedding(tmp_path):
    torch.manual_seed(1)
    net = SwinUNETR(in_channels=2, out_channels=1, feature_size=24)  # the paper's heads and window, F = 24
    torch.save(ssl_head_checkpoint(net, "swinViT."), tmp_path / "f24.pt")
    payload, _ = convert_swinunetr(tmp_path / "f24.pt")
    model = payload["model"]
    assert model["arch"] == "swinunetr" and model["features"] == [24, 48, 96, 192, 384] and model["in_channels"] == 2
    built = build_model(ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}))
    built.load_state_dict({**built.state_dict(), **payload["network"]})


def test_shape_mismatches_unknown_keys_and_missing_tensors_are_refused(monai_net, tmp_path):
    good = released_swinvit(monai_net)["state_dict"]
    bad = dict(good)
    key = "module.layers2.0.blocks.1.attn.qkv.weight"
    bad[key] = torch.randn(10, 24)
    torch.save({"state_dict": bad}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"encoder\.layers2\.0\.blocks\.1\.attn\.qkv\.weight: expected \(72, 24\), "
                                         r"found \(10, 24\)"):
        convert_swinunetr(tmp_path / "shape.pt")
    torch.save({"state_dict": {**good, "module.classifier.weight": torch.randn(2, 2)}}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="module.classifier.weight"):
        convert_swinunetr(tmp_path / "extra.pt")
    missing = {k: v for k, v in good.items() if "layers3.0.blocks.0.norm2" not in k}
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="encoder.layers3.0.blocks.0.norm2"):
        convert_swinunetr(tmp_path / "missing.pt")
    no_embed = {k: v for k, v in good.items() if "patch_embed" not in k}
    torch.save({"state_dict": no_embed}, tmp_path / "noembed.pt")
    with pytest.raises(ValueError, match="patch embedding"):
        convert_swinunetr(tmp_path / "noembed.pt")
    torch.save({"state_dict": good}, tmp_path / "good.pt")
    with pytest.raises(ValueError, match="not a SwinUNETR"):
        convert_swinunetr(tmp_path / "good.pt", arch="resenc-tiny")
    with pytest.raises(ValueError, match="fits no registered SwinUNETR"):
        convert_swinunetr(tmp_path / "good.pt", arch="swinunetr")  # heads 1/2/4/8, window 4 are the tiny's


def test_cli_import_checkpoint_swinunetr(monai_net, tmp_path, capsys):
    assert "swinunetr" in IMPORT_FORMATS
    torch.save(released_swinvit(monai_net), tmp_path / "model_swinvit.pt")
    assert main(["import-checkpoint", "--format", "swinunetr", str(tmp_path / "model_swinvit.pt"),
                 str(tmp_path / "out.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["arch"] == "swinunetr-tiny" and out["mapped"] == len(monai_net.swinViT.state_dict())
    payload, _ = convert_checkpoint("swinunetr", tmp_path / "model_swinvit.pt")
    assert load_checkpoint(tmp_path / "out.pt")["source"]["format"] == payload["source"]["format"] == "swinunetr"
