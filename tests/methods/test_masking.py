"""Block masks on the bottleneck grid: exact counts, ratios, alignment, reproducibility."""
import pytest
import torch

from volssl.methods.masking import block_mask, grid_mask, sample_ratios, token_mask


def test_static_ratio_masks_the_exact_count_per_sample():
    torch.manual_seed(0)
    g = grid_mask(16, (5, 5, 5), 0.75)
    assert g.shape == (16, 1, 5, 5, 5)
    masked = (g == 0).flatten(1).sum(1)
    assert torch.all(masked == round(0.75 * 125))  # 94 of 125 cells, in every sample
    assert not torch.equal(g[0], g[1])  # different cells per sample


def test_dynamic_ratios_are_drawn_per_sample_in_range():
    torch.manual_seed(0)
    r = sample_ratios(2000, (0.6, 0.9))
    assert r.min() >= 0.6 and r.max() <= 0.9 and r.std() > 0.05
    g = grid_mask(64, (5, 5, 5), (0.6, 0.9))
    frac = (g == 0).flatten(1).float().mean(1)
    assert frac.min() >= 0.6 - 0.5 / 125 and frac.max() <= 0.9 + 0.5 / 125
    assert len(set(frac.tolist())) > 5


def test_s3d_default_mask_is_5_cubed_blocks_of_32_on_a_160_patch():
    torch.manual_seed(0)
    m = block_mask(1, (160, 160, 160), 32, 0.75)
    assert m.shape == (1, 1, 160, 160, 160) and m.dtype == torch.float32
    blocks = m.view(5, 32, 5, 32, 5, 32).permute(0, 2, 4, 1, 3, 5).reshape(125, -1)
    assert torch.all(blocks.min(1).values == blocks.max(1).values)  # constant on each aligned 32^3 block
    assert int((blocks[:, 0] == 0).sum()) == 94
    # sampling every 32nd voxel recovers the bottleneck-grid mask exactly
    assert torch.equal(m[:, :, ::32, ::32, ::32].flatten(), blocks[:, 0])


def test_masks_come_from_the_global_rng():
    torch.manual_seed(5)
    a = block_mask(2, (64, 64, 64), 16, (0.6, 0.9))
    torch.manual_seed(5)
    b = block_mask(2, (64, 64, 64), 16, (0.6, 0.9))
    assert torch.equal(a, b)


def test_token_mask_amaes():
    torch.manual_seed(0)
    m = token_mask(2, (32, 32, 32))
    assert torch.all((m[:, :, ::4, ::4, ::4] == 0).flatten(1).sum(1) == round(0.6 * 512))


@pytest.mark.parametrize("patch,block,ratio,msg", [
    ((160, 160, 150), 32, 0.75, "not divisible"),
    ((64, 64, 64), 16, 1.5, "0 <= lo <= hi <= 1"),
    ((64, 64, 64), 16, (0.9, 0.6), "0 <= lo <= hi <= 1"),
])
def test_bad_arguments_are_clear_errors(patch, block, ratio, msg):
    with pytest.raises(ValueError, match=msg):
        block_mask(1, patch, block, ratio)


def test_rows_of_a_global_batch_equal_the_whole_draw():
    torch.manual_seed(3)
    whole = block_mask(6, (32, 32, 32), 16, (0.6, 0.9))
    rows = []
    for o in (0, 2, 4):
        torch.manual_seed(3)
        rows.append(block_mask(2, (32, 32, 32), 16, (0.6, 0.9), sample_offset=o, global_batch=6))
    assert torch.equal(torch.cat(rows), whole)
