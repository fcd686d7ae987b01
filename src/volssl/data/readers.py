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

Untrusted inputs
    * Only regular files (a ``.zarr``: a folder of regular files) are opened: a named pipe, socket or
      device called ``x.nii.gz`` would block a reader forever, a symbolic link loop cannot be opened;
      both raise VolumeError (rule "not_regular") before anything is opened (:func:`check_source_path`).
    * The header is read before any voxel data: the declared shape is checked against ``max_voxels``
      (rule "too_large"), the voxel type must be real scalars (complex or RGB voxels: rule "bad_dtype")
      and the voxel sizes must be positive (rule "bad_spacing"). A gzip NIfTI is decompressed with a
      bound: exactly the bytes its header declares, so a stream that is shorter (truncated) or longer
      (a header that understates the data, a decompression bomb) is refused without holding more
      than the declared array in memory.
    * Zarr: chunk files missing from the store (read by Zarr as the fill value) raise rule
      "missing_chunks" unless ``allow_missing_chunks``.
    * A NIfTI without any geometry (pixdim 0, qform_code = sform_code = 0) is read with 1 mm voxels,
      as nnU-Net (SimpleITK) does, and a warning says so.
    * dataset.json is validated against the nnU-Net v2 schema (:func:`read_dataset_json`): a wrong
      type raises one ValueError naming dataset.json and the field.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import stat
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from volssl.data.dataset_json import declared_labels, read_dataset_json
from volssl.util.errors import file_kind

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
    (a short machine-readable code: "unreadable", "not_3d", "no_spacing", "bad_affine", "missing",
    "not_regular", "too_large", "bad_dtype", "bad_spacing", "missing_chunks")."""

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
    error_rule: str = "missing"
    warnings: tuple[tuple[str, str, str], ...] = ()


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
    """``folder`` holds a dataset.json and imagesTr (or imagesTs).

    Raises:
        ValueError: its dataset.json is not a regular file (a named pipe, whose reading would block
        forever, a socket, a device, a folder or a symbolic link loop): the dataset cannot be read, and
        taking the folder for a plain one would silently drop its labels and naming.
    """
    folder = Path(folder)
    meta = folder / "dataset.json"
    if not ((folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir()):
        return False
    try:
        st = os.stat(meta)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{meta}: dataset.json is a symbolic link loop (a link that leads back to itself)") \
                from None
        return False  # no dataset.json (or a link to a missing one): a plain folder
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{meta}: dataset.json is {file_kind(st.st_mode)}, not a regular file; not opened "
                         "(reading it could block forever)")
    return True


def _abspath(path: Path) -> Path:
    """``path`` resolved (links followed), or made absolute as it is when it cannot be resolved (a
    symbolic link loop: :func:`check_source_path` reports it when the case is read)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError("Symlink loop ...")
        return Path(os.path.abspath(path))


def _warning(warnings: list[dict] | None, path: str | os.PathLike, rule: str, reason: str,
             case_id: str | None = None) -> None:
    if warnings is not None:
        warnings.append({"id": case_id, "path": str(path), "rule": rule, "reason": reason})


def discover(
    src: str | os.PathLike, spacing: tuple[float, float, float] | None = None,
    warnings: list[dict] | None = None,
) -> list[SourceCase]:
    """All cases under ``src`` (an nnU-Net v2 raw dataset or a folder searched recursively).

    Args:
        src: source folder, or a single volume file.
        spacing: (x, y, z) mm, attached to every case for files that carry no spacing.
        warnings: if given, dataset-level notes are appended to it as ``{"id": None, "path", "rule",
            "reason"}`` (label files without images, files that do not follow the nnU-Net naming and
            are ignored, a missing labelsTr, numTraining not matching); notes about one case travel
            on its :attr:`SourceCase.warnings`.

    Returns:
        cases in a deterministic order (sorted paths), with unique ids. An entry with a volume suffix
        that is not a regular file (a named pipe, a symbolic link loop) is still a case: it is
        excluded with its reason when read, and the other files are processed.

    Raises:
        FileNotFoundError: ``src`` does not exist. ValueError: ``src`` is neither a file nor a folder,
        or a dataset.json breaks the nnU-Net v2 schema (:func:`read_dataset_json`).
    """
    given = Path(src).expanduser()
    try:
        src = given.resolve()
    except (OSError, RuntimeError):
        raise ValueError(f"source {given} is a symbolic link loop (a link that leads back to itself)") from None
    if not src.exists():
        if os.path.islink(given):
            raise FileNotFoundError(f"source {given} is a link to a missing target ({os.readlink(given)})")
        raise FileNotFoundError(f"source not found: {src}")
    if not (src.is_file() or src.is_dir()):
        raise ValueError(f"source {src} is {file_kind(os.stat(src).st_mode)}, not a file or folder")
    if spacing is not None:
        spacing = _check_spacing(spacing, "--spacing")
    if src.is_file() or (src.is_dir() and volume_suffix(src) in ZARR_SUFFIXES):
        if volume_suffix(src) is None:
            raise ValueError(f"{src} is not a volume file (known suffixes: {', '.join(VOLUME_SUFFIXES)})")
        cases = [_plain_case(src, src.name, src.parent)]
    elif is_nnunet_dataset(src):
        cases = _nnunet_cases(src, prefix="", warnings=warnings)
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
                    cases.extend(_nnunet_cases(sub, prefix=sanitize_id(rel.replace("/", "_")) + "_",
                                               warnings=warnings))
                else:
                    keep.append(d)
            dirnames[:] = keep
            # os.walk lists anything that is not a folder here: regular files, but also named pipes,
            # sockets, broken links and link loops (a ".zarr" among them is no Zarr folder); all with a
            # volume suffix become cases, so that read_volume excludes the odd ones with a reason
            for f in filenames:
                if f.startswith(".") or volume_suffix(f) is None:
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


