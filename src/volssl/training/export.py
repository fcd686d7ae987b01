"""``volssl export RUN OUT --format nnunet|nnssl|safetensors``: a run's network in the form the field
shares weights in (:func:`export_run`).

``RUN``: a pre-training or fine-tuning run folder (``checkpoints/final.pt``; else ``latest.pt`` then
``best.pt`` for pre-training, ``best.pt`` then ``latest.pt`` for fine-tuning: a folder with
``run.json``), a checkpoint ``.pt`` file, an exported safetensors folder or ``hf://ORG/NAME[@REV]``.

* ``nnunet`` (ResEnc U-Nets only): ``OUT/nnunet_pretrained_weights.pth`` = ``{"network_weights": ...}``
  in dynamic-network-architectures' ``ResidualEncoderUNet`` key layout (every key nnU-Net v2's
  ``load_pretrained_weights`` requires, :mod:`volssl.models.dna_export`; decoder tensors an
  encoder-only pre-training lacks are freshly initialised and listed), and ``OUT/nnunet_plans.json``:
  the nnU-Net plans configuration the weights need (patch, spacing, normalisation, architecture)
  and what must match.
* ``nnssl`` (ResEnc U-Nets only): ``OUT/checkpoint_final.pth`` = ``{"network_weights",
  "nnssl_adaptation_plan", "trainer_name", ...}`` as nnssl writes its checkpoints (read back by
  :func:`volssl.models.checkpoint_import.convert_nnssl` and nnssl's fine-tuning branch of nnU-Net),
  and ``OUT/adaptation_plan.json`` (the plan alone, as nnssl's released models carry it).
* ``safetensors`` (any architecture): ``OUT/model.safetensors``, ``OUT/config.json`` and the model
  card ``OUT/README.md`` (:mod:`volssl.training.exported`), a folder every volssl command accepts
  as a checkpoint and that can be uploaded to the Hugging Face Hub as it is.

Every file is loadable with ``torch.load(weights_only=True)`` / safetensors: tensors and plain data only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from volssl.config import ModelConfig
from volssl.training.checkpoint import checkpoint_model, find_run_checkpoint, load_checkpoint
from volssl.training.exported import (
    CARD_FILE, CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, FINETUNE_FIELDS, WEIGHTS_FILE, locate_exported,
    read_exported, read_export_config, write_exported,
)
from volssl.util.atomic import atomic_path, write_json_atomic

FORMATS = ("nnunet", "nnssl", "safetensors")
NNUNET_WEIGHTS = "nnunet_pretrained_weights.pth"
NNUNET_PLANS = "nnunet_plans.json"
NNUNET_CONFIGURATION = "3d_fullres_volssl"
NNSSL_CHECKPOINT = "checkpoint_final.pth"
NNSSL_PLAN = "adaptation_plan.json"
_NORMALIZATION = {"zscore": ("ZScoreNormalization", False), "zscore_nonzero": ("ZScoreNormalization", True),
                  "ct": ("CTNormalization", False), "none": ("NoNormalization", False)}
_PRETRAIN_ORDER = ("final.pt", "latest.pt", "best.pt")
_FINETUNE_ORDER = ("final.pt", "best.pt", "latest.pt")


@dataclasses.dataclass
class RunInfo:
    """What an export says about the run: read from the checkpoint (and ``RUN/probe.csv``)."""

    where: str  # the checkpoint file (or exported folder / hf:// address) read
    data: dict[str, Any]  # the checkpoint payload
    model: ModelConfig
    kind: str  # "pretrain", "finetune" or "import"
    method: str
    preset: str
    step: int
    patch_size: list[int] | None
    final_loss: float | None
    final_loss_ema: float | None
    probe: dict[str, float] | None  # the last probe row: step, probe_dice, probe_floor


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_run` wrote: ``files`` (role -> path), the nnU-Net plans (``nnunet``) or
    adaptation plan (``nnssl``) it wrote, and notes the user should read."""

    format: str
    out: Path
    info: RunInfo
    files: dict[str, Path]
    plans: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- reading the run
