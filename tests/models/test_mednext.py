"""MedNeXt wrapper: MONAI's blocks in our encoder/decoder layout; counts vs the AMAES paper."""
import pytest
import torch
from monai.networks.blocks.mednext_block import MedNeXtBlock, MedNeXtDownBlock
from monai.networks.nets.mednext import MedNeXt as MonaiMedNeXt

from volssl.config import ModelConfig
from volssl.models.mednext import MedNeXt
from volssl.models.registry import build_model, count_parameters, get_arch, tiny_arch
from volssl.models.unet import UNetDecoder


@pytest.mark.parametrize("arch,paper", [("mednext-m", 21e6), ("mednext-l", 55e6), ("mednext-l-mednext-dec", 62e6)])
def test_parameter_counts_match_the_paper(arch, paper):
    net = build_model(ModelConfig(arch=arch), device="meta")
    assert get_arch(arch).paper_params == paper
    assert abs(count_parameters(net) - paper) / paper < 0.02


def test_paper_variants_use_the_unet_decoder_and_kernel_3():
    net = build_model(ModelConfig(arch="mednext-l", in_channels=1, out_channels=2), device="meta")
    assert isinstance(net.decoder, UNetDecoder) and len(net.decoder.seg_layers) == 4
    assert net.encoder.total_stride == 16 and net.encoder.in_channels == 1
    assert net.encoder.output_channels == [32, 64, 128, 256, 512]
    blocks = [m for m in net.encoder.modules() if isinstance(m, MedNeXtBlock)]
    assert blocks and all(m.conv1.kernel_size == (3, 3, 3) for m in blocks)  # kernel 3, no UpKern
    assert [len(s) for s in net.encoder.enc_stages] == [3, 4, 8, 8] and len(net.encoder.bottleneck) == 8
    # original MedNeXt / Yucca expansion convention: down block i expands by the ratio of stage i + 1
    assert [d.conv2.out_channels // d.conv2.in_channels for d in net.encoder.down_blocks] == [4, 8, 8, 8]
    assert all(isinstance(d, MedNeXtDownBlock) for d in net.encoder.down_blocks)
    assert all(k.startswith(("encoder.", "decoder.")) for k in net.state_dict())
    assert tiny_arch("mednext-l") == "mednext-tiny"


@pytest.mark.parametrize("decoder", ["unet", "mednext"])
def test_forward_and_deep_supervision(decoder):
    torch.manual_seed(0)
    net = MedNeXt(2, 3, (8, 16, 32, 64, 128), (1, 1, 1, 1, 1), (1, 2, 2, 2, 2), decoder=decoder)
    x = torch.randn(1, 2, 32, 32, 32)
    assert net(x).shape == (1, 3, 32, 32, 32)
    net.deep_supervision = True
    outs = net(x)
    assert [o.shape[2] for o in outs] == [32, 16, 8, 4] and all(o.shape[1] == 3 for o in outs)


def test_mednext_decoder_computes_what_monai_mednext_computes():
    """With one expansion ratio everywhere the two down-block conventions coincide: MONAI's weights,
    moved into our layout, give the same output."""
    torch.manual_seed(0)
    ref = MonaiMedNeXt(init_filters=8, in_channels=1, out_channels=2, encoder_expansion_ratio=2,
                       decoder_expansion_ratio=2, bottleneck_expansion_ratio=2, kernel_size=3,
                       use_residual_connection=True, blocks_down=(1, 2, 1, 1), blocks_bottleneck=2,
                       blocks_up=(1, 1, 2, 1)).eval()
    ours = MedNeXt(1, 2, (8, 16, 32, 64, 128), (1, 2, 1, 1, 2), (1, 2, 2, 2, 2), expansion=2, decoder="mednext",
                   decoder_blocks=(1, 1, 2, 1), decoder_expansion=2).eval()
    moved = {}
    for k, v in ref.state_dict().items():
        top = k.split(".")[0]
        if top in ("stem", "enc_stages", "down_blocks", "bottleneck"):
            moved["encoder." + k] = v
        elif top in ("up_blocks", "dec_stages"):
            moved["decoder." + k] = v
        else:  # out_0: the full-resolution head
            moved[k.replace("out_0.", "decoder.seg_layers.3.")] = v
    missing, unexpected = ours.load_state_dict(moved, strict=False)
    assert unexpected == [] and all(k.startswith("decoder.seg_layers.") for k in missing)  # the 3 DS heads
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_argument_validation():
    with pytest.raises(ValueError, match="strides must be"):
        MedNeXt(1, 1, (8, 16, 32), (1, 1, 1), (1, 2, 4))
    with pytest.raises(ValueError, match="decoder must be one of"):
        MedNeXt(1, 1, (8, 16, 32), (1, 1, 1), (1, 2, 2), decoder="swin")
    with pytest.raises(ValueError, match="expansion must be"):
        MedNeXt(1, 1, (8, 16, 32), (1, 1, 1), (1, 2, 2), expansion=(2, 2))
    net = build_model(ModelConfig(arch="mednext-tiny"))
    with pytest.raises(ValueError, match="not divisible by the total stride 16"):
        net(torch.zeros(1, 1, 40, 40, 40))
