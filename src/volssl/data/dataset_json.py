"""dataset.json of an nnU-Net v2 raw dataset (and the v1 / Medical Segmentation Decathlon forms volssl
also reads): read it and check it against the schema, with one readable error naming the field."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from volssl.util.errors import file_kind


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _is_v1_labels(labels: dict) -> bool:
    """nnU-Net v1 / Medical Segmentation Decathlon labels: ``{"0": "background", "1": "tumor"}``."""
    return bool(labels) and all(isinstance(v, str) and str(k).lstrip("-").isdigit() for k, v in labels.items())


def validate_dataset_json(meta: Any, where: str | os.PathLike) -> dict:
    """Check a parsed dataset.json against the nnU-Net v2 schema (with the v1 / Medical Segmentation
    Decathlon forms volssl also reads) and return it.

    Checked: it is a JSON object; ``channel_names`` (or v1 ``modality``) is a non-empty object
    ``{"0": "CT", ...}`` with integer keys and string names; ``labels`` (optional) is an object of
    ``name: int`` or ``name: [int, ...]`` (v2, region-based) or ``"0": "name"`` (v1);
    ``file_ending`` (optional, default ".nii.gz") is a string starting with "."; ``numTraining`` an
    integer >= 0; ``instance_labels`` true/false; ``regions_class_order`` a list of integers;
    ``dataset`` an object ``{case: {"images": [path, ...], "label": path}}``; ``training`` a list of
    ``{"image": path, "label": path}`` and ``test`` a list of paths.

    Raises:
        ValueError: ``"<where>: dataset.json field 'file_ending' must be ... got null"`` (the first
        problem found).
    """
    def bad(field_name: str, want: str, got: Any) -> ValueError:
        return ValueError(f"{where}: dataset.json field {field_name!r} must be {want}, got {_show(got)} "
                          f"({_json_type(got)})")

    if not isinstance(meta, dict):
        return_type = _json_type(meta)
        raise ValueError(f"{where}: dataset.json must be a JSON object ({{\"channel_names\": ..., \"labels\": ..., "
                         f"\"file_ending\": ...}}), got {return_type}")
    key = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
    if key is None:
        raise ValueError(f"{where}: dataset.json has no 'channel_names' (e.g. {{\"0\": \"CT\"}})")
    names = meta[key]
    if not isinstance(names, dict) or not names:
        raise bad(key, 'a non-empty object like {"0": "CT", "1": "T2"}', names)
    for k, v in names.items():
        if not (str(k).isdigit()):
            raise ValueError(f"{where}: dataset.json field {key!r}: key {k!r} is not a channel number "
                             f"(0, 1, ...): keys name the _XXXX file index")
        if not isinstance(v, str):
            raise bad(f"{key}.{k}", "a channel name (a string)", v)
    if len({int(k) for k in names}) != len(names):
        raise ValueError(f"{where}: dataset.json field {key!r} repeats a channel number: {sorted(names)}")
    if "labels" in meta and meta["labels"] is not None:
        labels = meta["labels"]
        if not isinstance(labels, dict):
            raise bad("labels", 'an object like {"background": 0, "tumor": 1}', labels)
        if not _is_v1_labels(labels):
            for name, v in labels.items():
                ok = _is_int(v) or (isinstance(v, list) and v and all(_is_int(x) for x in v))
                if not ok:
                    raise bad(f"labels.{name}", "an integer label value (or a list of them for a region)", v)
    if "file_ending" in meta:
        ending = meta["file_ending"]
        if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
            raise bad("file_ending", 'a file ending like ".nii.gz"', ending)
    if "numTraining" in meta and not (_is_int(meta["numTraining"]) and meta["numTraining"] >= 0):
        raise bad("numTraining", "an integer >= 0", meta["numTraining"])
    if "instance_labels" in meta and not isinstance(meta["instance_labels"], bool):
        raise bad("instance_labels", "true or false", meta["instance_labels"])
    if "regions_class_order" in meta and meta["regions_class_order"] is not None and not (
            isinstance(meta["regions_class_order"], list) and all(_is_int(x) for x in meta["regions_class_order"])):
        raise bad("regions_class_order", "a list of integers", meta["regions_class_order"])
    if "dataset" in meta and meta["dataset"] is not None:
        ds = meta["dataset"]
        if not isinstance(ds, dict):
            raise bad("dataset", 'an object {case: {"images": [...], "label": ...}}', ds)
        for case, entry in ds.items():
            if not isinstance(entry, dict):
                raise bad(f"dataset.{case}", 'an object {"images": [...], "label": ...}', entry)
            images = entry.get("images")
            if not isinstance(images, list) or not images or not all(isinstance(x, str) for x in images):
                raise bad(f"dataset.{case}.images", "a non-empty list of file paths", images)
            if entry.get("label") is not None and not isinstance(entry["label"], str):
                raise bad(f"dataset.{case}.label", "a file path or null", entry["label"])
    if "training" in meta and meta["training"] is not None:
        tr = meta["training"]
        if not isinstance(tr, list):
            raise bad("training", 'a list of {"image": ..., "label": ...}', tr)
        for k, e in enumerate(tr):
            if not isinstance(e, dict) or not isinstance(e.get("image"), str) or \
                    not isinstance(e.get("label", ""), (str, type(None))):
                raise bad(f"training[{k}]", 'an object {"image": path, "label": path}', e)
    if "test" in meta and meta["test"] is not None:
        ts = meta["test"]
        if not isinstance(ts, list) or not all(isinstance(e, str) or (isinstance(e, dict) and
                                                                     isinstance(e.get("image"), str)) for e in ts):
            raise bad("test", "a list of file paths", ts)
    return meta


def read_dataset_json(root: str | os.PathLike) -> dict:
    """The validated dataset.json of the nnU-Net dataset folder ``root`` (:func:`validate_dataset_json`).

    Raises:
        ValueError: unreadable, not JSON, or not the nnU-Net schema; the message names the file.
    """
    meta_path = Path(root) / "dataset.json"
    try:
        mode = os.stat(meta_path).st_mode
    except OSError:
        mode = None  # the read below says why
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(f"{meta_path}: dataset.json is {file_kind(mode)}, not a regular file; not opened (reading "
                         "it could block forever)")
    try:
        text = meta_path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{meta_path}: cannot read dataset.json: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{meta_path}: dataset.json is not a UTF-8 text file") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: dataset.json is not valid JSON: {e.msg} at line {e.lineno}, "
                         f"column {e.colno}") from None
    return validate_dataset_json(meta, meta_path)


def declared_labels(labels: dict) -> tuple[int, ...]:
    """Label values declared in a validated dataset.json (v2: name -> int or list of ints; v1: "0" -> name)."""
    values: set[int] = set()
    if _is_v1_labels(labels):
        return tuple(sorted(int(k) for k in labels))
    for v in labels.values():
        values.update(v if isinstance(v, list) else [v])
    return tuple(sorted(values))
