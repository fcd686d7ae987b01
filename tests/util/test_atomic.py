"""Atomic writes: a failure leaves the previous file intact; new files get normal permissions."""
import os

import pytest

from volssl.util.atomic import atomic_path, write_json_atomic


def test_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "b.json").st_mode & 0o777) == 0o644
