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
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from volssl.data.geometry import GeometryRecord, to_original
from volssl.data.preprocess import label_dtype, preprocess_arrays
from volssl.data.quality import QualityRules, check_case
from volssl.data.readers import SourceCase, default_max_voxels, discover, sanitize_id, source_axes, volume_suffix
from volssl.finetuning.tasks import Affinities, SemanticSegmentation
from volssl.inference.instances import predict_instances_case
# the model, its loading and the output writer live below this module; re-exported under their old names
from volssl.inference.model import (CHECKPOINT_NAMES, FineTunedModel, PredictOptions, load_finetuned,  # noqa: F401
                                    resolve_checkpoint, resolve_device)
from volssl.inference.sliding_window import sliding_window_predict
from volssl.inference.writing import write_label_map
from volssl.util.atomic import atomic_path, write_json_atomic
from volssl.util.errors import describe_failure
from volssl.util.paths import check_output_dir

# structural rules only: a small, thick-sliced or small-FOV scan is still predicted
PREDICT_RULES = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None)
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


def predict_semantic_case(model: FineTunedModel, case_id: str, files: Sequence[str], image: np.ndarray,
                          record: GeometryRecord, output_dir: str | os.PathLike, options: PredictOptions,
                          t0: float | None = None) -> dict[str, Any]:
    """A semantic model's prediction of one preprocessed case: class probabilities, mapped back onto the
    grid of ``files[0]``, argmax -> ``<case>.nii.gz`` (and ``<case>.npz`` with ``save_probabilities``);
    returns its predict.json entry."""
    t0 = time.perf_counter() if t0 is None else t0
    probs = predict_probabilities(model, image, options.overlap, options.mirror_axes, options.device,
                                  options.sw_batch_size, options.autocast)
    del image
    probs = probabilities_to_original(probs, record)
    values = np.asarray(model.label_values)
    label = values[np.argmax(probs, axis=0)]
    label = label.astype(label_dtype(values), copy=False)
    out_dir = Path(output_dir)
    out_path = out_dir / f"{case_id}.nii.gz"
    write_label_map(out_path, label, files[0], np.asarray(record.original_affine))
    prob_path = None
    if options.save_probabilities:
        prob_path = out_dir / f"{case_id}.npz"
        with atomic_path(prob_path, suffix=".npz") as tmp:
            np.savez_compressed(
                tmp, probabilities=probs.astype(np.float32, copy=False), labels=values.astype(np.int64),
                names=np.asarray(model.label_names), affine=np.asarray(record.original_affine, dtype=np.float64),
            )
    return {
        "case": case_id, "files": list(files), "output": str(out_path),
        "probabilities": str(prob_path) if prob_path else None,
        "shape": [int(s) for s in label.shape], "labels_found": [int(v) for v in np.unique(label)],
        "seconds": round(time.perf_counter() - t0, 3),
    }


class CasePredictor(NamedTuple):
    """How a task's model predicts one preprocessed case (:data:`CASE_PREDICTORS`)."""

    #: ``(model, case_id, files, image, record, output_dir, options, t0) -> predict.json entry``
    predict: Callable[..., dict[str, Any]]
    #: the agglomeration thresholds apply (recorded in predict.json's settings)
    thresholds: bool = False


#: the per-case predictor of each task of a fine-tuned model (``FineTunedModel.task``): the one place
#: prediction dispatches on the task
CASE_PREDICTORS: dict[str, CasePredictor] = {
    SemanticSegmentation.name: CasePredictor(predict_semantic_case),
    Affinities.name: CasePredictor(predict_instances_case, thresholds=True),
}


def predict_case(model: FineTunedModel, case: SourceCase, output_dir: str | os.PathLike,
                 options: PredictOptions = PredictOptions()) -> dict[str, Any]:
    """Predict one case and write its files with its task's predictor (:data:`CASE_PREDICTORS`; an
    affinity model: instance maps, one per agglomeration threshold, see :mod:`volssl.inference.instances`).

    Returns:
        ``{"case", "files", "output", "probabilities" (path or None), "shape", "labels_found",
        "seconds"}``, or ``{"case", "files", "path", "reason"}`` when the case cannot be predicted.
    """
    t0 = time.perf_counter()
    options = replace(options, device=resolve_device(options.device))
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
    return CASE_PREDICTORS[model.task].predict(model, case.id, files, image_p, record, output_dir, options, t0)


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


