"""``volssl predict``: segment every volume of a folder with a fine-tuned model.

Per case: read the channel files (:func:`volssl.data.quality.check_case` with only the structural
rules: readable, 3D, finite, not constant, channels on one grid), preprocess exactly as for training
(:func:`volssl.data.preprocess.preprocess_arrays` with the model's plan: RAS, nonzero crop,
resampling, normalisation), predict logits with the Gaussian sliding window
(:func:`volssl.inference.sliding_window.sliding_window_predict`, optional mirroring TTA), softmax,
map the class probabilities back onto the input file's grid (:func:`volssl.data.geometry.to_original`,
linear; outside the crop box: background), argmax, and write

* ``OUT/<case>.nii.gz``: the label map (smallest integer dtype holding the label values) with
  exactly the input file's shape and affine; a NIfTI input's header is copied (qform and sform
  with their codes; a trailing axis of size 1 is kept), other formats get qform = sform = the affine
  (code 1). A TIFF/Zarr input's
  output is on the (x, y, z) grid :func:`volssl.data.readers.read_volume` returns;
* ``OUT/<case>.npz`` (``save_probabilities``): ``probabilities`` float32 (K, X, Y, Z) on the same
  grid (they sum to 1), ``labels`` (K,) the label value of each channel, ``names`` (K,), ``affine``;
* ``OUT/predict.json``: the summary (see :func:`predict_folder`).

Inputs (:func:`find_inputs`): a folder searched recursively (or one file, or an nnU-Net raw dataset)
with :func:`volssl.data.readers.discover`; files named ``<case>_0000<ext>``, ``<case>_0001<ext>``
... in one folder form one multi-channel case ``<case>`` (channel order = the number), any other
volume file is a one-channel case named by its path. A case whose channel count differs from the
model's, or whose files cannot be read, is reported (file and reason) and skipped; the others are
predicted.

A fine-tuned model (:func:`load_finetuned`) is a run directory holding ``checkpoints/final.pt``
(else ``best.pt``, else ``latest.pt``) or a ``.pt`` file; see docs/design.md, "Fine-tuned model".
"""
from __future__ import annotations

import errno
import os
import re
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from volssl.config import ModelConfig
from volssl.data.geometry import GeometryRecord, to_original
from volssl.data.preprocess import PreprocessPlan, label_dtype, preprocess_arrays
from volssl.data.quality import QualityRules, check_case
from volssl.data.readers import (NIBABEL_SUFFIXES, SourceCase, default_max_voxels, discover, sanitize_id, source_axes,
                                 volume_suffix)
from volssl.inference.sliding_window import sliding_window_predict
from volssl.util.atomic import atomic_path, write_json_atomic
from volssl.util.errors import describe_failure
from volssl.util.paths import check_output_dir

CHECKPOINT_NAMES = ("final.pt", "best.pt", "latest.pt")
# structural rules only: a small, thick-sliced or small-FOV scan is still predicted
PREDICT_RULES = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None)
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ---------------------------------------------------------------------------------------------- the model


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
    task: str = "semantic"  # "semantic" (class logits) or "affinities" (one logit per offset; instances)
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
        if self.task not in ("semantic", "affinities"):
            raise ValueError(f"task must be 'semantic' or 'affinities', got {self.task!r}")
        if self.task == "affinities":
            if not self.offsets:
                raise ValueError("an affinity model needs the offsets of its output channels")
            self.offsets = tuple(tuple(int(v) for v in o) for o in self.offsets)

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
    ``checkpoints/final.pt`` (else ``best.pt``, else ``latest.pt``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            for name in CHECKPOINT_NAMES:
                if (folder / name).is_file():
                    return folder / name
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
        path: a run directory (``checkpoints/final.pt``, else ``best.pt``, else ``latest.pt``) or a
            ``.pt`` file.
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
        task=data.get("task") or "semantic", offsets=data.get("offsets"),
    )
    if cfg.in_channels != len(model.channels):
        raise ValueError(f"{file}: the network takes {cfg.in_channels} channel(s) but 'channels' names "
                         f"{len(model.channels)}: {list(model.channels)}")
    if model.task == "affinities":
        if cfg.out_channels != len(model.offsets):
            raise ValueError(f"{file}: the network has {cfg.out_channels} output channel(s) but {len(model.offsets)} "
                             "affinity offsets")
    elif cfg.out_channels != len(model.labels):
        raise ValueError(f"{file}: the network has {cfg.out_channels} output channel(s) but 'labels' has "
                         f"{len(model.labels)} entries: {model.labels}")
    return model


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(device)``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available (use --device cpu or auto)")
    return device


