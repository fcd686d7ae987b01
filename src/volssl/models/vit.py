"""3D Vision Transformer encoder (MAE-XNT): cubic patches, fixed sin-cos positions, no class token.

The volume ``(B, C, X, Y, Z)`` is cut into non-overlapping ``p^3`` patches by a strided convolution
(``patch_embed.proj``), giving ``N = (X/p)(Y/p)(Z/p)`` tokens of width ``D`` in C order of the token
grid; the fixed embedding of :func:`~volssl.models.pos_embed.sincos_pos_embed_3d` is added (computed
for the input's grid, so any patch divisible by ``p`` works); then ``depth`` pre-norm transformer
blocks (MONAI's :class:`~monai.networks.blocks.TransformerBlock`: LayerNorm -> multi-head
self-attention (PyTorch's fused ``scaled_dot_product_attention``) -> residual, LayerNorm -> GELU MLP
-> residual) and a final LayerNorm.

MAE path: ``forward(x, ids_keep)`` keeps only the tokens listed in ``ids_keep`` (B, n) after the
position embedding, so the blocks see the visible tokens only. UNETR path: ``forward(x, hidden=(5,))``
also returns block outputs (``hidden_states``) for the decoder's skips.

State-dict keys::

    patch_embed.proj.{weight,bias}
    blocks.{i}.norm1.*  blocks.{i}.attn.qkv.{weight,bias}  blocks.{i}.attn.out_proj.*
    blocks.{i}.norm2.*  blocks.{i}.mlp.linear1.*  blocks.{i}.mlp.linear2.*
    norm.{weight,bias}

LayerNorms use eps 1e-6 and weights are initialised as in MAE (Xavier-uniform linear layers and
patch projection, zero biases), matching the MAE-XNT public model.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from monai.networks.blocks import TransformerBlock
from torch import Tensor, nn

from volssl.models.pos_embed import sincos_pos_embed_3d

LN_EPS = 1e-6


class ViTOutput(NamedTuple):
    """What :class:`ViTEncoder3D` returns.

    ``tokens``: ``(B, n, D)`` the last block's output after the final LayerNorm (``n = N``, or the
    kept tokens on the MAE path); ``hidden_states``: the requested blocks' outputs ``(B, n, D)``
    (before any norm), in the order asked; ``grid``: the token grid ``(X/p, Y/p, Z/p)`` of the input.
    """

    tokens: Tensor
    hidden_states: list[Tensor]
    grid: tuple[int, int, int]


def transformer_block(dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                      eps: float = LN_EPS) -> TransformerBlock:
    """One pre-norm transformer block (MONAI ``TransformerBlock``, fused attention, no dropout).

    MONAI always builds a ``norm_cross_attn`` LayerNorm, used only with cross-attention; it is
    replaced by an identity here so that the block has no parameter without a gradient.
    """
    if dim % heads:
        raise ValueError(f"transformer block: dim {dim} is not divisible by heads {heads}")
    block = TransformerBlock(hidden_size=dim, mlp_dim=int(round(dim * mlp_ratio)), num_heads=heads, dropout_rate=0.0,
                             qkv_bias=qkv_bias, use_flash_attention=True)
    block.norm_cross_attn = nn.Identity()
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return block


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear weights and zero biases; LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchEmbed3D(nn.Module):
    """Non-overlapping ``p^3`` patches -> tokens: ``(B, C, X, Y, Z) -> (B, N, D)``, C order of the grid."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # Xavier on the flattened (D, C p^3) matrix, as MAE does for its linear patch projection
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTEncoder3D(nn.Module):
    """3D ViT encoder for cubic-patch tokens (see the module docstring).

    Args:
        in_channels: input channels (1 for MAE-XNT's grey-level volumes).
        dim: token width ``D`` (a multiple of 6 for the 3D sin-cos embedding; ViT-B: 768).
        depth: transformer blocks (ViT-B: 12).
        heads: attention heads (ViT-B: 12; ``dim`` must be divisible by it).
        patch_size: side ``p`` of the cubic patches in voxels (MAE-XNT: 4; ablation: 8).
        mlp_ratio: MLP hidden width / ``dim``.
        qkv_bias: bias on the query/key/value projection (MAE: yes).

    Attributes ``in_channels``, ``total_stride`` (= ``patch_size``) and ``num_layers`` (= ``depth``)
    are what fine-tuning, transfer and layer-wise lr decay rely on.
    """

    def __init__(self, in_channels: int = 1, dim: int = 768, depth: int = 12, heads: int = 12, patch_size: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("depth", depth), ("heads", heads),
                            ("patch_size", patch_size)):
            if int(value) < 1:
                raise ValueError(f"ViT encoder: {name} must be >= 1, got {value}")
        if dim < 6 or dim % 6:
            raise ValueError(f"ViT encoder: dim must be a positive multiple of 6 (3D sin-cos position embedding), "
                             f"got {dim}")
        if dim % heads:
            raise ValueError(f"ViT encoder: dim {dim} is not divisible by heads {heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"ViT encoder: mlp_ratio must be > 0, got {mlp_ratio}")
        self.in_channels = int(in_channels)
        self.dim = int(dim)
        self.depth = int(depth)
        self.heads = int(heads)
        self.patch_size = int(patch_size)
        self.patch_embed = PatchEmbed3D(self.in_channels, self.dim, self.patch_size)
        self.blocks = nn.ModuleList(transformer_block(self.dim, self.heads, mlp_ratio, qkv_bias)
                                    for _ in range(self.depth))
        self.norm = nn.LayerNorm(self.dim, eps=LN_EPS)
        self.blocks.apply(init_vit_weights)
        init_vit_weights(self.norm)
        self._pos_cache: dict[tuple, Tensor] = {}

    @property
    def total_stride(self) -> int:
        """Input voxels per token along each axis (the patch size)."""
        return self.patch_size

    @property
    def num_layers(self) -> int:
        """Transformer blocks (the ``L`` of layer-wise lr decay)."""
        return self.depth

    def grid_of(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Token grid of a ``(X, Y, Z)`` patch (ValueError unless every side is divisible by ``p``)."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != 3 or any(s < self.patch_size or s % self.patch_size for s in spatial):
            raise ValueError(f"ViT encoder: patch {spatial} must be three sides divisible by the patch size "
                             f"{self.patch_size}")
        return tuple(s // self.patch_size for s in spatial)  # type: ignore[return-value]

    def pos_embed(self, grid: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """The fixed ``(N, D)`` position embedding of ``grid`` (cached per grid, device and dtype)."""
        key = (tuple(int(g) for g in grid), str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed_3d(key[0], self.dim, device=device, dtype=dtype)
        return self._pos_cache[key]

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Patch tokens plus position embedding: ``(B, C, X, Y, Z) -> ((B, N, D), grid)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ViT encoder: expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        grid = self.grid_of(x.shape[2:])
        tokens = self.patch_embed(x)
        return tokens + self.pos_embed(grid, tokens.device).to(tokens.dtype), grid

    def forward(self, x: Tensor, ids_keep: Tensor | None = None,
                hidden: Sequence[int] | None = ()) -> ViTOutput:
        """Encode ``x`` (B, C, X, Y, Z).

        Args:
            x: the input patch; every side divisible by the patch size.
            ids_keep: ``(B, n)`` int64 indices (into the ``N`` tokens, C order of the grid) of the
                tokens to keep (MAE: the visible ones); None: all tokens.
            hidden: block indices (0-based) whose outputs to return in ``hidden_states``; None: all
                blocks; ``()``: none.

        Returns:
            :class:`ViTOutput` ``(tokens (B, n, D) after the final norm, hidden_states, grid)``.
        """
        tokens, grid = self.embed(x)
        if ids_keep is not None:
            if ids_keep.ndim != 2 or ids_keep.shape[0] != x.shape[0]:
                raise ValueError(f"ViT encoder: ids_keep must be (B, n) = ({x.shape[0]}, n), got "
                                 f"{tuple(ids_keep.shape)}")
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        wanted = range(self.depth) if hidden is None else [int(i) for i in hidden]
        for i in wanted:
            if not 0 <= i < self.depth:
                raise ValueError(f"ViT encoder: hidden block index {i} outside [0, {self.depth})")
        keep = set(wanted)
        states: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in keep:
                states[i] = tokens
        return ViTOutput(self.norm(tokens), [states[i] for i in wanted], grid)
