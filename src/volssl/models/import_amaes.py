"""Import the public AMAES checkpoints (asbjrnmunk/amaes, Yucca networks) as volssl checkpoints.

The published files (``unet_b_lw_dec_fullaug.pth``, ``unet_xl_...``, ``mednext_m3_...``,
``mednext_l3_...``) are ``torch.save``'d state dicts of the Lightning module, i.e. of the Yucca
network under ``model.``, with ``_orig_mod.`` after it when the network was ``torch.compile``'d
(``model._orig_mod.encoder.in_conv.conv1.conv.weight``). A Lightning ``.ckpt`` (the same dict under
``"state_dict"``) is accepted too. Prefixes ``model.``, ``_orig_mod.`` and ``module.`` are stripped
wherever they occur at the front, in any order.

Key mapping (Yucca -> volssl; ``{a}`` etc. are indices, ``*`` is ``weight`` / ``bias``)::

    U-Net (models/networks/unet.py: UNetEncoder / UNetDecoder)
      encoder.in_conv.conv{j}.{conv,norm}.*          -> encoder.stages.0.convs.{j-1}.{conv,norm}.*
      encoder.encoder_conv{s}.conv{j}.{conv,norm}.*  -> encoder.stages.{s}.convs.{j-1}.{conv,norm}.*
      pred_head.upsample{k}.*                        -> decoder.transpconvs.{k-1}.*
      pred_head.decoder_conv{k}.conv{j}.{conv,norm}.* -> decoder.stages.{k-1}.convs.{j-1}.{conv,norm}.*
    MedNeXt (models/networks/mednext.py: MedNeXtEncoder, Yucca's MedNeXt blocks)
      encoder.stem.*                                 -> encoder.stem.*
      encoder.enc_block_{i}.{j}.{part}               -> encoder.enc_stages.{i}.{j}.{part}
      encoder.down_{i}.{part}                        -> encoder.down_blocks.{i}.{part}
      encoder.bottleneck.{j}.{part}                  -> encoder.bottleneck.{j}.{part}
      pred_head.up_{i}.{part}      (MedNeXt decoder) -> decoder.up_blocks.{n-2-i}.{part}
      pred_head.dec_block_{i}.{j}.{part}             -> decoder.dec_stages.{n-2-i}.{j}.{part}
      pred_head.* (U-Net decoder: *_std_dec models)  -> as for the U-Net
      (part: conv1/norm/conv2/conv3/res_conv as MONAI's blocks; grn_beta/grn_gamma -> global_resp_beta/gamma)
    dropped (pre-training or task heads, reported):
      rec_head.* (the light-weight reconstruction decoder), pred_head.out_conv.*, pred_head.ds_out_conv*.*,
      pred_head.out_0.*, con_head.*, rot_head.*

The architecture is the registered one of the family (``unet-*`` / ``mednext-*``) whose state dict
holds every mapped key with the same shape, preferring the paper's (``unet-b``, ``unet-xl``,
``mednext-m``, ``mednext-l``: U-Net decoder); ``arch`` forces one. Any key without a rule or without a
counterpart, and any shape that differs, is refused with a message naming key and shapes.
Files are read with ``torch.load(weights_only=True)``.

Normalisation: the paper (Sec. 2) z-normalises each volume after clipping at the 99th percentile;
the import records the ``amaes`` preprocessing plan (that), which fine-tuning then applies. (Its
Table 1 and the public code's asserts speak of intensities in [0, 1].)
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from volssl.config import ModelConfig, RunConfig, config_to_dict
from volssl.models.checkpoint_import import ImportReport, load_untrusted, peel_prefixes
from volssl.models.registry import build_model, get_arch, load_architectures

PREFIXES = ("model.", "_orig_mod.", "module.")
#: the paper's architectures, preferred when several registered ones fit
PREFERRED = ("unet-b", "unet-xl", "mednext-m", "mednext-l")
PATCH = (128, 128, 128)  # the AMAES pre-training patch
_PARAM = r"(weight|bias)"
_RULES: tuple[tuple[re.Pattern[str], Any], ...] = tuple((re.compile(p), f) for p, f in (
    (rf"^encoder\.in_conv\.conv(\d+)\.(conv|norm)\.{_PARAM}$",
     lambda m, n: f"encoder.stages.0.convs.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (rf"^encoder\.encoder_conv(\d+)\.conv(\d+)\.(conv|norm)\.{_PARAM}$",
     lambda m, n: f"encoder.stages.{int(m[1])}.convs.{int(m[2]) - 1}.{m[3]}.{m[4]}"),
    (rf"^pred_head\.upsample(\d+)\.{_PARAM}$", lambda m, n: f"decoder.transpconvs.{int(m[1]) - 1}.{m[2]}"),
    (rf"^pred_head\.decoder_conv(\d+)\.conv(\d+)\.(conv|norm)\.{_PARAM}$",
     lambda m, n: f"decoder.stages.{int(m[1]) - 1}.convs.{int(m[2]) - 1}.{m[3]}.{m[4]}"),
    (r"^encoder\.stem\.(.+)$", lambda m, n: f"encoder.stem.{m[1]}"),
    (r"^encoder\.enc_block_(\d+)\.(\d+)\.(.+)$", lambda m, n: f"encoder.enc_stages.{m[1]}.{m[2]}.{_part(m[3])}"),
    (r"^encoder\.down_(\d+)\.(.+)$", lambda m, n: f"encoder.down_blocks.{m[1]}.{_part(m[2])}"),
    (r"^encoder\.bottleneck\.(\d+)\.(.+)$", lambda m, n: f"encoder.bottleneck.{m[1]}.{_part(m[2])}"),
    (r"^pred_head\.up_(\d+)\.(.+)$", lambda m, n: f"decoder.up_blocks.{n - 2 - int(m[1])}.{_part(m[2])}"),
    (r"^pred_head\.dec_block_(\d+)\.(\d+)\.(.+)$",
     lambda m, n: f"decoder.dec_stages.{n - 2 - int(m[1])}.{m[2]}.{_part(m[3])}"),
))
_DROP = re.compile(r"^(rec_head|con_head|rot_head)\.|^pred_head\.(out_conv|ds_out_conv\d+|out_0|out_\d+)\.")


def _part(name: str) -> str:
    """Yucca's MedNeXt-block parameter name -> MONAI's (only the GRN parameters differ)."""
    return {"grn_beta": "global_resp_beta", "grn_gamma": "global_resp_gamma"}.get(name, name)


def strip_prefixes(key: str) -> str:
    """``key`` without leading ``model.`` / ``_orig_mod.`` / ``module.`` (repeatedly, any order)."""
    return peel_prefixes(key, PREFIXES)[0]


def _n_stages(keys: list[str]) -> int:
    """Encoder stages of a Yucca state dict (U-Net: in_conv + encoder_conv{s}; MedNeXt: enc_block_{i} + bottleneck)."""
    found = [int(m[1]) for k in keys if (m := re.match(r"^encoder\.(?:encoder_conv|enc_block_)(\d+)\.", k))]
    if not found:
        return 0
    return max(found) + (1 if any(k.startswith("encoder.encoder_conv") for k in keys) else 2)


def map_amaes_state_dict(source: Mapping[str, Tensor], where: str = "AMAES checkpoint"
                         ) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a Yucca U-Net / MedNeXt state dict into volssl keys (see the module docstring).

    Returns ``(mapped, dropped)``: the renamed tensors and the (prefix-stripped) keys of heads that are
    never transferred. ValueError naming them if keys match no rule or are not tensors.
    """
    stripped: dict[str, Tensor] = {}
    for key, value in source.items():
        k = strip_prefixes(str(key))
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        if k in stripped:
            raise ValueError(f"{where}: {k!r} appears twice (with and without a model./_orig_mod./module. prefix)")
        stripped[k] = value
    n = _n_stages(list(stripped))
    mapped: dict[str, Tensor] = {}
    dropped, unknown = [], []
    for k, value in stripped.items():
        if _DROP.match(k):
            dropped.append(k)
            continue
        for pattern, rename in _RULES:
            m = pattern.match(k)
            if m:
                mapped[rename(m, n)] = value
                break
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} keys are not part of a Yucca U-Net / MedNeXt (AMAES) network: "
                         + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
    if not any(k.startswith("encoder.") for k in mapped):
        raise ValueError(f"{where}: no encoder weights (expected encoder.in_conv.* or encoder.stem.* after the "
                         "model./_orig_mod. prefixes)")
    return mapped, sorted(dropped)