# ---------------------------------------------------------------------------------------------- inputs


def _stem(path: str) -> str:
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def find_inputs(
    src: str | os.PathLike, spacing: tuple[float, float, float] | None = None, exclude: str | os.PathLike | None = None
) -> list[SourceCase]:
    """The cases to predict under ``src`` (see the module docstring for the naming rules).

    Args:
        src: a folder, an nnU-Net raw dataset or one volume file.
        spacing: (x, y, z) mm for TIFF/Zarr files without spacing.
        exclude: a folder whose files are left out (the output folder, when inside ``src``).

    Returns:
        cases with unique ids, sorted by id; a ``<case>_XXXX`` group with a missing channel file
        carries that as its ``error``.
    """
    cases = discover(src, spacing=spacing)
    if exclude is not None:
        # os.path.realpath, not Path.resolve: a link loop among the inputs (which Path.resolve raises on) stays a
        # case, and its read reports the loop
        ex = Path(os.path.realpath(Path(exclude).expanduser()))
        cases = [c for c in cases if not any(Path(os.path.realpath(p)).is_relative_to(ex) for p in c.images)]
    groups: dict[tuple[str, str], dict[int, SourceCase]] = {}
    for c in cases:
        m = _CHANNEL_FILE.match(_stem(c.images[0])) if len(c.images) == 1 and c.split is None else None
        if m:
            groups.setdefault((str(Path(c.images[0]).parent), m.group("case")), {})[int(m.group("channel"))] = c
    grouped: dict[str, SourceCase] = {}  # id of channel 0's case -> merged case
    merged_ids: set[str] = set()
    for (_, name), members in groups.items():
        if 0 not in members:
            continue  # e.g. "scan_2019.nii.gz": not a channel file
        first = members[0]
        n = max(members) + 1
        missing = [k for k in range(n) if k not in members]
        base = first.id[: -len("_0000")] if first.id.endswith("_0000") else sanitize_id(name)
        ending = volume_suffix(first.images[0])
        grouped[first.id] = replace(
            first, id=base, images=tuple(members[k].images[0] for k in sorted(members)),
            channels=tuple(f"{k:04d}" for k in sorted(members)),
            error=("missing channel file(s) " + ", ".join(f"{name}_{k:04d}{ending}" for k in missing))
            if missing else None,
        )
        merged_ids.update(m.id for m in members.values())
    out: list[SourceCase] = []
    for c in cases:
        if c.id in grouped:
            out.append(grouped[c.id])
        elif c.id not in merged_ids:
            out.append(c)
    seen: set[str] = set()
    unique = []
    for c in out:
        if c.id in seen:  # "a.nii.gz" next to "a_0000.nii.gz"
            k = 2
            while f"{c.id}-{k}" in seen:
                k += 1
            c = replace(c, id=f"{c.id}-{k}")
        seen.add(c.id)
        unique.append(c)
    return sorted(unique, key=lambda c: c.id)


# ---------------------------------------------------------------------------------------------- one case