def _nnunet_cases(root: Path, prefix: str, warnings: list[dict] | None = None) -> list[SourceCase]:
    """The cases of the nnU-Net raw dataset ``root``; dataset-level notes are appended to ``warnings``.

    Choices (see also :func:`discover`): a case whose files disagree with the channels dataset.json
    declares (a channel missing, or a ``_XXXX`` file of an undeclared channel) is excluded with
    that reason (rule "missing" / "channel_count"): processing it would drop a channel silently. A
    training case without a label map is kept (it serves pre-training; fine-tuning uses only cases
    with a label) with a warning. A label file without images, and a file that does not follow the
    naming, is ignored with a warning.
    """
    meta = read_dataset_json(root)
    layout = _NnunetLayout.of(root, prefix, meta)
    if isinstance(meta.get("dataset"), dict):  # explicit file lists
        return _listed_cases(layout, meta["dataset"])
    training = meta.get("training")
    if isinstance(training, list) and training and isinstance(training[0], dict) and \
            (root / str(training[0].get("image", ""))).is_file():  # Medical Segmentation Decathlon lists
        return _decathlon_cases(layout, training, meta.get("test") or [])
    cases: list[SourceCase] = []
    n_train = 0
    for split, images_dir, labels_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        if not (root / images_dir).is_dir():
            continue
        split_cases, n_groups = _split_cases(layout, split, images_dir, labels_dir, warnings)
        cases.extend(split_cases)
        if split == "train":
            n_train = n_groups
    if "numTraining" in meta and (root / "imagesTr").is_dir() and meta["numTraining"] != n_train:
        _warning(warnings, root / "dataset.json", "num_training",
                 f"numTraining is {meta['numTraining']}, imagesTr holds {n_train} case(s)")
    return cases


@dataclass(frozen=True)
class _NnunetLayout:
    """What every case of one nnU-Net raw dataset shares, read from its dataset.json.

    ``declared`` are the channel numbers (sorted), ``channel_names`` their names, ``ending`` the
    file ending, ``label_values`` the declared label values (None: not checked, e.g. instance labels).
    """

    root: Path
    prefix: str
    channel_names: tuple[str, ...]
    declared: tuple[int, ...]
    ending: str
    instance: bool
    label_values: tuple[int, ...] | None

    @classmethod
    def of(cls, root: Path, prefix: str, meta: dict[str, Any]) -> "_NnunetLayout":
        """The layout of the dataset ``root`` with the validated dataset.json ``meta``."""
        names = meta.get("channel_names") or meta.get("modality")
        channel_keys = sorted(names, key=int)
        instance = bool(meta.get("instance_labels", False))
        return cls(
            root=root, prefix=prefix, channel_names=tuple(str(names[k]) for k in channel_keys),
            declared=tuple(int(k) for k in channel_keys), ending=meta.get("file_ending", ".nii.gz"),
            instance=instance,
            label_values=declared_labels(meta["labels"]) if isinstance(meta.get("labels"), dict) and not instance
            else None,
        )

    def case(self, case: str, images: list[str], label: str | None, split: str | None, error: str | None = None,
             error_rule: str = "missing", notes: tuple = ()) -> SourceCase:
        """The :class:`SourceCase` named ``case`` (prefixed and sanitised) with these files."""
        return SourceCase(
            id=sanitize_id(self.prefix + case), images=tuple(images), channels=self.channel_names, label=label,
            subject=subject_of(case), split=split, label_values=self.label_values, instance_labels=self.instance,
            error=error, error_rule=error_rule, warnings=notes,
        )

    def listed(self, p: str) -> str:
        """A path listed in dataset.json (relative to the dataset folder), made absolute."""
        return str(_abspath(self.root / p))


def _listed_cases(layout: _NnunetLayout, dataset: dict[str, Any]) -> list[SourceCase]:
    """The cases of dataset.json's explicit ``"dataset"`` file lists (case -> images, label)."""
    cases = []
    for case in sorted(dataset):
        entry = dataset[case]
        images = [layout.listed(p) for p in entry.get("images", [])]
        label = layout.listed(entry["label"]) if entry.get("label") else None
        missing = [p for p in images + ([label] if label else []) if not os.path.lexists(p)]
        error, rule = None, "missing"
        if len(images) != len(layout.channel_names):
            error, rule = (f"{len(images)} image files listed, dataset.json declares {len(layout.channel_names)} "
                           f"channels"), "channel_count"
        elif missing:
            error = f"listed file(s) missing: {', '.join(missing)}"
        cases.append(layout.case(case, images, label, "train" if label else None, error, rule))
    return cases