def run_checkpoint(run: str | os.PathLike) -> str | Path:
    """The checkpoint file ``RUN`` names: the file itself or a run folder's checkpoint (module
    docstring; exported folders are handled by :func:`read_run`). FileNotFoundError naming the path otherwise."""
    path = Path(run).expanduser()
    if not path.exists():
        hint = f" (a link to the missing {os.readlink(path)})" if path.is_symlink() else ""
        raise FileNotFoundError(f"RUN not found: {path}{hint}")
    if path.is_file():
        return path
    order = _FINETUNE_ORDER if (path / "run.json").is_file() else _PRETRAIN_ORDER
    found = find_run_checkpoint(path, order)
    if found is not None:
        return found
    raise FileNotFoundError(f"{path}: no checkpoint found (looked for {', '.join(order)} in {path}/checkpoints and "
                            f"{path}); RUN is a run folder, a checkpoint .pt file or an exported folder")


def read_run(run: str | os.PathLike) -> RunInfo:
    """The checkpoint of ``run`` and what the export records about it (method, steps, losses, probe)."""
    exported = locate_exported(run)
    if exported is not None:
        where: str | Path = str(run)
        data = read_exported(exported, reference=str(run))
    else:
        where = run_checkpoint(run)
        data = load_checkpoint(where)
    model = checkpoint_model(data, where)
    kind = str(data.get("kind"))
    config = data.get("config") or {}
    source = data.get("source") or {}
    pretrained = data.get("pretrained") or {}
    if kind == "finetune":
        method = str(source.get("method") or pretrained.get("method") or "scratch")
        patch = data.get("patch_size")
        preset = str(data.get("recipe") or (config.get("recipe") or {}).get("name") or "")
    else:
        method = str(source.get("method") or (config.get("method") or {}).get("name") or "")
        if kind == "import" or method in ("", "none"):
            method = str(source.get("format") or "import")
        patch = (config.get("data") or {}).get("patch_size")
        preset = str(config.get("preset") or "")
    metrics = data.get("metrics") or {}
    probe = _probe_of(where, data)
    return RunInfo(where=str(where), data=data, model=model, kind=kind, method=method, preset=preset,
                   step=int(data.get("step") or 0), patch_size=[int(p) for p in patch] if patch else None,
                   final_loss=_float(metrics.get("loss")), final_loss_ema=_float(metrics.get("loss_ema")),
                   probe=probe)


def _probe_of(where: str | Path, data: dict[str, Any]) -> dict[str, float] | None:
    """The last probe row of the run (``RUN/probe.csv`` beside ``RUN/checkpoints/``), or what an
    exported folder recorded; None without one."""
    exported = locate_exported(data["source"]["path"]) if data.get("tag") == "export" else None
    if exported is not None:
        return read_export_config(exported).get("probe")
    path = Path(where)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    csv_path = run_dir / "probe.csv"
    if not csv_path.is_file():
        return None
    from volssl.training.probe import read_probe_csv

    rows = [r for r in read_probe_csv(csv_path) if "probe_dice" in r]
    if not rows:
        return None
    last = rows[-1]
    return {"step": int(last["step"]), "probe_dice": last["probe_dice"], "probe_floor": last.get("probe_floor")}


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- the plan in nnU-Net's terms
def plan_spacing(plan: dict[str, Any] | None) -> list[float] | None:
    """The target spacing (x, y, z mm) of a volssl plan dict (``target_spacing``, or ``spacing``), or None."""
    if not plan:
        return None
    spacing = plan.get("target_spacing", plan.get("spacing"))
    return [float(s) for s in spacing] if spacing else None


def plan_normalization(plan: dict[str, Any] | None, channels: int) -> tuple[list[str] | None, list[bool] | None]:
    """nnU-Net's ``normalization_schemes`` / ``use_mask_for_norm`` for a volssl plan's normalisation
    ("zscore" -> ZScoreNormalization, "zscore_nonzero" -> ZScoreNormalization inside the nonzero mask,
    "ct" -> CTNormalization for channels with CT intensities, "none" -> NoNormalization); None when
    the plan does not say."""
    name = (plan or {}).get("normalization")
    if name not in _NORMALIZATION:
        return None, None
    scheme, mask = _NORMALIZATION[name]
    schemes = [scheme] * channels
    if name == "ct":
        ct = (plan or {}).get("ct_intensities") or []
        schemes = ["CTNormalization" if i < len(ct) and ct[i] else "ZScoreNormalization" for i in range(channels)]
    return schemes, [mask] * channels


