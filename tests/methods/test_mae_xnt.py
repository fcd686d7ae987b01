"""MAE-XNT: patchify / unpatchify, exact masking, loss on removed patches only, global-batch rows, previews,
the transferred encoder, and a tiny pre-training run whose loss goes down."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volssl.config import resolve
from volssl.finetuning.transfer import transfer_weights
from volssl.methods import build_method
from volssl.methods.mae_xnt import MAEXNT, MAEXNTConfig
from volssl.models.registry import build_model
from volssl.models.vit import ViTEncoder3D

PATCH = ["data.patch_size=16,16,16"]


def tiny_method(ratio=0.75, channels=1, patch_size=4, norm_pix=False, seed=0):
    torch.manual_seed(seed)
    enc = ViTEncoder3D(in_channels=channels, dim=48, depth=2, heads=4, patch_size=patch_size)
    return MAEXNT(enc, MAEXNTConfig(mask_ratio=ratio, decoder_dim=24, decoder_heads=2, norm_pix_loss=norm_pix))


def smooth(n, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 4, 4, 4, generator=gen)
    return F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=True)


def test_patchify_unpatchify_round_trip_and_layout():
    m = tiny_method(channels=2)
    x = torch.randn(3, 2, 8, 12, 16)
    patches = m.patchify(x)
    assert patches.shape == (3, 2 * 3 * 4, 4 ** 3 * 2)
    assert torch.equal(m.unpatchify(patches, (2, 3, 4)), x)
    # token n is the 4^3 block at unravel_index(n, grid), voxels (px, py, pz, channel)
    i, j, k = np.unravel_index(17, (2, 3, 4))
    block = x[1, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4, 4 * k:4 * k + 4]
    assert torch.equal(patches[1, 17], block.permute(1, 2, 3, 0).reshape(-1))
    with pytest.raises(ValueError, match="does not fit"):
        m.unpatchify(patches, (2, 3, 3))


@pytest.mark.parametrize("ratio", [0.75, 0.8, 0.85, 0.9])
def test_the_masked_count_is_exact_and_the_indices_agree(ratio):
    m = tiny_method(ratio)
    torch.manual_seed(1)
    ids_keep, ids_restore, masked = m.random_masking(5, 4096)
    n_mask = 4096 - int(4096 * (1 - ratio))  # MAE's len_keep
    assert masked.shape == (5, 4096) and (masked.sum(1) == n_mask).all()
    assert ids_keep.shape == (5, 4096 - n_mask)
    for b in range(5):
        assert (masked[b, ids_keep[b]] == 0).all()  # kept tokens are exactly the unmasked ones
        shuffle = torch.argsort(ids_restore[b])
        assert torch.equal(shuffle[: ids_keep.shape[1]], ids_keep[b])  # ids_restore inverts the shuffle
    assert not torch.equal(masked[0], masked[1])  # per-sample masks


@pytest.mark.parametrize("ratio, n_tokens, n_keep", [(0.9, 4096, 409), (0.75, 4096, 1024), (0.9, 64, 6),
                                                     (0.99, 8, 1)])
def test_the_kept_count_is_maes_len_keep(ratio, n_tokens, n_keep):
    """int(N (1 - r)) tokens kept, as facebookresearch/mae and MAE_XNT (409 of 4096 at 0.9, not 410), at least 1."""
    m = tiny_method(ratio)
    assert m.n_kept(n_tokens) == n_keep and m.n_masked(n_tokens) == n_tokens - n_keep
    torch.manual_seed(2)
    ids_keep, ids_restore, masked = m.random_masking(3, n_tokens)
    assert ids_keep.shape == (3, n_keep) and ids_restore.shape == (3, n_tokens)
    assert (masked.sum(1) == n_tokens - n_keep).all() and ((1 - masked).sum(1) == n_keep).all()
    # the loss averages over exactly the N - n_keep tokens not in ids_keep: token n is the constant n / N
    values = torch.arange(n_tokens, dtype=torch.float32) / n_tokens
    x = m.unpatchify(values.view(1, n_tokens, 1).expand(3, -1, 4 ** 3), (1, 1, n_tokens))
    loss = m.forward_loss(x, torch.zeros(3, n_tokens, 4 ** 3), masked)
    removed = [sorted(set(range(n_tokens)) - set(ids_keep[b].tolist())) for b in range(3)]
    assert all(len(r) == n_tokens - n_keep for r in removed)
    expected = torch.stack([values[r].square().mean() for r in removed]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_noise_is_drawn_for_the_global_batch_and_rows_are_kept():
    m = tiny_method()
    torch.manual_seed(3)
    full = m.random_masking(4, 64, global_batch=4)
    parts = []
    for offset in (0, 2):
        torch.manual_seed(3)
        parts.append(m.random_masking(2, 64, sample_offset=offset, global_batch=4))
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), full[k])
    # the loss of the global batch is the mean of the two halves' losses (DDP averaging)
    x = smooth(4)
    torch.manual_seed(5)
    whole = m(x, 0, 4).loss
    halves = []
    for offset in (0, 2):
        torch.manual_seed(5)
        halves.append(m(x[offset:offset + 2], offset, 4).loss)
    assert whole.item() == pytest.approx(torch.stack(halves).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="do not fit a global batch"):
        m.random_masking(2, 64, sample_offset=3, global_batch=4)


def test_the_loss_counts_removed_patches_only():
    m = tiny_method(0.75)
    x = smooth(2)
    torch.manual_seed(0)
    _, _, masked = m.random_masking(2, 64)
    pred = torch.randn(2, 64, 64)
    base = m.forward_loss(x, pred, masked)
    noise = torch.randn_like(pred) * 10
    visible_changed = pred + noise * (1 - masked).unsqueeze(-1)
    assert m.forward_loss(x, visible_changed, masked).item() == pytest.approx(base.item(), rel=1e-6)
    assert m.forward_loss(x, pred + noise * masked.unsqueeze(-1), masked).item() != pytest.approx(base.item())
    # the mean over samples of each sample's mean over its removed patches' voxels
    err = (pred - m.patchify(x)).square().mean(-1)
    expected = torch.stack([err[b][masked[b] > 0].mean() for b in range(2)]).mean()
    assert base.item() == pytest.approx(expected.item(), rel=1e-6)
    # a perfect prediction of the removed patches gives zero loss
    assert m.forward_loss(x, m.patchify(x) + noise * (1 - masked).unsqueeze(-1), masked).item() == pytest.approx(0.0)


def test_norm_pix_loss_targets_are_normalised_per_patch():
    m = tiny_method(norm_pix=True)
    target = m.target_patches(smooth(2) * 5 + 3)
    assert target.mean(-1).abs().max() < 1e-5 and (target.var(-1) - 1).abs().max() < 1e-3


def test_forward_previews_and_gradients():
    m = tiny_method(0.75)
    x = smooth(2)
    out = m(x)
    assert out.loss.ndim == 0 and out.loss > 0
    assert set(out.previews) == {"input", "masked", "reconstruction", "target"}
    assert all(v.shape == (2, 1, 16, 16, 16) and not v.requires_grad for v in out.previews.values())
    visible = out.previews["masked"] != 0
    assert 0.2 < visible.float().mean() < 0.3  # a quarter of the 4^3 patches stay visible
    assert torch.equal(out.previews["reconstruction"][visible], x[visible])  # visible patches pasted
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())  # encoder + MAE decoder only: nothing unused


def test_from_config_and_the_transferred_encoder():
    cfg = resolve("mae-xnt-tiny", PATCH)
    method = build_method(cfg)
    assert isinstance(method, MAEXNT) and method.cfg.mask_ratio == 0.9
    state = method.transfer_state_dict()
    assert state and all(k.startswith("encoder.") for k in state) and not any("mask_token" in k for k in state)
    assert not any(k.startswith("decoder") for k in method.network.state_dict())  # no UNETR decoder in the method
    # loadable into the fine-tuning network (3 channels: the patch embedding is replicated)
    net = build_model(type(cfg.model)(arch=cfg.model.arch, in_channels=3, out_channels=2))
    report = transfer_weights(net, state, "encoder")
    assert report.replicated == ["encoder.patch_embed.proj.weight"]
    assert set(report.moved) | set(report.replicated) == set(state)
    assert torch.equal(net.state_dict()["encoder.blocks.0.attn.qkv.weight"], state["encoder.blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="ViT backbone"):
        build_method(resolve("mae-xnt-tiny", PATCH + ["model.arch=resenc-tiny"]))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        build_method(resolve("mae-xnt-tiny", ["data.patch_size=18,16,16"]))
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_method(1.0)


def _fields(n, seed):
    """Z-scored smooth fields (2^3 control points, trilinear): a masked patch is predictable from the rest."""
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 1, 2, 2, 2, generator=gen), size=(16,) * 3, mode="trilinear", align_corners=True)
    return (x - x.mean(dim=(2, 3, 4), keepdim=True)) / x.std(dim=(2, 3, 4), keepdim=True)


def test_tiny_pretraining_learns_to_inpaint(tmp_path):
    """Through the real trainer with a batches factory: the loss falls from the random decoder's (> 1),
    through the crop-mean prediction (1.0 for z-scored crops), to about half of it (150 steps, ~10 s)."""
    from volssl.training.logging import read_scalars
    from volssl.training.trainer import pretrain

    def batches(start_batch, rank, world_size):
        for k in itertools.count(start_batch):
            yield {"image": _fields(8, k)}

    cfg = resolve("mae-xnt-tiny", [
        "data.patch_size=16,16,16", "data.batch_size=8", "train.steps=150", "train.device=cpu", "train.log_every=1",
        "train.checkpoint_every=150", "train.preview_every=1000", "optim.warmup_steps=10", "optim.weight_decay=0",
        "optim.schedule=constant", "method.mask_ratio=0.5", "model.features=96", "model.blocks=2",
        "method.decoder_dim=48", "method.decoder_depth=1"])
    summary = pretrain(cfg, None, tmp_path, batches=batches, progress=False)
    assert summary["status"] == "finished"
    losses = [r["loss"] for r in read_scalars(tmp_path / "scalars.csv")]
    assert len(losses) == 150
    assert np.mean(losses[:5]) > 1.0 and np.mean(losses[-10:]) < 0.75, (losses[:5], losses[-10:])
