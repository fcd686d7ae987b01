"""A fine-tuned model as prediction uses it: :class:`FineTunedModel`, :func:`load_finetuned` (the
checkpoint contract: docs/design.md, "Fine-tuned model"), the device and the prediction options.

Below :mod:`volssl.inference.predict` (semantic label maps) and :mod:`volssl.inference.instances`
(affinities -> instances): both import from here, neither from the other's internals.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from volssl.config import ModelConfig
from volssl.data.preprocess import PreprocessPlan
from volssl.finetuning.tasks import TASKS, Affinities, SemanticSegmentation

CHECKPOINT_NAMES = ("final.pt", "best.pt", "latest.pt")


@dataclass(frozen=True)
class PredictOptions:
    """How cases are predicted and what is written (shared by :func:`volssl.inference.predict.predict_folder`
    and the per-case predictors of each task).

    Attributes:
        overlap: sliding-window overlap in [0, 1).
        mirror_axes: mirroring TTA axes (``()``: off; ``(0, 1, 2)``: 8 passes per tile); not used for
            affinities (a flip turns an offset around).
        sw_batch_size: tiles per forward pass.
        autocast: bfloat16 autocast on CUDA.
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:N" or a ``torch.device``.
        save_probabilities: semantic models: also write the class probabilities (``<case>.npz``).
        thresholds: affinity models: agglomeration thresholds; the first one's instance map is
            ``<case>.nii.gz``, every one's is ``t<threshold>/<case>.nii.gz``.
    """

    overlap: float = 0.5
    mirror_axes: Sequence[int] = (0, 1, 2)
    sw_batch_size: int = 1
    autocast: bool = False
    device: torch.device | str = "auto"
    save_probabilities: bool = False
    thresholds: Sequence[float] = (0.5,)

    def check(self) -> None:
        """ValueError for an overlap outside [0, 1) or a tile batch below 1."""
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")


@dataclass
class FineTunedModel:
    """A segmentation network with what prediction needs to use it.

    Attributes:
        network: maps ``(n, len(channels), *patch_size)`` to logits ``(n, len(labels), *patch_size)``
            (or a list of outputs, full resolution first).
        plan: the preprocessing plan the network was trained with.
        labels: ``{"background": 0, "lesion": 1, ...}`` (dataset.json style); output channel ``k`` is
            the ``k``-th smallest label value.
        channels: input channel names, in input order.
        patch_size: sliding-window tile (voxels, x, y, z).
        input_spacing: (x, y, z) mm for TIFF/Zarr inputs that carry no spacing (from plan.json).
        source: the checkpoint file, if loaded from one.
    """

    network: nn.Module
    plan: PreprocessPlan
    labels: dict[str, int]
    channels: tuple[str, ...]
    patch_size: tuple[int, int, int]
    input_spacing: tuple[float, float, float] | None = None
    source: str | None = None
    task: str = SemanticSegmentation.name  # "semantic" (class logits) or "affinities" (a logit per offset)
    offsets: tuple[tuple[int, ...], ...] | None = None  # task "affinities": the offset of each output channel

    def __post_init__(self) -> None:
        if isinstance(self.plan, dict):
            self.plan = PreprocessPlan.from_dict(self.plan)
        if not isinstance(self.labels, dict) or len(self.labels) < 2:
            raise ValueError(f"labels must map at least two names to integer values, got {self.labels!r}")
        if any(isinstance(v, (list, tuple)) for v in self.labels.values()):
            raise ValueError(f"region-based labels (lists of values) are not supported for prediction: {self.labels}")
        try:
            self.labels = {str(k): int(v) for k, v in self.labels.items()}
        except (TypeError, ValueError):
            raise ValueError(f"labels must map names to integer values, got {self.labels!r}") from None
        if len(set(self.labels.values())) != len(self.labels):
            raise ValueError(f"label values must be distinct, got {self.labels}")
        self.channels = tuple(str(c) for c in self.channels)
        if not self.channels:
            raise ValueError("a model needs at least one input channel name")
        patch = tuple(int(p) for p in self.patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be three positive integers, got {self.patch_size!r}")
        self.patch_size = patch
        if self.input_spacing is not None:
            self.input_spacing = tuple(float(s) for s in self.input_spacing)
        if self.task not in TASKS:
            raise ValueError(f"task must be {' or '.join(map(repr, TASKS))}, got {self.task!r}")
        if self.per_offset:
            if not self.offsets:
                raise ValueError("an affinity model needs the offsets of its output channels")
            self.offsets = tuple(tuple(int(v) for v in o) for o in self.offsets)

    @property
    def per_offset(self) -> bool:
        """One output channel per affinity offset (task "affinities"), not one per label."""
        return self.task == Affinities.name

    @property
    def n_outputs(self) -> int:
        """Output channels of the network: one per affinity offset, else one per label."""
        return len(self.offsets) if self.per_offset else len(self.labels)

    def describe_outputs(self) -> str:
        """What the output channels should be, for an error message."""
        if self.per_offset:
            return f"{len(self.offsets)} affinity offsets"
        return f"'labels' has {len(self.labels)} entries: {self.labels}"

    @property
    def label_values(self) -> list[int]:
        """Label value of each output channel (sorted)."""
        return sorted(self.labels.values())

    @property
    def label_names(self) -> list[str]:
        by_value = {v: k for k, v in self.labels.items()}
        return [by_value[v] for v in self.label_values]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: the file itself, or a run directory's
    ``checkpoints/final.pt`` (else ``best.pt``, else ``latest.pt``); or an exported safetensors folder
    (``hf://ORG/NAME[@REVISION]`` is downloaded to one first; :mod:`volssl.training.exported`)."""
    from volssl.training.checkpoint import find_run_checkpoint
    from volssl.training.exported import locate_exported

    exported = locate_exported(path)
    if exported is not None:
        return exported
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = find_run_checkpoint(path, CHECKPOINT_NAMES)
        if found is not None:
            return found
        names = ", ".join(CHECKPOINT_NAMES)
        raise FileNotFoundError(f"{path}: no checkpoint found (looked for {names} in {path}/checkpoints and {path})")
    raise FileNotFoundError(f"model not found: {path}")


