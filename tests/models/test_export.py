"""volssl ResEnc U-Net -> dynamic-network-architectures (DNA) ResidualEncoderUNet layout
(models/dna_export.py), checked against a reference network built here from DNA's module structure
and against nnU-Net v2's key-matching rule.

The reference is written from reading (not copying) MIC-DKFZ/dynamic-network-architectures:
``building_blocks/simple_conv_blocks.py`` (ConvDropoutNormReLU: conv, norm, nonlin, then
``all_modules = Sequential(conv, norm, nonlin)``; StackedConvBlocks: ``convs``),
``building_blocks/residual.py`` (BasicBlockD: conv1, conv2 without nonlin, nonlin2, ``skip`` =
Sequential([AvgPool], [1x1x1 ConvDropoutNormReLU, no bias]) or Identity; StackedResidualBlocks:
``blocks``), ``building_blocks/residual_encoders.py`` (ResidualEncoder: stem, stages),
``building_blocks/unet_decoder.py`` (UNetDecoder: ``self.encoder`` first, then stages,
transpconvs with bias = conv_bias, seg_layers) and ``architectures/unet.py``
(ResidualEncoderUNet: encoder, decoder). Real ``nn.Module`` objects are used so that torch's own
``state_dict()`` produces the aliases (one module under two names) exactly as DNA's network does.

nnU-Net's rule, re-stated from MIC-DKFZ/nnUNet ``nnunetv2/run/load_pretrained_weights.py``: every key
of the target network's state dict that does not contain ``.seg_layers.`` must be in the file's
``network_weights`` with the same shape (AssertionError otherwise); then those keys are loaded.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from volssl.config import ModelConfig
from volssl.models.checkpoint_import import convert_nnssl
from volssl.models.dna_export import (
    check_resenc, complete_state_dict, dna_arch_kwargs, nnssl_adaptation_plan, nnunet_architecture,
    to_dna_state_dict,
)
from volssl.models.registry import build_model, resolve_widths


# --------------------------------------------------------------------------- the DNA reference network
class _ConvDropoutNormReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, bias: bool, nonlin: bool):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, k, stride, padding=(k - 1) // 2, bias=bias)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        ops = [self.conv, self.norm]
        if nonlin:
            self.nonlin = nn.LeakyReLU(inplace=True)
            ops.append(self.nonlin)
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x):
        return self.all_modules(x)


class _StackedConvBlocks(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convs = nn.Sequential(_ConvDropoutNormReLU(cin, cout, 3, 1, True, True))

    def forward(self, x):
        return self.convs(x)


class _BasicBlockD(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _ConvDropoutNormReLU(cin, cout, 3, stride, True, True)
        self.conv2 = _ConvDropoutNormReLU(cout, cout, 3, 1, True, False)
        self.nonlin2 = nn.LeakyReLU(inplace=True)
        ops = ([nn.AvgPool3d(stride, stride)] if stride != 1 else []) + \
              ([_ConvDropoutNormReLU(cin, cout, 1, 1, False, False)] if cin != cout else [])
        self.skip = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x):
        residual = self.skip(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


class _StackedResidualBlocks(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(_BasicBlockD(cin, cout, stride),
                                    *[_BasicBlockD(cout, cout, 1) for _ in range(n - 1)])

    def forward(self, x):
        return self.blocks(x)


class _ResidualEncoder(nn.Module):
    def __init__(self, cin: int, features, blocks, strides):
        super().__init__()
        self.stem = _StackedConvBlocks(cin, features[0])
        stages, c = [], features[0]
        for f, n, s in zip(features, blocks, strides):
            stages.append(_StackedResidualBlocks(n, c, f, s))
            c = f
        self.stages = nn.Sequential(*stages)
        self.output_channels, self.strides = list(features), list(strides)

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class _UNetDecoder(nn.Module):
    def __init__(self, encoder: _ResidualEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        ch, st = encoder.output_channels, encoder.strides
        stages, transp, heads = [], [], []
        for s in range(1, len(ch)):
            below, skip = ch[-s], ch[-(s + 1)]
            transp.append(nn.ConvTranspose3d(below, skip, st[-s], st[-s], bias=True))
            stages.append(_StackedConvBlocks(2 * skip, skip))
            heads.append(nn.Conv3d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transp)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips):
        x = skips[-1]
        for s in range(len(self.stages)):
            x = self.stages[s](torch.cat((self.transpconvs[s](x), skips[-(s + 2)]), 1))
        return self.seg_layers[-1](x)


class DNAResidualEncoderUNet(nn.Module):
    """DNA's ResidualEncoderUNet as nnU-Net's ResEnc plans build it (conv bias, InstanceNorm3d eps 1e-5
    affine, LeakyReLU, no dropout, 3^3 kernels, one decoder conv per stage), deep supervision off."""

    def __init__(self, input_channels: int, num_classes: int, features, blocks, strides):
        super().__init__()
        self.encoder = _ResidualEncoder(input_channels, features, blocks, strides)
        self.decoder = _UNetDecoder(self.encoder, num_classes)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def reference_for(model: ModelConfig, num_classes: int) -> DNAResidualEncoderUNet:
    features, blocks, strides = resolve_widths(model)
    return DNAResidualEncoderUNet(model.in_channels, num_classes, features, blocks, strides)


def nnunet_load_pretrained_weights(network: nn.Module, fname) -> None:
    """nnU-Net v2's load_pretrained_weights, re-stated: the same checks, the same loading."""
    pretrained = torch.load(fname, weights_only=True)["network_weights"]
    skip_strings = [".seg_layers."]
    model_dict = network.state_dict()
    for key in model_dict:
        if all(s not in key for s in skip_strings):
            assert key in pretrained, (f"Key {key} is missing in the pretrained model weights. The pretrained "
                                       "weights do not seem to be compatible with your network.")
            assert model_dict[key].shape == pretrained[key].shape, f"The shape of the parameters of key {key} ..."
    model_dict.update({k: v for k, v in pretrained.items()
                       if k in model_dict and all(s not in k for s in skip_strings)})
    network.load_state_dict(model_dict)


