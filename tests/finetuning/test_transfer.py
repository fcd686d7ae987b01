"""Weight transfer: which tensors move, which are dropped, which stay new; stem replication; trainable sets."""
import dataclasses

import pytest
import torch

from volssl.config import ModelConfig, resolve
from volssl.finetuning.transfer import (
    init_heads, replicate_stem, set_trainable, trainable_names, transfer_weights,
)
from volssl.methods.s3d import S3D
from volssl.models.registry import build_model

STEM = "encoder.stem.convs.0.conv.weight"


def pretrained_method(seed: int = 1) -> S3D:
    """A tiny S3D with non-default weights everywhere (so 'moved' is visible)."""
    torch.manual_seed(seed)
    method = S3D.from_config(resolve("s3d-b-tiny", ["data.patch_size=32,32,32"]))
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return method


def fresh(in_channels: int = 1, out_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="resenc-tiny", in_channels=in_channels, out_channels=out_channels))


def test_transfer_all_moves_encoder_and_decoder_and_leaves_new_heads():
    method = pretrained_method()
    source = method.transfer_state_dict()
    assert not any(k.startswith("decoder.seg_layers.") or "mask_token" in k or "densify" in k for k in source)
    net = fresh()
    report = transfer_weights(net, source, "all")
    target = net.state_dict()
    assert set(report.moved) == set(source) and not report.dropped and not report.replicated
    assert set(report.new) == {k for k in target if k.startswith("decoder.seg_layers.")}
    for k in source:
        assert torch.equal(target[k], source[k]), k
    init = fresh().state_dict()
    for k in report.new:
        assert torch.equal(target[k], init[k]), k  # the segmentation heads keep their initialisation


def test_pretraining_only_tensors_are_dropped():
    method = pretrained_method()
    full = dict(method.network.state_dict())  # with the reconstruction heads
    full.update({k: v for k, v in method.state_dict().items() if k.startswith(("mask_tokens.", "densify."))})
    assert any("mask_tokens" in k for k in full) and any(k.startswith("densify.") for k in full)
    net = fresh()
    report = transfer_weights(net, full, "all")
    heads = {k for k in full if k.startswith("decoder.seg_layers.")}
    tokens = {k for k in full if k.startswith(("mask_tokens.", "densify."))}
    assert set(report.dropped) == heads | tokens
    assert set(report.moved) == set(full) - heads - tokens


def test_encoder_only_transfer_leaves_the_decoder_at_its_initialisation():
    source = pretrained_method().transfer_state_dict()
    net = fresh()
    report = transfer_weights(net, source, "encoder")
    target, init = net.state_dict(), fresh().state_dict()
    assert report.moved == sorted(k for k in source if k.startswith("encoder."))
    assert set(report.dropped) == {k for k in source if k.startswith("decoder.")}
    assert set(report.new) == {k for k in target if k.startswith("decoder.")}
    for k in target:
        ref = source[k] if k.startswith("encoder.") else init[k]
        assert torch.equal(target[k], ref), k


def test_stem_replication_over_three_channels():
    source = pretrained_method().transfer_state_dict()
    net = fresh(in_channels=3)
    report = transfer_weights(net, source, "all")
    assert report.replicated == [STEM] and STEM not in report.moved
    w, w0 = net.state_dict()[STEM], source[STEM]
    assert w.shape == (w0.shape[0], 3, *w0.shape[2:])
    for c in range(3):
        torch.testing.assert_close(w[:, c:c + 1], w0 / 3, rtol=0, atol=0)
    # three identical channels give the pre-trained stem's response to one
    x = torch.randn(1, 1, 16, 16, 16)
    conv0 = torch.nn.functional.conv3d(x, w0, padding=1)
    conv3 = torch.nn.functional.conv3d(x.repeat(1, 3, 1, 1, 1), w, padding=1)
    torch.testing.assert_close(conv3, conv0, rtol=1e-5, atol=1e-5)


