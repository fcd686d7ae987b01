"""Find and read the input volumes of ``volssl preprocess``.

:func:`discover` turns a source folder into a list of :class:`SourceCase` (all channels of one case
together); :func:`read_volume` reads one file into ``(array (X, Y, Z), affine (4, 4))``.

Sources
    * an nnU-Net v2 raw dataset (a folder with ``dataset.json``), read as-is: ``channel_names``,
      ``labels`` (their values are checked against the label maps, unless ``"instance_labels":
      true``), ``file_ending``; ``imagesTr/<case>_<XXXX><ending>`` with ``labelsTr/<case><ending>``,
      ``imagesTs/...`` with ``labelsTs/<case><ending>`` where present; or the explicit ``"dataset"``
      file lists of dataset.json. nnU-Net v1 / Medical Segmentation Decathlon ``modality``,
      ``labels`` ({"0": "background"}) and ``training``/``test`` lists (one file per case; a
      multi-modal 4D file is excluded as not 3D) are read too.
    * any other folder, searched recursively for volume files (:data:`VOLUME_SUFFIXES`); a nested
      folder that is an nnU-Net dataset is read as one (its case ids prefixed with its path).

Case ids are sanitised to ``[A-Za-z0-9_.-]``: the case name for an nnU-Net dataset, the path
relative to the source folder (without extension, ``/`` -> ``_``) otherwise; an id that collides
with an earlier one gets ``-<8 hex of its path>`` appended. The subject id is the BIDS ``sub-<label>``
entity of the path when there is one (e.g. ``sub-01``).

Geometry conventions
    Every reader returns the array with axes in the file's *index* order ``(i, j, k)`` and the 4x4
    affine that maps ``(i, j, k, 1)`` to RAS+ world coordinates in mm (the nibabel convention).
    * NIfTI/MGH (nibabel): the file's affine; a 4th (5th ...) axis of size 1 is dropped.
    * NRRD/MHA/MHD (SimpleITK): ITK stores direction and origin in LPS; the RAS affine is
      ``diag(-1, -1, 1, 1) @ [[D @ diag(spacing), origin], [0, 1]]``; ITK's numpy view is (z, y, x)
      and is transposed to (x, y, z) = ITK index order.
    * TIFF stacks and Zarr arrays are stored (z, y, x) (pages = z; OME-Zarr orders space axes z, y, x);
      they are transposed to (x, y, z) and get ``affine = diag(sx, sy, sz, 1)``, i.e. the array axes
      are taken as R, A, S. ``--spacing X,Y,Z`` is given in that (x, y, z) order and is used only for
      files that carry no spacing. Spacing is read from ImageJ TIFF metadata (``spacing`` and the
      X/YResolution tags with a known ``unit``), OME-TIFF ``PhysicalSize*``, an nnU-Net sidecar
      ``<file>.json`` (``{"spacing": [z, y, x]}``), and OME-Zarr ``multiscales`` scale transforms with
      a known unit; all converted to mm.

Every read problem raises :class:`VolumeError` (path, reason, rule) so that one bad file never
stops a run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

NIBABEL_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)
VOLUME_SUFFIXES = NIBABEL_SUFFIXES + ITK_SUFFIXES + TIFF_SUFFIXES + ZARR_SUFFIXES

# length units -> mm
_UNITS_MM = {
    "mm": 1.0, "millimeter": 1.0, "millimetre": 1.0,
    "cm": 10.0, "centimeter": 10.0, "centimetre": 10.0,
    "m": 1000.0, "meter": 1000.0, "metre": 1000.0,
    "um": 1e-3, "µm": 1e-3, "\u03bcm": 1e-3, "micron": 1e-3, "microns": 1e-3,
    "micrometer": 1e-3, "micrometre": 1e-3,
    "nm": 1e-6, "nanometer": 1e-6, "nanometre": 1e-6,
    "angstrom": 1e-7, "å": 1e-7,
}
_ID_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_SUBJECT = re.compile(r"(?:^|[/_\\])(sub-[A-Za-z0-9]+)")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class VolumeError(Exception):
    """A volume that cannot be used: ``path`` (the file), ``reason`` (a sentence) and ``rule``
    (a short machine-readable code: "unreadable", "not_3d", "no_spacing", "bad_affine", "missing")."""

    def __init__(self, path: str | os.PathLike, reason: str, rule: str = "unreadable") -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.rule = rule

    def __reduce__(self):  # picklable across worker processes
        return (VolumeError, (self.path, self.reason, self.rule))


@dataclass(frozen=True)
class SourceCase:
    """One case to preprocess: the files of all its channels (same grid) and its label map.

    ``images`` holds one path per channel (channel order of dataset.json), ``channels`` their names.
    ``split`` is "train" (imagesTr), "test" (imagesTs) or None (plain folder). ``spacing`` (mm,
    x, y, z) is used for files that carry no spacing (TIFF, Zarr). ``label_values`` are the values
    dataset.json declares (None: not checked). ``instance_labels``: the label map holds instance ids
    (dataset.json ``"instance_labels": true``, a volssl extension): any id >= 0 is allowed and every
    id >= 1 belongs to the foreground class 1. ``error`` is a problem found while discovering the
    case (e.g. a missing channel file); such a case is excluded with that reason.
    """

    id: str
    images: tuple[str, ...]
    channels: tuple[str, ...]
    label: str | None = None
    subject: str | None = None
    split: str | None = None
    spacing: tuple[float, float, float] | None = None
    label_values: tuple[int, ...] | None = None
    instance_labels: bool = False
    error: str | None = None


# ----------------------------------------------------------------------------------------------
# discovery


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The recognised volume suffix of ``path`` (lower case, e.g. ".nii.gz"), or None."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def sanitize_id(text: str) -> str:
    """Map ``text`` to a case id made of ``[A-Za-z0-9_.-]`` (never starting with '.' or '-')."""
    out = _ID_BAD.sub("_", text).lstrip(".-")
    return out or "case"


def subject_of(relpath: str) -> str | None:
    """The BIDS subject entity (``sub-<label>``) in a relative path, or None."""
    m = _SUBJECT.search(relpath.replace(os.sep, "/"))
    return m.group(1) if m else None


def _strip_suffix(name: str) -> str:
    suffix = volume_suffix(name)
    stem = name[: -len(suffix)] if suffix else name
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def _bids_channel(name: str) -> str:
    """BIDS suffix of a file name (``sub-01_ses-1_T1w.nii.gz`` -> ``T1w``), else "image"."""
    stem = _strip_suffix(name)
    if "sub-" in stem and "_" in stem:
        last = stem.rsplit("_", 1)[1]
        if last and "-" not in last:
            return last
    return "image"


def is_nnunet_dataset(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "dataset.json").is_file() and (
        (folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir()
    )


def discover(src: str | os.PathLike, spacing: tuple[float, float, float] | None = None) -> list[SourceCase]:
    """All cases under ``src`` (an nnU-Net v2 raw dataset or a folder searched recursively).

    Args:
        src: source folder, or a single volume file.
        spacing: (x, y, z) mm, attached to every case for files that carry no spacing.

    Returns:
        cases in a deterministic order (sorted paths), with unique ids.
    """
    src = Path(src).expanduser().resolve()
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    if spacing is not None:
        spacing = _check_spacing(spacing, "--spacing")
    if src.is_file() or (src.is_dir() and volume_suffix(src) in ZARR_SUFFIXES):
        if volume_suffix(src) is None:
            raise ValueError(f"{src} is not a volume file (known suffixes: {', '.join(VOLUME_SUFFIXES)})")
        cases = [_plain_case(src, src.name, src.parent)]
    elif is_nnunet_dataset(src):
        cases = _nnunet_cases(src, prefix="")
    else:
        cases = []
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            dirnames.sort()
            filenames.sort()
            keep = []
            for d in dirnames:
                if d.startswith("."):
                    continue
                sub = here / d
                rel = sub.relative_to(src).as_posix()
                if volume_suffix(d) in ZARR_SUFFIXES:
                    cases.append(_plain_case(sub, rel, src))
                elif is_nnunet_dataset(sub):
                    cases.extend(_nnunet_cases(sub, prefix=sanitize_id(rel.replace("/", "_")) + "_"))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                suffix = volume_suffix(f)
                if f.startswith(".") or suffix is None or suffix in ZARR_SUFFIXES:
                    continue
                cases.append(_plain_case(here / f, (here / f).relative_to(src).as_posix(), src))
    cases = _dedupe(cases)
    if spacing is not None:
        cases = [replace(c, spacing=spacing) for c in cases]
    return cases


def _plain_case(path: Path, rel: str, root: Path) -> SourceCase:
    parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
    stem = _strip_suffix(rel.rsplit("/", 1)[-1])
    case_id = sanitize_id((parent + "/" + stem if parent else stem).replace("/", "_"))
    return SourceCase(
        id=case_id, images=(str(path),), channels=(_bids_channel(path.name),), subject=subject_of(rel)
    )


def _dedupe(cases: list[SourceCase]) -> list[SourceCase]:
    seen: set[str] = set()
    out = []
    for c in cases:
        if c.id in seen:
            h = hashlib.blake2b("\0".join(c.images).encode(), digest_size=4).hexdigest()
            c = replace(c, id=f"{c.id}-{h}")
        seen.add(c.id)
        out.append(c)
    return out


def _declared_labels(labels: dict) -> tuple[int, ...]:
    """Label values declared in dataset.json (v2: name -> int or list of ints; v1: "0" -> name)."""
    values: set[int] = set()
    for k, v in labels.items():
        if isinstance(v, str) and str(k).lstrip("-").isdigit():  # nnU-Net v1
            values.add(int(k))
        elif isinstance(v, (list, tuple)):  # v2 region-based training
            values.update(int(x) for x in v)
        else:
            values.add(int(v))
    return tuple(sorted(values))


def _nnunet_cases(root: Path, prefix: str) -> list[SourceCase]:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: cannot read dataset.json: {e}") from e
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict) or not names:
        raise ValueError(f"{meta_path}: dataset.json has no channel_names")
    channel_keys = sorted(names, key=int)
    channel_names = tuple(str(names[k]) for k in channel_keys)
    ending = meta.get("file_ending", ".nii.gz")
    instance = bool(meta.get("instance_labels", False))
    label_values = _declared_labels(meta["labels"]) if isinstance(meta.get("labels"), dict) and not instance else None
    cases: list[SourceCase] = []

    def make(case: str, images: list[str], label: str | None, split: str | None, error: str | None = None):
        cases.append(SourceCase(
            id=sanitize_id(prefix + case), images=tuple(images), channels=channel_names, label=label,
            subject=subject_of(case), split=split, label_values=label_values, instance_labels=instance,
            error=error,
        ))

    if isinstance(meta.get("dataset"), dict):  # explicit file lists
        for case in sorted(meta["dataset"]):
            entry = meta["dataset"][case]
            images = [str((root / p).resolve()) for p in entry.get("images", [])]
            label = str((root / entry["label"]).resolve()) if entry.get("label") else None
            missing = [p for p in images + ([label] if label else []) if not Path(p).exists()]
            error = None
            if len(images) != len(channel_names):
                error = f"{len(images)} image files listed, dataset.json declares {len(channel_names)} channels"
            elif missing:
                error = f"listed file(s) missing: {', '.join(missing)}"
            make(case, images, label, "train" if label else None, error)
        return cases

    training = meta.get("training")
    if isinstance(training, list) and training and isinstance(training[0], dict) and \
            (root / str(training[0].get("image", ""))).is_file():  # Medical Segmentation Decathlon lists
        entries = [(e["image"], e.get("label"), "train") for e in training]
        entries += [(e if isinstance(e, str) else e["image"], None, "test") for e in meta.get("test", [])]
        for image, label, split in entries:
            image_path = (root / image).resolve()
            label_path = (root / label).resolve() if label else None
            missing = [str(p) for p in (image_path, label_path) if p is not None and not p.exists()]
            make(_strip_suffix(image_path.name), [str(image_path)], str(label_path) if label_path else None, split,
                 f"listed file(s) missing: {', '.join(missing)}" if missing else None)
        return cases

    for split, images_dir, labels_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        folder = root / images_dir
        if not folder.is_dir():
            continue
        groups: dict[str, dict[int, str]] = {}
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".") or not f.name.endswith(ending):
                continue
            m = _NNUNET_CHANNEL.match(f.name[: -len(ending)])
            if m:
                groups.setdefault(m.group("case"), {})[int(m.group("channel"))] = str(f.resolve())
        for case in sorted(groups):
            files = groups[case]
            missing = [int(k) for k in channel_keys if int(k) not in files]
            images = [files[int(k)] for k in channel_keys if int(k) in files]
            label_file = root / labels_dir / f"{case}{ending}"
            label = str(label_file.resolve()) if label_file.exists() else None
            error = None
            if missing:
                error = "missing channel file(s) " + ", ".join(f"{case}_{k:04d}{ending}" for k in missing)
            make(case, images, label, split, error)
    return cases


# ----------------------------------------------------------------------------------------------
# files behind a volume: size rule and fingerprint


def source_files(path: str | os.PathLike) -> list[Path]:
    """Every file that makes up the volume at ``path``: the file, the data file a ``.mhd`` / ``.nhdr``
    header names, all files of a ``.zarr`` directory."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    suffix = volume_suffix(path)
    if suffix in (".mhd", ".nhdr") and path.is_file():
        keys, sep = (("elementdatafile",), "=") if suffix == ".mhd" else (("data file", "datafile"), ":")
        try:
            with open(path, "r", errors="replace") as fh:
                header = fh.read(65536)
        except OSError:
            return files
        for line in header.splitlines():
            key, _, value = (s.strip() for s in line.partition(sep))
            if key.lower() in keys:
                if value and value.upper() != "LOCAL" and (path.parent / value).is_file():
                    files.append(path.parent / value)
                break
    return files