def must_match(info: RunInfo, fmt: str) -> list[str]:
    """What the downstream nnU-Net setup must match for these weights, in sentences."""
    plan = info.data.get("plan") or {}
    spacing = plan_spacing(plan)
    schemes, masks = plan_normalization(plan, info.model.in_channels)
    lines = [f"input channels: {info.model.in_channels} (the stem's weight; nnU-Net takes the count from "
             "dataset.json's channel_names)",
             "architecture: the 'architecture' entry (n_stages, features_per_stage, strides, n_blocks_per_stage, "
             "kernel_sizes, n_conv_per_stage_decoder, conv/norm/nonlin ops and their kwargs)"]
    lines.append(f"spacing: {spacing} mm (x, y, z)" if spacing else
                 "spacing: volssl kept each volume's own spacing (no resampling); use the dataset's own")
    lines.append(f"normalisation: {schemes} (use_mask_for_norm {masks})" if schemes else
                 "normalisation: not recorded in the checkpoint's plan")
    if plan.get("clip_percentiles"):
        lines.append(f"intensities were clipped to the percentiles {plan['clip_percentiles']} before normalising; "
                     "nnU-Net's schemes do not do this")
    if info.patch_size:
        lines.append(f"patch size: {info.patch_size} (x, y, z) was used in training; any patch divisible by the "
                     "total stride works, the same one transfers best")
    if spacing and len(set(spacing)) > 1 or info.patch_size and len(set(info.patch_size)) > 1:
        lines.append("axes: volssl lists spacing and patch as (x, y, z) on RAS axes; nnU-Net's SimpleITK reader "
                     "orders arrays (z, y, x): reverse these lists for nnU-Net's plans")
    return lines


# --------------------------------------------------------------------------- the formats
def _meta(info: RunInfo) -> dict[str, Any]:
    """Plain provenance fields stored beside the weights (weights_only-loadable)."""
    return {"library": "volssl", "volssl_version": _version(), "kind": info.kind, "method": info.method,
            "preset": info.preset, "step": info.step, "architecture": dataclasses.asdict(info.model)}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("volssl")
    except PackageNotFoundError:
        return "unknown"


def nnunet_plans(info: RunInfo) -> dict[str, Any]:
    """``OUT/nnunet_plans.json``: the nnU-Net v2 plans configuration the exported weights need
    (``configuration``: add it to the ``configurations`` of your plans file as
    ``3d_fullres_volssl``; it inherits the rest from ``3d_fullres``), plus what must match."""
    from volssl.models.dna_export import nnunet_architecture

    plan = info.data.get("plan") or {}
    schemes, masks = plan_normalization(plan, info.model.in_channels)
    configuration: dict[str, Any] = {"inherits_from": "3d_fullres",
                                     "data_identifier": f"nnUNetPlans_{NNUNET_CONFIGURATION}"}
    if info.patch_size:
        configuration["patch_size"] = info.patch_size
    if plan_spacing(plan):
        configuration["spacing"] = plan_spacing(plan)
    if schemes:
        configuration.update(normalization_schemes=schemes, use_mask_for_norm=masks)
    configuration["architecture"] = nnunet_architecture(info.model)
    return {"weights": NNUNET_WEIGHTS, "configuration_name": NNUNET_CONFIGURATION, "configuration": configuration,
            "input_channels": info.model.in_channels, "must_match": must_match(info, "nnunet"),
            "volssl": {**_meta(info), "plan": plan}}


def _check_targets(out: Path, names: list[str], overwrite: bool) -> None:
    """FileExistsError for files of the format already in ``out`` (unless ``overwrite``); ValueError
    when ``out`` holds a run or another model (its config.json is not a volssl export's), always."""
    config = out / CONFIG_FILE
    if CONFIG_FILE in names and config.is_file():
        try:
            foreign = json.loads(config.read_text()).get("format") != EXPORT_FORMAT
        except (ValueError, AttributeError, UnicodeDecodeError):
            foreign = True
        if foreign:
            raise ValueError(f"{config} belongs to a run or another model, not to a volssl export; export into "
                             "another folder")
    existing = [str(out / n) for n in names if os.path.lexists(out / n)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; choose another OUT or pass --overwrite to replace "
                              f"{'it' if len(existing) == 1 else 'the ' + str(len(existing)) + ' files'}")


