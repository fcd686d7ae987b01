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

:func:`predict_instances_case` is the affinity task's per-case predictor
(:data:`volssl.inference.predict.CASE_PREDICTORS`); scoring the instances against reference labels is
:func:`volssl.experiment.predict_instances_folder` (evaluation comes after inference).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from volssl.data.geometry import GeometryRecord, to_original
from volssl.inference.model import FineTunedModel, PredictOptions
from volssl.inference.sliding_window import sliding_window_predict
from volssl.inference.writing import write_label_map


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


def predict_instances_case(model: FineTunedModel, case_id: str, files: Sequence[str], image: np.ndarray,
                           record: GeometryRecord, output_dir: str | os.PathLike, options: PredictOptions,
                           t0: float | None = None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring for one preprocessed case (``files``: its channel files, the
    first one giving the output grid); returns its predict.json entry."""
    from volssl.inference.agglomerate import segment

    t0 = time.perf_counter() if t0 is None else t0
    thresholds = options.thresholds
    if not thresholds:
        raise ValueError("give at least one agglomeration threshold")
    source = files[0]
    affs = predict_affinities(model, image, options.overlap, options.device, options.sw_batch_size, options.autocast)
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
