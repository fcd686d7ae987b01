"""volssl checkpoints: atomic ``torch.save`` dicts that load with ``weights_only=True``.

A pre-training run keeps three files in ``RUN/checkpoints/``: ``latest.pt`` (every
``train.checkpoint_every`` steps and when the run is stopped by a signal), ``best.pt`` (lowest
smoothed training loss, or validation loss) and ``final.pt``. The payload (see docs/design.md,
"Checkpoint")::

    {"format": "volssl", "version": 1, "kind": "pretrain", "tag": "latest" | "best" | "final",
     "config": config_to_dict(cfg), "model": config_to_dict(cfg.model),
     "network": backbone state dict (what fine-tuning transfers), "encoder_keys": "encoder.",
     "method_state": full method state dict, "optimizer", "scheduler", "scaler", "step",
     "data_position": global batches consumed, "rng": rng_state(), "plan": plan.json dict or None,
     "metrics": {...}}

Everything in it is a tensor, dict, list, tuple, str, int, float, bool or None, so
``torch.load(weights_only=True)`` reads it without unpickling arbitrary objects.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volssl.util.atomic import atomic_path

FORMAT = "volssl"
VERSION = 1
TAGS = ("latest", "best", "final")


def save_checkpoint(path: str | os.PathLike, **payload: Any) -> Path:
    """Write ``payload`` (plus ``format``/``version``) to ``path`` atomically.

    The file is written beside ``path`` under a temporary name, fsynced and renamed, so a process
    killed while saving leaves the previous checkpoint intact.
    """
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION}
    data.update(payload)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a volssl checkpoint with ``weights_only=True`` onto the CPU.

    Raises FileNotFoundError if ``path`` does not exist and ValueError naming the file if it is
    truncated/corrupt, holds objects other than tensors and plain containers, or is not a volssl
    checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a plain volssl checkpoint (weights_only load refused it: {e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a volssl checkpoint (no format='volssl' field; found {what})")
    if int(data.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: checkpoint version {data['version']} is newer than this volssl ({VERSION})")
    return data


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """States of every global RNG, in weights_only-safe types.

    ``torch``: CPU generator state (uint8 tensor); ``cuda``: one state per visible device (or []);
    ``numpy``: the legacy global MT19937 state as a dict (key as an int64 tensor); ``python``: the
    ``random`` module state as nested tuples of ints.
    """
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only if as many devices are visible)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