def _torch_save(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(obj, tmp)


def export_nnunet(info: RunInfo, out: Path) -> ExportResult:
    """Write ``OUT/nnunet_pretrained_weights.pth`` and ``OUT/nnunet_plans.json`` (module docstring)."""
    from volssl.models.dna_export import complete_state_dict, to_dna_state_dict

    full, filled = complete_state_dict(info.data["network"], info.model, where=info.where)
    _torch_save({"network_weights": to_dna_state_dict(full), "volssl": _meta(info)}, out / NNUNET_WEIGHTS)
    plans = nnunet_plans(info)
    notes = []
    if filled:
        plans["volssl"]["freshly_initialised"] = filled
        notes.append(f"{len(filled)} decoder tensors were not pre-trained ({info.method} trains the encoder only): "
                     "they are freshly initialised (He init), as nnU-Net would")
    write_json_atomic(out / NNUNET_PLANS, plans)
    return ExportResult("nnunet", out, info, {"weights": out / NNUNET_WEIGHTS, "plans": out / NNUNET_PLANS},
                        plans=plans, notes=notes)


def nnssl_pretrain_plan(info: RunInfo) -> dict[str, Any]:
    """The ``pretrain_plan`` of the nnssl adaptation plan: an nnssl ``Plan`` dict with one configuration
    (spacing, patch size, normalisation of the volssl plan; nnssl's fine-tuning reads the first one)."""
    plan = info.data.get("plan") or {}
    spacing = plan_spacing(plan)
    schemes, masks = plan_normalization(plan, info.model.in_channels)
    style = "noresample" if spacing is None else "onemmiso" if spacing == [1.0, 1.0, 1.0] else "fixed"
    name = str(plan.get("name") or "volssl")
    configuration = {"data_identifier": f"volsslPlans_{name}", "preprocessor_name": "DefaultPreprocessor",
                     "spacing_style": style, "normalization_schemes": schemes, "use_mask_for_norm": masks,
                     "spacing": spacing, "patch_size": info.patch_size}
    return {"dataset_name": "volssl", "plans_name": f"volsslPlans_{name}",
            "original_median_spacing_after_transp": spacing, "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "configurations": {style: configuration},
            "experiment_planner_used": "volssl", "volssl_plan": plan}


def export_nnssl(info: RunInfo, out: Path) -> ExportResult:
    """Write ``OUT/checkpoint_final.pth`` and ``OUT/adaptation_plan.json`` (module docstring)."""
    from volssl.models.dna_export import complete_state_dict, nnssl_adaptation_plan, to_dna_state_dict

    network, missing = complete_state_dict(info.data["network"], info.model, where=info.where, fill=False)
    plan = nnssl_adaptation_plan(info.model, nnssl_pretrain_plan(info), info.patch_size)
    trainer = f"volssl-{info.method}"
    _torch_save({"network_weights": to_dna_state_dict(network), "nnssl_adaptation_plan": plan,
                 "trainer_name": trainer, "current_epoch": None, "volssl": _meta(info)}, out / NNSSL_CHECKPOINT)
    write_json_atomic(out / NNSSL_PLAN, {**plan, "trainer_name": trainer})
    notes = [f"{len(missing)} decoder tensors are not in the file ({info.method} trains the encoder only); nnssl's "
             "fine-tuning loads the encoder and stem (key_to_encoder / key_to_stem)"] if missing else []
    return ExportResult("nnssl", out, info, {"checkpoint": out / NNSSL_CHECKPOINT, "plan": out / NNSSL_PLAN},
                        plans=plan, notes=notes)


def _public_config(config: Any) -> Any:
    """``config`` with absolute paths (a dataset, a checkpoint) cut to their last part: a model folder
    is meant to be shared, the paths of the machine it was trained on are not."""
    if isinstance(config, dict):
        return {k: _public_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_public_config(v) for v in config]
    if isinstance(config, str) and (config.startswith("/") or config.startswith("~")) and len(config) > 1:
        return Path(config).name
    return config


def export_config(info: RunInfo) -> dict[str, Any]:
    """config.json of the safetensors folder (:mod:`volssl.training.exported`)."""
    data = info.data
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, **_meta(info),
        "parameters": int(sum(v.numel() for v in data["network"].values())), "plan": data.get("plan"),
        "patch_size": info.patch_size, "final_loss": info.final_loss, "final_loss_ema": info.final_loss_ema,
        "probe": info.probe, "encoder_keys": data.get("encoder_keys") or "encoder.",
        "config": _public_config(data.get("config") or {}),
        "exported_from": {"checkpoint": Path(info.where).name, "tag": data.get("tag")},
    }
    if info.kind == "import":
        config["source_format"] = (data.get("source") or {}).get("format") or info.method
    if info.kind == "finetune":
        config["finetune"] = {k: _public_config(data.get(k)) for k in FINETUNE_FIELDS if k in data}
    return config


