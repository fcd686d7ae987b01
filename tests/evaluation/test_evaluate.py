"""evaluate_folder on small NIfTI files: pairing, spacing, missing/mismatched cases, dataset.json labels, CLI."""
import json
import math

import nibabel as nib
import numpy as np
import pytest

from volssl.cli import main
from volssl.evaluation.evaluate import dataset_labels, evaluate_folder, load_metrics
from volssl.evaluation.metrics import case_metrics

SPACING = (0.8, 1.0, 2.5)


def _save(path, array, spacing=SPACING, dtype=np.uint8):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))


def _pair(seed):
    rng = np.random.default_rng(seed)
    ref = np.zeros((16, 14, 10), np.uint8)
    a = rng.integers(2, 6, size=3)
    ref[a[0]:a[0] + 6, a[1]:a[1] + 5, a[2]:a[2] + 4] = 1
    ref[9:14, 8:12, 2:7] = 2
    pred = np.roll(ref, 1, axis=int(rng.integers(0, 3)))
    return pred, ref


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "labelsTr"
    pred_dir.mkdir()
    ref_dir.mkdir()
    arrays = {}
    for i in range(3):
        pred, ref = _pair(i)
        arrays[f"case_{i}"] = (pred, ref)
        _save(ref_dir / f"case_{i}.nii.gz", ref)
        _save(pred_dir / f"case_{i}.nii.gz", pred)
    # case_3: no prediction; case_4: prediction on another grid; extra.nii.gz: no reference
    _save(ref_dir / "case_3.nii.gz", arrays["case_0"][1])
    _save(ref_dir / "case_4.nii.gz", arrays["case_0"][1])
    _save(pred_dir / "case_4.nii.gz", np.zeros((16, 14, 9)))
    _save(pred_dir / "extra.nii.gz", np.zeros((16, 14, 10)))
    (pred_dir / "plans.json").write_text("{}")  # ignored
    return pred_dir, ref_dir, arrays


