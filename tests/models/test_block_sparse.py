"""Block-sparse encoding (models/block_sparse.py): the same numbers as the masked-dense encoder."""
import pytest
import torch

from volssl.config import ModelConfig
from volssl.methods.masking import block_mask, upsample_mask
from volssl.models.block_sparse import (BlockGrid, BlockNormAct, BlocksToDense, Halo, dense_to_blocks,
                                        encode_block_sparse)
from volssl.models.registry import build_model


def _grid_case(seed=0):
    torch.manual_seed(seed)
    mask = block_mask(2, (12, 8, 16), 4, 0.5).double()  # a non-cubic 3 x 2 x 4 grid of 4^3 blocks
    return mask, BlockGrid(mask, 4)


def test_grid_lists_the_visible_blocks_of_each_sample_in_order():
    mask, grid = _grid_case()
    assert grid.grid == (3, 2, 4) and grid.batch == 2 and grid.n == 24  # 12 of 24 blocks visible per sample
    assert grid.sample.tolist() == sorted(grid.sample.tolist())
    cells = mask[:, 0, ::4, ::4, ::4]
    assert torch.all(cells[grid.sample, grid.ix, grid.iy, grid.iz] == 1)
    assert grid.blocks_per_sample.tolist() == [12.0, 12.0] and grid.visible_fraction == 0.5
    with pytest.raises(ValueError, match="not divisible by the block 5"):
        BlockGrid(mask, 5)


@pytest.mark.parametrize("lo,hi", [(1, 1), (1, 0), (2, 1)])
def test_halo_is_the_neighbourhood_cut_from_the_dense_tensor_and_its_gradient_checks(lo, hi):
    mask, grid = _grid_case()
    x = torch.randn(grid.n, 2, 4, 4, 4, dtype=torch.double, requires_grad=True)
    dense = BlocksToDense.apply(x, grid)  # zero at masked blocks, as the masked-dense path leaves them
    assert torch.equal(dense * (1 - mask), torch.zeros_like(dense))
    ours = Halo.apply(x, grid, lo, hi)
    ref = dense_to_blocks(dense, grid, lo, hi)  # plain autograd ops: pad, unfold, index
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    y = torch.randn_like(ours)  # the hand-written backwards against autograd's (both are linear maps)
    torch.testing.assert_close(torch.autograd.grad((ours * y).sum(), x)[0],
                               torch.autograd.grad((ref * y).sum(), x)[0], rtol=1e-12, atol=1e-12)
    small = torch.randn(grid.n, 1, 4, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: BlocksToDense.apply(t, grid)[:, :, :6], (small,))


@pytest.mark.parametrize("slope", [0.01, None])
def test_block_norm_equals_the_masked_norm_over_each_samples_visible_voxels(slope):
    from volssl.models.resenc_unet import MaskedNormAct, make_mask_level

    mask, grid = _grid_case(1)
    x = (torch.randn(grid.n, 2, 4, 4, 4, dtype=torch.double) * 2 + 1).requires_grad_()
    w = torch.randn(2, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, dtype=torch.double, requires_grad=True)
    count = grid.voxels_per_sample(4)
    ours = BlocksToDense.apply(BlockNormAct.apply(x, grid.sample, count, w, b, 1e-5, slope), grid)
    dense = BlocksToDense.apply(x, grid)
    ref = MaskedNormAct.apply(dense, mask, make_mask_level(mask).count, w, b, 1e-5, slope)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    y = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad((ours * y).sum(), (x, w, b)),
                               torch.autograd.grad((ref * y).sum(), (x, w, b)), rtol=1e-10, atol=1e-12)
    # MaskedNormAct's own backward is gradchecked in test_resenc_unet; the weight and bias here:
    assert torch.autograd.gradcheck(lambda w, b: BlockNormAct.apply(x.detach(), grid.sample, count, w, b, 1e-5,
                                                                    slope), (w, b))


def _encoder(dtype=torch.double, seed=0):
    torch.manual_seed(seed)
    net = build_model(ModelConfig(arch="resenc-tiny")).to(dtype)
    for m in net.modules():  # trained-like norms (the init zeroes each block's last norm weight)
        if isinstance(m, torch.nn.InstanceNorm3d):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return net.encoder


def _outputs_and_grads(outputs, weights, params, x):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return [o.detach() for o in outputs], torch.autograd.grad(loss, params + [x])


@pytest.mark.parametrize("unit", [8, 16])
def test_every_stage_and_every_gradient_equal_the_masked_dense_encoder(unit):
    enc = _encoder()
    params = list(enc.parameters())
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.double, requires_grad=True)
    mask = upsample_mask(block_mask(2, (32 // unit,) * 3, 1, (0.3, 0.8)), unit).double()
    dense = enc(x, mask)
    weights = [torch.randn_like(o) for o in dense]
    ref_out, ref_grad = _outputs_and_grads(dense, weights, params, x)
    for n in range(1, len(enc.stages) + 1):
        out, grad = _outputs_and_grads(encode_block_sparse(enc, x, mask, n, unit=unit), weights, params, x)
        for s, (a, b) in enumerate(zip(out, ref_out)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"stage {s} with {n} block stages")
        scale = max(g.abs().max() for g in ref_grad)
        for g, r in zip(grad, ref_grad):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11 * scale)


def test_block_sparse_leaks_nothing_from_the_masked_input():
    enc = _encoder(torch.float32)
    torch.manual_seed(3)
    mask = block_mask(2, (32,) * 3, 8, 0.5)
    x = torch.randn(2, 1, 32, 32, 32)
    x2 = x + 5.0 * torch.randn_like(x) * (1 - mask)
    with torch.no_grad():
        a = encode_block_sparse(enc, x, mask, len(enc.stages))
        b = encode_block_sparse(enc, x2, mask, len(enc.stages))
    for s, (va, vb, c) in enumerate(zip(a, b, enc.cumulative_strides)):
        assert torch.equal(va, vb), f"stage {s}: visible output depends on masked input"
        assert torch.all(va * (1 - mask[:, :, ::c, ::c, ::c]) == 0) and va.abs().sum() > 0


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_nothing_or_everything_masked(ratio):
    enc = _encoder(torch.float32)
    x = torch.randn(2, 1, 32, 32, 32)
    mask = block_mask(2, (32,) * 3, 8, ratio)
    with torch.no_grad():
        for a, b in zip(encode_block_sparse(enc, x, mask, 2), enc(x, mask)):
            assert (a - b).abs().max() <= 1e-5 * max(b.abs().max(), 1.0)  # float32: equal up to rounding
