"""Import SwinUNETR weights (the authors' self-supervised releases, MONAI fine-tuned models) as volssl
checkpoints of a ``swinunetr`` architecture (:mod:`volssl.models.swinunetr`).

Accepted files (read with ``torch.load(weights_only=True)``, see
:func:`~volssl.models.checkpoint_import.load_untrusted`): a dict with a ``state_dict`` or ``model``
entry, or a bare state dict. Key layouts:

* the authors' released Swin ViT (``model_swinvit.pt`` of MONAI research-contributions
  ``SwinUNETR/Pretrain``, what ``SwinUNETR.load_from`` reads): ``module.patch_embed.*``,
  ``module.layers1.0.blocks.0.*`` ..., with the MLP named ``mlp.fc1`` / ``mlp.fc2`` (MONAI:
  ``mlp.linear1`` / ``mlp.linear2``);
* checkpoints of the authors' pre-training script (``SSLHead``): the Swin ViT under ``swinViT.`` or,
  in later releases of that code, ``swin_vit.``, often behind DDP's ``module.``; the SSL heads
  (``rotation_pre/head``, ``contrastive_pre/head``, ``conv`` = reconstruction head) are dropped;
* MONAI ``SwinUNETR`` state dicts (fine-tuned models, e.g. the BTCV release): ``swinViT.*`` plus the
  conv decoder ``encoder1..4``, ``encoder10``, ``decoder1..5`` (kept, under ``decoder.``) and the
  task head ``out.*`` (dropped, as nnssl imports drop their output convs);
* MONAI's ``ssl_pretrained_weights.pth`` layout (``encoder.layersN.0.0.*``, see MONAI's
  ``filter_swinunetr``) and volssl's own (``encoder.layersN.0.*``).

``module.``, ``_orig_mod.`` and ``backbone.`` prefixes are stripped. The feature size and input
channels come from the patch embedding, the depths from the block indices, the heads and window
from the relative-position tables; the architecture is the registered ``swinunetr``-family one with
those heads and window (``arch`` to choose). Any key with no counterpart, a missing Swin tensor or a
shape that differs is refused with a message naming the key and both shapes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from volssl.config import ModelConfig, RunConfig, config_to_dict
from volssl.models.checkpoint_import import ImportReport, _plain, load_untrusted, peel_prefixes
from volssl.models.registry import ArchSpec, build_model, get_arch, load_architectures
from volssl.models.swinunetr import feature_widths

_STRIP = ("module.", "_orig_mod.", "backbone.")
_SWIN_PREFIXES = ("swinViT.", "swin_vit.", "encoder.")
_SWIN_BARE = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")
_DECODER = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.",
            "decoder1.", "decoder2.", "decoder3.", "decoder4.", "decoder5.")
_HEADS = ("rotation_pre.", "rotation_head.", "contrastive_pre.", "contrastive_head.", "conv.", "convTrans3d.",
          "out.", "norm.", "mask_token")
_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
_NESTED_LAYER = re.compile(r"^(layers[1-4])\.0\.0\.")
PATCH_EMBED = "encoder.patch_embed.proj.weight"
DEFAULT_PATCH = (96, 96, 96)  # the authors' ROI


def _strip(key: str) -> tuple[str, list[str]]:
    return peel_prefixes(key, _STRIP)


def map_key(key: str) -> tuple[str | None, str]:
    """``(our key or None, kind)`` for a source key (prefixes already stripped); kind is "encoder",
    "decoder", "dropped" (an SSL / task head) or "unknown"."""
    swin = None
    for p in _SWIN_PREFIXES:
        if key.startswith(p):
            swin = key[len(p):]
            break
    if swin is None and key.startswith(_SWIN_BARE):
        swin = key
    if swin is not None:
        if swin.startswith(("mask_token", "norm.")):
            return None, "dropped"  # encoder-level extras of other SSL codes (MONAI's filter_swinunetr drops them)
        swin = _NESTED_LAYER.sub(r"\1.0.", swin)
        for old, new in _RENAMES:
            swin = swin.replace(old, new)
        return "encoder." + swin, "encoder"
    if key.startswith(_DECODER):
        return "decoder." + key, "decoder"
    if key.startswith(_HEADS):
        return None, "dropped"
    return None, "unknown"


def _state_dict(data: Any, where: str) -> tuple[Mapping[str, Any], str]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a state dict or a dict with 'state_dict' / 'model', got "
                         f"{type(data).__name__}")
    if data.get("format") == "volssl":
        raise ValueError(f"{where}: already a volssl checkpoint (kind {data.get('kind')!r}); no import needed")
    for entry in ("state_dict", "model"):
        value = data.get(entry)
        if isinstance(value, Mapping) and value and all(isinstance(v, Tensor) for v in value.values()):
            return value, entry
    if data and all(isinstance(v, Tensor) for v in data.values()):
        return data, "bare"
    raise ValueError(f"{where}: no SwinUNETR state dict: neither a 'state_dict' nor a 'model' entry of tensors, "
                     f"nor a bare state dict (keys: {sorted(map(str, data))[:8]})")


def infer_architecture(weights: Mapping[str, Tensor], where: str = "checkpoint") -> dict[str, Any]:
    """``{"feature_size", "in_channels", "depths", "num_heads", "window_size"}`` of mapped ``encoder.*`` weights."""
    embed = weights.get(PATCH_EMBED)
    if not isinstance(embed, Tensor) or embed.ndim != 5:
        raise ValueError(f"{where}: no 3D patch embedding {PATCH_EMBED!r} (Swin ViT 'patch_embed.proj.weight'): "
                         "not a SwinUNETR / Swin ViT state dict")
    if tuple(embed.shape[2:]) != (2, 2, 2):
        raise ValueError(f"{where}: patch embedding kernel {tuple(embed.shape[2:])}; volssl's swinunetr uses "
                         "2^3 patches")
    depths, heads, windows = [], [], []
    for i in range(1, 5):
        prefix = f"encoder.layers{i}.0.blocks."
        blocks = {int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix)}
        if not blocks:
            raise ValueError(f"{where}: no Swin blocks of stage {i} ({prefix}*)")
        depths.append(max(blocks) + 1)
        table = weights.get(f"{prefix}0.attn.relative_position_bias_table")
        if not isinstance(table, Tensor) or table.ndim != 2:
            raise ValueError(f"{where}: no {prefix}0.attn.relative_position_bias_table")
        side = round(table.shape[0] ** (1 / 3))
        if side ** 3 != table.shape[0] or side % 2 == 0:
            raise ValueError(f"{where}: {prefix}0.attn.relative_position_bias_table has {table.shape[0]} rows, not "
                             "(2w - 1)^3 for a cubic window w")
        heads.append(int(table.shape[1]))
        windows.append((side + 1) // 2)
    if len(set(windows)) != 1:
        raise ValueError(f"{where}: windows differ between stages ({windows})")
    return {"feature_size": int(embed.shape[0]), "in_channels": int(embed.shape[1]), "depths": tuple(depths),
            "num_heads": tuple(heads), "window_size": windows[0]}


def _choose_arch(found: dict[str, Any], arch: str | None, where: str) -> ModelConfig:
    if arch is not None:
        spec = get_arch(arch)
        if spec.family != "swinunetr":
            raise ValueError(f"{where}: arch {arch!r} is a {spec.family!r} network, not a SwinUNETR")
        specs = [spec]
    else:
        specs = [s for s in load_architectures().values() if s.family == "swinunetr"]

    def fits(s: ArchSpec) -> bool:
        return (tuple(s.options.get("num_heads", ())) == found["num_heads"]
                and int(s.options.get("window_size", -1)) == found["window_size"])

    exact = [s for s in specs if fits(s) and s.features == feature_widths(found["feature_size"])
             and s.blocks == found["depths"]]
    usable = exact or [s for s in specs if fits(s)]
    if not usable:
        have = ", ".join(f"{s.name} (heads {tuple(s.options.get('num_heads', ()))}, window "
                         f"{s.options.get('window_size')})" for s in specs)
        raise ValueError(f"{where}: a Swin ViT with heads {found['num_heads']} and window {found['window_size']} fits "
                         f"no registered SwinUNETR architecture: {have}")
    spec = usable[0]
    features = feature_widths(found["feature_size"])
    return ModelConfig(arch=spec.name, in_channels=found["in_channels"], out_channels=1,
                       features=None if features == spec.features else features,
                       blocks=None if found["depths"] == spec.blocks else found["depths"])


def map_swinunetr_state_dict(source: Mapping[str, Any], where: str = "checkpoint"
                             ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """``(mapped weights, dropped source keys, stripped prefixes)``; ValueError listing unknown keys."""
    mapped: dict[str, Tensor] = {}
    dropped, unknown, prefixes = [], [], set()
    for key, value in source.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        bare, stripped = _strip(str(key))
        prefixes.update(stripped)
        ours, kind = map_key(bare)
        if kind == "unknown":
            unknown.append(str(key))
        elif ours is None:
            dropped.append(str(key))
        elif ours in mapped:
            raise ValueError(f"{where}: two source keys map to {ours!r} (the second is {key!r})")
        else:
            mapped[ours] = value
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} keys have no counterpart in a SwinUNETR (is this a SwinUNETR / "
                         f"Swin ViT state dict?): {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
    return mapped, sorted(dropped), sorted(prefixes)


def convert_swinunetr(src: str | os.PathLike, arch: str | None = None) -> tuple[dict[str, Any], ImportReport]:
    """Read the SwinUNETR checkpoint ``src``; return ``(volssl checkpoint payload, report)``.

    The payload follows docs/design.md ("Checkpoint") with ``kind="import"``, no optimiser state, the
    authors' 96^3 ROI as patch size and a ``source`` record; write it with
    :func:`volssl.training.checkpoint.save_checkpoint`. ``arch``: a ``swinunetr``-family architecture
    (default: the registered one whose heads and window fit).
    """
    src = Path(src)
    where = str(src)
    data = load_untrusted(src)
    state, container = _state_dict(data, where)
    mapped, dropped, prefixes = map_swinunetr_state_dict(state, where)
    found = infer_architecture(mapped, where)
    model_cfg = _choose_arch(found, arch, where)
    target = {k: tuple(v.shape) for k, v in build_model(model_cfg, device="meta").state_dict().items()}
    report = ImportReport(dropped=list(dropped))
    mismatched, extra = [], []
    for key, value in mapped.items():
        if key.startswith("decoder.seg_layers."):
            continue
        if key not in target:
            extra.append(key)
        elif tuple(value.shape) != target[key]:
            mismatched.append(f"{key}: expected {target[key]}, found {tuple(value.shape)}")
    if mismatched:
        raise ValueError(f"{where}: {len(mismatched)} tensors do not fit {model_cfg.arch!r}: "
                         + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensors have no counterpart in {model_cfg.arch!r}: "
                         + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    missing_encoder = [k for k in target if k.startswith("encoder.") and k not in mapped
                       and not k.endswith("relative_position_index")]  # a constant buffer: the fresh one is right
    if missing_encoder:
        raise ValueError(f"{where}: {len(missing_encoder)} Swin ViT tensors are missing: "
                         + ", ".join(missing_encoder[:8]) + (" ..." if len(missing_encoder) > 8 else ""))
    report.missing = [k for k in target if k not in mapped and not k.startswith("decoder.seg_layers.")]
    network = {k: v.detach().clone().contiguous() for k, v in mapped.items()}
    report.mapped = len(network)

    run_cfg = RunConfig(description=f"imported from SwinUNETR checkpoint {src.name}", model=model_cfg)
    run_cfg.data = dataclasses.replace(run_cfg.data, patch_size=DEFAULT_PATCH)
    extras = data if container != "bare" else {}
    payload = {
        "kind": "import", "tag": "import", "config": config_to_dict(run_cfg), "model": config_to_dict(model_cfg),
        "network": network, "encoder_keys": "encoder.", "method_state": None, "optimizer": None,
        "scheduler": None, "scaler": None, "step": 0, "data_position": 0, "rng": None, "plan": None,
        "metrics": {},
        "source": {"format": "swinunetr", "path": str(src), "container": container, "stripped_prefixes": prefixes,
                   "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in found.items()},
                   "global_step": _plain(extras.get("global_step")), "epoch": _plain(extras.get("epoch")),
                   "report": dataclasses.asdict(report)},
    }
    if not math.isfinite(sum(float(v.float().abs().sum()) for v in network.values() if v.is_floating_point())):
        raise ValueError(f"{where}: the weights hold NaN or infinite values")
    return payload, report
