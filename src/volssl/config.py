"""Run configuration as data: nested dataclasses, named presets, ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`. Presets are functions returning a RunConfig
(registered with :func:`register_preset`); ``--set a.b=value`` overrides any field with type
checking; :func:`config_to_dict` / :func:`config_from_dict` give the JSON form saved with every run.

Method-specific settings live in ``RunConfig.method``, a dataclass chosen by its ``name`` field from
:data:`METHOD_CONFIGS` (each method module registers its own with :func:`register_method_config`).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

Triple = tuple[int, int, int]


@dataclass
class DataConfig:
    """How training patches are drawn from a preprocessed dataset."""

    patch_size: Triple = (160, 160, 160)
    batch_size: int = 6  # global batch (split over data-parallel ranks)
    num_workers: int = 4  # loader processes per rank
    foreground_prob: float = 0.0  # probability that a patch is centred on a labelled voxel
    sampling: str = "uniform"  # "uniform" over volumes, or "size" (proportional to voxel count)
    channel_mode: str = "single"  # "single": one random channel per patch (S3D); "all": stacked channels
    symmetries: bool = False  # one of the 48 cube symmetries (axis permutation x flips) per patch (MAE-XNT)
    crop_zscore: bool = False  # z-score every patch on its own (MAE-XNT); raw TIFF/Zarr crops always are
    # statistics of the raw TIFF/Zarr crops' z-score: "crop" (each crop's own, MAE-XNT paper) or "volume"
    # (the volume's mean/std, public MAE_XNT code; estimated from <= 2^24 voxels, see data/volume_crops.py)
    crop_norm: str = "crop"


@dataclass
class ModelConfig:
    """Backbone architecture: a named architecture plus optional overrides of its widths."""

    arch: str = "resenc-l"
    in_channels: int = 1
    out_channels: int = 1
    features: tuple[int, ...] | None = None  # None: the architecture's own
    blocks: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    # several input channels: "stem" (one encoder input per channel, the stem mixes them; S3D Table 6) or
    # "features" (a one-channel encoder runs on each channel, its stage features fused; models/channel_fusion.py)
    channel_fusion: str = "stem"


@dataclass
class MethodConfig:
    """Base of every method's settings; ``name`` selects the dataclass (see METHOD_CONFIGS)."""

    name: str = "none"


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: str = "sgd"  # "sgd" (Nesterov) or "adamw"
    lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    schedule: str = "poly"  # "poly", "cosine" or "constant"
    poly_exponent: float = 0.9
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    min_lr: float = 0.0  # floor of the cosine schedule
    grad_clip: float | None = 12.0  # max global grad norm; None: off


@dataclass
class AugmentConfig:
    """Spatial augmentation of pre-training patches (S3D: minor scale, rotation, mirroring)."""

    enabled: bool = True
    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5  # per axis
    # elastic deformation (AMAES p .33; batchgenerators/Yucca semantics): a displacement field
    # uniform in [-1, 1] per voxel and axis, Gaussian-smoothed with sigma, times alpha (voxels)
    p_elastic: float = 0.0
    elastic_alpha: tuple[float, float] = (200.0, 600.0)
    elastic_sigma: tuple[float, float] = (20.0, 30.0)


@dataclass
class TrainConfig:
    """Loop, precision, logging and checkpointing."""

    steps: int = 250_000
    precision: str = "bf16"  # "fp32", "bf16" or "fp16" (autocast; fp16 uses a grad scaler)
    compile: bool = False
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    log_every: int = 50  # steps between scalar logs (TensorBoard + CSV)
    preview_every: int = 1000  # steps between slice PNGs
    checkpoint_every: int = 1000  # steps between 'latest' checkpoints
    val_every: int = 0  # steps between validation losses for 'best'; 0: best = lowest smoothed train loss
    probe_dataset: str = ""  # labelled dataset (raw nnU-Net or preprocessed) of the representation probe; "": none
    probe_every: int = 0  # steps between probes (training/probe.py); 0 with a probe_dataset: train.steps // 10


@dataclass
class RunConfig:
    """Everything that defines a pre-training run."""

    preset: str = ""
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- registries
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {"none": MethodConfig}
PRESETS: dict[str, Callable[[], RunConfig]] = {}


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a MethodConfig subclass selectable by its default ``name``."""
    name = cls().name
    METHOD_CONFIGS[name] = cls
    return cls


def register_preset(name: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    """Decorator: register a zero-argument function returning the preset's RunConfig."""

    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = fn
        return fn

    return deco


#: functions that register the built-in presets and method configurations when first needed. The
#: package root (``volssl/__init__.py``) adds the one importing :mod:`volssl.presets`: this module sits
#: below the presets and methods in docs/design.md's layers and never imports them itself.
SPEC_LOADERS: list[Callable[[], None]] = []


def load_builtin_specs() -> None:
    """Register the built-in presets, methods and their configurations (idempotent)."""
    for load in SPEC_LOADERS:
        load()


def list_presets() -> list[str]:
    load_builtin_specs()
    return sorted(PRESETS)


def get_preset(name: str) -> RunConfig:
    """Return a fresh RunConfig for preset ``name`` (KeyError with the list of known names)."""
    load_builtin_specs()
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


# --------------------------------------------------------------------------- (de)serialisation
def config_to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a JSON/CLI value to the annotated type ``hint``; ValueError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: cannot interpret {value!r} as {hint}")
    if isinstance(value, str) and (origin in (tuple, list) or hint in (tuple, list)):
        text = value.strip()
        if text.startswith(("[", "(")):
            value = json.loads(text.replace("(", "[").replace(")", "]"))
        else:
            value = [v for v in text.split(",") if v.strip()]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        return [_coerce(v, args[0] if args else Any, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if name == "method" and cls is RunConfig:
            mname = value.get("name", "none") if isinstance(value, dict) else "none"
            mcls = _method_class(mname)
            kwargs[name] = _from_dict(mcls, value, key)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _method_class(name: str) -> type[MethodConfig]:
    load_builtin_specs()
    if name not in METHOD_CONFIGS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[name]


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`config_to_dict` with type checking of every field."""
    return _from_dict(RunConfig, data, "")


def save_config(cfg: RunConfig, path) -> None:
    from pathlib import Path

    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")


def load_config(path) -> RunConfig:
    from pathlib import Path

    return config_from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- overrides
def apply_overrides(cfg: RunConfig, overrides: list[str] | None) -> RunConfig:
    """Apply ``key=value`` strings (``optim.lr=3e-2``, ``data.patch_size=64,64,64``) in place.

    Setting ``method.name`` swaps the method dataclass for that method's defaults. Raises ValueError
    naming the bad key or value.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        obj: Any = cfg
        for i, p in enumerate(parts[:-1]):
            if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"override {key!r}: no field {'.'.join(parts[: i + 1])!r}")
            obj = getattr(obj, p)
        last = parts[-1]
        if not dataclasses.is_dataclass(obj) or last not in {f.name for f in dataclasses.fields(obj)}:
            known = sorted(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else []
            raise ValueError(f"override {key!r}: no such field (known here: {known})")
        if obj is getattr(cfg, "method", None) and last == "name":  # (any dataclass tree may be overridden)
            cfg.method = _method_class(raw.strip())()
            continue
        hint = _hints(type(obj))[last]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            raise ValueError(f"override {key!r}: is a group; set one of its fields")
        setattr(obj, last, _coerce(raw.strip(), hint, key))
    return cfg


def resolve(preset: str, overrides: list[str] | None = None) -> RunConfig:
    """Preset + overrides -> the complete configuration of a run."""
    return apply_overrides(get_preset(preset), overrides)
