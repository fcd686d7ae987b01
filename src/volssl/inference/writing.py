"""Writing predictions: :func:`write_label_map` puts a label map (X, Y, Z) on a source file's grid as NIfTI.

Below :mod:`volssl.inference.predict` (semantic label maps) and :mod:`volssl.inference.instances`
(instance maps), which both write through it.
"""
from __future__ import annotations

import os

import numpy as np

from volssl.data.readers import NIBABEL_SUFFIXES, volume_suffix
from volssl.util.atomic import atomic_path


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
