"""S3D sparse masked autoencoder: loss, previews, no leak, switches (Table 1a rows), transfer."""
import dataclasses

import pytest
import torch

from volssl.config import ModelConfig, get_preset
from volssl.methods import MethodOutput, build_method
from volssl.methods.masking import block_mask
from volssl.methods.s3d import S3D, S3DConfig, reconstruction_loss
from volssl.models.registry import build_model

PATCH = (32, 32, 32)  # resenc-tiny: total stride 8 -> 4^3 bottleneck, 8^3 mask blocks (64 per patch)


def make(**switches) -> S3D:
    torch.manual_seed(0)
    return S3D(build_model(ModelConfig(arch="resenc-tiny")), S3DConfig(**switches))


def images(seed=1, batch=2):
    return torch.randn(batch, 1, *PATCH, generator=torch.Generator().manual_seed(seed))


def test_forward_returns_loss_and_previews_and_trains_every_part():
    s3d = make()
    out = s3d(images())
    assert isinstance(out, MethodOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.previews) == {"input", "masked", "reconstruction", "target"}
    assert all(p.shape == (2, 1, *PATCH) and not p.requires_grad for p in out.previews.values())
    out.loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in s3d.mask_tokens)
    assert all(c.weight.grad is not None for c in list(s3d.densify)[1:])
    assert s3d.network.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0
    unused = [n for n, p in s3d.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP and the optimiser see no parameter that gets no gradient


def test_loss_is_l2_on_masked_voxels_only():
    s3d = make()
    x = images()
    mask = block_mask(2, PATCH, 16, 0.5)
    out = s3d.forward_masked(x, mask)
    recon, hidden = out.previews["reconstruction"], 1 - mask
    per_sample = ((recon - x).square() * hidden).sum((1, 2, 3, 4)) / hidden.sum((1, 2, 3, 4))
    expected = per_sample.mean()  # mean over samples of each sample's masked-voxel MSE
    torch.testing.assert_close(out.loss.detach(), expected)
    # changing the target at visible voxels changes nothing; at masked voxels it does
    target_vis = x + 3.0 * mask * torch.randn_like(x)
    target_hid = x + 3.0 * hidden * torch.randn_like(x)
    base = reconstruction_loss(recon, x, mask)
    assert torch.equal(reconstruction_loss(recon, target_vis, mask), base)
    assert not torch.allclose(reconstruction_loss(recon, target_hid, mask), base)


@pytest.mark.parametrize("block_sparse", ["off", "on"])
def test_reconstruction_does_not_depend_on_masked_input(block_sparse):
    s3d = make(block_sparse=block_sparse)
    x = images()
    mask = block_mask(2, PATCH, 16, 0.5)
    x2 = x + 4.0 * torch.randn_like(x) * (1 - mask)
    with torch.no_grad():
        a = s3d.forward_masked(x, mask).previews["reconstruction"]
        b = s3d.forward_masked(x2, mask).previews["reconstruction"]
    assert torch.equal(a, b)  # nothing of the masked content reaches any output voxel


TABLE_1A = {  # rows of the paper's Table 1a (adaptations added one after the other)
    "base": dict(sparse_conv=False, masked_norm=False, mask_token=False, densify=False),
    "+sparse conv + norm": dict(mask_token=False, densify=False),
    "+mask token": dict(densify=False),
    "+densify (S3D)": dict(),
}


@pytest.mark.parametrize("row", list(TABLE_1A))
def test_each_ablation_row_runs(row):
    s3d = make(**TABLE_1A[row])
    cfg = s3d.cfg
    assert (len(s3d.mask_tokens) > 0) == cfg.mask_token and (len(s3d.densify) > 0) == cfg.densify
    out = s3d(images())
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_other_switches_run():
    for kw in (dict(mask_input=False), dict(loss_masked_only=False), dict(masked_norm=False),
               dict(sparse_conv=False), dict(mask_ratio_range=None, mask_ratio=0.6)):
        out = make(**kw)(images())
        out.loss.backward()
        assert torch.isfinite(out.loss), kw


def test_dynamic_ratio_per_sample():
    s3d = make()  # default: U[0.6, 0.9] per sample
    torch.manual_seed(0)
    m = s3d.draw_mask(torch.zeros(64, 1, *PATCH))
    grid = m[:, :, ::8, ::8, ::8]  # one value per 8^3 block, constant inside it
    assert torch.equal(m, grid.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4))
    masked = (1 - grid).flatten(1).sum(1).tolist()  # 64 blocks: round(64 * r) in [38, 58]
    assert all(38 <= k <= 58 for k in masked)
    assert min(masked) <= 40 and max(masked) >= 56 and len(set(masked)) >= 15  # drawn per sample over the range


def test_transfer_state_dict_excludes_pretraining_parts():
    s3d = make()
    sd = s3d.transfer_state_dict()
    net_keys = set(s3d.network.state_dict())
    assert set(sd) == {k for k in net_keys if not k.startswith("decoder.seg_layers.")}
    assert not any(k.startswith(("mask_tokens", "densify")) for k in sd)
    assert any(k.startswith("mask_tokens") for k in s3d.state_dict())


def test_bad_mask_block_and_patch_are_refused():
    with pytest.raises(ValueError, match="multiple of the encoder's total stride 8"):
        make(mask_block=4)  # the nnssl flaw: smaller blocks than the total stride cannot mask the bottleneck
    with pytest.raises(ValueError, match="divisible by the mask block 8"):
        make()(torch.zeros(1, 1, 32, 32, 36))


