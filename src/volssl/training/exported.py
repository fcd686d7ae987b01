"""A network exported as a safetensors folder (``volssl export RUN OUT --format safetensors``), read
back as the payload :func:`volssl.training.checkpoint.load_checkpoint` returns for a ``.pt`` file.

The folder (the layout of a Hugging Face model repository)::

    OUT/model.safetensors   the network's state dict (the checkpoint's "network"; names as build_model's)
    OUT/config.json         {"format": "volssl-safetensors", "version": 1, "kind", "method", "preset",
                             "architecture": ModelConfig dict, "parameters", "plan", "patch_size", "step",
                             "final_loss", "final_loss_ema", "probe", "encoder_keys", "config",
                             ["finetune": {"labels", "channels", "deep_supervision", "task", "offsets", ...}],
                             ["source_format"], "exported_from", "weights", "weights_sha256"}
    OUT/README.md           the model card (written by volssl.training.export)

Wherever a checkpoint is accepted (``--checkpoint``, ``--model``, ``load_checkpoint``), such a folder
and ``hf://ORG/NAME[@REVISION]`` (a Hub repository holding one; :mod:`volssl.util.hub`) are too:
:func:`locate_exported` says whether a reference is one, :func:`read_exported` loads it. safetensors
holds only tensors, so loading runs no code; ``weights_sha256`` (of ``model.safetensors``) is verified.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from volssl.util.atomic import atomic_path, write_json_atomic, write_text_atomic
from volssl.util.hub import download_hub_folder, is_hub_reference

EXPORT_FORMAT = "volssl-safetensors"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: fields of a fine-tuned checkpoint kept under config.json's "finetune" (and returned top-level by read_exported)
FINETUNE_FIELDS = ("labels", "channels", "deep_supervision", "task", "offsets", "recipe", "fold", "n_train",
                   "pretrained")


def is_exported_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``model.safetensors`` and ``config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file()


def locate_exported(ref: str | os.PathLike | None) -> Path | None:
    """The exported folder ``ref`` names, or None when it names something else (a ``.pt`` file, a run folder).

    ``hf://ORG/NAME[@REVISION]`` is downloaded (or found in the cache) first; a Hub repository that
    holds no export is a ValueError naming it and what it holds. Download failures: see
    :func:`volssl.util.hub.download_hub_folder`.
    """
    if ref is None:
        return None
    if is_hub_reference(ref):
        folder = download_hub_folder(str(ref))
        if not is_exported_folder(folder):
            names = sorted(p.name for p in folder.iterdir())[:10]
            raise ValueError(f"{ref}: the repository holds no volssl export ({WEIGHTS_FILE} + {CONFIG_FILE}); "
                             f"found {names}")
        return folder
    if isinstance(ref, (str, os.PathLike)) and is_exported_folder(ref):
        return Path(ref).expanduser()
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_exported(folder: str | os.PathLike, network: Mapping[str, torch.Tensor], config: dict[str, Any],
                   card: str | None = None) -> dict[str, Path]:
    """Write ``network`` (a state dict) to ``folder/model.safetensors`` and ``config`` (see the module
    docstring; ``weights`` and ``weights_sha256`` are filled in here) to ``folder/config.json``, and
    ``card`` to ``folder/README.md``; each file atomically. Returns ``{"weights", "config", "card"}`` paths.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in network.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"network entries that are not tensors cannot be exported: {bad[:5]}")
    # safetensors refuses tensors that share memory: one contiguous CPU copy each
    tensors = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in network.items()}
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "volssl", "export": EXPORT_FORMAT})
    config = {**config, "weights": WEIGHTS_FILE, "weights_sha256": file_sha256(weights)}
    write_json_atomic(folder / CONFIG_FILE, config)
    paths = {"weights": weights, "config": folder / CONFIG_FILE}
    if card is not None:
        write_text_atomic(folder / CARD_FILE, card)
        paths["card"] = folder / CARD_FILE
    return paths


def read_export_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json``, checked: a volssl export of a version this volssl reads, with an
    architecture. ValueError naming the file otherwise."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not a volssl export (format {found!r}, expected {EXPORT_FORMAT!r}; a "
                         "transformers or other model folder is not a volssl checkpoint)")
    if int(config.get("version") or 0) > EXPORT_VERSION:
        raise ValueError(f"{path}: export version {config['version']} is newer than this volssl ({EXPORT_VERSION})")
    if not isinstance(config.get("architecture"), dict):
        raise ValueError(f"{path}: no 'architecture' (the ModelConfig of the network)")
    if config.get("kind") not in ("pretrain", "finetune", "import"):
        raise ValueError(f"{path}: 'kind' must be 'pretrain', 'finetune' or 'import', got {config.get('kind')!r}")
    return config


def read_exported(folder: str | os.PathLike, reference: str | None = None) -> dict[str, Any]:
    """The checkpoint payload (docs/design.md, "Checkpoint" / "Fine-tuned model") of an exported folder.

    ``network`` holds the tensors of ``model.safetensors`` (on the CPU); ``model`` is config.json's
    ``architecture``; a fine-tuned export also has ``labels``, ``channels``, ``patch_size``,
    ``deep_supervision``, ``task`` and ``offsets`` at the top level. No optimiser state. ``source``
    records the folder (and ``reference``, e.g. the ``hf://`` address it came from). ValueError naming
    the file for a broken config, a checksum mismatch or an unreadable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_export_config(folder)
    weights = folder / WEIGHTS_FILE
    expected = config.get("weights_sha256")
    if expected and file_sha256(weights) != expected:
        raise ValueError(f"{weights}: checksum mismatch: the file is corrupt or was changed after export "
                         f"(config.json's weights_sha256 is {expected[:12]}...)")
    try:
        network = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    metrics = {"loss": config.get("final_loss"), "loss_ema": config.get("final_loss_ema")}
    payload: dict[str, Any] = {
        "format": "volssl", "version": 1, "kind": config["kind"], "tag": "export",
        "config": config.get("config") or {}, "model": config["architecture"], "network": network,
        "encoder_keys": config.get("encoder_keys") or "encoder.", "method_state": None, "optimizer": None,
        "scheduler": None, "scaler": None, "rng": None, "step": int(config.get("step") or 0),
        "data_position": int(config.get("step") or 0), "plan": config.get("plan"), "metrics": metrics,
        "source": {"format": config.get("source_format") or "safetensors", "path": str(folder),
                   "reference": reference or str(folder), "method": config.get("method")},
    }
    if config["kind"] == "finetune":
        payload.update({k: v for k, v in (config.get("finetune") or {}).items() if k in FINETUNE_FIELDS})
        payload["patch_size"] = config.get("patch_size")
    return payload
