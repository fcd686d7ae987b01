"""Plain U-Net (AMAES U-Net B / XL): layout, parameter counts vs the paper, decoder variants."""
import json

import pytest
import torch

from volssl.cli import main
from volssl.config import ModelConfig
from volssl.models.registry import build_model, count_parameters, get_arch, tiny_arch
from volssl.models.unet import UNet, UNetDecoder


@pytest.mark.parametrize("arch,paper", [("unet-b", 22e6), ("unet-xl", 90e6)])
def test_parameter_counts_match_the_paper_with_the_full_decoder(arch, paper):
    net = build_model(ModelConfig(arch=arch), device="meta")
    total = count_parameters(net)
    assert get_arch(arch).paper_params == paper
    assert abs(total - paper) / paper < 0.03  # 22.58M / 90.31M: the paper counts encoder + full decoder
    assert count_parameters(net.encoder) < 0.7 * total  # so the number is not the encoder's alone


def test_models_cli_shows_the_counts_next_to_the_paper(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["unet-b"]["params_paper"] == 22_000_000 and rows["unet-b"]["family"] == "unet"
    assert rows["unet-b"]["params"] == rows["unet-b"]["encoder_params"] + rows["unet-b"]["decoder_params"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "22.58M" in out and "22.0M" in out and "90.0M" in out


def test_layout_for_finetuning_and_yucca_widths():
    net = build_model(ModelConfig(arch="unet-b", in_channels=2, out_channels=3), device="meta")
    enc = net.encoder
    assert enc.in_channels == 2 and enc.total_stride == 16 and enc.output_channels == [32, 64, 128, 256, 512]
    sd = net.state_dict()
    assert sd["encoder.stages.0.convs.0.conv.weight"].shape == (32, 2, 3, 3, 3)
    assert sd["encoder.stages.4.convs.1.conv.weight"].shape == (512, 512, 3, 3, 3)
    assert all(f"encoder.stages.{s}.convs.{j}.norm.weight" in sd for s in range(5) for j in range(2))
    assert sd["decoder.transpconvs.0.weight"].shape == (512, 256, 2, 2, 2)
    assert sd["decoder.stages.0.convs.0.conv.weight"].shape == (256, 512, 3, 3, 3)  # concat of up + skip
    assert sd["decoder.stages.3.convs.1.conv.weight"].shape == (32, 32, 3, 3, 3)  # two convs per block
    assert len(net.decoder.seg_layers) == 4 and sd["decoder.seg_layers.3.weight"].shape == (3, 32, 1, 1, 1)
    assert all(k.startswith(("encoder.", "decoder.")) for k in sd)
    assert tiny_arch("unet-b") == "unet-tiny" and tiny_arch("unet-xl") == "unet-tiny"


def test_forward_shapes_with_and_without_deep_supervision():
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="unet-tiny", in_channels=2, out_channels=3))
    x = torch.randn(2, 2, 32, 32, 32)
    assert net(x).shape == (2, 3, 32, 32, 32)
    net.deep_supervision = True
    outs = net(x)
    assert [o.shape[2] for o in outs] == [32, 16, 8, 4]
    torch.testing.assert_close(outs[0], net.decoder(net.encoder(x)))  # full resolution first
    skips = net.encoder(x)
    assert [s.shape[1:] for s in skips] == [(8, 32, 32, 32), (16, 16, 16, 16), (32, 8, 8, 8), (64, 4, 4, 4),
                                            (128, 2, 2, 2)]


def test_downsampling_is_max_pooling_as_in_yucca():
    net = build_model(ModelConfig(arch="unet-tiny"))
    assert isinstance(net.encoder.stages[0].pool, torch.nn.Identity)
    assert all(isinstance(s.pool, torch.nn.MaxPool3d) for s in net.encoder.stages[1:])
    assert not any(isinstance(m, torch.nn.Conv3d) and m.stride != (1, 1, 1) for m in net.encoder.modules())


def test_decoder_without_skips_reads_only_the_bottleneck():
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="unet-tiny"))
    light = UNetDecoder(net.encoder.output_channels, net.encoder.strides, 1, convs_per_stage=1,
                        skip_connections=False, deep_supervision_heads=False)
    assert len(light.seg_layers) == 1 and all(len(s.convs) == 1 for s in light.stages)
    assert light.stages[0].convs[0].conv.in_channels == 64  # no concatenation
    feats = net.encoder(torch.randn(1, 1, 32, 32, 32))
    with torch.no_grad():
        a = light(feats)
        b = light([torch.randn_like(f) for f in feats[:-1]] + [feats[-1]])
        c = light([feats[-1]])
    assert a.shape == (1, 1, 32, 32, 32) and torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="deep-supervision heads"):
        light(feats, deep_supervision=True)


def test_argument_validation():
    with pytest.raises(ValueError, match="same length"):
        UNet(1, 1, (8, 16), (2,), (1, 2))
    with pytest.raises(ValueError, match="in/out channels"):
        UNet(0, 1, (8, 16), (2, 2), (1, 2))
    with pytest.raises(ValueError, match="convolutions per block"):
        UNet(1, 1, (8, 16), (2, 2), (1, 2), decoder_convs=0)
    net = build_model(ModelConfig(arch="unet-tiny"))
    with pytest.raises(ValueError, match="not divisible by the total stride 16"):
        net(torch.zeros(1, 1, 24, 24, 24))
    with pytest.raises(ValueError, match=r"expected input \(B, 1"):
        net(torch.zeros(1, 2, 32, 32, 32))