def test_build_method_from_tiny_preset():
    cfg = get_preset("s3d-b-tiny")
    method = build_method(cfg)
    assert isinstance(method, S3D) and method.block == 8 and method.network.decoder.out_channels == 1
    cfg.method = dataclasses.replace(cfg.method, name="nope")
    with pytest.raises(ValueError, match="no pre-training method 'nope'"):
        build_method(cfg)


def _record_ops(s3d, x):
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        s3d(x).loss.backward()  # mask drawing, masked encoder, tokens, densify, decoder, loss, backward
    return rec.ops


def test_the_masked_dense_step_has_no_host_sync():
    ops = _record_ops(make(block_sparse="off"), images())
    assert {"sort", "convolution_backward"} <= set(ops)
    assert not set(ops) & {"nonzero", "_local_scalar_dense", "masked_select", "index", "index_put", "unique"}


def test_the_block_sparse_step_has_one_host_sync():
    ops = _record_ops(make(block_sparse="on"), images())
    assert ops["nonzero"] == 1  # finding the visible blocks, once per step
    assert not set(ops) & {"_local_scalar_dense", "masked_select", "unique"}


def _trained_like(s3d: S3D) -> S3D:
    for m in s3d.modules():  # the init zeroes each residual block's last norm weight: give every norm a value
        if isinstance(m, torch.nn.InstanceNorm3d):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return s3d


@pytest.mark.parametrize("kw", [dict(), dict(mask_input=False), dict(mask_block=16), dict(densify=False)])
def test_block_sparse_step_equals_the_masked_dense_step(kw):
    dense = _trained_like(make(block_sparse="off", **kw))
    sparse = make(block_sparse="on", **kw)
    sparse.load_state_dict(dense.state_dict())
    x = images()
    results = []
    for m in (dense, sparse):
        torch.manual_seed(5)  # the same mask
        loss = m(x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert sparse.block_stages(PATCH) == (4 if kw.get("mask_block") else 3) and dense.block_stages(PATCH) == 0
    assert abs(l1 - l0) <= 1e-5 * l0  # float32: equal up to rounding
    assert g0.keys() == g1.keys()
    scale = max(g.abs().max() for g in g0.values())
    for n in g0:
        if n.endswith(".conv.bias"):  # a bias before an instance norm: its exact gradient is 0, both are noise
            assert (g1[n] - g0[n]).abs().max() <= 1e-6 * scale, n
        else:
            assert (g1[n] - g0[n]).abs().max() <= 1e-5 * max(g0[n].abs().max(), 0.05 * scale), n


def test_block_sparse_under_bf16_autocast_matches_the_masked_dense_step():
    dense = make(block_sparse="off")
    sparse = make(block_sparse="on")
    sparse.load_state_dict(dense.state_dict())
    losses = []
    for m in (dense, sparse):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(images()).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16 rounds at 4e-3 per op
    assert all(torch.isfinite(p.grad).all() for p in sparse.parameters() if p.grad is not None)


def test_block_sparse_switch_is_checked_and_auto_follows_the_ratio():
    with pytest.raises(ValueError, match="block_sparse must be 'auto', 'on' or 'off'"):
        make(block_sparse="yes")
    with pytest.raises(ValueError, match="needs sparse_conv and masked_norm"):
        make(block_sparse="on", sparse_conv=False)
    with pytest.raises(ValueError, match="block_stages must be in"):
        make(block_stages=5)
    assert make().block_stages(PATCH) == 3  # default U[0.6, 0.9]: the stages whose blocks are >= 2 voxels
    assert make(block_stages=1).block_stages(PATCH) == 1
    assert make(mask_ratio_range=None, mask_ratio=0.3).block_stages(PATCH) == 0  # auto: below 0.5, masked-dense
    assert make(mask_ratio_range=None, mask_ratio=0.3, block_sparse="on").block_stages(PATCH) == 3
    assert make(masked_norm=False).block_stages(PATCH) == 0  # Table 1a rows without it: masked-dense


def test_data_parallel_rows_draw_the_masks_and_loss_of_the_whole_batch():
    s3d = make()
    x = images(batch=4)
    torch.manual_seed(7)
    whole_mask = s3d.draw_mask(x)
    parts = []
    for o in (0, 2):
        torch.manual_seed(7)  # every rank is reseeded with the same step seed
        parts.append(s3d.draw_mask(x[o:o + 2], sample_offset=o, global_batch=4))
    assert torch.equal(torch.cat(parts), whole_mask)
    torch.manual_seed(7)
    whole = s3d(x).loss
    halves = []
    for o in (0, 2):
        torch.manual_seed(7)
        halves.append(s3d(x[o:o + 2], sample_offset=o, global_batch=4).loss)
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)  # DDP's gradient average is exact
    with pytest.raises(ValueError, match="do not fit a global batch of 4"):
        s3d(x[:2], sample_offset=3, global_batch=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch.compile and bf16 autocast on CUDA)")
def test_block_sparse_step_compiles_under_bf16_autocast_on_a_gpu():
    dense = make(block_sparse="off").cuda()
    sparse = make(block_sparse="on").cuda()
    sparse.load_state_dict(dense.state_dict())
    compiled = torch.compile(sparse)
    x = images().cuda()
    losses = []
    for m in (dense, compiled):
        torch.manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in sparse.parameters() if p.grad is not None)
