"""Multi-channel data through a one-channel encoder (models/channel_fusion.py)."""
import pytest
import torch

from volssl.config import ModelConfig
from volssl.models.channel_fusion import ChannelFusionNet, mean_fusion_weight
from volssl.models.registry import build_model


def test_mean_fusion_weight_averages_the_channels():
    w = mean_fusion_weight(3, 4)
    x = torch.randn(2, 3 * 4, 5, 5, 5)
    y = torch.nn.functional.conv3d(x, w)
    torch.testing.assert_close(y, x.reshape(2, 3, 4, 5, 5, 5).mean(1))


@pytest.mark.parametrize("arch", ["resenc-tiny", "unet-tiny"])
def test_build_model_wraps_a_one_channel_network(arch):
    net = build_model(ModelConfig(arch=arch, in_channels=3, out_channels=2, channel_fusion="features"))
    assert isinstance(net, ChannelFusionNet) and net.encoder.in_channels == 1
    keys = set(net.state_dict())
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("fusion.") for k in keys)
    x = torch.randn(2, 3, 32, 32, 32)
    assert net(x).shape == (2, 2, 32, 32, 32)
    net.deep_supervision = True
    assert isinstance(net(x), list)
    # channels are not interchangeable once trained, but at initialisation a permutation gives the same output
    net.deep_supervision = False
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x[:, [2, 0, 1]]), rtol=1e-4, atol=1e-5)
    # one channel: no wrapper; "stem": the plain network
    assert not isinstance(build_model(ModelConfig(arch=arch, in_channels=1, channel_fusion="features")),
                          ChannelFusionNet)
    assert not isinstance(build_model(ModelConfig(arch=arch, in_channels=3)), ChannelFusionNet)


def test_bad_fusion_and_a_vit_are_refused():
    with pytest.raises(ValueError, match="channel_fusion"):
        build_model(ModelConfig(arch="resenc-tiny", in_channels=2, channel_fusion="late"))
    with pytest.raises(ValueError, match="CNN encoder"):
        build_model(ModelConfig(arch="vit-unetr-tiny", in_channels=2, channel_fusion="features"))
