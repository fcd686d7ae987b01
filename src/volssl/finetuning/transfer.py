"""Weight transfer from a pre-training checkpoint, and which parameters each stage trains.

:func:`transfer_weights` copies a checkpoint's ``"network"`` (the backbone state dict, see
docs/design.md "Checkpoint") into a freshly built segmentation network:

* ``transfer="all"``: encoder (stem + stages) and decoder (transposed convs + conv blocks);
  ``"encoder"``: the encoder only, the decoder keeps its fresh initialisation;
* parts that exist only for pre-training are dropped: the output convs ``decoder.seg_layers.*``
  (they predict intensities; the segmentation heads are always new), mask tokens and densification
  convs (S3D keeps those outside ``network``, so they normally never reach here);
* multi-channel datasets: a pre-trained single-channel stem conv ``(F, 1, k, k, k)`` (any encoder
  conv whose shapes differ only in the input channels: a ViT/Swin patch embedding too) is repeated
  over the ``C`` input channels and divided by ``C`` (``stem_init="replicate"``, the S3D paper's
  Table 6 and nnssl's rule: a stack of identical channels then gives the pre-trained response), or
  left at its fresh initialisation (``stem_init="random"``).

Anything else that does not fit (a key the network lacks, a shape that differs) is an error naming
the key and both shapes: the checkpoint belongs to another architecture.

:func:`set_trainable` switches ``requires_grad`` for a stage: the decoder only (the stem too when
asked), or everything; output heads that no loss uses are never trainable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

ENCODER_PREFIX = "encoder."
STEM_PREFIX = "encoder.stem."
DECODER_PREFIX = "decoder."
HEAD_PREFIX = "decoder.seg_layers."
FUSION_PREFIX = "fusion."  # per-stage channel fusion (models/channel_fusion.py): new, trained with the decoder
#: name fragments of tensors that exist only for pre-training (never transferred)
PRETRAIN_ONLY = (HEAD_PREFIX, "mask_token", "densify.")


@dataclass
class TransferReport:
    """What :func:`transfer_weights` did, by state-dict key."""

    moved: list[str] = field(default_factory=list)  # copied unchanged
    replicated: list[str] = field(default_factory=list)  # stem conv repeated over the input channels, / C
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not transferred
    new: list[str] = field(default_factory=list)  # left at their fresh initialisation

    def summary(self) -> str:
        text = f"transferred {len(self.moved) + len(self.replicated)} tensors"
        if self.replicated:
            text += f" ({', '.join(self.replicated)} replicated over the input channels)"
        text += f", dropped {len(self.dropped)}, {len(self.new)} new"
        return text

    def to_dict(self) -> dict[str, list[str]]:
        return {"moved": list(self.moved), "replicated": list(self.replicated), "dropped": list(self.dropped),
                "new": list(self.new)}


def is_pretrain_only(key: str) -> bool:
    """Whether ``key`` names a pre-training-only tensor (reconstruction heads, mask tokens, densify convs)."""
    return any(part in key for part in PRETRAIN_ONLY)


def is_input_conv(key: str, have: torch.Size, want: torch.Size) -> bool:
    """Whether ``key`` is an encoder convolution (the stem, or a ViT/Swin patch embedding) whose
    checkpoint shape ``have`` differs from the network's ``want`` only in its input channels (dim 1)."""
    return (key.startswith(ENCODER_PREFIX) and key.endswith("weight") and len(have) >= 3
            and len(have) == len(want) and have[:1] + have[2:] == want[:1] + want[2:])


def replicate_stem(weight: Tensor, in_channels: int) -> Tensor:
    """A single-channel stem conv weight ``(F, 1, *k)`` repeated to ``(F, in_channels, *k)`` and divided
    by ``in_channels``."""
    if weight.ndim < 3 or weight.shape[1] != 1:
        raise ValueError(f"replicate_stem: expected a single-input-channel conv weight (F, 1, ...), got "
                         f"{tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"replicate_stem: in_channels must be >= 1, got {in_channels}")
    reps = [1] * weight.ndim
    reps[1] = in_channels
    return weight.repeat(*reps) / in_channels


def transfer_weights(network: nn.Module, source: Mapping[str, Tensor], transfer: str = "all",
                     stem_init: str = "replicate", where: str = "checkpoint") -> TransferReport:
    """Load the pre-trained ``source`` state dict into ``network`` (in place); see the module docstring.

    Args:
        network: the freshly initialised segmentation network (a ResEnc U-Net state-dict layout).
        source: the checkpoint's ``"network"`` (keys ``encoder.*``, ``decoder.*``).
        transfer: "all" (encoder + decoder) or "encoder".
        stem_init: "replicate" or "random", for a stem with more input channels than the source's.
        where: the checkpoint's name, for error messages.

    Returns:
        the :class:`TransferReport` (moved, replicated, dropped and new keys, each sorted).

    Raises:
        ValueError: unknown ``transfer`` / ``stem_init``, a source key the network lacks, or a shape
            that differs (other than the stem's input channels), naming the key and both shapes.
    """
    if transfer not in ("all", "encoder"):
        raise ValueError(f"transfer_weights: transfer must be 'all' or 'encoder', got {transfer!r}")
    if stem_init not in ("replicate", "random"):
        raise ValueError(f"transfer_weights: stem_init must be 'replicate' or 'random', got {stem_init!r}")
    target = network.state_dict()
    report = TransferReport()
    loaded: dict[str, Tensor] = {}
    for key, value in source.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: network entry {key!r} is a {type(value).__name__}, not a tensor")
        if is_pretrain_only(key) or (transfer == "encoder" and not key.startswith(ENCODER_PREFIX)):
            report.dropped.append(key)
            continue
        if key not in target:
            raise ValueError(f"{where}: the checkpoint's {key!r} has no counterpart in the fine-tuning network "
                             "(another architecture?)")
        want = target[key].shape
        if value.shape == want:
            loaded[key] = value
            report.moved.append(key)
        elif is_input_conv(key, value.shape, want):
            if stem_init == "random":
                report.dropped.append(key)
            elif value.shape[1] == 1:
                loaded[key] = replicate_stem(value, want[1])
                report.replicated.append(key)
            else:
                raise ValueError(f"{where}: the pre-trained stem takes {value.shape[1]} channels and the dataset has "
                                 f"{want[1]}; only a single-channel stem can be replicated (or use "
                                 "stem_init=random)")
        else:
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(want)} in the fine-tuning network (another architecture?)")
    with torch.no_grad():
        for key, value in loaded.items():
            target[key].copy_(value.to(dtype=target[key].dtype))
    report.new = sorted(k for k in target if k not in loaded)
    report.moved.sort()
    report.dropped.sort()
    return report


