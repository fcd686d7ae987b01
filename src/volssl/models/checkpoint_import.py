"""Import weights published by other frameworks as volssl checkpoints.

``nnssl`` (MIC-DKFZ/nnssl, the S3D paper's framework): a torch file holding ``network_weights``, the
state dict of dynamic-network-architectures' ``ResidualEncoderUNet``, and usually
``nnssl_adaptation_plan`` (architecture, pre-training plan, input channels, recommended patch size,
``key_to_encoder``/``key_to_stem``). Our :class:`~volssl.models.resenc_unet.ResEncUNet` uses the
same key layout, so the mapping is one to one except for

* aliases DNA stores twice: ``...all_modules.0.*`` (= ``...conv.*``), ``...all_modules.1.*``
  (= ``...norm.*``) and ``decoder.encoder.*`` (= ``encoder.*``): the canonical copy is kept;
* ``decoder.seg_layers.*``: the pre-training output convs (intensity reconstruction), dropped like
  :meth:`volssl.methods.s3d.S3D.transfer_state_dict` drops ours;
* ``_orig_mod.`` / ``module.`` prefixes (torch.compile / DDP), stripped.

Any other key, or any tensor whose shape differs from the target architecture's, is refused with
a message naming the key, the expected and the found shape. Files are read with
``torch.load(weights_only=True)`` (plus numpy's data-only array/scalar constructors, which nnssl
plans may contain): a checkpoint cannot run code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from volssl.config import ModelConfig, RunConfig, config_to_dict
from volssl.models.registry import ARCHITECTURES, build_model, get_arch
from volssl.models.resenc_unet import LEAKY_SLOPE, NORM_EPS

HEAD_PREFIX = "decoder.seg_layers."
_ALIASES = ((".all_modules.0.", ".conv."), (".all_modules.1.", ".norm."))
_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class ImportReport:
    """What an import mapped: counts, and the names of what it left out."""

    mapped: int = 0
    aliases: int = 0  # duplicate copies of mapped tensors (DNA's all_modules.* / decoder.encoder.*)
    dropped: list[str] = field(default_factory=list)  # pre-training heads
    missing: list[str] = field(default_factory=list)  # target keys absent from the source (decoder only)

    def summary(self) -> str:
        text = f"mapped {self.mapped} tensors, dropped {len(self.dropped)}"
        if self.dropped:
            text += f" ({', '.join(self.dropped)})"
        text += f", skipped {self.aliases} duplicate aliases"
        if self.missing:
            text += f"; {len(self.missing)} decoder tensors not in the source keep their fresh init"
        return text


# --------------------------------------------------------------------------- safe loading
def _numpy_data_globals() -> list[Any]:
    """numpy's data-only constructors (arrays, scalars, dtypes): nnssl plans may hold numpy values."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    return [np.dtype, np.ndarray, _reconstruct, scalar] + [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]