def _decathlon_cases(layout: _NnunetLayout, training: list[dict], test: list) -> list[SourceCase]:
    """The cases of Medical Segmentation Decathlon ``training`` / ``test`` lists (one file per case)."""
    entries = [(e["image"], e.get("label"), "train") for e in training]
    entries += [(e if isinstance(e, str) else e["image"], None, "test") for e in test]
    cases = []
    for image, label, split in entries:
        image_path = Path(layout.listed(image))
        label_path = Path(layout.listed(label)) if label else None
        missing = [str(p) for p in (image_path, label_path) if p is not None and not os.path.lexists(p)]
        cases.append(layout.case(_strip_suffix(image_path.name), [str(image_path)],
                                 str(label_path) if label_path else None, split,
                                 f"listed file(s) missing: {', '.join(missing)}" if missing else None))
    return cases


def _image_groups(folder: Path, ending: str, warnings: list[dict] | None) -> dict[str, dict[int, str]]:
    """case -> {channel number: absolute path} of the ``<case>_XXXX<ending>`` files in ``folder``;
    other files with a volume suffix are ignored with a warning."""
    groups: dict[str, dict[int, str]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        m = _NNUNET_CHANNEL.match(f.name[: -len(ending)]) if f.name.endswith(ending) else None
        if m:
            groups.setdefault(m.group("case"), {})[int(m.group("channel"))] = str(_abspath(f))
        elif f.name.endswith(ending):
            _warning(warnings, f, "ignored_file", f"not named <case>_XXXX{ending} (XXXX = channel number); ignored")
        elif volume_suffix(f) is not None:
            _warning(warnings, f, "ignored_file", f"file ending differs from dataset.json file_ending "
                                                  f"{ending!r}; ignored")
    return groups


def _label_cases(labels_folder: Path, ending: str, warnings: list[dict] | None) -> set[str]:
    """Case names of the ``<case><ending>`` files in ``labels_folder``; other volume files are ignored
    with a warning."""
    label_cases: set[str] = set()
    for f in sorted(labels_folder.iterdir()):
        if f.name.startswith("."):
            continue
        if f.name.endswith(ending):
            label_cases.add(f.name[: -len(ending)])
        elif volume_suffix(f) is not None:
            _warning(warnings, f, "ignored_file", f"file ending differs from dataset.json file_ending "
                                                  f"{ending!r}; ignored")
    return label_cases


def _split_cases(layout: _NnunetLayout, split: str, images_dir: str, labels_dir: str,
                 warnings: list[dict] | None) -> tuple[list[SourceCase], int]:
    """(the cases of ``images_dir`` with their ``labels_dir`` label maps, number of image groups)."""
    ending = layout.ending
    groups = _image_groups(layout.root / images_dir, ending, warnings)
    labels_folder = layout.root / labels_dir
    label_cases: set[str] = set()
    if labels_folder.is_dir():
        label_cases = _label_cases(labels_folder, ending, warnings)
        for case in sorted(label_cases - set(groups)):
            _warning(warnings, labels_folder / f"{case}{ending}", "orphan_label",
                     f"label map without images (no {images_dir}/{case}_XXXX{ending}); ignored")
    elif split == "train" and groups:
        _warning(warnings, labels_folder, "no_labels",
                 f"{labels_dir}/ is missing: the {len(groups)} training case(s) are used without labels "
                 "(pre-training only; fine-tuning needs labels)")
    cases = []
    for case in sorted(groups):
        files = groups[case]
        missing = [k for k in layout.declared if k not in files]
        extra = sorted(k for k in files if k not in layout.declared)
        images = [files[k] for k in layout.declared if k in files]
        label_file = labels_folder / f"{case}{ending}"
        label = str(_abspath(label_file)) if case in label_cases and os.path.lexists(label_file) else None
        error, rule, notes = None, "missing", ()
        if extra:
            error, rule = (f"file(s) {', '.join(f'{case}_{k:04d}{ending}' for k in extra)} of channel(s) "
                           f"{', '.join(str(k) for k in extra)} not declared in dataset.json channel_names "
                           f"(declares {len(layout.declared)}: {', '.join(str(k) for k in layout.declared)})"
                           ), "channel_count"
        elif missing:
            error = "missing channel file(s) " + ", ".join(f"{case}_{k:04d}{ending}" for k in missing)
        if split == "train" and label is None and labels_folder.is_dir():
            notes = (("no_label", str(label_file), f"training case without {labels_dir}/{case}{ending}: used "
                      "without a label (pre-training only; fine-tuning skips it)"),)
        cases.append(layout.case(case, images, label, split, error, rule, notes))
    return cases, len(groups)


# ----------------------------------------------------------------------------------------------
# files behind a volume: size rule and fingerprint


def _detached_data_file(path: Path) -> Path | None:
    """The data file a ``.mhd`` / ``.nhdr`` header (a regular file) names, or None (data inside the
    header, a file list, or not such a header). The named file may not exist."""
    suffix = volume_suffix(path)
    if suffix not in (".mhd", ".nhdr") or not path.is_file():
        return None
    keys, sep = (("elementdatafile",), "=") if suffix == ".mhd" else (("data file", "datafile"), ":")
    try:
        with open(path, "r", errors="replace") as fh:
            header = fh.read(65536)
    except OSError:
        return None
    for line in header.splitlines():
        key, _, value = (s.strip() for s in line.partition(sep))
        if key.lower() in keys:
            if value and value.upper() not in ("LOCAL", "LIST") and not value.upper().startswith("LIST "):
                return path.parent / value
            return None
    return None


def source_files(path: str | os.PathLike) -> list[Path]:
    """Every file that makes up the volume at ``path``: the file, the data file a ``.mhd`` / ``.nhdr``
    header names, all files of a ``.zarr`` directory."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    data = _detached_data_file(path)
    if data is not None and data.is_file():
        files.append(data)
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


def check_source_path(path: str | os.PathLike) -> None:
    """Make sure :func:`read_volume` may open ``path``: a regular file (a ``.zarr``: a folder), and for
    a ``.mhd`` / ``.nhdr`` header also the data file it names. Nothing is opened here (a named pipe
    would block ``open`` until someone writes to it).

    Raises:
        VolumeError: rule "missing" (not found, a link to a missing target), "not_regular" (a named
        pipe, socket, device, folder, or a symbolic link loop) or "unreadable" (cannot be accessed).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise VolumeError(path, "is a symbolic link loop (a link that leads back to itself); not opened",
                              "not_regular") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                raise VolumeError(path, f"is a link to a missing target ({os.readlink(path)})", "missing") from None
            raise VolumeError(path, "file not found", "missing") from None
        raise VolumeError(path, f"cannot be accessed: {(e.strerror or str(e)).lower()}", "unreadable") from None
    if volume_suffix(path) in ZARR_SUFFIXES:
        if not stat.S_ISDIR(st.st_mode):
            raise VolumeError(path, f"is {file_kind(st.st_mode)}, not a Zarr folder; not opened", "not_regular")
        return
    if not stat.S_ISREG(st.st_mode):
        raise VolumeError(path, f"is {file_kind(st.st_mode)}, not a regular file; not opened (reading it could "
                                "block forever)", "not_regular")
    data = _detached_data_file(path)
    if data is not None and os.path.lexists(data):
        try:
            check_source_path(data)
        except VolumeError as e:
            raise VolumeError(path, f"its data file {data.name} {e.reason}", e.rule) from None


# ----------------------------------------------------------------------------------------------
# reading

#: rough bytes of working memory per source voxel while a volume is preprocessed (float32 copies:
#: stacked image, reoriented, resampled, normalised), times a safety factor, for the default limit
BYTES_PER_VOXEL = 4
MEMORY_SAFETY_FACTOR = 8
_GZIP_CHUNK = 1 << 24  # bytes decompressed per read


_CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # (limit, usage): v2, v1
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def available_memory_bytes(*, total: bool = False) -> int | None:
    """Memory this process may still use (bytes): ``MemAvailable`` of /proc/meminfo, lowered to the
    room left under a cgroup (container) limit; ``sysconf`` elsewhere; None if unknown.

    Args:
        total: the most this process could ever get instead of what is free now: the machine's
            physical memory lowered to every positive cgroup limit itself (not to the room left under
            it). ``volssl evaluate`` bounds a declared volume by it (a header that cannot fit at all).
    """
    avail = _physical_memory_bytes() if total else _free_memory_bytes()
    for limit_file, usage_file in _CGROUP_MEMORY_FILES:
        try:
            limit = int(Path(limit_file).read_text().strip())  # "max" (no limit): ValueError
        except (OSError, ValueError):
            continue
        if total:
            if limit > 0:
                avail = limit if avail is None else min(avail, limit)
            continue
        if limit >= 1 << 60:  # cgroup v1 "no limit"
            continue
        try:
            room = limit - int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        avail = room if avail is None else min(avail, room)
        break
    if total:
        return avail
    return max(int(avail), 0) if avail is not None else None


def _free_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo, else free pages (``sysconf``), in bytes; None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _physical_memory_bytes() -> int | None:
    """Physical memory of this machine (``sysconf``), in bytes; None if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def default_max_voxels() -> int:
    """The default size limit of one input volume (voxels): available memory /
    (:data:`BYTES_PER_VOXEL` * :data:`MEMORY_SAFETY_FACTOR`) = memory / 32 B, at least 64^3; 1024^3
    when the memory cannot be read. Per file, not divided among workers: a worker that dies for
    memory anyway has its case retried alone (:mod:`volssl.data.preprocess`)."""
    avail = available_memory_bytes()
    if avail is None:
        return 1024 ** 3
    return max(64 ** 3, avail // (BYTES_PER_VOXEL * MEMORY_SAFETY_FACTOR))


@dataclass
class _Reading:
    """Options and notes of one :func:`read_volume` call."""

    max_voxels: int | None = None
    allow_missing_chunks: bool = True
    warnings: list[tuple[str, str]] = field(default_factory=list)


def source_axes(path: str | os.PathLike) -> str:
    """Axis order of the file's own array relative to what :func:`read_volume` returns:
    "xyz" (NIfTI, ITK formats) or "zyx" (TIFF, Zarr; transpose back with ``a.transpose(2, 1, 0)``)."""
    return "zyx" if volume_suffix(path) in TIFF_SUFFIXES + ZARR_SUFFIXES else "xyz"


_FORMAT_NAMES = {".nii.gz": "gzip NIfTI", ".nii": "NIfTI", ".mgz": "MGH", ".mgh": "MGH", ".nrrd": "NRRD",
                 ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage", ".tif": "TIFF", ".tiff": "TIFF",
                 ".zarr": "Zarr"}


def _library_detail(e: BaseException) -> str:
    """A library's error message on one short line (ITK's multi-line messages: the ERROR line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "rror:" in ln]
    text = (errors[-1] if errors else " ".join(lines)) or type(e).__name__
    text = re.sub(r"^.*?ITK ERROR:\s*\S+\(0x[0-9a-f]+\):\s*", "", text)
    return text if len(text) <= 200 else text[:197] + "..."