def _perturbed(model: ModelConfig, seed: int = 0) -> nn.Module:
    """Our network with every parameter moved off its init (norm weights are zero-initialised)."""
    torch.manual_seed(seed)
    net = build_model(model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


TINY = ModelConfig(arch="resenc-tiny", in_channels=2, out_channels=3)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model", [ModelConfig(arch="resenc-l"), ModelConfig(arch="resenc-s", in_channels=3),
                                   TINY], ids=["resenc-l", "resenc-s", "resenc-tiny"])
def test_dna_layout_equals_the_reference_networks_state_dict(model):
    """Key set, order and shapes of DNA's state dict (meta tensors: no memory), aliases included."""
    with torch.device("meta"):
        ref = reference_for(model, model.out_channels).state_dict()
    plain = build_model(model, device="meta").state_dict()
    ours = to_dna_state_dict(plain)
    assert list(ours) == list(ref)
    assert all(tuple(ours[k].shape) == tuple(ref[k].shape) for k in ref)
    assert any(".all_modules.0." in k for k in ours) and any(k.startswith("decoder.encoder.") for k in ours)
    assert len(ours) > 2 * len(plain)


def test_nnunet_rule_accepts_the_file_and_the_loaded_network_computes_the_same(tmp_path):
    net = _perturbed(TINY)
    path = tmp_path / "w.pth"
    torch.save({"network_weights": to_dna_state_dict(net.state_dict())}, path)
    ref = reference_for(TINY, num_classes=3).eval()
    nnunet_load_pretrained_weights(ref, path)  # passes nnU-Net's assertions
    with torch.no_grad():  # nnU-Net trains new heads; copy ours to compare the whole function
        for a, b in zip(ref.decoder.seg_layers, net.decoder.seg_layers):
            a.load_state_dict(b.state_dict())
        x = torch.randn(1, 2, 16, 16, 16)
        assert torch.allclose(ref(x), net(x), atol=1e-5, rtol=1e-5)
        for a, b in zip(ref.encoder(x), net.encoder(x)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("drop", ["decoder.encoder.stages.1.blocks.0.skip.1.all_modules.1.weight",
                                  "encoder.stem.convs.0.all_modules.0.weight", "decoder.transpconvs.0.bias"])
def test_a_missing_key_fails_as_in_nnunet(tmp_path, drop):
    weights = to_dna_state_dict(_perturbed(TINY).state_dict())
    del weights[drop]
    torch.save({"network_weights": weights}, tmp_path / "w.pth")
    with pytest.raises(AssertionError, match=f"Key {drop} is missing in the pretrained model weights"):
        nnunet_load_pretrained_weights(reference_for(TINY, 3), tmp_path / "w.pth")


def test_heads_are_not_needed_and_a_wrong_shape_fails(tmp_path):
    weights = {k: v for k, v in to_dna_state_dict(_perturbed(TINY).state_dict()).items() if ".seg_layers." not in k}
    torch.save({"network_weights": weights}, tmp_path / "w.pth")
    nnunet_load_pretrained_weights(reference_for(TINY, num_classes=5), tmp_path / "w.pth")  # other classes: fine
    with pytest.raises(AssertionError, match="shape of the parameters of key encoder.stem.convs.0.conv.weight"):
        nnunet_load_pretrained_weights(reference_for(ModelConfig(arch="resenc-tiny", in_channels=1), 5),
                                       tmp_path / "w.pth")


def test_nnssl_layout_round_trips_through_convert_nnssl(tmp_path):
    net = _perturbed(TINY, seed=1)
    plan = nnssl_adaptation_plan(TINY, {"configurations": {"onemmiso": {"spacing": [1, 1, 1]}}}, (32, 32, 32))
    assert plan["architecture_plans"]["arch_class_name"] == "ResidualEncoderUNet"
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": to_dna_state_dict(net.state_dict()), "nnssl_adaptation_plan": plan}, path)
    payload, report = convert_nnssl(path)
    assert report.missing == [] and report.mapped == len(net.state_dict()) - len(report.dropped)
    assert payload["config"]["data"]["patch_size"] == [32, 32, 32]
    back = build_model(ModelConfig(**{**payload["model"], "out_channels": 3})).eval()
    missing, unexpected = back.load_state_dict(payload["network"], strict=False)
    assert unexpected == [] and all(k.startswith("decoder.seg_layers.") for k in missing)
    back.decoder.seg_layers.load_state_dict(net.decoder.seg_layers.state_dict())  # convert_nnssl drops heads
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_resenc_l_is_named_as_nnssl_names_it():
    plan = nnssl_adaptation_plan(ModelConfig(arch="resenc-l"), {}, (160, 160, 160))
    assert plan["architecture_plans"] == {"arch_class_name": "ResEncL", "arch_kwargs": None,
                                          "arch_kwargs_requiring_import": None}
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"


def test_arch_kwargs_are_nnunets_resenc_plans():
    kw = dna_arch_kwargs(ModelConfig(arch="resenc-l"))
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320] and kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert kw["strides"][0] == [1, 1, 1] and kw["strides"][1] == [2, 2, 2] and kw["kernel_sizes"] == [[3, 3, 3]] * 6
    assert kw["n_conv_per_stage_decoder"] == [1] * 5 and kw["conv_bias"] is True and kw["dropout_op"] is None
    assert kw["norm_op_kwargs"] == {"eps": 1e-5, "affine": True} and kw["nonlin"] == "torch.nn.LeakyReLU"
    arch = nnunet_architecture(ModelConfig(arch="resenc-l"))
    assert arch["network_class_name"] == "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def test_other_architectures_are_refused_by_name():
    with pytest.raises(ValueError, match="architecture 'unet-tiny'"):
        check_resenc(ModelConfig(arch="unet-tiny"), "run.pt")
    with pytest.raises(ValueError, match="channel_fusion='features'"):
        check_resenc(ModelConfig(arch="resenc-tiny", in_channels=2, channel_fusion="features"))


def test_an_encoder_only_network_gets_a_fresh_decoder_and_bad_shapes_are_refused():
    sd = {k: v for k, v in _perturbed(TINY).state_dict().items() if k.startswith("encoder.")}
    full, filled = complete_state_dict(sd, TINY, where="voco.pt")
    assert filled and all(k.startswith("decoder.") and ".seg_layers." not in k for k in filled)
    assert all(torch.equal(full[k], sd[k]) for k in sd) and not any(".seg_layers." in k for k in full)
    again, _ = complete_state_dict(sd, TINY, where="voco.pt")
    assert all(torch.equal(full[k], again[k]) for k in filled)  # seeded
    sd["encoder.stem.convs.0.conv.weight"] = torch.zeros(8, 1, 3, 3, 3)
    with pytest.raises(ValueError, match="voco.pt: .*encoder.stem.convs.0.conv.weight"):
        complete_state_dict(sd, TINY, where="voco.pt")
