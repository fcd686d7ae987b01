"""volssl ResEnc U-Net weights -> dynamic-network-architectures' (DNA) ``ResidualEncoderUNet`` layout,
as nnU-Net v2 (``-pretrained_weights``) and nnssl (its checkpoints' ``network_weights``) hold them.

The inverse of :mod:`volssl.models.checkpoint_import` (whose ``_canonical`` / ``_ALIASES`` /
``map_dna_state_dict`` define the correspondence; this module only runs it backwards and checks that
the importer maps every written key back). Facts about DNA's layout, read in
MIC-DKFZ/dynamic-network-architectures:

* ``building_blocks/simple_conv_blocks.py``: ``ConvDropoutNormReLU`` registers ``conv``, (``dropout``),
  ``norm``, ``nonlin`` and then ``all_modules = nn.Sequential(conv, norm, nonlin)``, so its state dict
  holds every conv / norm tensor twice: ``X.conv.*`` = ``X.all_modules.0.*`` and ``X.norm.*`` =
  ``X.all_modules.1.*`` (no dropout in nnU-Net's ResEnc plans). ``StackedConvBlocks`` keeps its
  blocks in ``convs``.
* ``building_blocks/residual.py``: ``BasicBlockD`` has ``conv1``, ``conv2`` (no nonlin) and a ``skip``
  ``nn.Sequential`` of [AvgPool when strided] + [1x1x1 ``ConvDropoutNormReLU`` without bias when the
  width changes] (else ``nn.Identity``); ``StackedResidualBlocks`` keeps them in ``blocks``.
* ``building_blocks/residual_encoders.py``: ``ResidualEncoder`` = ``stem`` (one conv block to
  ``features_per_stage[0]``) + ``stages``.
* ``building_blocks/unet_decoder.py``: ``UNetDecoder`` stores the encoder as ``self.encoder`` (so the
  network's state dict repeats the whole encoder under ``decoder.encoder.*``), then ``stages``,
  ``transpconvs`` (bias = ``conv_bias``) and ``seg_layers``.
* ``architectures/unet.py``: ``ResidualEncoderUNet`` = ``encoder`` + ``decoder``.

nnU-Net v2's ``load_pretrained_weights`` (nnunetv2/run/load_pretrained_weights.py, MIC-DKFZ/nnUNet)
asserts that every key of the target network's state dict that does not contain ``.seg_layers.``
is in the file's ``network_weights`` with the same shape, then loads those keys: so the file must
carry all of these names, aliases included.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from volssl.config import ModelConfig
from volssl.models.checkpoint_import import _ALIASES, HEAD_PREFIX, _canonical, map_dna_state_dict
from volssl.models.registry import build_model, get_arch, resolve_widths
from volssl.models.resenc_unet import LEAKY_SLOPE, NORM_EPS

DNA_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
#: arch_kwargs nnU-Net imports by name (pydoc.locate), as its ResEnc planners write them
KW_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
RESENC_FAMILY = "resenc"
_DNA_GROUPS = ("encoder.", "decoder.encoder.", "decoder.stages.", "decoder.transpconvs.", "decoder.seg_layers.")
_PARAM_SUFFIXES = ("weight", "bias")
assert LEAKY_SLOPE == 0.01, "nonlin_kwargs below rely on LeakyReLU's default negative_slope (0.01)"


def check_resenc(model: ModelConfig, where: str = "checkpoint") -> None:
    """ValueError naming the architecture unless ``model`` is a plain ResEnc U-Net (the only volssl
    network with a DNA / nnU-Net counterpart)."""
    spec = get_arch(model.arch)
    if spec.family != RESENC_FAMILY:
        raise ValueError(f"{where}: architecture {model.arch!r} ({spec.family} family) has no nnU-Net / nnssl "
                         "counterpart; only ResEnc U-Nets (resenc-l, resenc-s, resenc-tiny) export to the nnunet "
                         "and nnssl formats (use --format safetensors for the others)")
    if model.channel_fusion == "features" and model.in_channels > 1:
        raise ValueError(f"{where}: a ResEnc U-Net with channel_fusion='features' ({model.in_channels} channels "
                         "fused after per-channel encoders) has no nnU-Net counterpart; use --format safetensors")


def dna_arch_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The ``arch_kwargs`` of DNA's ``ResidualEncoderUNet`` for ``model``, in nnU-Net's plans form
    (nnunetv2/experiment_planning/experiment_planners/residual_unets/residual_encoder_unet_planners.py):
    isotropic 3^3 kernels and strides, one decoder conv per stage, conv bias, InstanceNorm3d(eps 1e-5,
    affine), no dropout, LeakyReLU (default slope 0.01, in place). Input channels and classes are
    not part of them (nnU-Net takes both from dataset.json)."""
    check_resenc(model)
    features, blocks, strides = resolve_widths(model)
    n = len(features)
    return {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3] for _ in range(n)],
        "strides": [[int(s)] * 3 for s in strides],
        "n_blocks_per_stage": list(blocks),
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": NORM_EPS, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def nnunet_architecture(model: ModelConfig) -> dict[str, Any]:
    """The ``architecture`` entry of an nnU-Net v2 plans configuration for ``model``."""
    return {"network_class_name": DNA_CLASS, "arch_kwargs": dna_arch_kwargs(model),
            "_kw_requires_import": list(KW_REQUIRES_IMPORT)}


