"""Fixed 3D sin-cos position embedding: values by hand, row order, distinct rows, argument checks."""
import math

import numpy as np
import pytest
import torch

from volssl.models.pos_embed import sincos_pos_embed_3d


def test_values_of_a_tiny_grid_by_hand():
    # dim 6: one frequency (omega = 1) per axis -> [sin x, cos x, sin y, cos y, sin z, cos z]
    emb = sincos_pos_embed_3d((1, 1, 2), 6)
    assert emb.shape == (2, 6) and emb.dtype == torch.float32
    assert emb[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert emb[1].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0, math.sin(1.0), math.cos(1.0)])
    # dim 12: two frequencies per axis, omega = (1, 10000 ** -0.5 = 0.01)
    emb = sincos_pos_embed_3d((2, 1, 1), 12)
    s1, s2, c1, c2 = math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)
    assert emb[1].tolist() == pytest.approx([s1, s2, c1, c2, 0, 0, 1, 1, 0, 0, 1, 1])


def test_rows_follow_the_c_order_of_the_grid():
    grid = (2, 3, 4)
    emb = sincos_pos_embed_3d(grid, 18)
    for n in (0, 5, 13, 23):
        i, j, k = np.unravel_index(n, grid)
        assert emb[n, 0].item() == pytest.approx(0.0 if i == 0 else math.sin(i))  # first axis, omega 1
        assert emb[n, 6].item() == pytest.approx(math.sin(j))
        assert emb[n, 12].item() == pytest.approx(math.sin(k))


def test_rows_are_distinct_and_the_embedding_is_fixed():
    emb = sincos_pos_embed_3d(4, 48)
    assert emb.shape == (64, 48)
    dist = torch.cdist(emb, emb) + torch.eye(64) * 1e3
    assert dist.min() > 0.1  # no two tokens share a position code
    assert torch.equal(emb, sincos_pos_embed_3d((4, 4, 4), 48))  # deterministic: nothing learned
    assert emb.abs().max() <= 1.0


@pytest.mark.parametrize("grid, dim, match", [
    ((2, 2, 2), 8, "multiple of 6"), ((2, 2, 2), 0, "multiple of 6"), ((2, 2), 6, "three positive"),
    ((2, 0, 2), 6, "three positive"),
])
def test_bad_arguments_are_clear_errors(grid, dim, match):
    with pytest.raises(ValueError, match=match):
        sincos_pos_embed_3d(grid, dim)