def test_scores_missing_and_mismatch_are_reported(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    out = tmp_path / "metrics.json"
    res = evaluate_folder(pred_dir, ref_dir, out, nsd_tolerance_mm=1.0, progress=False)
    assert res["missing"] == ["case_3"]
    assert res["unmatched_predictions"] == ["extra"]
    (err,) = res["errors"]
    assert err["case"] == "case_4" and "case_4.nii.gz" in err["error"] and "shape" in err["error"]
    assert res["settings"]["classes"] == {"1": "1", "2": "2"}  # found in the references
    assert len(res["cases"]) == 6
    for c in res["cases"]:
        pred, ref = arrays[c["case"]]
        (expected,) = case_metrics(pred, ref, [int(c["class"])], SPACING, 1.0)
        assert (c["dice"], c["nsd"]) == pytest.approx(expected, abs=1e-12)
    per_class = res["mean"]["per_class"]
    d1 = np.mean([c["dice"] for c in res["cases"] if c["class"] == "1"])
    assert per_class["1"]["dice"] == pytest.approx(d1) and per_class["1"]["n"] == 3
    assert res["mean"]["dice"] == pytest.approx((per_class["1"]["dice"] + per_class["2"]["dice"]) / 2)
    assert res["mean"]["n_cases"] == 3
    # written as valid JSON, read back identically
    on_disk = json.loads(out.read_text())
    assert on_disk["mean"]["nsd"] == pytest.approx(res["mean"]["nsd"])
    assert load_metrics(out)["cases"][0]["dice"] == res["cases"][0]["dice"]


def test_spacing_comes_from_the_reference_file(tmp_path):
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[3:8, 3:8, 3:8] = 1
    pred = np.roll(ref, 1, axis=2)  # one voxel off along z
    for spacing, expect_perfect in (((1.0, 1.0, 1.0), True), ((1.0, 1.0, 3.0), False)):
        d = tmp_path / f"s{spacing[2]}"
        (d / "p").mkdir(parents=True)
        (d / "r").mkdir()
        _save(d / "p" / "a.nii.gz", pred, spacing)
        _save(d / "r" / "a.nii.gz", ref, spacing)
        res = evaluate_folder(d / "p", d / "r", None, nsd_tolerance_mm=1.0, progress=False)
        assert (res["mean"]["nsd"] == 1.0) is expect_perfect


def test_geometry_mismatch_is_reported(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    ref = np.ones((6, 6, 6))
    _save(tmp_path / "r" / "a.nii.gz", ref)
    _save(tmp_path / "p" / "a.nii.gz", ref, spacing=(1.0, 1.0, 1.0))
    _save(tmp_path / "r" / "b.nii.gz", ref)
    _save(tmp_path / "p" / "b.nii.gz", ref)
    _save(tmp_path / "r" / "c.nii.gz", ref)
    _save(tmp_path / "p" / "c.nii.gz", np.full((6, 6, 6), 0.5), dtype=np.float32)  # probabilities, not labels
    res = evaluate_folder(tmp_path / "p", tmp_path / "r", None, progress=False)
    assert [e["case"] for e in res["errors"]] == ["a", "c"] and "affine" in res["errors"][0]["error"]
    assert "non-integer" in res["errors"][1]["error"] and "c.nii.gz" in res["errors"][1]["error"]
    assert res["mean"]["dice"] == 1.0 and res["mean"]["n_cases"] == 1


def test_dataset_json_classes_regions_and_empty_conventions(tmp_path):
    root = tmp_path / "Dataset001_X"
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr").mkdir()
    (tmp_path / "pred").mkdir()
    meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2, "whole": [1, 2], "c": 3},
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4] = 1
    ref[4:6] = 2
    pred = ref.copy()
    pred[4:6] = 1  # class 2 predicted as 1; class 3 absent from both
    _save(root / "labelsTr" / "x.nii.gz", ref)
    _save(tmp_path / "pred" / "x.nii.gz", pred)

    labels, names, _ = dataset_labels(root / "labelsTr")
    assert labels == [1, 2, (1, 2), 3] and names["1,2"] == "whole"
    res = evaluate_folder(tmp_path / "pred", root / "labelsTr", tmp_path / "m.json", progress=False)
    pc = res["mean"]["per_class"]
    assert pc["1,2"]["dice"] == 1.0 and pc["2"]["dice"] == 0.0 and pc["1"]["name"] == "a"
    assert math.isnan(pc["3"]["dice"]) and pc["3"]["n"] == 0  # both empty: NaN, left out
    assert res["mean"]["dice"] == pytest.approx((pc["1"]["dice"] + 0.0 + 1.0) / 3)
    assert json.loads((tmp_path / "m.json").read_text())["mean"]["per_class"]["3"]["dice"] is None
    res1 = evaluate_folder(tmp_path / "pred", root / "labelsTr", None, progress=False, empty_score=1.0)
    assert res1["mean"]["per_class"]["3"]["dice"] == 1.0
    with pytest.raises(ValueError, match="labelsTr"):
        evaluate_folder(tmp_path / "pred", root, None, progress=False)


def test_workers_give_the_same_result(folders):
    pred_dir, ref_dir, _ = folders
    a = evaluate_folder(pred_dir, ref_dir, None, progress=False, workers=1)
    b = evaluate_folder(pred_dir, ref_dir, None, progress=False, workers=2)
    assert a["cases"] == b["cases"] and a["errors"] == b["errors"]


def test_cli(folders, tmp_path, capsys):
    pred_dir, ref_dir, _ = folders
    out = tmp_path / "cli.json"
    rc = main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(out), "--labels", "1",
               "--nsd-tolerance-mm", "2", "--workers", "1", "--no-progress", "--strict"])
    assert rc == 3  # case_3 missing, case_4 mismatched
    data = json.loads(out.read_text())
    assert {c["class"] for c in data["cases"]} == {"1"} and data["settings"]["nsd_tolerance_mm"] == 2.0
    captured = capsys.readouterr()
    assert "case_3" in captured.err and "mean" in captured.out
    assert main(["evaluate", str(tmp_path / "nope"), str(ref_dir), "--out", str(out)]) == 2
