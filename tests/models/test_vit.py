"""3D ViT encoder: token shapes, the kept-token (MAE) path, hidden states, fixed positions, state dict."""
import pytest
import torch

from volssl.models.pos_embed import sincos_pos_embed_3d
from volssl.models.vit import ViTEncoder3D


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ViTEncoder3D(in_channels=2, dim=48, depth=3, heads=4, patch_size=4).eval()


def test_tokens_hidden_states_and_grid(encoder):
    x = torch.randn(2, 2, 16, 8, 12)
    out = encoder(x, hidden=None)
    assert out.grid == (4, 2, 3) and out.tokens.shape == (2, 24, 48)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 24, 48) for h in out.hidden_states)
    # the final output is the last block's output after the final norm
    assert torch.allclose(out.tokens, encoder.norm(out.hidden_states[-1]))
    picked = encoder(x, hidden=(2, 0))
    assert torch.equal(picked.hidden_states[0], out.hidden_states[2])
    assert torch.equal(picked.hidden_states[1], out.hidden_states[0])
    assert encoder(x).hidden_states == []
    assert encoder.total_stride == 4 and encoder.in_channels == 2 and encoder.num_layers == 3


def test_position_embedding_is_added_before_tokens_are_dropped(encoder):
    x = torch.randn(1, 2, 8, 8, 8)
    full = encoder(x).tokens
    tokens, grid = encoder.embed(x)
    plain = encoder.patch_embed(x)
    assert torch.allclose(tokens - plain, sincos_pos_embed_3d(grid, 48).unsqueeze(0), atol=1e-6)
    # keeping every token in a shuffled order permutes the output rows: each token keeps its position code
    perm = torch.randperm(8)
    shuffled = encoder(x, ids_keep=perm.unsqueeze(0)).tokens
    assert torch.allclose(shuffled, full[:, perm], atol=1e-5)
    # keeping a subset: the blocks see only those tokens (attention among the kept ones)
    keep = torch.tensor([[1, 6, 3]])
    sub = encoder(x, ids_keep=keep).tokens
    manual = tokens[:, keep[0]]
    for block in encoder.blocks:
        manual = block(manual)
    assert sub.shape == (1, 3, 48) and torch.allclose(sub, encoder.norm(manual), atol=1e-6)
    assert not torch.allclose(sub, full[:, keep[0]], atol=1e-3)


def test_positions_are_not_parameters_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    enc = ViTEncoder3D(in_channels=1, dim=24, depth=2, heads=2, patch_size=2)
    keys = set(enc.state_dict())
    assert not any("pos" in k for k in keys) and not any("cross" in k for k in keys)
    assert {"patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.mlp.linear1.weight", "norm.weight"} <= keys
    enc(torch.randn(2, 1, 4, 4, 4)).tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    # MAE's initialisation: Xavier-uniform linear weights, zero biases, eps 1e-6 norms
    assert enc.blocks[0].attn.qkv.bias.abs().sum() == 0 and enc.norm.eps == 1e-6 and enc.blocks[0].norm1.eps == 1e-6


def test_bad_inputs_and_widths_are_clear_errors(encoder):
    with pytest.raises(ValueError, match="divisible by the patch size"):
        encoder(torch.randn(1, 2, 10, 8, 8))
    with pytest.raises(ValueError, match=r"expected input \(B, 2"):
        encoder(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="ids_keep"):
        encoder(torch.randn(1, 2, 8, 8, 8), ids_keep=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="hidden block index 3"):
        encoder(torch.randn(1, 2, 8, 8, 8), hidden=(3,))
    with pytest.raises(ValueError, match="multiple of 6"):
        ViTEncoder3D(dim=64, heads=4)
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViTEncoder3D(dim=48, heads=5)
