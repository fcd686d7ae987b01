"""UNETR-XNT: logits at full resolution for patch 4 and 8, the segmentation-network layout, the skips and
widths of Fig. 2 / Fig. 5, the registered architectures."""
import pytest
import torch

from volssl.config import ModelConfig
from volssl.models.registry import build_model, count_parameters, get_arch, tiny_arch
from volssl.models.unetr_xnt import UNETRXNT, default_widths, skip_blocks


@pytest.mark.parametrize("arch, patch", [("vit-unetr-tiny", 4), ("vit-unetr-p8-tiny", 8)])
def test_logits_at_full_resolution_for_patch_4_and_8(arch, patch):
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch=arch, in_channels=1, out_channels=3))
    assert net.encoder.total_stride == patch and net.encoder.in_channels == 1
    x = torch.randn(1, 1, 32, 32, 32)
    y = net(x)
    assert y.shape == (1, 3, 32, 32, 32)
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())  # no unused parameter (DDP, optimiser)
    net.eval()
    with torch.no_grad():  # non-cubic patches work: the position embedding follows the grid
        assert net(torch.randn(1, 1, 16, 32, 24))[0].shape == (3, 16, 32, 24)


@pytest.mark.parametrize("arch", ["vit-unetr-tiny", "vit-unetr-p8-tiny"])
def test_a_64_cube_gives_64_cube_logits(arch):  # MAE-XNT's crop: 4096 tokens with patch 4, 512 with patch 8
    net = build_model(ModelConfig(arch=arch, out_channels=2)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)


def test_segmentation_network_layout_and_deep_supervision():
    net = build_model(ModelConfig(arch="vit-unetr-tiny", in_channels=2, out_channels=4))
    assert len(net.decoder.seg_layers) == 1 and net.decoder.seg_layers[-1].out_channels == 4
    assert net.deep_supervision is False
    keys = net.state_dict()
    assert keys["encoder.patch_embed.proj.weight"].shape == (192, 2, 4, 4, 4)
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    net.deep_supervision = True  # one full-resolution head: a one-element list
    out = net(torch.randn(1, 2, 16, 16, 16))
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (1, 4, 16, 16, 16)


def test_skips_and_widths_follow_the_papers_figures():
    assert skip_blocks(12, 4) == (5,)  # the output of block 6 of 12 (Fig. 2)
    assert skip_blocks(12, 8) == (7, 3)  # blocks 8 and 4 (Fig. 5)
    assert default_widths(768, 4) == (48, 12) and default_widths(768, 8) == (96, 48, 24)
    with pytest.raises(ValueError, match="too shallow"):
        skip_blocks(2, 8)
    with pytest.raises(ValueError, match="power of two"):
        UNETRXNT(1, 2, (48,), (2,), (6,), heads=4)
    with pytest.raises(ValueError, match="one value"):
        UNETRXNT(1, 2, (48, 96), (2, 2), (4, 2), heads=4)


def test_registered_architectures_and_their_tiny_siblings():
    assert tiny_arch("vit-b-unetr") == "vit-unetr-tiny" and tiny_arch("vit-b-unetr-p8") == "vit-unetr-p8-tiny"
    spec = get_arch("vit-b-unetr")
    assert (spec.features, spec.blocks, spec.strides, dict(spec.options)) == ((768,), (12,), (4,), {"heads": 12})
    assert get_arch("vit-b-unetr-p8").total_stride == 8
    big = build_model(ModelConfig(arch="vit-b-unetr"), device="meta")
    assert 84e6 < count_parameters(big.encoder) < 86e6  # ViT-B
    p8 = build_model(ModelConfig(arch="vit-b-unetr-p8"), device="meta")
    assert len(p8.decoder.merges) == 2 and len(big.decoder.merges) == 1  # the extra up-sampling level
