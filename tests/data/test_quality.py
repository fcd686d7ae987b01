"""The exclusion rules (S3D defaults, each switchable) and check_case."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volssl.data.quality import (
    QualityRules,
    check_affine_match,
    check_case,
    check_constant,
    check_file_size,
    check_finite,
    check_fov,
    check_integer_labels,
    check_label_values,
    check_spacing,
    voxel_sizes,
)
from volssl.data.readers import SourceCase


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> str:
    aff = np.diag([*zooms, 1.0])
    aff[:3, 3] = shift
    nib.save(nib.Nifti1Image(data, aff), path)
    return str(path)


def test_rule_functions_and_switches(tmp_path):
    assert check_spacing(np.array([1.0, 1.0, 7.0]), 6.5).startswith("spacing 7 mm along axis 2 > 6.5")
    assert check_spacing(np.array([1.0, 1.0, 6.5]), 6.5) is None
    assert check_spacing(np.array([9.0, 9.0, 9.0]), None) is None
    assert "field of view 40 mm along axis 1 < 50" in check_fov((60, 40, 60), np.ones(3), 50.0)
    assert check_fov((50, 50, 25), np.array([1.0, 1.0, 2.0]), 50.0) is None  # exactly 50 mm is kept
    assert check_fov((2, 2, 2), np.ones(3), None) is None
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 1500)
    assert "1.5 kB < 2 kB" in check_file_size(str(f), 2000)
    assert check_file_size(str(f), 1500) is None and check_file_size(str(f), None) is None
    assert check_finite(np.array([1.0, np.nan, np.inf])) == "image has 2 non-finite (NaN/inf) voxels"
    assert check_finite(np.arange(3)) is None
    assert "constant" in check_constant(np.full((2, 2, 2), 3.0)) and check_constant(np.arange(8.0)) is None
    assert check_integer_labels(np.array([0.0, 1.0, 2.0])) is None
    assert check_integer_labels(np.array([0.0, 1.5])) is not None
    assert check_integer_labels(np.array([0.0, np.nan])) is not None
    assert "[3]" in check_label_values(np.array([0, 1, 3]), (0, 1, 2))
    assert check_label_values(np.array([0, 3]), None) is None
    a = np.eye(4)
    b = a.copy()
    b[0, 3] = 2.0
    assert "max difference 2" in check_affine_match(b, a, 1e-3, "label")
    assert check_affine_match(a + 1e-5, a, 1e-3, "label") is None
    assert np.allclose(voxel_sizes(np.diag([-2.0, 3.0, 4.0, 1.0])), [2, 3, 4])


def test_rules_validate():
    with pytest.raises(ValueError, match="min_fov_mm"):
        QualityRules(min_fov_mm=-1)
    r = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None)
    assert r.to_dict()["min_fov_mm"] is None


def test_check_case_good_multichannel_with_label(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [_nifti(tmp_path / f"c_{i:04d}.nii", rng.normal(size=(12, 13, 14)).astype(np.float32), (5, 5, 5))
            for i in range(2)]
    lab = _nifti(tmp_path / "c.nii", (rng.random((12, 13, 14)) > 0.5).astype(np.float32), (5, 5, 5))
    case = SourceCase(id="c", images=tuple(imgs), channels=("T1", "T2"), label=lab, label_values=(0, 1))
    out = check_case(case, QualityRules(min_file_bytes=None))
    assert out.ok and out.image.shape == (2, 12, 13, 14) and out.image.dtype == np.float32
    assert out.label.dtype == np.int64 and set(np.unique(out.label)) == {0, 1}
    assert np.allclose(np.diag(out.affine)[:3], 5)


def test_check_case_reports_each_problem(tmp_path):
    rng = np.random.default_rng(1)
    good = rng.normal(size=(12, 13, 14)).astype(np.float32)
    rules = QualityRules(min_file_bytes=None, min_fov_mm=50.0)
    img = _nifti(tmp_path / "a_0000.nii", good, (5, 5, 5))

    def problems(**kw):
        case = SourceCase(**{"id": "a", "images": (img,), "channels": ("T1",), **kw})
        res = check_case(case, rules)
        assert res.image is None  # arrays only come with a clean case
        return [(p.rule, Path(p.path).name) for p in res.problems]

    shifted = _nifti(tmp_path / "shift_0001.nii", good, (5, 5, 5), shift=(3, 0, 0))
    assert problems(images=(img, shifted), channels=("T1", "T2")) == [("channel_geometry", "shift_0001.nii")]
    assert problems(label=_nifti(tmp_path / "l1.nii", np.zeros((12, 13, 15), np.uint8), (5, 5, 5))) == [
        ("label_shape", "l1.nii")]
    assert problems(label=_nifti(tmp_path / "l2.nii", np.zeros((12, 13, 14), np.uint8), (5, 5, 5), (1, 0, 0))) == [
        ("label_affine", "l2.nii")]
    lab3 = np.zeros((12, 13, 14), np.uint8)
    lab3[0, 0, 0] = 4
    assert problems(label=_nifti(tmp_path / "l3.nii", lab3, (5, 5, 5)), label_values=(0, 1)) == [
        ("label_values", "l3.nii")]
    assert problems(label=_nifti(tmp_path / "l4.nii", good, (5, 5, 5))) == [("label_nonint", "l4.nii")]
    assert problems(error="missing channel file(s) a_0001.nii") == [("missing", "a_0000.nii")]
    small = _nifti(tmp_path / "small.nii", good[:5], (1, 1, 1))
    assert problems(images=(small,)) == [("fov", "small.nii")]
    big = _nifti(tmp_path / "big.nii", good, (5, 5, 8))
    assert problems(images=(big,)) == [("spacing", "big.nii")]
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    assert problems(images=(_nifti(tmp_path / "nan.nii", nan, (5, 5, 5)),)) == [("nonfinite", "nan.nii")]
    assert problems(images=(_nifti(tmp_path / "k.nii", np.ones_like(good), (5, 5, 5)),)) == [("constant", "k.nii")]
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"0" * 100)
    assert problems(images=(str(tmp_path / "bad.nii.gz"),)) == [("unreadable", "bad.nii.gz")]


def test_file_size_rule_stops_before_reading(tmp_path):
    (tmp_path / "tiny.nii.gz").write_bytes(b"garbage")  # unreadable, but the size rule fires first
    case = SourceCase(id="t", images=(str(tmp_path / "tiny.nii.gz"),), channels=("image",))
    res = check_case(case, QualityRules())
    assert [p.rule for p in res.problems] == ["file_size"]
    assert "0.0 kB < 200 kB" in res.problems[0].reason
    res = check_case(case, QualityRules(min_file_bytes=None))
    assert [p.rule for p in res.problems] == ["unreadable"]
