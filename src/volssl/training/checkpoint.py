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
     "metrics": {...}, "checksum": "sha256:<hex>"}

``checksum`` is a SHA-256 over a canonical walk of every other field (each tensor's dtype, shape and
raw bytes; the plain values with their types; dict keys in order), written by :func:`save_checkpoint`
and verified by :func:`load_checkpoint`: a bit flipped inside a tensor's storage (which ``torch.load``
does not notice) makes the load fail with "checksum mismatch". It costs about 0.06 s per 100 MB of
tensors on a CPU with SHA instructions (0.05 s to save, 0.07 s to load the same 100 MB). A file
without the field (written before it existed, or by another tool) loads unverified.

Everything in it is a tensor, dict, list, tuple, str, int, float, bool or None, so
``torch.load(weights_only=True)`` reads it without unpickling arbitrary objects.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import stat
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from volssl.util.atomic import atomic_path
from volssl.util.errors import file_kind

FORMAT = "volssl"
VERSION = 1
TAGS = ("latest", "best", "final")
CHECKSUM_KEY = "checksum"
CHECKSUM_ALGO = "sha256"


def save_checkpoint(path: str | os.PathLike, **payload: Any) -> Path:
    """Write ``payload`` (plus ``format``/``version`` and its ``checksum``) to ``path`` atomically.

    The file is written beside ``path`` under a temporary name, fsynced and renamed, so a process
    killed while saving leaves the previous checkpoint intact. A ``checksum`` in ``payload`` (a
    re-saved loaded checkpoint) is replaced by the checksum of what is written now.
    """
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION}
    data.update(payload)
    data.pop(CHECKSUM_KEY, None)
    data[CHECKSUM_KEY] = payload_checksum(data)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read a volssl checkpoint with ``weights_only=True`` onto the CPU.

    ``path`` may also be an exported safetensors folder (``model.safetensors`` + ``config.json``) or
    ``hf://ORG/NAME[@REVISION]`` (a Hub repository holding one, downloaded through huggingface_hub's
    cache): the same payload, without optimiser state (:mod:`volssl.training.exported`).

    Raises FileNotFoundError if ``path`` does not exist (or is a link to a missing file) and
    ValueError naming the file if it is a folder, truncated/corrupt, fails its checksum (``verify``;
    a file without a checksum is not verified), holds objects other than tensors and plain
    containers, or is not a volssl checkpoint; a Hub reference that cannot be downloaded raises
    :class:`volssl.util.hub.HubUnreachable` (a ConnectionError) naming the repository.
    """
    from volssl.training.exported import locate_exported, read_exported

    exported = locate_exported(path)
    if exported is not None:
        return read_exported(exported, reference=str(path))
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path}: a symbolic link loop (a link that leads back to itself), not a checkpoint "
                             "file") from None
        if path.is_symlink():
            raise FileNotFoundError(f"checkpoint not found: {path} is a link to a missing file "
                                    f"({os.readlink(path)})") from None
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path}: a folder, not a checkpoint file")
    if not stat.S_ISREG(mode):  # a named pipe would block torch.load forever
        raise ValueError(f"{path}: {file_kind(mode)}, not a checkpoint file; not opened")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a plain volssl checkpoint (weights_only load refused it: {e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = f"keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a volssl checkpoint (no format='volssl' field; found {what})")
    if int(data.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: checkpoint version {data['version']} is newer than this volssl ({VERSION})")
    if verify and data.get(CHECKSUM_KEY) is not None:
        verify_checksum(data, path)
    return data


def find_run_checkpoint(folder: Path, names: Sequence[str]) -> Path | None:
    """A run folder's checkpoint: the first of ``names`` in ``folder/checkpoints``, else in ``folder``
    itself; None when there is none."""
    for where in (folder / "checkpoints", folder):
        for name in names:
            if (where / name).is_file():
                return where / name
    return None


def checkpoint_model(data: dict[str, Any], where: str | os.PathLike) -> Any:
    """The :class:`~volssl.config.ModelConfig` of a loaded checkpoint ``data``; ValueError naming ``where``
    if it lacks the ``network`` state dict or a valid ``model`` configuration."""
    from volssl.config import config_from_dict

    if not isinstance(data.get("network"), dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{where}: the checkpoint lacks the 'network' state dict or the 'model' configuration")
    try:
        return config_from_dict({"model": data["model"]}).model
    except ValueError as e:
        raise ValueError(f"{where}: bad 'model' configuration: {e}") from None


def verify_checksum(data: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """ValueError naming ``path`` unless ``data[CHECKSUM_KEY]`` matches the rest of ``data``."""
    stored = data.get(CHECKSUM_KEY)
    algo = str(stored).split(":", 1)[0] if isinstance(stored, str) else None
    if algo != CHECKSUM_ALGO:
        raise ValueError(f"{path}: unreadable checksum field {str(stored)[:40]!r}: the file is corrupt")
    if payload_checksum(data) != stored:
        raise ValueError(f"{path}: checksum mismatch: the file is corrupt (its tensors or values changed after "
                         "it was written)")


def payload_checksum(data: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of every field of ``data`` but :data:`CHECKSUM_KEY` (see the module docstring)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in data.items() if k != CHECKSUM_KEY})
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` into ``h``: a type tag, then a length-prefixed encoding of the value (recursively).

    Dicts are walked in insertion order, which ``torch.save`` / ``torch.load`` keep. Tensors contribute
    dtype, shape and their values' bytes (whatever their strides or device), so the digest of a loaded
    checkpoint equals that of the saved payload.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        _tag(h, b"T", f"{t.dtype}|{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        _tag(h, b"D", str(len(obj)).encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        _tag(h, b"L" if isinstance(obj, list) else b"U", str(len(obj)).encode())
        for v in obj:
            _feed(h, v)
    elif obj is None:
        _tag(h, b"N", b"")
    elif isinstance(obj, bool):
        _tag(h, b"B", b"1" if obj else b"0")
    elif isinstance(obj, int):
        _tag(h, b"I", str(int(obj)).encode())
    elif isinstance(obj, float):
        _tag(h, b"F", float(obj).hex().encode())
    elif isinstance(obj, str):
        _tag(h, b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        _tag(h, b"Y", bytes(obj))
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        _tag(h, b"A", f"{a.dtype.str}|{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    elif isinstance(obj, (np.generic, torch.dtype, torch.device, complex)):
        _tag(h, b"R", f"{type(obj).__name__}|{obj!r}".encode())
    else:  # something else torch.load(weights_only) allows: its type only (a repr may hold an address)
        _tag(h, b"O", f"{type(obj).__module__}.{type(obj).__qualname__}".encode())


def _tag(h: Any, kind: bytes, body: bytes) -> None:
    h.update(kind + str(len(body)).encode() + b":" + body)


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
