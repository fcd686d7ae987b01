"""Read access to a preprocessed dataset (what ``volssl preprocess`` writes).

Layout of ``ROOT``::

    plan.json                 preprocessing plan (spacing, normalisation, ...) used for every case
    manifest/shard-*.jsonl    one row per volume (see manifest.py)
    images/<id>.b2nd          float32 (C, X, Y, Z), RAS axes, target spacing, normalised
    labels/<id>.b2nd          integer (X, Y, Z) label map on the same grid (labelled cases only)
    props/<id>.json           geometry needed to map arrays back to the source file, and per-class
                              voxel samples for foreground-biased patch sampling
    report.json               excluded files with reasons (merged over shards)
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from volssl.data.manifest import CaseRecord, read_manifest
from volssl.data.storage import SUFFIX, open_array


class PreprocessedDataset:
    """A preprocessed dataset on disk. ``cases`` lists the usable (status "ok") records."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not (self.root / "plan.json").exists():
            raise FileNotFoundError(
                f"{self.root} is not a preprocessed volssl dataset (no plan.json); run `volssl preprocess` first"
            )

    @cached_property
    def plan(self) -> dict[str, Any]:
        return json.loads((self.root / "plan.json").read_text())

    @cached_property
    def records(self) -> dict[str, CaseRecord]:
        return read_manifest(self.root)

    @cached_property
    def cases(self) -> list[CaseRecord]:
        """The usable records sorted by case id: the manifest lists cases in the order parallel workers
        finished them, which changes from run to run, and every patch stream indexes this list."""
        return [r for _, r in sorted(self.records.items()) if r.ok]

    def __len__(self) -> int:
        return len(self.cases)

    def image_path(self, case_id: str) -> Path:
        return self.root / "images" / f"{case_id}{SUFFIX}"

    def label_path(self, case_id: str) -> Path:
        return self.root / "labels" / f"{case_id}{SUFFIX}"

    def props_path(self, case_id: str) -> Path:
        return self.root / "props" / f"{case_id}.json"

    def image(self, case_id: str):
        """Lazily-decoded image array (C, X, Y, Z); slice it to read a patch."""
        return open_array(self.image_path(case_id))

    def label(self, case_id: str):
        """Lazily-decoded label array (X, Y, Z)."""
        return open_array(self.label_path(case_id))

    def props(self, case_id: str) -> dict[str, Any]:
        return json.loads(self.props_path(case_id).read_text())