def _alias(key: str) -> tuple[str, str] | None:
    """``(module prefix, DNA's all_modules.{0,1} alias)`` of a conv / norm tensor key of one of our
    ConvNormAct blocks (DNA's ConvDropoutNormReLU), or None for any other key."""
    param = key.rpartition(".")[2]
    if param not in _PARAM_SUFFIXES:
        return None
    for alias, canon in _ALIASES:  # (".all_modules.0.", ".conv."), (".all_modules.1.", ".norm.")
        tail = canon + param
        if ("." + key).endswith(tail):
            prefix = key[: len(key) - len(tail)]
            return prefix, prefix + alias + param
    return None


def _with_aliases(items: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """``items`` with each block's ``all_modules`` aliases after its ``conv`` / ``norm`` tensors
    (DNA's registration order: conv, norm, then all_modules)."""
    out: list[tuple[str, Tensor]] = []
    pending: list[tuple[str, Tensor]] = []
    current = None
    for key, value in items:
        found = _alias(key)
        block = found[0] if found else None
        if block != current:
            out += pending
            pending, current = [], block
        out.append((key, value))
        if found:
            pending.append((found[1], value))
    return out + pending


def complete_state_dict(network: Mapping[str, Tensor], model: ModelConfig, where: str = "checkpoint",
                        seed: int = 0, fill: bool = True) -> tuple[dict[str, Tensor], list[str]]:
    """``network`` checked against ``build_model(model)`` (names and shapes, via the importer's
    :func:`~volssl.models.checkpoint_import.map_dna_state_dict`), with the decoder tensors it lacks
    (an encoder-only pre-training, e.g. VoCo) taken from a freshly initialised network (He init,
    seeded with ``seed``: what nnU-Net does with weights it does not load) when ``fill``. Output heads
    (``decoder.seg_layers``) are kept when present and never added. Returns ``(state dict in our
    names, the decoder keys that were missing (and filled in when ``fill``))``; ValueError naming
    ``where`` if a tensor does not fit, a key is unknown or an encoder tensor is missing.
    """
    check_resenc(model, where)
    target = build_model(model, device="meta").state_dict()
    heads = {k: v for k, v in network.items() if k.startswith(HEAD_PREFIX)}
    mapped, report = map_dna_state_dict({k: v for k, v in network.items() if k not in heads}, target, where=where)
    filled = list(report.missing)
    if filled and fill:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = build_model(model).state_dict()
        mapped.update({k: fresh[k] for k in filled})
    for k, v in heads.items():
        if k not in target or tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{where}: output head {k} {tuple(v.shape)} does not fit the architecture")
        mapped[k] = v
    order = {k: i for i, k in enumerate(target)}
    return {k: mapped[k] for k in sorted(mapped, key=order.__getitem__)}, filled


def to_dna_state_dict(network: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our ResEnc U-Net state dict -> DNA ``ResidualEncoderUNet``'s: every conv / norm tensor also under
    its ``all_modules.{0,1}`` alias and the encoder also under ``decoder.encoder.``, the aliases sharing
    the tensor (``torch.save`` stores it once). Key order follows DNA's module registration (encoder,
    decoder.encoder, decoder.stages, decoder.transpconvs, decoder.seg_layers). Every written key maps
    back to its source through the importer's ``_canonical`` (checked here).
    """
    items = [(k, v.detach() if v.device.type == "meta" else v.detach().cpu().contiguous()) for k, v in network.items()]
    items = _with_aliases(items)
    items += [("decoder." + k, v) for k, v in items if k.startswith("encoder.")]
    for name, _ in items:
        back, _ = _canonical(name)
        if back not in network:  # the importer would not map it back: a programming error, not a user error
            raise AssertionError(f"DNA key {name} maps back to {back}, which is not in the network")
    group = {k: next((i for i, g in enumerate(_DNA_GROUPS) if k.startswith(g)), len(_DNA_GROUPS)) for k, _ in items}
    return dict(sorted(items, key=lambda kv: group[kv[0]]))  # stable sort: DNA's module order


def nnssl_adaptation_plan(model: ModelConfig, pretrain_plan: dict[str, Any],
                          patch_size: tuple[int, int, int] | list[int] | None) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` of an nnssl checkpoint (MIC-DKFZ/nnssl
    src/nnssl/adaptation_planning/adaptation_plan.py ``AdaptationPlan.serialize``, plus the
    ``keys_to_in_proj`` / ``key_to_lpe`` entries the nnssl fine-tuning branch of nnU-Net reads).

    nnssl's ResEnc-L (``resenc-l`` at its own widths) is named ``"ResEncL"`` without ``arch_kwargs``
    (as nnssl's released checkpoints); any other ResEnc U-Net is ``"ResidualEncoderUNet"`` with its
    ``arch_kwargs``. ``pretrain_plan``: an nnssl ``Plan`` dict (:func:`volssl.training.export` builds it).
    """
    check_resenc(model)
    spec = get_arch("resenc-l")
    is_l = resolve_widths(model) == (spec.features, spec.blocks, spec.strides)
    arch = ({"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None} if is_l else
            {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": dna_arch_kwargs(model),
             "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]})
    return {
        "architecture_plans": arch,
        "pretrain_plan": pretrain_plan,
        "pretrain_num_input_channels": int(model.in_channels),
        "recommended_downstream_patchsize": [int(p) for p in patch_size] if patch_size else None,
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    }
