"""AMAES -> volssl checkpoint import, tested on state dicts built to the layout of the public AMAES
checkpoints: the Lightning module's ``model.`` + torch.compile's ``_orig_mod.`` + the Yucca network's
names and shapes (UNetEncoder / UNetDecoder / MedNeXtEncoder, written out here from that code)."""
import pytest
import torch

from volssl.cli import main
from volssl.config import ModelConfig
from volssl.finetuning.transfer import transfer_weights
from volssl.models.import_amaes import convert_amaes, map_amaes_state_dict, resolve_arch
from volssl.models.registry import build_model
from volssl.training.checkpoint import load_checkpoint

PREFIX = "model._orig_mod."


def _t(shape, device, gen):
    return torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=gen)


def yucca_unet(filters=8, in_ch=1, device="cpu", seed=0, head="rec"):
    """A Yucca UNet state dict: encoder (in_conv + encoder_conv1..4, two ConvDropoutNormNonlin each) and
    the light reconstruction head (``rec``: one conv per stage, no skips) or a fine-tuned ``pred`` head."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def cdnn(prefix, cin, cout):
        sd[f"{prefix}.conv.weight"] = _t((cout, cin, 3, 3, 3), device, gen)
        sd[f"{prefix}.conv.bias"] = _t((cout,), device, gen)
        sd[f"{prefix}.norm.weight"] = _t((cout,), device, gen)
        sd[f"{prefix}.norm.bias"] = _t((cout,), device, gen)

    f = [filters * 2 ** s for s in range(5)]
    cdnn(f"{PREFIX}encoder.in_conv.conv1", in_ch, f[0])
    cdnn(f"{PREFIX}encoder.in_conv.conv2", f[0], f[0])
    for s in range(1, 5):
        cdnn(f"{PREFIX}encoder.encoder_conv{s}.conv1", f[s - 1], f[s])
        cdnn(f"{PREFIX}encoder.encoder_conv{s}.conv2", f[s], f[s])
    h = f"{PREFIX}{head}_head"
    for k in range(1, 5):
        cin, cout = f[5 - k], f[4 - k]
        sd[f"{h}.upsample{k}.weight"] = _t((cin, cout, 2, 2, 2), device, gen)
        sd[f"{h}.upsample{k}.bias"] = _t((cout,), device, gen)
        cdnn(f"{h}.decoder_conv{k}.conv1", cout if head == "rec" else 2 * cout, cout)
        if head == "pred":
            cdnn(f"{h}.decoder_conv{k}.conv2", cout, cout)
    sd[f"{h}.out_conv.weight"] = _t((1 if head == "rec" else 3, f[0], 1, 1, 1), device, gen)
    sd[f"{h}.out_conv.bias"] = _t((1 if head == "rec" else 3,), device, gen)
    return sd


def yucca_mednext(filters=8, blocks=(1, 1, 1, 1, 1), ratios=(2, 2, 2, 2, 2), in_ch=1, device="cpu", seed=0):
    """A Yucca MedNeXt (mednext_*_lw_dec) state dict: MedNeXtEncoder (stem, enc_block_i, down_i with
    ratio i+1, bottleneck) and the U-Net light reconstruction head."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def block(prefix, c, r, cout=None, down=False):
        cout = cout or c
        sd[f"{prefix}.conv1.weight"] = _t((c, 1, 3, 3, 3), device, gen)  # depth-wise
        sd[f"{prefix}.conv1.bias"] = _t((c,), device, gen)
        sd[f"{prefix}.norm.weight"] = _t((c,), device, gen)
        sd[f"{prefix}.norm.bias"] = _t((c,), device, gen)
        sd[f"{prefix}.conv2.weight"] = _t((r * c, c, 1, 1, 1), device, gen)
        sd[f"{prefix}.conv2.bias"] = _t((r * c,), device, gen)
        sd[f"{prefix}.conv3.weight"] = _t((cout, r * c, 1, 1, 1), device, gen)
        sd[f"{prefix}.conv3.bias"] = _t((cout,), device, gen)
        if down:
            sd[f"{prefix}.res_conv.weight"] = _t((cout, c, 1, 1, 1), device, gen)
            sd[f"{prefix}.res_conv.bias"] = _t((cout,), device, gen)

    f = [filters * 2 ** s for s in range(5)]
    e = f"{PREFIX}encoder"
    sd[f"{e}.stem.weight"] = _t((f[0], in_ch, 1, 1, 1), device, gen)
    sd[f"{e}.stem.bias"] = _t((f[0],), device, gen)
    for i in range(4):
        for j in range(blocks[i]):
            block(f"{e}.enc_block_{i}.{j}", f[i], ratios[i])
        block(f"{e}.down_{i}", f[i], ratios[i + 1], cout=f[i + 1], down=True)
    for j in range(blocks[4]):
        block(f"{e}.bottleneck.{j}", f[4], ratios[4])
    light = yucca_unet(filters, in_ch, device, seed + 1)
    sd.update({k: v for k, v in light.items() if ".rec_head." in k})
    return sd


