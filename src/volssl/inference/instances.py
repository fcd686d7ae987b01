"""Instance prediction with an affinity model (MAE-XNT axons): affinities -> fragments -> agglomeration.

For a fine-tuned model with ``task == "affinities"`` (:mod:`volssl.finetuning.affinities`; output
channel ``c`` = the affinity of each voxel with its neighbour at ``model.offsets[c]``, channels 0-2
the nearest neighbours), one case is predicted as:

1. the sliding-window logits on the preprocessed image (no mirroring: a flip turns an offset
   around), a sigmoid -> affinities in [0, 1];
2. the affinities mapped back onto the input file's grid (:func:`volssl.data.geometry.to_original`,
   linear; outside the crop box 0 = boundary);
3. watershed fragments and waterz agglomeration at each threshold
   (:func:`volssl.inference.agglomerate.segment`): higher thresholds merge more;
4. ``OUT/<case>.nii.gz`` (the first threshold) and ``OUT/t<threshold>/<case>.nii.gz`` (each), uint32
   instance ids on the input's grid.

:func:`predict_instances_folder` predicts a folder and scores each threshold against reference
instance labels (:func:`volssl.evaluation.instance_evaluate.evaluate_instances_folder`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from volssl.data.geometry import GeometryRecord, to_original
from volssl.inference.sliding_window import sliding_window_predict

if TYPE_CHECKING:
    from volssl.inference.predict import FineTunedModel


def threshold_dir(out: str | os.PathLike, t: float) -> Path:
    """The folder of the instance maps at agglomeration threshold ``t``: ``OUT/t<t>``."""
    return Path(out) / f"t{float(t):g}"


def predict_affinities(model: FineTunedModel, image: np.ndarray, overlap: float = 0.5,
                       device: torch.device | str = "cpu", sw_batch_size: int = 1,
                       autocast: bool = False) -> np.ndarray:
    """Affinities ``float32 (C, X, Y, Z)`` in [0, 1] of a preprocessed image ``(C_in, X, Y, Z)``."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    with torch.inference_mode():
        logits = sliding_window_predict(model.network, x, model.patch_size, overlap=overlap,
                                        sw_batch_size=sw_batch_size, device=device, out_device="cpu",
                                        autocast=autocast)[0]
        if logits.shape[0] != len(model.offsets or ()):
            raise ValueError(f"the network returned {logits.shape[0]} channels; the model has "
                             f"{len(model.offsets or ())} affinity offsets")
        return torch.sigmoid(logits.float()).numpy()


def predict_instances_case(model: FineTunedModel, case_id: str, image: np.ndarray, record: GeometryRecord,
                           source: str, output_dir: str | os.PathLike, thresholds: Sequence[float] = (0.5,),
                           overlap: float = 0.5, device: torch.device | str = "cpu", sw_batch_size: int = 1,
                           autocast: bool = False, t0: float | None = None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring for one preprocessed case; returns its predict.json entry."""
    from volssl.inference.agglomerate import segment
    from volssl.inference.predict import write_label_map

    t0 = time.perf_counter() if t0 is None else t0
    if not thresholds:
        raise ValueError("give at least one agglomeration threshold")
    affs = predict_affinities(model, image, overlap, device, sw_batch_size, autocast)
    affs = np.clip(to_original(affs, record, order=1, fill=0.0), 0.0, 1.0).astype(np.float32)
    spacing = np.sqrt((np.asarray(record.original_affine)[:3, :3] ** 2).sum(0))
    segs = segment(affs, [float(t) for t in thresholds], spacing=tuple(float(s) for s in spacing))
    out = Path(output_dir)
    affine = np.asarray(record.original_affine)
    counts = {}
    for k, t in enumerate(thresholds):
        seg = segs[float(t)]
        seg = seg.astype(np.uint32) if seg.max(initial=0) < 2**32 else seg
        counts[f"{float(t):g}"] = int(len(np.unique(seg)) - (1 if (seg == 0).any() else 0))
        folder = threshold_dir(out, t)
        folder.mkdir(parents=True, exist_ok=True)
        write_label_map(folder / f"{case_id}.nii.gz", seg, source, affine)
        if k == 0:
            write_label_map(out / f"{case_id}.nii.gz", seg, source, affine)
    return {"case": case_id, "files": [source], "output": str(out / f"{case_id}.nii.gz"), "probabilities": None,
            "shape": [int(s) for s in affs.shape[1:]], "instances": counts,
            "thresholds": [float(t) for t in thresholds], "seconds": round(time.perf_counter() - t0, 3)}


def predict_instances_folder(model: Any, images: str | os.PathLike, labels: str | os.PathLike,
                             out: str | os.PathLike, thresholds: Sequence[float] = (0.5, 0.6, 0.7),
                             device: str = "cpu", progress: bool = False) -> dict[float, dict[str, float]]:
    """Predict ``images`` with the affinity model (a run dir, checkpoint or FineTunedModel) at every
    threshold, score each against ``labels``: ``{threshold: mean instance metrics}`` (metrics files in
    ``out/metrics_t<t>.json``, predictions in ``out/predictions``)."""
    from volssl.evaluation.instance_evaluate import evaluate_instances_folder
    from volssl.inference.predict import predict_folder

    out = Path(out)
    predict_folder(model, images, out / "predictions", mirror_axes=(), device=device, progress=progress,
                   thresholds=thresholds)
    scores = {}
    for t in thresholds:
        result = evaluate_instances_folder(threshold_dir(out / "predictions", t), labels,
                                           out / f"metrics_t{float(t):g}.json", progress=progress)
        scores[float(t)] = {k: (float("nan") if v is None else float(v)) for k, v in result["mean"].items()
                            if isinstance(v, (int, float)) or v is None}
    return scores