def _model_config(d: Any, where: Path) -> ModelConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: 'model' must be a ModelConfig dict, got {type(d).__name__}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{where}: unknown ModelConfig field(s) {sorted(unknown)}")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_finetuned(path: str | os.PathLike, device: torch.device | str = "cpu") -> FineTunedModel:
    """Load a fine-tuned model (contract: docs/design.md, "Fine-tuned model").

    Args:
        path: a run directory (``checkpoints/final.pt``, else ``best.pt``, else ``latest.pt``), a
            ``.pt`` file, an exported safetensors folder or ``hf://ORG/NAME[@REVISION]``.
        device: where to put the network.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: not a volssl checkpoint, not kind "finetune", inconsistent fields, or weights that
            do not fit the described network (the message names the file).
    """
    from volssl.models.registry import build_model
    from volssl.training.checkpoint import load_checkpoint

    file = resolve_checkpoint(path)
    data = load_checkpoint(file)
    if data.get("kind") != "finetune":
        raise ValueError(f"{file}: a {data.get('kind')!r} checkpoint, not a fine-tuned model (kind 'finetune'); "
                         "prediction needs a fine-tuned segmentation network")
    missing = [k for k in ("model", "network", "plan", "labels", "channels", "patch_size") if k not in data]
    if missing:
        raise ValueError(f"{file}: fine-tuned checkpoint lacks {', '.join(missing)}")
    cfg = _model_config(data["model"], file)
    try:
        model_plan = PreprocessPlan.from_dict(data["plan"])
        network = build_model(cfg)
        network.load_state_dict(data["network"], strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{file}: cannot build the network or load its weights: {e}") from None
    if hasattr(network, "deep_supervision"):
        network.deep_supervision = False  # only the full-resolution output is needed
    spacing = data["plan"].get("input_spacing") if isinstance(data["plan"], dict) else None
    model = FineTunedModel(
        network=network.to(device).eval(), plan=model_plan, labels=data["labels"], channels=data["channels"],
        patch_size=data["patch_size"], input_spacing=spacing, source=str(file),
        task=data.get("task") or SemanticSegmentation.name, offsets=data.get("offsets"),
    )
    if cfg.in_channels != len(model.channels):
        raise ValueError(f"{file}: the network takes {cfg.in_channels} channel(s) but 'channels' names "
                         f"{len(model.channels)}: {list(model.channels)}")
    if cfg.out_channels != model.n_outputs:
        raise ValueError(f"{file}: the network has {cfg.out_channels} output channel(s) but {model.describe_outputs()}")
    return model


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(device)``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available (use --device cpu or auto)")
    return device