@pytest.mark.parametrize("filters,arch", [(32, "unet-b"), (64, "unet-xl")])
def test_paper_unets_are_recognised_from_their_shapes(filters, arch):
    mapped, dropped = map_amaes_state_dict(yucca_unet(filters, device="meta"))
    name, report = resolve_arch(mapped, 1, "unet")
    assert name == arch and report.mapped == 40  # 5 stages x 2 convs x (conv w, b, norm w, b)
    assert all(k.startswith("encoder.stages.") for k in mapped)
    assert len(dropped) == 4 * 6 + 2 and all(k.startswith("rec_head.") for k in dropped)
    assert "encoder.stages.1.convs.0.conv.weight" in mapped and mapped["encoder.stages.4.convs.1.conv.weight"].shape \
        == (16 * filters, 16 * filters, 3, 3, 3)


@pytest.mark.parametrize("blocks,ratios,arch", [((3, 4, 4, 4, 4), (2, 3, 4, 4, 4), "mednext-m"),
                                                ((3, 4, 8, 8, 8), (3, 4, 8, 8, 8), "mednext-l")])
def test_paper_mednexts_are_recognised_from_their_shapes(blocks, ratios, arch):
    sd = yucca_mednext(32, blocks, ratios, device="meta")
    mapped, _ = map_amaes_state_dict(sd)
    name, report = resolve_arch(mapped, 1, "mednext")
    assert name == arch  # the U-Net decoder variant, as the paper fine-tunes (not mednext-l-mednext-dec)
    target = build_model(ModelConfig(arch=arch), device="meta").state_dict()
    assert {k for k in target if k.startswith("encoder.")} == set(mapped)


def test_cli_import_of_a_compiled_unet_then_encoder_transfer(tmp_path, capsys):
    sd = yucca_unet(8)
    assert all(k.startswith("model._orig_mod.") for k in sd)
    src, dst = tmp_path / "unet_tiny_lw_dec_fullaug.pth", tmp_path / "imported.pt"
    torch.save(sd, src)
    assert main(["import-checkpoint", "--format", "amaes", str(src), str(dst)]) == 0
    assert "mapped 40 tensors" in capsys.readouterr().out
    ckpt = load_checkpoint(dst)
    assert ckpt["kind"] == "import" and ckpt["model"]["arch"] == "unet-tiny" and ckpt["source"]["format"] == "amaes"
    assert ckpt["plan"]["name"] == "amaes" and ckpt["config"]["data"]["patch_size"] == [128, 128, 128]
    net = ckpt["network"]
    torch.testing.assert_close(net["encoder.stages.0.convs.1.norm.bias"],
                               sd["model._orig_mod.encoder.in_conv.conv2.norm.bias"])
    torch.testing.assert_close(net["encoder.stages.3.convs.0.conv.weight"],
                               sd["model._orig_mod.encoder.encoder_conv3.conv1.conv.weight"])
    # fine-tuning: a 2-channel, 3-class U-Net; every encoder tensor moves (the stem replicated), decoder new
    ft = build_model(ModelConfig(arch="unet-tiny", in_channels=2, out_channels=3))
    report = transfer_weights(ft, net, "encoder", where=str(dst))
    enc = {k for k in ft.state_dict() if k.startswith("encoder.")}
    assert set(report.moved) | set(report.replicated) == enc
    assert report.replicated == ["encoder.stages.0.convs.0.conv.weight"]
    assert set(report.new) == {k for k in ft.state_dict() if k.startswith("decoder.")}
    torch.testing.assert_close(ft.state_dict()["encoder.stages.2.convs.1.conv.weight"],
                               sd["model._orig_mod.encoder.encoder_conv2.conv2.conv.weight"])