HEAD_SMALL_STD = 2e-5  # MAE's fine-tuning head init (facebookresearch/mae main_finetune.py)
HEAD_INIT_MODES = ("he", "small")


def init_heads(network: nn.Module, mode: str, keys: list[str] | None = None) -> list[str]:
    """Re-initialise the output convs (``decoder.seg_layers.*``) per ``mode``; returns the keys changed.

    ``"he"``: leave them as built (nnU-Net's He init, zero bias). ``"small"``: weights from a normal
    with std :data:`HEAD_SMALL_STD` truncated at 2 std, biases 0, so every voxel starts at equal class
    probabilities (logits ~1e-5) whatever the seed. ``keys``: only these state-dict keys (the ones the
    transfer left new; a head moved from a checkpoint is never touched); None: every head tensor.
    Draws from torch's global generator (the caller seeds it).
    """
    if mode not in HEAD_INIT_MODES:
        raise ValueError(f"init_heads: mode must be one of {HEAD_INIT_MODES}, got {mode!r}")
    if mode == "he":
        return []
    allowed = None if keys is None else set(keys)
    changed = []
    with torch.no_grad():
        for name, p in network.named_parameters():
            if not name.startswith(HEAD_PREFIX) or (allowed is not None and name not in allowed):
                continue
            if name.endswith(".bias"):
                p.zero_()
            else:
                nn.init.trunc_normal_(p, std=HEAD_SMALL_STD, a=-2 * HEAD_SMALL_STD, b=2 * HEAD_SMALL_STD)
            changed.append(name)
    return changed


def unused_heads(network: nn.Module, deep_supervision: bool = True) -> tuple[str, ...]:
    """Prefixes of the output heads no loss uses: without deep supervision all but the last
    (full-resolution) one; with it the first (lowest resolution, weight 0 as in nnU-Net)."""
    heads = sorted({int(n[len(HEAD_PREFIX):].split(".")[0]) for n, _ in network.named_parameters()
                    if n.startswith(HEAD_PREFIX)})
    unused = heads[:1] if deep_supervision and len(heads) > 1 else heads[:-1] if not deep_supervision else []
    return tuple(f"{HEAD_PREFIX}{k}." for k in unused)


def trainable_names(network: nn.Module, trainable: str, train_stem: bool = False,
                    deep_supervision: bool = True) -> list[str]:
    """Names of the parameters a stage trains: ``"all"``, or ``"decoder"`` (plus the stem when
    ``train_stem``), less the :func:`unused_heads` (a parameter that never gets a gradient would
    break DDP's static graph)."""
    if trainable not in ("decoder", "all"):
        raise ValueError(f"trainable must be 'decoder' or 'all', got {trainable!r}")
    unused = unused_heads(network, deep_supervision)
    names = []
    for name, _ in network.named_parameters():
        if unused and name.startswith(unused):
            continue
        if trainable == "all" or name.startswith((DECODER_PREFIX, FUSION_PREFIX)) or (
                train_stem and name.startswith(STEM_PREFIX)):
            names.append(name)
    return names


def set_trainable(network: nn.Module, trainable: str, train_stem: bool = False, deep_supervision: bool = True) -> bool:
    """Set ``requires_grad`` of every parameter per :func:`trainable_names`; returns True if anything changed."""
    keep = set(trainable_names(network, trainable, train_stem, deep_supervision))
    changed = False
    for name, p in network.named_parameters():
        flag = name in keep
        if p.requires_grad != flag:
            p.requires_grad_(flag)
            changed = True
    return changed
