"""Layer-wise learning-rate decay for fine-tuning ViT encoders (BEiT / MAE; MAE-XNT's fine-tuning).

Each parameter gets a layer id: the embeddings (patch projection, position / class / mask tokens)
are layer 0, encoder block ``i`` (0-based) is layer ``i + 1``, and everything after the blocks (the
encoder's final norm, the decoder, the heads) is layer ``L + 1``, where ``L`` is the number of
blocks. Its learning rate is the peak (scheduled) lr times::

    lr_scale = layer_decay ** (L + 1 - layer_id)

so the decoder learns at the full rate, the last block at ``layer_decay`` times it, and the
embeddings at ``layer_decay ** (L + 1)`` (MAE's convention, whose ``num_layers`` is our ``L + 1``).
:func:`param_groups_lrd` returns optimiser parameter groups carrying ``lr_scale`` (honoured by
:class:`volssl.training.optim.StepSchedule` and :func:`~volssl.training.optim.build_optimizer`) and
their own ``weight_decay``: as in MAE, biases, norm weights (any 1-d parameter) and the names in
``no_weight_decay`` are not decayed.
"""
from __future__ import annotations

import re
from typing import Collection, Iterable

from torch import nn

#: parameter names (after the encoder prefix) that belong to the embedding layer (layer 0)
EMBEDDING_NAMES = ("patch_embed.", "pos_embed", "cls_token", "mask_token")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int, encoder_prefix: str = "encoder.") -> int:
    """The layer of parameter ``name`` in a network whose ViT encoder (``num_layers`` blocks) sits
    under ``encoder_prefix`` ("" for a bare encoder): embeddings 0, block ``i`` -> ``i + 1``, anything
    else (final norm, decoder, heads) ``num_layers + 1``."""
    if num_layers < 1:
        raise ValueError(f"layer_id: num_layers must be >= 1, got {num_layers}")
    if not name.startswith(encoder_prefix):
        return num_layers + 1
    rest = name[len(encoder_prefix):]
    if rest.startswith(EMBEDDING_NAMES):
        return 0
    m = _BLOCK.match(rest)
    if m:
        block = int(m.group(1))
        if block >= num_layers:
            raise ValueError(f"layer_id: {name!r} names block {block} but the encoder has {num_layers} blocks")
        return block + 1
    return num_layers + 1


def layer_scales(num_layers: int, layer_decay: float) -> list[float]:
    """``lr_scale`` of layers ``0 .. num_layers + 1``: ``layer_decay ** (num_layers + 1 - id)``."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
    return [float(layer_decay) ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def encoder_depth(model: nn.Module) -> int:
    """Blocks of ``model.encoder`` (or of ``model`` itself): its ``num_layers``, else ``len(blocks)``."""
    enc = getattr(model, "encoder", model)
    depth = getattr(enc, "num_layers", None)
    if depth is None and isinstance(getattr(enc, "blocks", None), nn.ModuleList):
        depth = len(enc.blocks)
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"layer-wise lr decay needs a transformer encoder with blocks (encoder.blocks / "
                         f"encoder.num_layers); {type(enc).__name__} has none")
    return depth


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float,
                     no_weight_decay: Collection[str] = ("pos_embed", "cls_token", "mask_token"),
                     num_layers: int | None = None, names: Iterable[str] | None = None,
                     encoder_prefix: str | None = None) -> list[dict]:
    """Optimiser parameter groups with layer-wise lr decay (see the module docstring).

    Args:
        model: a segmentation network with a ViT ``encoder`` (or a bare encoder).
        weight_decay: the decay of matrices and convolution kernels.
        layer_decay: the per-layer lr factor in (0, 1] (1: no decay).
        no_weight_decay: name fragments never decayed (besides every 1-d parameter).
        num_layers: encoder blocks ``L`` (default: :func:`encoder_depth`).
        names: only these parameters (default: every parameter with ``requires_grad``).
        encoder_prefix: where the encoder's parameters live ("encoder." when ``model`` has an
            ``encoder``, else "").

    Returns:
        groups ``{"params", "weight_decay", "lr_scale", "layer_id"}``, one per (layer, decayed or
        not) that holds parameters, ordered by layer then decayed-first (a deterministic order, so
        optimiser states resume exactly).
    """
    if weight_decay < 0:
        raise ValueError(f"param_groups_lrd: weight_decay must be >= 0, got {weight_decay}")
    depth = encoder_depth(model) if num_layers is None else int(num_layers)
    scales = layer_scales(depth, layer_decay)
    prefix = encoder_prefix if encoder_prefix is not None else ("encoder." if hasattr(model, "encoder") else "")
    wanted = None if names is None else set(names)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if (wanted is None and not p.requires_grad) or (wanted is not None and name not in wanted):
            continue
        lid = layer_id(name, depth, prefix)
        decay = p.ndim > 1 and not any(frag in name for frag in no_weight_decay)
        group = groups.setdefault((lid, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                 "lr_scale": scales[lid], "layer_id": lid})
        group["params"].append(p)
    if wanted is not None:
        missing = wanted - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"param_groups_lrd: no parameters named {sorted(missing)[:5]}")
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]