def test_mednext_import_with_a_finetuned_unet_head_maps_the_decoder(tmp_path):
    sd = yucca_mednext(8)
    sd = {k: v for k, v in sd.items() if ".rec_head." not in k}
    sd.update({k.replace("rec_head", "pred_head"): v for k, v in yucca_unet(8, head="pred").items()
               if ".pred_head." in k})
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}  # an uncompiled one this time
    src = tmp_path / "mednext.pth"
    torch.save(sd, src)
    payload, report = convert_amaes(src)
    assert payload["model"]["arch"] == "mednext-tiny"
    assert report.dropped == ["pred_head.out_conv.bias", "pred_head.out_conv.weight"]
    torch.testing.assert_close(payload["network"]["encoder.down_blocks.2.res_conv.weight"],
                               sd["model.encoder.down_2.res_conv.weight"])
    torch.testing.assert_close(payload["network"]["decoder.stages.0.convs.1.conv.weight"],
                               sd["model.pred_head.decoder_conv1.conv2.conv.weight"])
    net = build_model(ModelConfig(arch="mednext-tiny"))
    moved = transfer_weights(net, payload["network"], "all")
    assert {k for k in net.state_dict() if not k.startswith("decoder.seg_layers.")} == set(moved.moved)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


def test_shape_mismatch_and_foreign_keys_are_refused(tmp_path):
    sd = yucca_unet(8)
    sd["model._orig_mod.encoder.encoder_conv2.conv1.conv.weight"] = torch.zeros(32, 16, 5, 5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"encoder\.stages\.2\.convs\.0\.conv\.weight: unet-tiny has "
                                         r"\(32, 16, 3, 3, 3\), the checkpoint \(32, 16, 5, 5, 5\)"):
        convert_amaes(tmp_path / "bad.pth", arch="unet-tiny")
    with pytest.raises(ValueError, match="fits no registered unet architecture"):
        convert_amaes(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="encoder tensors of a 'unet-b' network are missing|do not fit"):
        convert_amaes(tmp_path / "bad.pth", arch="unet-b")
    torch.save({**yucca_unet(8), "model.encoder.swin.layers.0.weight": torch.zeros(1)}, tmp_path / "swin.pth")
    with pytest.raises(ValueError, match=r"not part of a Yucca U-Net / MedNeXt .*encoder\.swin\.layers\.0\.weight"):
        convert_amaes(tmp_path / "swin.pth")
    torch.save({"epoch": torch.zeros(1)}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="not part of a Yucca"):
        convert_amaes(tmp_path / "empty.pth")


def test_lightning_checkpoint_container_is_accepted(tmp_path):
    torch.save({"state_dict": yucca_unet(8), "epoch": 99}, tmp_path / "last.ckpt")
    payload, report = convert_amaes(tmp_path / "last.ckpt")
    assert payload["model"]["arch"] == "unet-tiny" and report.mapped == 40