def load_untrusted(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a clear ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused: the file holds objects other than tensors and plain data, and volssl loads "
            f"checkpoints with weights_only=True so that a downloaded file cannot run code ({str(e)[-300:]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None


def _plain(obj: Any) -> Any:
    """numpy values -> Python values, recursively (our checkpoints load without the numpy allowlist)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if type(obj).__module__ == "numpy":
        return obj.tolist() if hasattr(obj, "tolist") else str(obj)
    return obj


# --------------------------------------------------------------------------- architecture
def _isotropic(strides: Any, where: str) -> tuple[int, ...]:
    out = []
    for s in strides:
        vals = [int(v) for v in s] if isinstance(s, (list, tuple)) else [int(s)]
        if len(set(vals)) != 1:
            raise ValueError(f"{where}: anisotropic stride {s} is not supported (volssl ResEnc U-Nets are isotropic)")
        out.append(vals[0])
    return tuple(out)


def model_config_from_plan(plan: Mapping[str, Any] | None, in_channels: int, arch: str | None = None,
                           where: str = "nnssl checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` an nnssl adaptation plan describes (``arch`` when there is no plan).

    Accepts the architecture names ``ResEncL`` and ``ResidualEncoderUNet`` (with ``arch_kwargs``:
    3^3 kernels, one decoder conv per stage, conv bias, instance norm, leaky ReLU); anything else is
    a ValueError naming what does not fit. Our ResEnc U-Net fixes InstanceNorm3d's ``eps`` (1e-5),
    ``affine=True`` and LeakyReLU's ``negative_slope`` (0.01), and :class:`ModelConfig` cannot carry
    other values, so a plan whose ``norm_op_kwargs`` / ``nonlin_kwargs`` set different ones is
    refused with a ValueError naming ``where``, the key and both values. Absent keys (or absent
    kwargs) mean torch's defaults, which are ours: eps 1e-5, slope 0.01; an absent ``affine`` is not
    checked (the state dict decides: missing norm weights are refused by the key mapping).
    """
    if not plan:
        return ModelConfig(arch=arch or "resenc-l", in_channels=in_channels, out_channels=1)
    arch_plans = plan.get("architecture_plans") or {}
    name = arch_plans.get("arch_class_name") or plan.get("architecture_name") or "ResEncL"
    kwargs = arch_plans.get("arch_kwargs")
    if name in ("ResEncL",) and not kwargs:
        return ModelConfig(arch="resenc-l", in_channels=in_channels, out_channels=1)
    if name != "ResidualEncoderUNet" or not kwargs:
        raise ValueError(f"{where}: architecture {name!r} is not a ResEnc U-Net; volssl imports nnssl 'ResEncL' "
                         "and 'ResidualEncoderUNet' weights")
    checks = {
        "kernel_sizes": all(all(int(k) == 3 for k in (ks if isinstance(ks, (list, tuple)) else [ks]))
                            for ks in kwargs.get("kernel_sizes", [3])),
        "n_conv_per_stage_decoder": all(int(n) == 1 for n in _as_list(kwargs.get("n_conv_per_stage_decoder", 1))),
        "conv_bias": bool(kwargs.get("conv_bias", True)),
        "norm_op": "InstanceNorm" in str(kwargs.get("norm_op", "InstanceNorm3d")),
        "nonlin": "LeakyReLU" in str(kwargs.get("nonlin", "LeakyReLU")),
        "dropout_op": kwargs.get("dropout_op") in (None, "None"),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{where}: ResidualEncoderUNet settings not supported by volssl: "
                         + ", ".join(f"{k}={kwargs.get(k)!r}" for k in bad))
    _check_layer_kwargs(kwargs, where)
    n = int(kwargs.get("n_stages", len(kwargs["features_per_stage"])))
    features = tuple(int(f) for f in _as_list(kwargs["features_per_stage"], n))
    blocks = tuple(int(b) for b in _as_list(kwargs["n_blocks_per_stage"], n))
    strides = _isotropic(kwargs["strides"], where)
    base = "resenc-l"
    spec = ARCHITECTURES[base]
    return ModelConfig(arch=base, in_channels=in_channels, out_channels=1,
                       features=None if features == spec.features else features,
                       blocks=None if blocks == spec.blocks else blocks,
                       strides=None if strides == spec.strides else strides)


def _check_layer_kwargs(kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse ``norm_op_kwargs`` / ``nonlin_kwargs`` values our ResEnc U-Net does not use (see
    :func:`model_config_from_plan`): the weights would load, but the network would compute another
    function than the one that was pre-trained."""
    ours = (("norm_op_kwargs", "eps", NORM_EPS), ("norm_op_kwargs", "affine", True),
            ("nonlin_kwargs", "negative_slope", LEAKY_SLOPE))
    for group, key, expected in ours:
        values = kwargs.get(group)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: architecture_plans.arch_kwargs.{group} is a {type(values).__name__}, "
                             "expected a mapping")
        if key not in values or values[key] is None:
            continue
        found = values[key]
        if isinstance(expected, bool):
            same = isinstance(found, bool) and found == expected
        else:
            try:
                same = not isinstance(found, bool) and math.isclose(float(found), expected, rel_tol=1e-9, abs_tol=0.0)
            except (TypeError, ValueError):
                same = False
        if not same:
            raise ValueError(f"{where}: architecture_plans.arch_kwargs.{group}.{key} is {found!r}, but volssl's "
                             f"ResEnc U-Net uses {expected!r} (fixed: models/resenc_unet.py); importing the "
                             "weights would change what the network computes")


def _as_list(v: Any, n: int | None = None) -> list:
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v] * (n or 1)


# --------------------------------------------------------------------------- key mapping
def peel_prefixes(key: str, prefixes: Sequence[str]) -> tuple[str, list[str]]:
    """``(key without any of prefixes at its front, the prefixes removed in order)``: removed
    repeatedly, in any order (``module._orig_mod.x`` and ``_orig_mod.module.x`` both give ``x``)."""
    peeled = []
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
                peeled.append(p)
    return key, peeled


def _strip(key: str) -> str:
    return peel_prefixes(key, _PREFIXES)[0]


def _canonical(key: str) -> tuple[str, bool]:
    """(our key, whether ``key`` is one of DNA's duplicate aliases)."""
    out = key
    if out.startswith("decoder.encoder."):
        out = out[len("decoder."):]
    for alias, canon in _ALIASES:
        out = out.replace(alias, canon)
    return out, out != key


def map_dna_state_dict(source: Mapping[str, Tensor], target: Mapping[str, Tensor | torch.Size],
                       where: str = "nnssl checkpoint") -> tuple[dict[str, Tensor], ImportReport]:
    """Map a DNA ``ResidualEncoderUNet`` state dict onto ``target`` (our state dict, or key -> shape).

    Returns ``(mapped state dict, report)``. ValueError, naming keys and shapes, if a tensor's shape
    differs from the target's, if the source has keys the target lacks, or if an encoder/stem
    tensor is missing. Missing decoder tensors are allowed (reported).
    """
    shapes = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in target.items()}
    report = ImportReport()
    mapped: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    # canonical keys first, so an alias only fills in when its canonical copy is absent
    items = sorted(((_strip(k), v) for k, v in source.items()), key=lambda kv: _canonical(kv[0])[1])
    for key, value in items:
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: network_weights[{key!r}] is a {type(value).__name__}, not a tensor")
        ours, is_alias = _canonical(key)
        if ours.startswith(HEAD_PREFIX):
            if not is_alias:
                report.dropped.append(ours)
            continue
        if ours not in shapes:
            unexpected.append(key)
            continue
        if tuple(value.shape) != shapes[ours]:
            mismatched.append(f"{ours}: expected {shapes[ours]}, found {tuple(value.shape)}")
            continue
        if ours in mapped:
            report.aliases += 1
            continue
        mapped[ours] = value
    if mismatched:
        raise ValueError(f"{where}: {len(mismatched)} tensors do not fit the target architecture: "
                         + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} keys have no counterpart in a volssl ResEnc U-Net "
                         f"(is this a ResidualEncoderUNet state dict?): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
    absent = [k for k in shapes if k not in mapped and not k.startswith(HEAD_PREFIX)]
    missing_encoder = [k for k in absent if k.startswith("encoder.")]
    if missing_encoder:
        raise ValueError(f"{where}: {len(missing_encoder)} encoder tensors are missing: "
                         + ", ".join(missing_encoder[:8]) + (" ..." if len(missing_encoder) > 8 else ""))
    report.missing = absent
    report.mapped = len(mapped)
    report.dropped.sort()
    return mapped, report


# --------------------------------------------------------------------------- conversion
def convert_nnssl(src: str | os.PathLike, arch: str | None = None) -> tuple[dict[str, Any], ImportReport]:
    """Read the nnssl checkpoint ``src``; return ``(volssl checkpoint payload, report)``.

    The architecture comes from the file's ``nnssl_adaptation_plan`` when present, else from
    ``arch`` (default ``resenc-l``); the input channels from the stem's weight. The payload follows
    docs/design.md ("Checkpoint") with ``kind="import"``, no optimiser state and a ``source`` record;
    write it with :func:`volssl.training.checkpoint.save_checkpoint`.
    """
    src = Path(src)
    data = load_untrusted(src)
    if not isinstance(data, dict) or "network_weights" not in data:
        what = f"keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{src}: not an nnssl checkpoint (no 'network_weights'; found {what})")
    weights = data["network_weights"]
    if not isinstance(weights, Mapping):
        raise ValueError(f"{src}: 'network_weights' is a {type(weights).__name__}, not a state dict")
    weights = {_strip(str(k)): v for k, v in weights.items()}
    stem = weights.get("encoder.stem.convs.0.conv.weight", weights.get("encoder.stem.convs.0.all_modules.0.weight"))
    if not isinstance(stem, Tensor) or stem.ndim != 5:
        raise ValueError(f"{src}: no 3D stem convolution 'encoder.stem.convs.0.conv.weight' in network_weights "
                         "(not a ResidualEncoderUNet state dict)")
    if arch is not None:
        get_arch(arch)  # KeyError listing the known names
    plan = _plain(data.get("nnssl_adaptation_plan")) or None
    in_channels = int(stem.shape[1])
    model_cfg = model_config_from_plan(plan, in_channels, arch, where=str(src))
    if plan and plan.get("pretrain_num_input_channels") not in (None, in_channels):
        raise ValueError(f"{src}: the plan says {plan['pretrain_num_input_channels']} input channels but the stem "
                         f"has {in_channels}")
    target = build_model(model_cfg, device="meta").state_dict()
    mapped, report = map_dna_state_dict(weights, target, where=str(src))
    mapped = {k: v.detach().clone().contiguous() for k, v in mapped.items()}

    run_cfg = RunConfig(description=f"imported from nnssl checkpoint {src.name}", model=model_cfg)
    patch = (plan or {}).get("recommended_downstream_patchsize")
    if isinstance(patch, (list, tuple)) and len(patch) == 3:
        run_cfg.data = dataclasses.replace(run_cfg.data, patch_size=tuple(int(p) for p in patch))
    payload = {
        "kind": "import", "tag": "import", "config": config_to_dict(run_cfg), "model": config_to_dict(model_cfg),
        "network": mapped, "encoder_keys": "encoder.", "method_state": None, "optimizer": None,
        "scheduler": None, "scaler": None, "step": 0, "data_position": 0, "rng": None, "plan": None,
        "metrics": {},
        "source": {"format": "nnssl", "path": str(src), "trainer_name": _plain(data.get("trainer_name")),
                   "current_epoch": _plain(data.get("current_epoch")), "adaptation_plan": plan,
                   "report": dataclasses.asdict(report)},
    }
    return payload, report