def predict_probabilities(
    model: FineTunedModel,
    image: np.ndarray,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (0, 1, 2),
    device: torch.device | str = "cpu",
    sw_batch_size: int = 1,
    autocast: bool = False,
) -> np.ndarray:
    """Class probabilities (softmax) ``float32 (K, X, Y, Z)`` of a preprocessed image ``(C, X, Y, Z)``.

    On CUDA the logits are accumulated on the GPU; if that runs out of memory, the case is redone
    with the accumulation (not the network) on the CPU.
    """
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]

    def run(out_device):
        return sliding_window_predict(
            model.network, x, model.patch_size, overlap=overlap, sw_batch_size=sw_batch_size,
            mirror_axes=mirror_axes, device=device, out_device=out_device, autocast=autocast,
        )[0]

    try:
        logits = run(device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        logits = run(torch.device("cpu"))
    with torch.inference_mode():
        if logits.shape[0] != len(model.labels):
            raise ValueError(f"the network returned {logits.shape[0]} channels; the model has {len(model.labels)} "
                             "labels")
        return torch.softmax(logits, dim=0).cpu().numpy()


def probabilities_to_original(probs: np.ndarray, record: GeometryRecord) -> np.ndarray:
    """Map class probabilities ``(K, *record.shape)`` onto the source grid (linear interpolation);
    outside the crop box everything is background (channel 0 = 1). Each voxel still sums to 1."""
    back = to_original(probs, record, order=1, fill=0.0)
    back[0] += 1.0 - back.sum(axis=0)  # 1 outside the box; rounding only inside
    np.clip(back, 0.0, 1.0, out=back)
    return back


def write_label_map(path: str | os.PathLike, label: np.ndarray, source: str, affine: np.ndarray) -> None:
    """Write ``label`` (X, Y, Z) as NIfTI at ``path`` (atomically) on the grid of ``source``.

    A NIfTI source's header is reused (qform, sform and their codes; data type, scaling and display
    range reset for a label map; trailing axes of size 1 kept); any other source gets qform = sform =
    ``affine`` with code 1.
    """
    import nibabel as nib

    img = None
    if volume_suffix(source) in NIBABEL_SUFFIXES:
        src = nib.load(source)
        if isinstance(src, (nib.Nifti1Image, nib.Nifti2Image)) and tuple(src.shape[:3]) == label.shape:
            header = src.header.copy()
            header.set_data_dtype(label.dtype)
            header.set_slope_inter(1.0, 0.0)
            header["cal_min"], header["cal_max"] = 0.0, 0.0
            img = type(src)(label.reshape(src.shape), None, header=header)  # (X, Y, Z, 1) stays 4D
            if not np.allclose(header.get_best_affine(), affine, rtol=0, atol=1e-4):  # a bug in the reader
                raise RuntimeError(f"{source}: header affine differs from the affine read")
    if img is None:
        img = nib.Nifti1Image(label, np.asarray(affine, dtype=np.float64))
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_data_dtype(label.dtype)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def predict_case(
    model: FineTunedModel,
    case: SourceCase,
    output_dir: str | os.PathLike,
    save_probabilities: bool = False,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (0, 1, 2),
    device: torch.device | str = "cpu",
    sw_batch_size: int = 1,
    autocast: bool = False,
    thresholds: Sequence[float] = (0.5,),
) -> dict[str, Any]:
    """Predict one case and write its files (an affinity model: instance maps, one per agglomeration
    threshold; see :mod:`volssl.inference.instances`).

    Returns:
        ``{"case", "files", "output", "probabilities" (path or None), "shape", "labels_found",
        "seconds"}``, or ``{"case", "files", "path", "reason"}`` when the case cannot be predicted.
    """
    t0 = time.perf_counter()
    files = list(case.images)

    def failed(path: str, reason: str) -> dict[str, Any]:
        return {"case": case.id, "files": files, "path": path, "reason": reason}

    first = files[0] if files else case.id
    if case.error:
        return failed(first, case.error)
    if len(files) != len(model.channels):
        names = ", ".join(Path(f).name for f in files)
        return failed(first, f"{len(files)} channel file(s) ({names}) but the model expects {len(model.channels)} "
                             f"({', '.join(model.channels)}); name the files of a multi-channel case "
                             "<case>_0000, <case>_0001, ...")
    # the declared size is checked from the header against what this machine can hold before any data are read
    checked = check_case(replace(case, label=None), PREDICT_RULES, max_voxels=default_max_voxels())
    if not checked.ok:
        return failed(checked.problems[0].path, "; ".join(f"{Path(p.path).name}: {p.reason}" for p in checked.problems))
    image_p, _, record, _ = preprocess_arrays(checked.image, checked.affine, model.plan, None, source_axes(first))
    del checked
    if model.task == "affinities":
        from volssl.inference.instances import predict_instances_case

        return predict_instances_case(model, case.id, image_p, record, first, output_dir, thresholds, overlap,
                                      device, sw_batch_size, autocast, t0)
    probs = predict_probabilities(model, image_p, overlap, mirror_axes, device, sw_batch_size, autocast)
    del image_p
    probs = probabilities_to_original(probs, record)
    values = np.asarray(model.label_values)
    label = values[np.argmax(probs, axis=0)]
    label = label.astype(label_dtype(values), copy=False)
    out_dir = Path(output_dir)
    out_path = out_dir / f"{case.id}.nii.gz"
    write_label_map(out_path, label, first, np.asarray(record.original_affine))
    prob_path = None
    if save_probabilities:
        prob_path = out_dir / f"{case.id}.npz"
        with atomic_path(prob_path, suffix=".npz") as tmp:
            np.savez_compressed(
                tmp, probabilities=probs.astype(np.float32, copy=False), labels=values.astype(np.int64),
                names=np.asarray(model.label_names), affine=np.asarray(record.original_affine, dtype=np.float64),
            )
    return {
        "case": case.id, "files": files, "output": str(out_path),
        "probabilities": str(prob_path) if prob_path else None,
        "shape": [int(s) for s in label.shape], "labels_found": [int(v) for v in np.unique(label)],
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------------------------------------- the folder


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _output_unwritable(e: BaseException, output_dir: Path) -> bool:
    """``e`` says a file under ``output_dir`` cannot be written (permission, read-only, disk full)."""
    if not isinstance(e, OSError) or e.errno not in _UNWRITABLE:
        return False
    if e.filename is None:
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    try:
        return Path(os.path.realpath(os.fsdecode(e.filename))).is_relative_to(output_dir)
    except (OSError, ValueError, TypeError):
        return False


def predict_folder(
    model: FineTunedModel | str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    save_probabilities: bool = False,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (0, 1, 2),
    device: torch.device | str = "auto",
    progress: bool = True,
    sw_batch_size: int = 1,
    autocast: bool = False,
    spacing: tuple[float, float, float] | None = None,
    thresholds: Sequence[float] = (0.5,),
) -> dict[str, Any]:
    """Predict every case of ``input_dir`` into ``output_dir``.

    Args:
        model: a :class:`FineTunedModel`, or a run directory / checkpoint file (:func:`load_finetuned`).
        input_dir: folder of volumes (or one file, or an nnU-Net raw dataset); see :func:`find_inputs`.
        output_dir: where ``<case>.nii.gz`` (and ``<case>.npz``) and ``predict.json`` go (created).
        save_probabilities: also write the class probabilities on the input grid.
        overlap: sliding-window overlap in [0, 1).
        mirror_axes: mirroring TTA axes (``()``: off; ``(0, 1, 2)``: 8 passes per tile).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:N". The network is moved there.
        progress: tqdm bar over the cases (stderr).
        sw_batch_size: tiles per forward pass.
        autocast: bfloat16 autocast on CUDA.
        spacing: (x, y, z) mm for TIFF/Zarr inputs without spacing (default: the plan's input spacing).
        thresholds: affinity models only: agglomeration thresholds; the first one's instance map is
            ``<case>.nii.gz``, every one's is ``t<threshold>/<case>.nii.gz``. Mirroring is not used for
            affinities (a flip turns an offset around).

    Returns:
        the summary (also written to ``output_dir/predict.json``): ``{"input", "output", "model",
        "n_cases", "n_predicted", "n_failed", "predicted": [per-case dicts], "failed": [{"case",
        "files", "path", "reason"}], "settings": {...}, "seconds"}``. A bad input never stops the run.

    Raises:
        ValueError: ``output_dir`` is an existing file or cannot be written (checked before the model
            is loaded), bad arguments, no input volumes.
        OSError: an output file cannot be written (permission denied, read-only file system, disk
            full): the run stops there instead of predicting cases it cannot save.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    # the output folder is checked (not a file, writable) before the model is loaded or a case predicted
    output_dir = check_output_dir(output_dir, "output folder")
    dev = resolve_device(device)
    if not isinstance(model, FineTunedModel):
        model = load_finetuned(model, dev)
    model.network.to(dev).eval()
    cases = find_inputs(input_dir, spacing=spacing or model.input_spacing, exclude=output_dir)
    if not cases:
        raise ValueError(f"{input_dir}: no volume files found")

    predicted, failed = [], []
    bar = tqdm(cases, desc="predict", unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        try:
            result = predict_case(model, case, output_dir, save_probabilities, overlap, mirror_axes, dev,
                                  sw_batch_size, autocast, thresholds)
        except Exception as e:  # noqa: BLE001 - an odd file (or a bug) must not stop the run
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if _output_unwritable(e, output_dir):  # every later case would fail the same way, after its work
                raise
            path = case.images[0] if case.images else case.id
            if isinstance(e, MemoryError):
                reason = "out of memory while predicting"
            else:
                reason = describe_failure(e)
            result = {"case": case.id, "files": list(case.images), "path": path,
                      "reason": f"{Path(path).name}: {reason}"}
        (failed if "reason" in result else predicted).append(result)
        bar.set_postfix(failed=len(failed), refresh=False)
    bar.close()

    summary = {
        "input": str(Path(input_dir).expanduser().resolve()),
        "output": str(output_dir),
        "model": model.source,
        "n_cases": len(cases),
        "n_predicted": len(predicted),
        "n_failed": len(failed),
        "predicted": predicted,
        "failed": failed,
        "settings": {
            "overlap": float(overlap), "mirror_axes": sorted(int(a) for a in mirror_axes), "device": str(dev),
            "patch_size": list(model.patch_size), "sw_batch_size": int(sw_batch_size), "autocast": bool(autocast),
            "save_probabilities": bool(save_probabilities), "labels": model.labels, "channels": list(model.channels),
            "plan": model.plan.to_dict(), "task": model.task,
            "thresholds": [float(t) for t in thresholds] if model.task == "affinities" else None,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(output_dir / "predict.json", summary)
    return summary