def _predict_or_report(model: FineTunedModel, case: SourceCase, output_dir: Path,
                       options: PredictOptions) -> dict[str, Any]:
    """:func:`predict_case`, a failure reported as ``{"case", "files", "path", "reason"}``; an output that
    cannot be written stops the run (every later case would fail the same way, after its work)."""
    try:
        return predict_case(model, case, output_dir, options)
    except Exception as e:  # noqa: BLE001 - an odd file (or a bug) must not stop the run
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        if _output_unwritable(e, output_dir):
            raise
        path = case.images[0] if case.images else case.id
        reason = "out of memory while predicting" if isinstance(e, MemoryError) else describe_failure(e)
        return {"case": case.id, "files": list(case.images), "path": path, "reason": f"{Path(path).name}: {reason}"}


def predict_folder(
    model: FineTunedModel | str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: PredictOptions = PredictOptions(),
    spacing: tuple[float, float, float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every case of ``input_dir`` into ``output_dir``.

    Args:
        model: a :class:`FineTunedModel`, or a run directory / checkpoint file (:func:`load_finetuned`).
        input_dir: folder of volumes (or one file, or an nnU-Net raw dataset); see :func:`find_inputs`.
        output_dir: where ``<case>.nii.gz`` (and ``<case>.npz``) and ``predict.json`` go (created).
        options: overlap, mirroring, tile batch, autocast, device ("auto": CUDA if available; the
            network is moved there), probabilities, agglomeration thresholds (:class:`PredictOptions`).
        spacing: (x, y, z) mm for TIFF/Zarr inputs without spacing (default: the plan's input spacing).
        progress: tqdm bar over the cases (stderr).

    Returns:
        the summary (also written to ``output_dir/predict.json``): ``{"input", "output", "model",
        "n_cases", "n_predicted", "n_failed", "predicted": [per-case dicts], "failed": [{"case",
        "files", "path", "reason"}], "settings": {...}, "seconds"}``. A bad input never stops the run.

    Raises:
        ValueError: ``output_dir`` is an existing file or cannot be written (checked before the model
            is loaded), bad options, no input volumes.
        OSError: an output file cannot be written (permission denied, read-only file system, disk
            full): the run stops there instead of predicting cases it cannot save.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    options.check()
    # the output folder is checked (not a file, writable) before the model is loaded or a case predicted
    output_dir = check_output_dir(output_dir, "output folder")
    dev = resolve_device(options.device)
    options = replace(options, device=dev)
    if not isinstance(model, FineTunedModel):
        model = load_finetuned(model, dev)
    model.network.to(dev).eval()
    cases = find_inputs(input_dir, spacing=spacing or model.input_spacing, exclude=output_dir)
    if not cases:
        raise ValueError(f"{input_dir}: no volume files found")

    predicted, failed = [], []
    bar = tqdm(cases, desc="predict", unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        result = _predict_or_report(model, case, output_dir, options)
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
        "settings": _settings(model, options),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(output_dir / "predict.json", summary)
    return summary


def _settings(model: FineTunedModel, options: PredictOptions) -> dict[str, Any]:
    """predict.json's ``settings``: the options (``options.device`` resolved) and the model's description."""
    return {
        "overlap": float(options.overlap), "mirror_axes": sorted(int(a) for a in options.mirror_axes),
        "device": str(options.device), "patch_size": list(model.patch_size),
        "sw_batch_size": int(options.sw_batch_size), "autocast": bool(options.autocast),
        "save_probabilities": bool(options.save_probabilities), "labels": model.labels,
        "channels": list(model.channels), "plan": model.plan.to_dict(), "task": model.task,
        "thresholds": ([float(t) for t in options.thresholds] if CASE_PREDICTORS[model.task].thresholds
                       else None),
    }
