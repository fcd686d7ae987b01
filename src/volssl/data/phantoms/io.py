"""Writing phantoms: gzipped NIfTI files (:func:`write_nifti`) and nnU-Net v2 raw datasets of a kind
(:func:`generate_phantoms`) or of a named task (:func:`generate_task`)."""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.fields import _check_shape
from volssl.data.phantoms.tasks import KINDS, PHANTOM_KINDS, get_task, make_case
from volssl.util.atomic import atomic_path, write_json_atomic

FILE_ENDING = ".nii.gz"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _DatasetSpec:
    """What :func:`_write_dataset` writes: file-name ``prefix``, ``make(i, shape)`` -> case ``i``,
    ``meta`` (dataset.json's name, description, channel_names and labels), the label files' dtype,
    whether labels are instance ids, and the ``provenance`` recorded under ``volssl_phantoms``."""

    prefix: str
    make: Callable[[int, tuple[int, int, int] | None], PhantomCase]
    meta: dict
    label_dtype: type
    instance: bool
    provenance: dict


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    """Write ``array`` (X, Y, Z) as a gzipped NIfTI-1 with qform = sform = ``affine`` (scanner, mm),
    atomically and byte-reproducibly (gzip timestamp 0)."""
    import nibabel as nib

    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"{path}: values [{array.min()}, {array.max()}] do not fit {np.dtype(dtype).name}")
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, suffix=FILE_ENDING) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def generate_phantoms(
    out: str | os.PathLike,
    kind: str,
    n: int,
    seed: int = 0,
    n_test: int | None = None,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` training and ``n_test`` (default ``max(1, n // 5)``) test phantoms of ``kind`` as an
    nnU-Net v2 raw dataset and return ``out``::

        out/dataset.json                          channel_names, labels, numTraining, file_ending, ...
        out/imagesTr/<kind>_<i>_<cccc>.nii.gz     int16, one file per channel
        out/labelsTr/<kind>_<i>.nii.gz            uint8 (uint16 instance ids for axons)
        out/imagesTs/..., out/labelsTs/...        the held-out cases (numbered after the training ones)

    ``dataset.json`` is written last: a directory without it is incomplete. An existing non-empty
    ``out`` is refused unless ``overwrite`` (which deletes only the entries above and preview.png).
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = PHANTOM_KINDS[kind]
    meta = {
        "name": f"volssl-phantoms-{kind}",
        "description": spec.description,
        "channel_names": {str(c): name for c, name in enumerate(spec.channel_names)},
        "labels": dict(spec.labels),
    }
    dataset = _DatasetSpec(kind, lambda i, shp: make_case(kind, seed, i, shp), meta, spec.label_dtype, spec.instance,
                           {"kind": kind, "seed": int(seed)})
    return _write_dataset(out, dataset, n, n_test, shape, progress, overwrite)


def _clear_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite``, which deletes only the dataset's
    entries (images/labels folders, dataset.json, preview.png)."""
    parts = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dataset.json", "preview.png")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: output directory is not empty (use --overwrite to replace the dataset)")
        for name in parts:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def _write_dataset(out: str | os.PathLike, dataset: _DatasetSpec, n: int, n_test: int | None,
                   shape: tuple[int, int, int] | None, progress: bool, overwrite: bool) -> Path:
    """Write cases ``dataset.make(i, shape)`` as an nnU-Net v2 raw dataset (see
    :func:`generate_phantoms`)."""
    from tqdm import tqdm

    if int(n) < 1:
        raise ValueError(f"phantoms: need n >= 1 training cases, got {n}")
    n_test = max(1, int(n) // 5) if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"phantoms: n_test must be >= 0, got {n_test}")
    shape = _check_shape(shape, 16, "phantoms")
    out = Path(out)
    _clear_output(out, overwrite)
    total = int(n) + n_test
    width = max(3, len(str(total - 1)))
    for i in tqdm(range(total), desc=f"phantoms {dataset.prefix}", unit="case", disable=not progress):
        case = dataset.make(i, shape)
        split = "Tr" if i < n else "Ts"
        name = f"{dataset.prefix}_{i:0{width}d}"
        for c in range(case.images.shape[0]):
            write_nifti(out / f"images{split}" / f"{name}_{c:04d}{FILE_ENDING}", case.images[c], case.affine, np.int16)
        write_nifti(out / f"labels{split}" / f"{name}{FILE_ENDING}", case.label, case.affine, dataset.label_dtype)
    meta = {
        **dataset.meta,
        "numTraining": int(n),
        "numTest": n_test,
        "file_ending": FILE_ENDING,
        "tensorImageSize": "3D",
        "licence": "CC0 (synthetic)",
        "reference": "volssl phantoms",
        "instance_labels": dataset.instance,
        "volssl_phantoms": {**dataset.provenance, "shape": list(shape) if shape else None, "version": FORMAT_VERSION},
    }
    write_json_atomic(out / "dataset.json", meta)
    return out


def generate_task(
    out: str | os.PathLike,
    task: str,
    n: int,
    seed: int | None = None,
    n_test: int | None = None,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the phantom task ``task`` (a key of :data:`PHANTOM_TASKS`) as an nnU-Net v2 raw dataset,
    as :func:`generate_phantoms` does (files ``<task>_<i>_<cccc>.nii.gz`` with "-" -> "_"); ``seed``
    defaults to the task's own. dataset.json names the task's labels and channels and records the
    variant under ``volssl_phantoms``."""
    spec = get_task(task)
    seed = spec.seed if seed is None else int(seed)
    kind = PHANTOM_KINDS[spec.kind]
    meta = {
        "name": f"volssl-phantoms-{spec.name}",
        "description": spec.description,
        "channel_names": {str(c): name for c, name in enumerate(spec.channel_names)},
        "labels": spec.labels,
    }
    provenance = {"kind": spec.kind, "task": spec.name, "seed": seed,
                  "variant": dataclasses.asdict(spec.variant) if spec.variant is not None else None}
    dataset = _DatasetSpec(spec.name.replace("-", "_"), lambda i, shp: make_case(spec.kind, seed, i, shp, spec.variant),
                           meta, kind.label_dtype, kind.instance, provenance)
    return _write_dataset(out, dataset, n, n_test, shape, progress, overwrite)