def check_against(mapped: Mapping[str, Tensor], target: Mapping[str, Tensor | torch.Size], arch: str,
                  where: str = "AMAES checkpoint") -> ImportReport:
    """ValueError naming keys and shapes unless every mapped tensor has a same-shaped counterpart in
    ``target`` (arch ``arch``'s state dict or key -> shape) and every encoder tensor is present."""
    shapes = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in target.items()}
    extra = [k for k in mapped if k not in shapes]
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensors have no counterpart in a {arch!r} network: "
                         + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
    bad = [f"{k}: {arch} has {shapes[k]}, the checkpoint {tuple(v.shape)}" for k, v in mapped.items()
           if tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"{where}: {len(bad)} tensors do not fit a {arch!r} network: " + "; ".join(bad[:6])
                         + (" ..." if len(bad) > 6 else ""))
    missing_enc = [k for k in shapes if k.startswith("encoder.") and k not in mapped]
    if missing_enc:
        raise ValueError(f"{where}: {len(missing_enc)} encoder tensors of a {arch!r} network are missing: "
                         + ", ".join(missing_enc[:8]) + (" ..." if len(missing_enc) > 8 else ""))
    return ImportReport(mapped=len(mapped), missing=sorted(k for k in shapes if k not in mapped
                                                           and not k.startswith("decoder.seg_layers.")))


