"""AMAES: augmentation order (through the real trainer), token masking, the light decoder without skips,
the loss, transfer into the fine-tuning network, data-parallel rows, and a tiny pre-training run."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from volssl.config import (ModelConfig, RunConfig, apply_overrides, config_from_dict, config_to_dict,
                           get_preset)
from volssl.data.intensity_artifacts import ArtifactConfig, artifact_augment
from volssl.finetuning.transfer import transfer_weights
from volssl.methods import MethodOutput, build_method
from volssl.methods.amaes import AMAES, AMAESConfig
from volssl.methods.masking import token_mask
from volssl.models.registry import build_model
from volssl.training.augment import spatial_augment
from volssl.training.logging import read_scalars
from volssl.training.trainer import AUGMENT_STREAM, pretrain, step_seed

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from training_standins import make_batches  # noqa: E402

PATCH = (32, 32, 32)  # unet-tiny / mednext-tiny: total stride 16, 8^3 tokens of 4^3 voxels


def make(arch="unet-tiny", **kw) -> AMAES:
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(arch=arch), method=AMAESConfig(**kw))
    cfg.data.patch_size = PATCH
    return AMAES.from_config(cfg)


def images(seed=1, batch=2):
    return torch.randn(batch, 1, *PATCH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["unet-tiny", "mednext-tiny"])
def test_forward_returns_loss_and_previews_and_trains_every_part(arch):
    method = make(arch)
    out = method(images())
    assert isinstance(out, MethodOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.previews) == {"input", "masked", "reconstruction", "target"}
    assert all(p.shape == (2, 1, *PATCH) and not p.requires_grad for p in out.previews.values())
    out.loss.backward()
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP and the optimiser see no parameter without a gradient
    assert len(method.decoder.seg_layers) == 1  # one 1^3 output conv, no deep-supervision heads


def test_token_mask_masks_an_exact_count_of_4_cubed_tokens():
    method = make()
    torch.manual_seed(3)
    mask = method.draw_mask(images(batch=3))
    assert mask.shape == (3, 1, *PATCH)
    tokens = mask.view(3, 8, 4, 8, 4, 8, 4)
    per_token = tokens.amin(dim=(2, 4, 6))
    assert torch.equal(per_token, tokens.amax(dim=(2, 4, 6)))  # constant on every 4^3 token
    n_tokens = 8 ** 3
    assert ((per_token == 0).flatten(1).sum(1) == round(0.6 * n_tokens)).all()  # exactly 60 % per sample
    assert not torch.equal(per_token[0], per_token[1])  # drawn per sample


def test_masked_voxels_of_the_input_are_zero_and_the_decoder_sees_only_the_bottleneck():
    method = make(intensity=ArtifactConfig(enabled=False))
    seen = []
    method.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = images() + 5.0  # no voxel is 0 by chance
    torch.manual_seed(0)
    out = method(x)
    torch.manual_seed(0)
    mask = token_mask(2, PATCH, 4, 0.6)
    assert torch.equal(out.previews["masked"], x * mask)  # masked tokens zeroed, the rest untouched
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].shape == (2, 128, 2, 2, 2)  # bottleneck only
    assert method.decoder.stages[0].convs[0].conv.in_channels == 64  # no concatenated skip
    assert all(len(stage.convs) == 1 for stage in method.decoder.stages)  # one conv per stage
    assert isinstance(method.decoder.transpconvs[0], torch.nn.ConvTranspose3d)
    feats = method.network.encoder(x)
    with torch.no_grad():
        a = method.decoder(feats)
        b = method.decoder([f + 10.0 * torch.randn_like(f) for f in feats[:-1]] + feats[-1:])
    assert torch.equal(a, b)  # changing the skip features changes nothing


def test_loss_is_whole_volume_mse_by_default_and_masked_only_as_an_option():
    x, inp = images(), images(seed=2)
    mask = token_mask(2, PATCH, 4, 0.6, generator=torch.Generator().manual_seed(0))
    whole = make().forward_masked(x, inp, mask)
    recon = whole.previews["reconstruction"]
    torch.testing.assert_close(whole.loss.detach(), torch.nn.functional.mse_loss(recon, x))
    masked = make(loss_masked_only=True).forward_masked(x, inp, mask)
    hidden = 1 - mask
    sq = (masked.previews["reconstruction"] - x).square()
    per_sample = (sq * hidden).sum((1, 2, 3, 4)) / hidden.sum((1, 2, 3, 4))
    torch.testing.assert_close(masked.loss.detach(), per_sample.mean())


def test_augmentation_order_through_the_trainer(tmp_path):
    """Spatial augmentation (trainer) -> the clean copy is the target -> intensity artifacts on the input
    only -> masked tokens zeroed."""
    cfg = apply_overrides(get_preset("amaes-unet-b-tiny"), [
        "train.steps=1", "data.batch_size=2", "data.patch_size=32,32,32", "data.num_workers=0",
        "train.device=cpu", "augment.p_rotation=1", "augment.p_elastic=1", "augment.elastic_alpha=2,4",
        "augment.elastic_sigma=4,5", "method.intensity.p_gamma=1", "method.intensity.p_bias=1",
        "method.intensity.p_noise=1"])
    method = build_method(cfg)
    seen = {}
    inner = method.forward_masked

    def spy(target, inputs, mask):
        out = inner(target, inputs, mask)
        seen.update(target=target.clone(), inputs=inputs.clone(), mask=mask.clone(), masked=out.previews["masked"])
        return out

    method.forward_masked = spy
    batches = make_batches(2, PATCH, seed=5)
    pretrain(cfg, None, tmp_path / "run", method=method, batches=batches, progress=False)
    raw = next(iter(batches(0, 0, 1)))["image"]
    gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 0, AUGMENT_STREAM))
    spatial = spatial_augment(raw, cfg.augment, gen, 0, 2)
    assert not torch.allclose(spatial, raw, atol=1e-3)  # the sample was spatially augmented ...
    assert torch.equal(seen["target"], spatial)  # ... and the target is exactly that, intensity-clean
    torch.manual_seed(step_seed(cfg.train.seed, 0))  # the method's RNG at step 0: mask, then artifacts
    mask = token_mask(2, PATCH, 4, 0.6)
    corrupted = artifact_augment(spatial, cfg.method.intensity)
    assert torch.equal(seen["mask"], mask)
    assert torch.equal(seen["inputs"], corrupted) and not torch.allclose(corrupted, spatial, atol=1e-3)
    assert torch.equal(seen["masked"], corrupted * mask)  # the encoder's input: corrupted, tokens zeroed


def test_rows_of_a_global_batch_give_the_single_process_loss():
    method = make()
    x = images(batch=4)
    torch.manual_seed(7)
    full = method(x).loss
    torch.manual_seed(7)
    a = method(x[:2], sample_offset=0, global_batch=4).loss
    torch.manual_seed(7)
    b = method(x[2:], sample_offset=2, global_batch=4).loss
    torch.testing.assert_close((a + b) / 2, full)


@pytest.mark.parametrize("arch", ["unet-tiny", "mednext-tiny"])
def test_transfer_moves_every_encoder_key_into_the_finetuning_network(arch):
    method = make(arch)
    sd = method.transfer_state_dict()
    assert sd.keys() == method.network.state_dict().keys()
    ft = build_model(ModelConfig(arch=arch, in_channels=1, out_channels=3))
    encoder_keys = {k for k in ft.state_dict() if k.startswith("encoder.")}
    assert set(sd) == encoder_keys  # the light decoder is not part of the transferred weights
    report = transfer_weights(ft, sd, "encoder")
    assert set(report.moved) == encoder_keys and report.dropped == []
    assert set(report.new) == {k for k in ft.state_dict() if k.startswith("decoder.")}
    for k in encoder_keys:
        assert torch.equal(ft.state_dict()[k], sd[k])
    assert ft.decoder.stages[0].convs[0].conv.in_channels == 2 * ft.decoder.stages[0].convs[0].conv.out_channels


def test_config_round_trip_and_nested_overrides():
    cfg = get_preset("amaes-unet-b")
    apply_overrides(cfg, ["method.intensity.p_noise=0.5", "method.loss_masked_only=true"])
    back = config_from_dict(config_to_dict(cfg))
    assert back == cfg and isinstance(back.method.intensity, ArtifactConfig)
    assert back.method.intensity.p_noise == 0.5 and back.method.loss_masked_only
    with pytest.raises(ValueError, match="is a group"):
        apply_overrides(cfg, ["method.intensity=off"])
    with pytest.raises(ValueError, match="intensity.p_noise must lie in"):
        artifact_augment(images(), dataclasses.replace(cfg.method.intensity, p_noise=2.0))


def test_guard_rails():
    cfg = RunConfig(model=ModelConfig(arch="unet-tiny"), method=AMAESConfig())
    cfg.data.patch_size = (40, 40, 40)
    with pytest.raises(ValueError, match="divisible by the token size 4 and by the encoder's total stride 16"):
        AMAES.from_config(cfg)
    with pytest.raises(ValueError, match="must be an AMAESConfig"):
        AMAES.from_config(RunConfig(model=ModelConfig(arch="unet-tiny")))
    with pytest.raises(ValueError, match="mask_ratio"):
        make(mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"expected images \(B, 1"):
        make()(torch.zeros(1, 2, *PATCH))


def test_a_tiny_pretraining_run_lowers_the_loss(tmp_path):
    cfg = apply_overrides(get_preset("amaes-unet-b-tiny"), [
        "train.steps=30", "data.batch_size=2", "data.patch_size=32,32,32", "data.num_workers=0",
        "train.device=cpu", "train.log_every=1", "train.checkpoint_every=30", "train.preview_every=30"])
    summary = pretrain(cfg, None, tmp_path / "run", batches=make_batches(2, PATCH, seed=1), progress=False)
    assert summary["status"] == "finished" and summary["step"] == 30
    losses = [r["loss"] for r in read_scalars(tmp_path / "run" / "scalars.csv")]
    assert len(losses) == 30
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert all(k.startswith("encoder.") for k in ckpt["network"]) and ckpt["config"]["method"]["name"] == "amaes"