def read_volume(
    path: str | os.PathLike, spacing: tuple[float, float, float] | None = None, *,
    max_voxels: int | None = None, allow_missing_chunks: bool = True,
    warnings: list[tuple[str, str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D volume.

    Args:
        path: a NIfTI/MGH, NRRD/MHA/MHD, TIFF file or a ``.zarr`` directory.
        spacing: (x, y, z) mm for TIFF/Zarr files that carry no spacing (ignored otherwise).
        max_voxels: refuse (rule "too_large") a volume whose header declares more voxels than this,
            before any voxel data is read; None: no limit.
        allow_missing_chunks: Zarr only: chunk files missing from the store are read as the fill
            value (True, Zarr's own behaviour, with a warning) or refused (False, rule
            "missing_chunks"). Writers such as zarr-python 3 leave out chunks that hold only the fill
            value, so volssl's own Zarr outputs need True; ``volssl preprocess`` uses False.
        warnings: if given, ``(rule, reason)`` notes about a volume that is read anyway are appended
            (e.g. "assumed_spacing": a NIfTI without geometry read with 1 mm voxels).

    Returns:
        ``(array, affine)``: the array (X, Y, Z) in its stored dtype (scaling applied for NIfTI) and a
        float64 (4, 4) voxel-to-RAS affine in mm (see the module docstring for axis conventions).

    Raises:
        VolumeError: not a regular file, unreadable or truncated file, not a 3D array of real scalars,
        larger than ``max_voxels``, missing Zarr chunks, no or invalid spacing, invalid affine.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise VolumeError(path, f"unknown file type (known: {', '.join(VOLUME_SUFFIXES)})", "unreadable")
    check_source_path(path)
    opts = _Reading(max_voxels=max_voxels, allow_missing_chunks=allow_missing_chunks)
    try:
        if suffix in NIBABEL_SUFFIXES:
            array, affine = _read_nibabel(path, opts)
        elif suffix in ITK_SUFFIXES:
            array, affine = _read_itk(path, opts)
        elif suffix in TIFF_SUFFIXES:
            array, file_spacing = _read_tiff(path, opts)
            affine = _diag_affine(path, file_spacing, spacing)
        else:
            array, file_spacing = _read_zarr(path, opts)
            affine = _diag_affine(path, file_spacing, spacing)
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # any library error: truncated, corrupt, wrong format
        raise VolumeError(path, f"cannot read: the file is damaged, truncated or not a {_FORMAT_NAMES[suffix]} file "
                                f"({_library_detail(e)})", "unreadable") from None
    _check_dtype(path, array.dtype)
    if array.ndim != 3 or 0 in array.shape:
        raise VolumeError(path, f"array shape {tuple(int(s) for s in array.shape)} has an axis of length 0: the "
                                "volume holds no voxels", "not_3d")
    affine = np.asarray(affine, dtype=np.float64)
    check_affine(path, affine)
    if warnings is not None:
        warnings.extend(opts.warnings)
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


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    """Raise VolumeError (rule "bad_dtype") unless voxels of ``dtype`` are real scalars (bool, int, float)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "biuf":
        return
    if dtype.kind == "c":
        raise VolumeError(path, f"voxels are complex numbers ({dtype.name}); a real-valued image is needed "
                                "(store the magnitude or the real part)", "bad_dtype")
    if dtype.names:
        what = "colour (RGB) triples" if set(dtype.names) <= set("RGBA") else f"records with fields {dtype.names}"
        raise VolumeError(path, f"voxels are {what}, not single numbers; a scalar (grey-value) image is needed",
                          "bad_dtype")
    raise VolumeError(path, f"voxels of type {dtype} are not numbers; a scalar (grey-value) image is needed",
                      "bad_dtype")


def check_declared_size(path: str | os.PathLike, shape: tuple[int, ...], max_voxels: int | None, *,
                        as_memory_error: bool = False) -> None:
    """The header size guard: refuse a volume whose header declares ``shape`` (voxels per axis) holding
    more than ``max_voxels`` voxels (None: no limit), before any of its voxel data is read.

    Args:
        as_memory_error: raise MemoryError with the shape written ``AxBxC`` (``volssl evaluate``, which
            reports it as one pair that cannot be scored) instead of VolumeError (rule "too_large").
    """
    n = math.prod(int(s) for s in shape)
    if max_voxels is None or n <= max_voxels:
        return
    if as_memory_error:
        raise MemoryError(f"{path}: its header declares {'x'.join(str(int(v)) for v in shape)} = {n:.3g} voxels, "
                          f"more than the limit of {max_voxels:.3g} voxels (--max-voxels); not read")
    raise VolumeError(
        path, f"declared shape {tuple(int(s) for s in shape)} = {n:,} voxels exceeds the limit of "
              f"{int(max_voxels):,} voxels (--max-voxels); not read", "too_large")


def declared_size(path: str | os.PathLike) -> tuple[tuple[int, ...], int] | None:
    """``(shape, bytes per voxel once read)`` of a volume file from its header alone (nothing of the
    voxel data is read), or None when the header cannot tell (the read that follows reports why).

    NIfTI/MGH: nibabel's header (a scaled NIfTI is read as float64, 8 bytes); NRRD/MHA/MHD:
    SimpleITK's ``ReadImageInformation`` (shape (x, y, z, components)); TIFF: the first series; Zarr:
    the array (level 0 of an OME-Zarr group); ``.npy``: its header. The shape is the file's own, before
    :func:`read_volume` drops size-1 axes or reorders (z, y, x) ones.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    try:
        if path.name.lower().endswith(".npy"):
            arr = np.load(path, mmap_mode="r")  # the header only
            return tuple(int(v) for v in arr.shape), arr.dtype.itemsize
        if suffix in NIBABEL_SUFFIXES:
            return _declared_nibabel(path)
        if suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            itemsize = 8 if reader.GetPixelID() in (sitk.sitkFloat64, sitk.sitkInt64, sitk.sitkUInt64) else 4
            return tuple(int(v) for v in reader.GetSize()) + (int(reader.GetNumberOfComponents()),), itemsize
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                series = tif.series[0]
                return tuple(int(v) for v in series.shape), np.dtype(series.dtype).itemsize
        if suffix in ZARR_SUFFIXES:
            return _declared_zarr(path)
    except Exception:  # noqa: BLE001 - the header cannot tell; read_volume reports the problem
        return None
    return None


def _declared_nibabel(path: Path) -> tuple[tuple[int, ...], int]:
    """:func:`declared_size` of a NIfTI/MGH file (8 bytes per voxel when the header scales the values)."""
    import nibabel as nib

    img = nib.load(str(path))
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    slope, inter = img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (None, None)
    if (slope not in (None, 1.0) and np.isfinite(slope)) or (inter not in (None, 0.0) and np.isfinite(inter)):
        itemsize = 8
    return tuple(int(v) for v in img.shape), itemsize


def _declared_zarr(path: Path) -> tuple[tuple[int, ...], int] | None:
    """:func:`declared_size` of a Zarr array or group (its OME-Zarr level 0, or its one / "0" array)."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        ms = (attrs.get("ome") or attrs).get("multiscales")
        keys = sorted(node.array_keys())
        if ms:
            key = ms[0]["datasets"][0]["path"]
        else:
            key = "0" if "0" in keys else keys[0] if len(keys) == 1 else None
        if key is None:
            return None
        node = node[key]
    return tuple(int(v) for v in node.shape), np.dtype(node.dtype).itemsize


def _check_file_spacing(path: Path, values, where: str) -> None:
    """Raise VolumeError (rule "bad_spacing") unless the voxel sizes ``values`` are finite and > 0."""
    vals = [float(v) for v in values]
    if not all(math.isfinite(v) and v > 0 for v in vals):
        shown = ", ".join(f"{v:g}" for v in vals)
        raise VolumeError(path, f"voxel size ({shown}) in {where} is zero, negative or not a number; "
                                "the geometry is undefined", "bad_spacing")


def _read_nibabel(path: Path, opts: _Reading) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))  # the header only; voxel data are read below
    shape = img.shape
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise _not_3d(path, shape)
    _check_dtype(path, img.get_data_dtype())
    check_declared_size(path, shape[:3], opts.max_voxels)
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        _check_nifti_geometry(path, img, opts)
    proxy = img.dataobj
    if volume_suffix(path) in (".nii", ".nii.gz") and all(hasattr(proxy, a) for a in ("offset", "dtype", "shape")):
        data = _read_nifti_data(path, proxy)
    else:
        data = np.asanyarray(proxy)
    if len(shape) > 3:
        data = data[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
    return np.asarray(data), img.affine


def _check_nifti_geometry(path: Path, img, opts: _Reading) -> None:
    """Voxel sizes as stored (nibabel's loader silently turns pixdim 0 into 1 and negative into its
    absolute value; SimpleITK reads the raw values): all zero with qform_code = sform_code = 0 is a
    file without geometry, read with 1 mm voxels and a warning (as nnU-Net / SimpleITK does); any
    other zero, negative or non-finite voxel size is refused (rule "bad_spacing")."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:
        raw = type(img.header).from_fileobj(fh, check=False)
    pixdim = [float(v) for v in raw["pixdim"][1:4]]
    qcode, scode = int(raw["qform_code"]), int(raw["sform_code"])
    if all(v == 0 for v in pixdim) and qcode == 0 and scode == 0:
        opts.warnings.append(("assumed_spacing", "the header has no geometry (pixdim 0, qform_code = sform_code "
                                                 "= 0): read with 1 mm isotropic voxels, as nnU-Net (SimpleITK) "
                                                 "does; check the voxel size"))
        return
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        shown = ", ".join(f"{v:g}" for v in pixdim)
        raise VolumeError(path, f"voxel size in the header (pixdim = {shown}) is zero, negative or not a number "
                                f"(qform_code {qcode}, sform_code {scode}); readers disagree on what it means "
                                "(nibabel replaces it, SimpleITK refuses zero), so the geometry is undefined",
                          "bad_spacing")


def _read_nifti_data(path: Path, proxy) -> np.ndarray:
    """The voxel data of a NIfTI file as its header declares them (scaling applied), read with a bound.

    Plain ``.nii``: refused when the file is shorter than the header's offset + voxel bytes, then read
    by nibabel (memory map). ``.nii.gz``: decompressed into an array of exactly the declared size (the
    pages are touched only as data arrive, so a truncated stream never costs the declared size) and
    refused when the stream ends before it, holds more data after it, or fails its CRC check.
    """
    from nibabel.volumeutils import apply_read_scaling

    dtype = np.dtype(proxy.dtype)
    shape = tuple(int(s) for s in proxy.shape)
    offset = int(proxy.offset)
    nbytes = math.prod(shape) * dtype.itemsize
    if volume_suffix(path) == ".nii":
        size = os.stat(path).st_size
        if size < offset + nbytes:
            raise VolumeError(path, f"cannot read: the file is truncated: the header declares {nbytes:,} bytes of "
                                    f"voxel data after byte {offset:,}, the file holds {max(size - offset, 0):,}",
                              "unreadable")
        return np.asanyarray(proxy)
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            skip = offset
            while skip > 0:
                n = len(fh.read(min(skip, _GZIP_CHUNK)))
                if n == 0:
                    break
                skip -= n
            while skip == 0 and got < nbytes:
                n = fh.readinto(view[got:got + _GZIP_CHUNK])
                if not n:
                    break
                got += n
            if got == nbytes and fh.read(1):
                raise VolumeError(path, f"cannot read: the compressed stream holds more data than the header declares "
                                        f"({nbytes:,} bytes of voxels after byte {offset:,}): the header does not "
                                        f"match the data; not read further", "unreadable")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        what = "ends early (the file is truncated)" if isinstance(e, EOFError) else \
            f"is damaged ({_library_detail(e)})"
        raise VolumeError(path, f"cannot read: the compressed stream {what}", "unreadable") from None
    if got < nbytes:
        raise VolumeError(path, f"cannot read: the file is truncated: the header declares {nbytes:,} bytes of voxel "
                                f"data after byte {offset:,}, the compressed stream holds {got:,}", "unreadable")
    raw = buf.view(dtype).reshape(shape, order=getattr(proxy, "order", "F"))
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)  # as nibabel's ArrayProxy scales
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(raw, slope, inter)


def _read_itk(path: Path, opts: _Reading) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only
    size = reader.GetSize()
    ncomp = reader.GetNumberOfComponents()
    if ncomp != 1:
        raise _not_3d(path, tuple(reversed(size)) + (ncomp,),
                      f" ({ncomp} components per voxel: a vector, colour or complex-valued image)")
    if reader.GetDimension() < 3 or any(s != 1 for s in size[3:]):
        raise _not_3d(path, size)
    check_declared_size(path, size[:3], opts.max_voxels)
    _check_file_spacing(path, reader.GetSpacing()[:3], "the header")
    img = reader.Execute()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _not_3d(path, tuple(reversed(size)) + (img.GetNumberOfComponentsPerPixel(),),
                      f" ({img.GetNumberOfComponentsPerPixel()} components per voxel)")
    if "complex" in img.GetPixelIDTypeAsString():
        raise VolumeError(path, f"voxels are complex numbers ({img.GetPixelIDTypeAsString()}); a real-valued image "
                                "is needed (store the magnitude or the real part)", "bad_dtype")
    if img.GetDimension() > 3:
        img = sitk.Extract(img, list(size[:3]) + [0] * (len(size) - 3), [0] * len(size))
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.array(img.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # ITK numpy view is (z, y, x)
    return np.ascontiguousarray(array), affine


def _shape_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 3D shape :func:`_to_3d` makes of ``shape`` (size-1 axes dropped, leading first)."""
    dims = list(shape)
    while len(dims) > 3 and 1 in dims:
        dims.pop(dims.index(1))
    if len(dims) != 3:
        raise _not_3d(path, shape)
    return tuple(dims)


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


def _read_tiff(path: Path, opts: _Reading) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(x, y, z) array of a TIFF stack (pages = z) and its spacing (x, y, z) mm if the file has one."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        if "S" in series.axes and series.shape[series.axes.index("S")] > 1:
            raise _not_3d(path, series.shape, f" (axes {series.axes}: colour samples per pixel)")
        check_declared_size(path, _shape_3d(path, tuple(series.shape)), opts.max_voxels)
        _check_dtype(path, series.dtype)
        array = series.asarray()
        spacing = _tiff_spacing(tif)
    array = _to_3d(path, np.asarray(array))
    sidecar = path.with_name(_strip_suffix(path.name) + ".json")
    if spacing is None and sidecar.is_file():  # nnU-Net Tiff3DIO: {"spacing": [z, y, x]}
        try:
            zyx = json.loads(sidecar.read_text())["spacing"]
            spacing = tuple(float(s) for s in reversed(zyx))
            if len(spacing) != 3:
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise VolumeError(sidecar, "cannot read the spacing from this sidecar: it must be JSON like "
                                       '{"spacing": [z, y, x]} (three numbers, mm)', "no_spacing") from None
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
        sx, sy = (  # pixels per unit -> unit per pixel; 0 pixels per unit is an invalid (infinite) size
            float(tags[t].value[1]) / float(tags[t].value[0]) if float(tags[t].value[0]) else math.inf
            for t in ("XResolution", "YResolution")
        )
        try:
            z = float(meta["spacing"])
        except (TypeError, ValueError):
            z = math.nan
        return (sx * scale, sy * scale, z * scale)
    return None


def _read_zarr(path: Path, opts: _Reading) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(x, y, z) array of a Zarr array / group (OME-Zarr multiscales: level 0) and its spacing."""
    import zarr

    files = _zarr_store_files(path)  # before zarr opens anything: refuses named pipes in the store
    node = zarr.open(str(path), mode="r")
    spacing = None
    spacing_all, axes = None, None
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
    else:
        array = node
    check_declared_size(path, _shape_3d(path, tuple(array.shape)), opts.max_voxels)
    _check_dtype(path, array.dtype)
    _check_zarr_chunks(path, str(getattr(array, "path", "") or ""), files, array, opts)
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
    data = _to_3d(path, data)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), spacing


def _zarr_store_files(root: Path) -> set[str]:
    """Relative paths (posix) of the regular files in the Zarr folder ``root`` (linked folders followed
    once). Raises VolumeError (rule "not_regular") for a named pipe, socket or device in the store,
    which Zarr would block on; broken links count as absent (missing chunks)."""
    found: set[str] = set()
    seen: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise VolumeError(root, f"cannot list {folder}: {(e.strerror or str(e)).lower()}", "unreadable") from None
        for entry in entries:
            name = rel + entry.name
            try:
                est = entry.stat()  # follows links
            except OSError:
                continue  # a broken link or a link loop: absent
            if stat.S_ISDIR(est.st_mode):
                stack.append((Path(entry.path), name + "/"))
            elif stat.S_ISREG(est.st_mode):
                found.add(name)
            else:
                raise VolumeError(root, f"the Zarr store holds {name}, which is {file_kind(est.st_mode)}, not a "
                                        "regular file; not opened", "not_regular")
    return found


def _zarr_chunk_grid(meta_dir: Path) -> tuple[list[int], list[int], Any, Any] | None:
    """(shape, stored chunk shape, key function, fill value) from the array metadata in ``meta_dir``
    (Zarr v2 ``.zarray`` or v3 ``zarr.json``, regular grids; for sharded v3 arrays the chunk is the
    shard); None when it cannot be told."""
    try:
        if (meta_dir / ".zarray").is_file():
            meta = json.loads((meta_dir / ".zarray").read_text())
            sep = meta.get("dimension_separator") or "."
            return list(meta["shape"]), list(meta["chunks"]), \
                (lambda idx: sep.join(map(str, idx)) if idx else "0"), meta.get("fill_value")
        if (meta_dir / "zarr.json").is_file():
            meta = json.loads((meta_dir / "zarr.json").read_text())
            grid = meta.get("chunk_grid") or {}
            if grid.get("name") != "regular":
                return None
            enc = meta.get("chunk_key_encoding") or {"name": "default"}
            name = enc.get("name", "default")
            sep = (enc.get("configuration") or {}).get("separator", "/" if name == "default" else ".")
            if name == "default":
                def key(idx):
                    return sep.join(["c", *map(str, idx)])
            elif name == "v2":
                def key(idx):
                    return sep.join(map(str, idx)) if idx else "0"
            else:
                return None
            return list(meta["shape"]), list(grid["configuration"]["chunk_shape"]), key, meta.get("fill_value")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def _check_zarr_chunks(path: Path, array_path: str, files: set[str], array, opts: _Reading) -> None:
    """Compare the chunk files present with the chunk grid: missing chunks are refused (rule
    "missing_chunks") unless ``opts.allow_missing_chunks`` (then a warning)."""
    prefix = array_path.strip("/")
    grid = _zarr_chunk_grid(path / prefix if prefix else path)
    if grid is None:
        return
    shape, chunks, key, fill = grid
    if len(shape) != len(chunks) or not all(c > 0 for c in chunks):
        return
    counts = [math.ceil(s / c) for s, c in zip(shape, chunks)]
    total = math.prod(counts)
    base = prefix + "/" if prefix else ""
    missing, example = 0, None
    for idx in itertools.product(*(range(n) for n in counts)):
        if base + key(idx) not in files:
            missing += 1
            example = example or key(idx)
    if not missing:
        return
    where = f" of array {prefix!r}" if prefix else ""
    text = (f"{missing} of {total} chunk files{where} are missing from the store (e.g. {example!r}); "
            f"Zarr reads them as the fill value {fill!r}")
    if opts.allow_missing_chunks:
        opts.warnings.append(("missing_chunks", text + " (allowed)"))
        return
    raise VolumeError(path, text + ". Copy the missing chunks, or, if the writer left out chunks that hold only "
                                   "the fill value (zarr-python 3 does by default), allow it with "
                                   "--zarr-allow-missing-chunks", "missing_chunks")


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
    if file_spacing is not None:
        _check_file_spacing(path, file_spacing, "the file's metadata")
        spacing = tuple(float(s) for s in file_spacing)
    elif override is not None:
        spacing = _check_spacing(override, "--spacing")
    else:
        raise VolumeError(path, "the file carries no voxel spacing; pass --spacing X,Y,Z (mm)", "no_spacing")
    return np.diag([*spacing, 1.0])


def _check_spacing(spacing, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: spacing must be three numbers (mm), got {spacing!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what}: spacing must be three positive numbers (mm), got {spacing!r}")
    return values