def test_random_stem_init_keeps_the_fresh_stem():
    source = pretrained_method().transfer_state_dict()
    net = fresh(in_channels=2)
    report = transfer_weights(net, source, "all", stem_init="random")
    assert STEM in report.dropped and STEM in report.new
    assert torch.equal(net.state_dict()[STEM], fresh(in_channels=2).state_dict()[STEM])
    assert torch.equal(replicate_stem(torch.ones(2, 1, 3, 3, 3), 4), torch.full((2, 4, 3, 3, 3), 0.25))


def test_another_architecture_is_refused_naming_the_key():
    source = pretrained_method().transfer_state_dict()
    wider = build_model(dataclasses.replace(ModelConfig(arch="resenc-tiny"), features=(8, 16, 32, 96)))
    with pytest.raises(ValueError, match=r"encoder\.stages\.3.*shape"):
        transfer_weights(wider, source, "all", where="ckpt.pt")
    with pytest.raises(ValueError, match="no counterpart"):
        transfer_weights(fresh(), {"head.weight": torch.zeros(1)}, "all")
    with pytest.raises(ValueError, match="only a single-channel stem"):
        transfer_weights(fresh(in_channels=3), {STEM: torch.zeros(8, 2, 3, 3, 3)}, "all")


def test_trainable_sets_per_stage():
    net = fresh()
    names = [n for n, _ in net.named_parameters()]
    decoder = trainable_names(net, "decoder")
    assert decoder == [n for n in names if n.startswith("decoder.") and ".seg_layers.0." not in n]
    assert trainable_names(net, "decoder", train_stem=True) == [n for n in names if n.startswith(
        ("decoder.", "encoder.stem.")) and ".seg_layers.0." not in n]
    # deep supervision: the lowest-resolution head has loss weight 0, so it is never trained
    assert [n for n in names if n not in trainable_names(net, "all")] == ["decoder.seg_layers.0.weight",
                                                                         "decoder.seg_layers.0.bias"]
    no_ds = trainable_names(net, "all", deep_supervision=False)  # 4 stages: 3 heads, only the last is trained
    assert [n for n in names if n not in no_ds] == [f"decoder.seg_layers.{k}.{w}" for k in range(2)
                                                     for w in ("weight", "bias")]
    assert set_trainable(net, "decoder") is True and set_trainable(net, "decoder") is False
    assert {n for n, p in net.named_parameters() if p.requires_grad} == set(decoder)
    assert set_trainable(net, "all") is True
    assert {n for n, p in net.named_parameters() if not p.requires_grad} == {"decoder.seg_layers.0.weight",
                                                                            "decoder.seg_layers.0.bias"}


def test_small_head_init_zeroes_the_logits_of_every_seed_and_touches_nothing_else():
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    spread = []
    for seed in range(4):
        net = fresh(out_channels=2, seed=seed).eval()
        with torch.no_grad():
            he = net(x)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        changed = init_heads(net, "small")
        assert set(changed) == {k for k in before if k.startswith("decoder.seg_layers.")}
        for k, v in net.state_dict().items():
            if k in changed:
                assert v.abs().max() <= 4e-5 and (not k.endswith(".bias") or not v.any()), k
            else:
                assert torch.equal(v, before[k]), k
        with torch.no_grad():
            small = net(x)
        assert small.abs().max() < 1e-3  # softmax 0.5 / 0.5 everywhere
        spread.append((he[:, 1] - he[:, 0]).abs().mean().item())
    assert max(spread) > 0.3  # what it replaces: He heads give seed-dependent logits of order 1
    assert init_heads(net, "he") == []


def test_init_heads_leaves_heads_outside_keys_and_refuses_unknown_modes():
    net = fresh(out_channels=2)
    head = "decoder.seg_layers.0.weight"
    before = net.state_dict()[head].clone()
    changed = init_heads(net, "small", keys=["decoder.seg_layers.1.weight"])
    assert changed == ["decoder.seg_layers.1.weight"] and torch.equal(net.state_dict()[head], before)
    with pytest.raises(ValueError, match="must be one of"):
        init_heads(net, "zero")