def source_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the volume at ``path`` (all of its :func:`source_files`)."""
    return sum(p.stat().st_size for p in source_files(path) if p.exists())


def fingerprint(paths: list[str | os.PathLike | None]) -> str:
    """Fast change detector of source files: blake2b over (name, size, mtime_ns) of every file.

    Used to decide whether a finished case must be redone. Reading whole files would cost a full
    pass over the data on every resumed run (terabytes at 100k volumes); this costs one ``stat``
    per file. A content change that keeps both size and modification time is not detected.
    """
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        if p is None:
            h.update(b"<none>\0")
            continue
        for f in source_files(p):
            try:
                st = f.stat()
                h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{f.name}\0<missing>\0".encode())
    return "stat-" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# reading


def source_axes(path: str | os.PathLike) -> str:
    """Axis order of the file's own array relative to what :func:`read_volume` returns:
    "xyz" (NIfTI, ITK formats) or "zyx" (TIFF, Zarr; transpose back with ``a.transpose(2, 1, 0)``)."""
    return "zyx" if volume_suffix(path) in TIFF_SUFFIXES + ZARR_SUFFIXES else "xyz"


def read_volume(
    path: str | os.PathLike, spacing: tuple[float, float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D volume.

    Args:
        path: a NIfTI/MGH, NRRD/MHA/MHD, TIFF file or a ``.zarr`` directory.
        spacing: (x, y, z) mm for TIFF/Zarr files that carry no spacing (ignored otherwise).

    Returns:
        ``(array, affine)``: the array (X, Y, Z) in its stored dtype (scaling applied for NIfTI) and a
        float64 (4, 4) voxel-to-RAS affine in mm (see the module docstring for axis conventions).

    Raises:
        VolumeError: unreadable or truncated file, not a 3D array, no spacing, invalid affine.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise VolumeError(path, f"unknown file type (known: {', '.join(VOLUME_SUFFIXES)})", "unreadable")
    if not path.exists():
        raise VolumeError(path, "file not found", "missing")
    try:
        if suffix in NIBABEL_SUFFIXES:
            array, affine = _read_nibabel(path)
        elif suffix in ITK_SUFFIXES:
            array, affine = _read_itk(path)
        elif suffix in TIFF_SUFFIXES:
            array, file_spacing = _read_tiff(path)
            affine = _diag_affine(path, file_spacing, spacing)
        else:
            array, file_spacing = _read_zarr(path)
            affine = _diag_affine(path, file_spacing, spacing)
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # any library error: truncated, corrupt, wrong format
        raise VolumeError(path, f"cannot read: {type(e).__name__}: {e}", "unreadable") from None
    affine = np.asarray(affine, dtype=np.float64)
    check_affine(path, affine)
    return array, affine


def check_affine(path: str | os.PathLike, affine: np.ndarray) -> None:
    """Raise VolumeError unless ``affine`` is a finite, non-singular 4x4 voxel-to-world map."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VolumeError(path, "affine is not a finite 4x4 matrix", "bad_affine")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * float(np.prod(zooms)):
        raise VolumeError(path, f"affine is singular (voxel sizes {np.round(zooms, 4).tolist()})", "bad_affine")


