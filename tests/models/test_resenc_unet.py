"""Residual Encoder U-Net: parameter count, key layout, shapes, masked norm, sparse encoder."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from volssl.config import ModelConfig
from volssl.methods.masking import block_mask
from volssl.models.registry import build_model, count_parameters, describe_architectures
from volssl.models.resenc_unet import (
    ConvNormAct,
    MaskedNormAct,
    ResEncUNet,
    make_mask_level,
    masked_instance_norm,
)


def tiny(**kw) -> ResEncUNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resenc-tiny", **kw))


# --------------------------------------------------------------------------- architecture
def test_resenc_l_has_about_102_3m_parameters_without_allocating():
    net = build_model(ModelConfig(arch="resenc-l"), device="meta")  # counting only: no weights, no forward
    assert abs(count_parameters(net) - 102.3e6) / 102.3e6 < 0.01
    assert abs(count_parameters(net.encoder) - 90.3e6) / 90.3e6 < 0.01
    assert abs(count_parameters(net.decoder) - 12.1e6) / 12.1e6 < 0.01
    rows = {r["name"]: r for r in describe_architectures()}
    assert rows["resenc-l"]["params"] == count_parameters(net) and rows["resenc-l"]["params_paper"] == 102_300_000


def test_key_layout_follows_dynamic_network_architectures():
    keys = set(build_model(ModelConfig(arch="resenc-l"), device="meta").state_dict())
    expected = {
        "encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.conv.bias",
        "encoder.stem.convs.0.norm.weight", "encoder.stem.convs.0.norm.bias",
        "encoder.stages.0.blocks.0.conv1.conv.weight", "encoder.stages.0.blocks.0.conv2.norm.bias",
        "encoder.stages.1.blocks.0.skip.1.conv.weight", "encoder.stages.1.blocks.0.skip.1.norm.weight",
        "encoder.stages.5.blocks.5.conv2.conv.weight",
        "decoder.transpconvs.0.weight", "decoder.transpconvs.4.bias",
        "decoder.stages.0.convs.0.conv.weight", "decoder.stages.4.convs.0.norm.bias",
        "decoder.seg_layers.0.weight", "decoder.seg_layers.4.bias",
    }
    assert expected <= keys
    assert "encoder.stages.1.blocks.0.skip.1.conv.bias" not in keys  # DNA: projection conv has no bias
    assert "encoder.stages.5.blocks.0.skip.1.conv.weight" not in keys  # 320 -> 320: pool only
    assert "encoder.stages.0.blocks.0.skip.0.conv.weight" not in keys  # stem 32 -> 32, stride 1: identity
    assert not any("all_modules" in k for k in keys)


def test_forward_shapes_and_deep_supervision():
    net = tiny(in_channels=2, out_channels=3)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        skips = net.encoder(x)
        assert [tuple(s.shape[1:]) for s in skips] == [(8, 32, 32, 32), (16, 16, 16, 16), (32, 8, 8, 8),
                                                       (64, 4, 4, 4)]
        assert net(x).shape == (1, 3, 32, 32, 32)
        net.deep_supervision = True
        outs = net(x)
    assert [o.shape[2] for o in outs] == [32, 16, 8]


def test_input_not_divisible_by_total_stride_is_a_clear_error():
    with pytest.raises(ValueError, match="total stride 8"):
        tiny().encoder(torch.randn(1, 1, 20, 32, 32))  # 20: not a multiple of 8


# --------------------------------------------------------------------------- norms
def test_dense_path_equals_conv_instancenorm_leakyrelu_modules():
    torch.manual_seed(0)
    block = ConvNormAct(3, 5)
    nn.init.normal_(block.norm.weight)
    nn.init.normal_(block.norm.bias)
    ref = nn.Sequential(block.conv, nn.InstanceNorm3d(5, eps=1e-5, affine=True), nn.LeakyReLU(0.01))
    ref[1].load_state_dict(block.norm.state_dict())
    x = torch.randn(2, 3, 8, 8, 8)
    torch.testing.assert_close(block(x), ref(x))


def test_masked_norm_with_all_ones_mask_is_instance_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, 6) * 3 + 1
    w, b = torch.randn(4), torch.randn(4)
    norm = nn.InstanceNorm3d(4, eps=1e-5, affine=True)
    norm.weight.data, norm.bias.data = w.clone(), b.clone()
    ones = torch.ones(2, 1, 6, 6, 6)
    torch.testing.assert_close(masked_instance_norm(x, ones, w, b), norm(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(MaskedNormAct.apply(x, ones, make_mask_level(ones).count, w, b, 1e-5, None), norm(x),
                               atol=1e-5, rtol=1e-5)


def test_masked_norm_statistics_equal_direct_visible_statistics():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, 8) * 2 + 3  # offset: E[x^2] - mean^2 must not lose precision
    mask = block_mask(2, (8, 8, 8), 4, 0.6)
    w, b = torch.randn(3), torch.randn(3)
    fused = MaskedNormAct.apply(x, mask, make_mask_level(mask).count, w, b, 1e-5, None)
    plain = masked_instance_norm(x, mask, w, b) * mask
    for i in range(2):
        vis = mask[i, 0].bool()
        for c in range(3):
            v = x[i, c][vis].double()  # boolean indexing here, in the test only
            ref = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5) * w[c] + b[c]
            torch.testing.assert_close(fused[i, c][vis].double(), ref, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(plain[i, c][vis].double(), ref, atol=2e-5, rtol=1e-5)
            assert torch.all(fused[i, c][~vis] == 0)


@pytest.mark.parametrize("slope", [0.01, None])
def test_fused_masked_norm_gradients(slope):
    torch.manual_seed(2)
    x = (torch.randn(2, 3, 4, 4, 4, dtype=torch.double) * 2 + 1).requires_grad_()
    mask = (torch.rand(2, 1, 4, 4, 4) > 0.4).double()
    count = make_mask_level(mask).count
    w = torch.randn(3, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: MaskedNormAct.apply(x, mask, count, w, b, 1e-5, slope), (x, w, b))


# --------------------------------------------------------------------------- sparse encoder
def _mask_and_perturbation(patch=32, block=8):
    torch.manual_seed(3)
    mask = block_mask(2, (patch,) * 3, block, 0.5)  # block = total stride, 4^3 grid: 32 masked, 32 visible blocks
    x = torch.randn(2, 1, patch, patch, patch)
    x2 = x + 5.0 * torch.randn_like(x) * (1 - mask)  # differs only inside masked blocks
    return mask, x, x2


def _visible(outputs, mask, strides):
    return [o * mask[:, :, ::c, ::c, ::c] for o, c in zip(outputs, strides)]


def test_masked_input_changes_no_visible_output_of_any_stage():
    net = tiny()
    mask, x, x2 = _mask_and_perturbation()
    with torch.no_grad():
        a, b = net.encoder(x, mask), net.encoder(x2, mask)
    strides = net.encoder.cumulative_strides
    assert len(a) == 4 and a[-1].shape[2:] == (4, 4, 4)  # the bottleneck is one voxel per block
    for s, (va, vb, c) in enumerate(zip(a, b, strides)):
        m = mask[:, :, ::c, ::c, ::c]
        assert torch.equal(va, vb), f"stage {s}: visible output depends on masked input"
        assert torch.all(va * (1 - m) == 0), f"stage {s}: masked positions are not zero"
        assert (va * m).abs().sum() > 0


def test_without_input_masking_the_masked_input_leaks():
    net = tiny()
    mask, x, x2 = _mask_and_perturbation()
    with torch.no_grad():
        a = net.encoder(x, mask, mask_input=False)
        b = net.encoder(x2, mask, mask_input=False)
    diffs = [(va - vb).abs().max().item() for va, vb in zip(a, b)]
    assert all(d > 1e-4 for d in diffs), diffs  # leaks into visible voxels at every stage, bottleneck included


def test_without_sparse_conv_masked_regions_fill_in():
    net = tiny()
    mask, x, _ = _mask_and_perturbation()
    with torch.no_grad():
        outs = net.encoder(x, mask, sparse_conv=False, masked_norm=False)
    m0 = mask[:, :, ::1, ::1, ::1]
    assert (outs[0] * (1 - m0)).abs().max() > 1e-3  # conv output spreads into the masked blocks


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_sparse_encoder_forward_and_backward_have_no_host_sync():
    net = tiny()
    mask, x, _ = _mask_and_perturbation()
    with _RecordOps() as rec:
        loss = sum(s.square().mean() for s in net.encoder(x, mask))
        loss.backward()
    forbidden = {"nonzero", "_local_scalar_dense", "masked_select", "index", "index_put", "unique", "item"}
    assert "convolution" in rec.ops and not (rec.ops & forbidden), rec.ops & forbidden
