"""The manifest of a preprocessed dataset: one JSON row per volume, appended per shard.

Layout: ``ROOT/manifest/shard-00003-of-00016.jsonl``. Each preprocessing shard appends (and flushes)
one line per finished or excluded volume, so the manifest is readable while shards are still
writing. Readers merge all shard files; for an id seen twice the last row wins. A torn final line
(a run killed mid-write) is ignored. At 100k volumes a full read is one pass of ``json.loads``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

MANIFEST_DIR = "manifest"


@dataclass
class CaseRecord:
    """One volume (all channels of one case) in a preprocessed dataset.

    ``shape`` is the stored image shape (C, X, Y, Z) on the preprocessed grid, ``spacing`` in mm
    along X, Y, Z (RAS axes). ``status`` is "ok" or "excluded" (then ``reason`` says why).
    """

    id: str
    status: str = "ok"
    shape: list[int] | None = None
    spacing: list[float] | None = None
    channels: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    label_source: str | None = None
    subject: str | None = None
    split: str | None = None  # "train" (imagesTr), "test" (imagesTs) or None
    checksum: str | None = None  # of the source file(s)
    reason: str | None = None
    has_label: bool = False
    problems: list[dict] | None = None  # excluded: [{"rule", "path", "reason"}, ...]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def n_voxels(self) -> int:
        if not self.shape:
            return 0
        n = 1
        for s in self.shape[-3:]:
            n *= int(s)
        return n


def shard_file(root: str | os.PathLike, shard: int, n_shards: int) -> Path:
    return Path(root) / MANIFEST_DIR / f"shard-{shard:05d}-of-{n_shards:05d}.jsonl"


class ManifestWriter:
    """Append-only writer for one shard's manifest file (each row flushed and fsynced)."""

    def __init__(self, root: str | os.PathLike, shard: int = 0, n_shards: int = 1) -> None:
        self.path = shard_file(root, shard, n_shards)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _repair_tail(self) -> None:
        """Drop a torn last line left by a killed run, so appends start on a fresh line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            cut = fh.read().rfind(b"\n") + 1
            fh.truncate(cut)

    def append(self, record: CaseRecord) -> None:
        self._fh.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn last line of a shard still being written
            line = line.strip()
            if line:
                yield json.loads(line)


def read_manifest(root: str | os.PathLike) -> dict[str, CaseRecord]:
    """All records of a preprocessed dataset, merged over shards, keyed by id (insertion-ordered)."""
    mdir = Path(root) / MANIFEST_DIR
    records: dict[str, CaseRecord] = {}
    if not mdir.is_dir():
        return records
    known = set(CaseRecord.__dataclass_fields__)
    for path in sorted(mdir.glob("shard-*.jsonl")):
        for row in _rows(path):
            rec = CaseRecord(**{k: v for k, v in row.items() if k in known})
            records.pop(rec.id, None)
            records[rec.id] = rec
    return records
