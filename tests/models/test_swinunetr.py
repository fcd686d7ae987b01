"""SwinUNETR in volssl's layout: MONAI's modules re-parented (same weights -> same logits), registry
entries, one output head, patch checks, and what fine-tuning's transfer / trainable logic sees."""
import pytest
import torch
from monai.networks.nets import SwinUNETR

from volssl.config import ModelConfig
from volssl.finetuning.transfer import trainable_names, transfer_weights, unused_heads
from volssl.models.registry import build_model, count_parameters, describe_architectures, get_arch, tiny_arch
from volssl.models.swinunetr import SwinUNETRNet, feature_widths

TINY = dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def monai_key(ours: str) -> str:
    """Our state-dict key -> MONAI SwinUNETR's."""
    if ours.startswith("encoder."):
        return "swinViT." + ours[len("encoder."):]
    if ours.startswith("decoder.seg_layers.0."):
        return "out." + ours[len("decoder.seg_layers.0."):]
    return ours[len("decoder."):]


def test_the_registry_holds_the_paper_network_and_a_tiny_sibling():
    spec, tiny = get_arch("swinunetr"), get_arch("swinunetr-tiny")
    assert spec.family == tiny.family == "swinunetr" and tiny_arch("swinunetr") == "swinunetr-tiny"
    assert spec.features == (48, 96, 192, 384, 768) and spec.blocks == (2, 2, 2, 2) and spec.total_stride == 32
    assert spec.options == {"num_heads": (3, 6, 12, 24), "window_size": 7}
    net = build_model(ModelConfig(arch="swinunetr"), device="meta")
    n = count_parameters(net)
    assert abs(n - spec.paper_params) / spec.paper_params < 0.01, n  # 62.19M vs the paper's 62M
    monai = SwinUNETR(in_channels=1, out_channels=1, feature_size=48)
    assert n == count_parameters(monai)
    rows = {r["name"]: r for r in describe_architectures()}
    assert rows["swinunetr"]["params"] == n and rows["swinunetr"]["encoder_params"] == count_parameters(monai.swinViT)


def test_keys_map_one_to_one_onto_monai_and_the_same_weights_give_the_same_logits():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(arch="swinunetr-tiny", in_channels=2, out_channels=3))
    theirs = SwinUNETR(in_channels=2, out_channels=3, **TINY)
    mine = ours.state_dict()
    assert {monai_key(k) for k in mine} == set(theirs.state_dict())
    theirs.load_state_dict({monai_key(k): v for k, v in mine.items()})
    assert {k[len("encoder."):] for k in mine if k.startswith("encoder.")} == set(theirs.swinViT.state_dict())
    x = torch.randn(1, 2, 32, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_layout_attributes_and_a_single_head():
    net = build_model(ModelConfig(arch="swinunetr-tiny", in_channels=3, out_channels=2))
    assert isinstance(net, SwinUNETRNet)
    assert net.encoder.in_channels == 3 and net.encoder.total_stride == 32
    assert len(net.decoder.seg_layers) == 1 and net.decoder.seg_layers[-1].conv.conv.out_channels == 2
    assert net.deep_supervision is False
    net.deep_supervision = False  # what fine-tuning / inference set
    with pytest.raises(ValueError, match="deep supervision is not supported"):
        net.deep_supervision = True
    out = net(torch.randn(1, 3, 32, 32, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 32, 32, 64)


@pytest.mark.parametrize("shape", [(1, 1, 48, 32, 32), (1, 1, 32, 32, 40)])
def test_patches_must_be_multiples_of_32(shape):
    net = build_model(ModelConfig(arch="swinunetr-tiny"))
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.randn(shape))
    with pytest.raises(ValueError, match=r"expected input \(B, 1"):
        net(torch.randn(1, 2, 32, 32, 32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(features=(16, 32, 64, 128, 256)), "multiple of 12"),
    (dict(features=(12, 24, 48, 96, 96)), "F, 2F"),
    (dict(strides=(1, 2, 2, 2, 2)), "strides must be"),
    (dict(blocks=(2, 2, 2)), "four values"),
    (dict(num_heads=(5, 2, 4, 8)), "num_heads"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    args = dict(features=feature_widths(12), blocks=(2, 2, 2, 2), strides=(2, 2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                window_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SwinUNETRNet(1, 1, **args)


def test_width_overrides_build_other_feature_sizes():
    net = build_model(ModelConfig(arch="swinunetr-tiny", features=feature_widths(24)))
    assert net.encoder.patch_embed.proj.weight.shape == (24, 1, 2, 2, 2) and net.feature_size == 24


def test_fine_tuning_sees_every_parameter_trainable_and_encoder_keys_move():
    net = build_model(ModelConfig(arch="swinunetr-tiny", in_channels=1, out_channels=2))
    assert unused_heads(net, deep_supervision=False) == ()
    assert set(trainable_names(net, "all", deep_supervision=False)) == {n for n, _ in net.named_parameters()}
    decoder_only = set(trainable_names(net, "decoder", deep_supervision=False))
    assert decoder_only and all(n.startswith("decoder.") for n in decoder_only)
    source = build_model(ModelConfig(arch="swinunetr-tiny", in_channels=1, out_channels=1)).state_dict()
    report = transfer_weights(net, source, transfer="encoder")
    encoder_keys = {k for k in net.state_dict() if k.startswith("encoder.")}
    assert set(report.moved) == encoder_keys and all(k.startswith("decoder.") for k in report.new)
    assert torch.equal(net.state_dict()["encoder.layers3.0.blocks.1.attn.qkv.weight"],
                       source["encoder.layers3.0.blocks.1.attn.qkv.weight"])