def _not_3d(path: Path, shape: tuple[int, ...], extra: str = "") -> VolumeError:
    return VolumeError(
        path, f"array shape {tuple(int(s) for s in shape)} is not 3D{extra} "
        "(extra axes are allowed only with size 1)", "not_3d",
    )


def _read_nibabel(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise _not_3d(path, shape)
    if len(shape) == 3:
        data = np.asanyarray(img.dataobj)
    else:
        data = np.asanyarray(img.dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)])
    return np.asarray(data), img.affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    size = img.GetSize()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _not_3d(path, tuple(reversed(size)) + (img.GetNumberOfComponentsPerPixel(),),
                      f" ({img.GetNumberOfComponentsPerPixel()} components per voxel)")
    if img.GetDimension() < 3 or any(s != 1 for s in size[3:]):
        raise _not_3d(path, size)
    if img.GetDimension() > 3:
        img = sitk.Extract(img, list(size[:3]) + [0] * (len(size) - 3), [0] * len(size))
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.array(img.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # ITK numpy view is (z, y, x)
    return np.ascontiguousarray(array), affine


def _to_3d(path: Path, array: np.ndarray) -> np.ndarray:
    """Drop size-1 axes (leading first) until the array is 3D; (z, y, x) stays (z, y, x)."""
    shape = array.shape
    while array.ndim > 3 and 1 in array.shape:
        array = np.squeeze(array, axis=array.shape.index(1))
    if array.ndim != 3:
        raise _not_3d(path, shape)
    return array


def _unit_mm(unit) -> float | None:
    if unit is None:
        return None
    return _UNITS_MM.get(str(unit).strip().lower().replace("\\u00b5", "µ"))


def _read_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(x, y, z) array of a TIFF stack (pages = z) and its spacing (x, y, z) mm if the file has one."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        if "S" in series.axes and series.shape[series.axes.index("S")] > 1:
            raise _not_3d(path, series.shape, f" (axes {series.axes}: colour samples per pixel)")
        array = series.asarray()
        spacing = _tiff_spacing(tif)
    array = _to_3d(path, np.asarray(array))
    sidecar = path.with_name(_strip_suffix(path.name) + ".json")
    if spacing is None and sidecar.is_file():  # nnU-Net Tiff3DIO: {"spacing": [z, y, x]}
        try:
            zyx = json.loads(sidecar.read_text())["spacing"]
            spacing = tuple(float(s) for s in reversed(zyx))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VolumeError(sidecar, f"cannot read spacing from sidecar: {e}", "no_spacing") from None
    return np.ascontiguousarray(array.transpose(2, 1, 0)), spacing


def _tiff_spacing(tif) -> tuple[float, float, float] | None:
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            out = []
            for ax in "XYZ":
                size = pixels.get(f"PhysicalSize{ax}")
                scale = _unit_mm(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
                if size is None or scale is None:
                    return None
                out.append(float(size) * scale)
            return tuple(out)
        except (ET.ParseError, StopIteration, ValueError):
            return None
    meta = tif.imagej_metadata
    if meta and "spacing" in meta:
        scale = _unit_mm(meta.get("unit"))
        tags = tif.pages[0].tags
        if scale is None or "XResolution" not in tags or "YResolution" not in tags:
            return None
        sx, sy = (
            float(tags[t].value[1]) / float(tags[t].value[0]) for t in ("XResolution", "YResolution")
        )
        return (sx * scale, sy * scale, float(meta["spacing"]) * scale)
    return None


def _read_zarr(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(x, y, z) array of a Zarr array / group (OME-Zarr multiscales: level 0) and its spacing."""
    import zarr

    node = zarr.open(str(path), mode="r")
    spacing = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = (attrs.get("ome") or attrs).get("multiscales")
        if multiscales:
            ms = multiscales[0]
            level0 = ms["datasets"][0]
            array = node[level0["path"]]
            spacing_all = _ome_scale(ms, level0, array.ndim)
            axes = ms.get("axes")
        else:
            keys = sorted(node.array_keys())
            if "0" in keys:
                array = node["0"]
            elif len(keys) == 1:
                array = node[keys[0]]
            else:
                raise VolumeError(path, f"Zarr group holds {len(keys)} arrays and no OME multiscales metadata; "
                                        "point to one array", "unreadable")
            spacing_all, axes = None, None
        data = np.asarray(array[...])
        if axes and len(axes) == data.ndim:
            space = [i for i, a in enumerate(axes) if (a.get("type") if isinstance(a, dict) else None) == "space"
                     or (a.get("name") if isinstance(a, dict) else a) in ("x", "y", "z")]
            if len(space) == 3 and all(data.shape[i] == 1 for i in range(data.ndim) if i not in space):
                units = [_unit_mm(axes[i].get("unit")) if isinstance(axes[i], dict) else None for i in space]
                if spacing_all is not None and all(u is not None for u in units):
                    zyx = [spacing_all[i] * u for i, u in zip(space, units)]
                    spacing = (zyx[2], zyx[1], zyx[0])
                data = data.reshape([data.shape[i] for i in space])
    else:
        data = np.asarray(node[...])
    data = _to_3d(path, data)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), spacing


def _ome_scale(ms: dict, level: dict, ndim: int) -> list[float] | None:
    scale = np.ones(ndim)
    found = False
    for transforms in (level.get("coordinateTransformations"), ms.get("coordinateTransformations")):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
                scale *= np.asarray(t["scale"], dtype=np.float64)
                found = True
    return scale.tolist() if found else None


def _diag_affine(path: Path, file_spacing, override) -> np.ndarray:
    spacing = file_spacing if file_spacing is not None else override
    if spacing is None:
        raise VolumeError(path, "the file carries no voxel spacing; pass --spacing X,Y,Z (mm)", "no_spacing")
    spacing = _check_spacing(spacing, str(path))
    return np.diag([*spacing, 1.0])


def _check_spacing(spacing, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: spacing must be three numbers (mm), got {spacing!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what}: spacing must be three positive numbers (mm), got {spacing!r}")
    return values
