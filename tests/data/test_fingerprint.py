"""volssl.data.fingerprint: per-case geometry on the RAS grid, foreground intensity statistics,
modalities, the cache, and the file-naming errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volssl.data.fingerprint import (
    FINGERPRINT_FILE,
    channel_modality,
    dataset_fingerprint,
    intensity_properties,
    load_fingerprint,
    naming_problems,
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def _dataset(root: Path, n: int = 3, channels=("CT",), rng_seed: int = 0) -> Path:
    """Cases with a zero border (cropped away), a known foreground and, for case i, spacing (1, 1, 2 + i)
    stored in LPS-like flipped order for odd cases."""
    rng = np.random.default_rng(rng_seed)
    for i in range(n):
        shape = (20, 24, 16)
        zooms = (1.0, 1.0, 2.0 + i)
        affine = np.diag([*zooms, 1.0])
        if i % 2:  # x flipped and axes (x, y, z) stored as (y, x, z): the fingerprint must see RAS
            affine = np.array([[0.0, -zooms[0], 0, 10], [zooms[1], 0, 0, 0], [0, 0, zooms[2], 0], [0, 0, 0, 1]])
        label = np.zeros(shape, np.uint8)
        label[6:12, 8:14, 5:9] = 1
        for c, _ in enumerate(channels):
            img = np.zeros(shape, np.float32)
            img[2:18, 3:21, 1:15] = rng.normal(10.0 * (c + 1), 1.0, (16, 18, 14))
            img[label == 1] = 100.0 * (c + 1) + rng.normal(0, 5.0, int(label.sum()))
            _save(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", img, affine)
        _save(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": {"background": 0, "organ": 1}, "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_geometry_intensities_and_modalities(tmp_path):
    root = _dataset(tmp_path / "ds", channels=("CT", "T1"))
    fp = dataset_fingerprint(root, progress=False)
    assert json.loads(json.dumps(fp)) == fp  # JSON-serialisable as is
    assert fp["channel_names"] == ["CT", "T1"] and fp["modalities"] == ["CT", "non-CT"]
    assert fp["labels"] == {"background": 0, "organ": 1} and fp["n_cases"] == 3 and not fp["excluded"]
    by_id = {c["id"]: c for c in fp["cases"]}
    # RAS spacing and shape: the odd case stores (y, x, z), its RAS spacing is still (1, 1, 3)
    assert by_id["case_001"]["spacing"] == pytest.approx([1.0, 1.0, 3.0])
    assert by_id["case_000"]["shape"] == [20, 24, 16] and by_id["case_001"]["shape"] == [24, 20, 16]
    assert by_id["case_000"]["shape_after_crop"] == [16, 18, 14]
    assert by_id["case_001"]["shape_after_crop"] == [18, 16, 14]
    assert by_id["case_000"]["relative_size_after_crop"] == pytest.approx(16 * 18 * 14 / (20 * 24 * 16))
    assert fp["median_spacing"] == pytest.approx([1.0, 1.0, 3.0])
    assert all(c["foreground"] == "label" and c["n_foreground"] == 6 * 6 * 4 for c in fp["cases"])
    ct, t1 = fp["foreground_intensity_properties_per_channel"]
    assert ct["channel"] == "CT" and ct["n_samples"] == 3 * 144
    assert ct["mean"] == pytest.approx(100.0, abs=1.5) and ct["std"] == pytest.approx(5.0, abs=1.0)
    assert ct["percentile_00_5"] < ct["median"] < ct["percentile_99_5"] and ct["min"] <= ct["percentile_00_5"]
    assert t1["mean"] == pytest.approx(200.0, abs=1.5)  # foreground only: the background (20) is not sampled


def test_sampling_is_bounded_and_reproducible(tmp_path):
    root = _dataset(tmp_path / "ds")
    a = dataset_fingerprint(root, samples=60, seed=1, progress=False)
    b = dataset_fingerprint(root, samples=60, seed=1, progress=False)
    c = dataset_fingerprint(root, samples=60, seed=2, progress=False)
    props = a["foreground_intensity_properties_per_channel"][0]
    assert props["n_samples"] == 60  # 20 per case
    assert props == b["foreground_intensity_properties_per_channel"][0]
    assert props != c["foreground_intensity_properties_per_channel"][0]
    with pytest.raises(ValueError, match="samples"):
        dataset_fingerprint(root, samples=0, progress=False)


def test_cache_is_reused_until_a_file_changes(tmp_path):
    root = _dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    fp = dataset_fingerprint(root, cache=cache, progress=False)
    path = cache / FINGERPRINT_FILE
    assert path.is_file() and load_fingerprint(cache) == fp
    # a matching cache is returned as stored (a marker survives); other settings or files recompute it
    stored = json.loads(path.read_text())
    stored["marker"] = 1
    path.write_text(json.dumps(stored))
    assert dataset_fingerprint(root, cache=cache, progress=False)["marker"] == 1
    assert "marker" not in dataset_fingerprint(root, cache=cache, progress=False, seed=5)
    path.write_text(json.dumps({**json.loads(path.read_text()), "marker": 2}))
    img = root / "imagesTr" / "case_000_0000.nii.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "marker" not in dataset_fingerprint(root, cache=cache, progress=False)
    with pytest.raises(ValueError, match="not a volssl dataset fingerprint"):
        (tmp_path / "x.json").write_text("{}")
        load_fingerprint(tmp_path / "x.json")


def test_file_naming_errors_are_reported(tmp_path):
    root = _dataset(tmp_path / "ds", n=2, channels=("T1", "T2"))
    assert naming_problems(root) == []
    (root / "imagesTr" / "case_000_0000.nii.gz").rename(root / "imagesTr" / "case_000_T1.nii.gz")
    (root / "imagesTr" / "case_001_0005.nii.gz").write_bytes(b"")
    (root / "labelsTr" / "orphan.nii.gz").write_bytes(b"")
    problems = naming_problems(root)
    text = "\n".join(problems)
    assert "imagesTr/case_000_T1.nii.gz: not named <case>_XXXX.nii.gz with XXXX in 0000, 0001" in text
    assert "imagesTr/case_001_0005.nii.gz" in text
    assert "case_000: missing channel file(s) case_000_0000.nii.gz" in text
    assert "labelsTr/orphan.nii.gz: no imagesTr/orphan_XXXX.nii.gz images" in text
    with pytest.raises(ValueError, match="file naming problem"):
        dataset_fingerprint(root, progress=False)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    assert any("training case without labelsTr/case_001.nii.gz" in p for p in naming_problems(root))


def test_unreadable_cases_are_excluded_and_empty_labels_use_nonzero(tmp_path):
    root = _dataset(tmp_path / "ds", n=3)
    (root / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"not a nifti")
    empty = nib.load(root / "labelsTr" / "case_001.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), root / "labelsTr" / "case_001.nii.gz")
    fp = dataset_fingerprint(root, progress=False)
    assert [e["id"] for e in fp["excluded"]] == ["case_002"] and fp["n_cases"] == 2
    by_id = {c["id"]: c for c in fp["cases"]}
    assert by_id["case_001"]["foreground"] == "nonzero" and by_id["case_001"]["n_foreground"] == 16 * 18 * 14
    assert by_id["case_000"]["foreground"] == "label"


def test_small_pieces():
    assert channel_modality("CT") == "CT" and channel_modality(" ct ") == "CT"
    assert channel_modality("T1") == channel_modality("CTA-like MR") == "non-CT"
    props = intensity_properties(np.arange(1001, dtype=np.float32))
    assert props["n_samples"] == 1001 and props["median"] == 500.0
    assert props["percentile_00_5"] == pytest.approx(5.0) and props["percentile_99_5"] == pytest.approx(995.0)
    assert intensity_properties(np.array([]))["mean"] is None