def export_safetensors(info: RunInfo, out: Path) -> ExportResult:
    """Write ``OUT/model.safetensors``, ``OUT/config.json`` and ``OUT/README.md`` (module docstring)."""
    from volssl.training.model_card import model_card

    config = export_config(info)
    files = write_exported(out, info.data["network"], config, card=model_card(info, config))
    return ExportResult("safetensors", out, info, files)


# --------------------------------------------------------------------------- the entry point
def export_run(run: str | os.PathLike, out: str | os.PathLike, fmt: str, overwrite: bool = False) -> ExportResult:
    """Export the network of ``run`` (module docstring) to the folder ``out`` in format ``fmt``
    (``"nnunet"``, ``"nnssl"`` or ``"safetensors"``).

    Existing files of the format in ``out`` are refused (FileExistsError) unless ``overwrite``.
    Raises FileNotFoundError naming ``run`` when it does not exist or holds no checkpoint, ValueError
    naming the file for an unreadable checkpoint, or for an architecture with no nnU-Net counterpart
    (``nnunet`` / ``nnssl``: ResEnc U-Nets only).
    """
    from volssl.models.dna_export import check_resenc
    from volssl.util.paths import check_output_dir

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    names = {"nnunet": [NNUNET_WEIGHTS, NNUNET_PLANS], "nnssl": [NNSSL_CHECKPOINT, NNSSL_PLAN],
             "safetensors": [WEIGHTS_FILE, CONFIG_FILE, CARD_FILE]}[fmt]
    out_path = Path(out).expanduser()
    if out_path.is_dir():
        _check_targets(out_path, names, overwrite)  # before reading a large checkpoint
    info = read_run(run)
    if fmt != "safetensors":
        check_resenc(info.model, where=f"{info.where} ({fmt} export)")
    out_path = check_output_dir(out_path, "export folder (OUT)")
    _check_targets(out_path, names, overwrite)
    writer = {"nnunet": export_nnunet, "nnssl": export_nnssl, "safetensors": export_safetensors}[fmt]
    return writer(info, out_path)


def compact_json(obj: Any) -> str:
    """``json.dumps(obj, indent=2)`` with every list of plain values on one line (``[3, 3, 3]``)."""
    import re

    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + ", ".join(
        v.strip() for v in m.group(1).split(",")) + "]" if m.group(1).strip() else "[]", text)


def describe_result(result: ExportResult) -> list[str]:
    """The lines ``volssl export`` prints: what was written where, the plans, the notes."""
    info = result.info
    lines = [f"exported {info.kind} checkpoint {info.where} ({info.method}, {info.model.arch}, step {info.step}) "
             f"as {result.format} to {result.out}:"]
    lines += [f"  {role:<10} {path}" for role, path in result.files.items()]
    if result.format == "nnunet" and result.plans is not None:
        lines.append("plans the weights need (also in the plans file above):")
        lines += ["  " + line for line in compact_json(result.plans["configuration"]).splitlines()]
        lines.append("must match:")
        lines += [f"  - {line}" for line in result.plans["must_match"]]
        lines.append(f"then: add 'configuration' to your nnU-Net plans as {NNUNET_CONFIGURATION!r}, preprocess "
                     f"(nnUNetv2_preprocess -d DATASET -plans_name PLANS -c {NNUNET_CONFIGURATION}) and train "
                     f"(nnUNetv2_train DATASET {NNUNET_CONFIGURATION} FOLD -p PLANS -pretrained_weights "
                     f"{result.files['weights']})")
    if result.format == "nnssl" and result.plans is not None:
        lines.append(f"adaptation plan: {result.plans['architecture_plans']['arch_class_name']}, "
                     f"{result.plans['pretrain_num_input_channels']} input channel(s), recommended patch "
                     f"{result.plans['recommended_downstream_patchsize']}")
    lines += [f"note: {n}" for n in result.notes]
    return lines