def _in_channels(mapped: Mapping[str, Tensor], where: str) -> tuple[str, int]:
    for key, family in (("encoder.stages.0.convs.0.conv.weight", "unet"), ("encoder.stem.weight", "mednext")):
        if key in mapped:
            w = mapped[key]
            if w.ndim != 5:
                raise ValueError(f"{where}: {key} has shape {tuple(w.shape)}, not a 3D convolution")
            return family, int(w.shape[1])
    raise ValueError(f"{where}: no input convolution (encoder.in_conv.conv1.conv.weight or encoder.stem.weight)")


def resolve_arch(mapped: Mapping[str, Tensor], in_channels: int, family: str, arch: str | None = None,
                 where: str = "AMAES checkpoint") -> tuple[str, ImportReport]:
    """The architecture ``mapped`` fits (``arch`` if given: checked), and the check's report."""
    if arch is not None:
        get_arch(arch)  # KeyError listing the known names
        target = build_model(ModelConfig(arch=arch, in_channels=in_channels), device="meta").state_dict()
        return arch, check_against(mapped, target, arch, where)
    registered = [n for n, s in load_architectures().items() if s.family == family]
    names = sorted(registered, key=lambda n: (PREFERRED.index(n) if n in PREFERRED else len(PREFERRED),
                                              registered.index(n)))
    errors = []
    for name in names:
        target = build_model(ModelConfig(arch=name, in_channels=in_channels), device="meta").state_dict()
        try:
            return name, check_against(mapped, target, name, where)
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(f"{where}: fits no registered {family} architecture ({', '.join(names)}); "
                     f"closest: {min(errors, key=len) if errors else 'none'}")


def convert_amaes(src: str | os.PathLike, arch: str | None = None) -> tuple[dict[str, Any], ImportReport]:
    """Read the AMAES checkpoint ``src``; return ``(volssl checkpoint payload, report)``.

    The payload follows docs/design.md ("Checkpoint") with ``kind="import"``, the mapped weights in
    ``"network"`` (encoder, plus a fine-tuned decoder when the file has one), the AMAES 128^3 patch,
    the ``amaes`` preprocessing plan and a ``source`` record; write it with
    :func:`volssl.training.checkpoint.save_checkpoint`.
    """
    src = Path(src)
    data = load_untrusted(src)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]  # a Lightning .ckpt
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{src}: not an AMAES checkpoint (expected a state dict, found {type(data).__name__})")
    mapped, dropped = map_amaes_state_dict(data, where=str(src))
    family, in_channels = _in_channels(mapped, str(src))
    name, report = resolve_arch(mapped, in_channels, family, arch, where=str(src))
    report.dropped = dropped
    model_cfg = ModelConfig(arch=name, in_channels=in_channels, out_channels=1)
    mapped = {k: v.detach().clone().contiguous() for k, v in mapped.items()}

    from volssl.data.preprocess import get_plan

    run_cfg = RunConfig(description=f"imported from AMAES checkpoint {src.name}", model=model_cfg)
    run_cfg.data = dataclasses.replace(run_cfg.data, patch_size=PATCH)
    payload = {
        "kind": "import", "tag": "import", "config": config_to_dict(run_cfg), "model": config_to_dict(model_cfg),
        "network": mapped, "encoder_keys": "encoder.", "method_state": None, "optimizer": None,
        "scheduler": None, "scaler": None, "step": 0, "data_position": 0, "rng": None,
        "plan": get_plan("amaes").to_dict(), "metrics": {},
        "source": {"format": "amaes", "path": str(src), "report": dataclasses.asdict(report)},
    }
    return payload, report
