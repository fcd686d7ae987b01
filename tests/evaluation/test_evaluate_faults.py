"""volssl evaluate is fault-tolerant per pair (a huge declared volume, out of memory, an unreadable file
fail alone, named, and the exit code says so) and leaves ignore labels (255, negative values,
dataset.json's "ignore") out of the scores instead of scoring them as classes."""
import gzip
import json
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest

from volssl.cli import main
from volssl.evaluation import evaluate as ev
from volssl.evaluation.evaluate import declared_size, evaluate_folder


def _save(path, array, dtype=np.uint8):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4)), str(path))


def _pair():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:8, 3:9, 2:7] = 1
    pred = np.roll(ref, 1, axis=0)
    return pred, ref


def _huge_header(path, dims=(32767, 32767, 32767)):
    """A .nii.gz whose header declares ``dims`` voxels (35 TB of uint8) but holds 64 bytes."""
    small = path.with_name("small_tmp.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(small))
    raw = bytearray(small.read_bytes())
    small.unlink()
    raw[40:56] = struct.pack("<8h", 3, *dims, 1, 1, 1, 1)
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    pred, ref = _pair()
    for case in ("a", "b", "c"):
        _save(ref_dir / f"{case}.nii.gz", ref)
        _save(pred_dir / f"{case}.nii.gz", pred)
    return pred_dir, ref_dir


def test_a_huge_declared_prediction_fails_alone_without_being_read(folders, tmp_path, capsys):
    pred_dir, ref_dir = folders
    _huge_header(pred_dir / "b.nii.gz")
    assert declared_size(pred_dir / "b.nii.gz") == ((32767, 32767, 32767), 1)
    out = tmp_path / "m.json"
    rc = main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(out), "--workers", "1", "--no-progress"])
    assert rc == 3  # some pairs failed (without --strict)
    data = json.loads(out.read_text())
    assert data["mean"]["n_cases"] == 2 and {c["case"] for c in data["cases"]} == {"a", "c"}
    (err,) = data["errors"]
    assert err["case"] == "b" and str(pred_dir / "b.nii.gz") in err["error"]
    assert "32767x32767x32767" in err["error"] and "memory" in err["error"]
    captured = capsys.readouterr()
    assert "warning: case b not scored" in captured.err and "Traceback" not in captured.err
    assert data["mean"]["dice"] == pytest.approx(evaluate_folder(pred_dir, ref_dir, None, labels=[1],
                                                                 progress=False)["mean"]["dice"])


def _gzip_bomb(path, dims=(1024, 1024, 1024)):
    """~1 MB of gzip holding an honest NIfTI header of ``dims`` uint8 and its 1 GiB of zeros."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(dims)
    hdr.set_data_dtype(np.uint8)
    hdr.set_sform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = comp.compress(bytes(16 << 20)) + comp.flush()  # 16 MiB of zeros; gzip members concatenate
    with open(path, "wb") as fh:
        fh.write(gzip.compress(hdr.binaryblock + b"\0" * 4))
        for _ in range(int(np.prod(dims)) // (16 << 20)):
            fh.write(member)


def test_a_shape_mismatch_is_told_from_the_headers_without_reading(folders, monkeypatch):
    """Acceptance corpus: a 1 MB gzip prediction declaring 1024^3 (uint8: 1 GiB, which this machine's memory
    allows) against a 12^3 reference was decompressed whole (peak 1.1 GB) before the shape mismatch was
    noticed. The headers tell it: nothing of either file is read."""
    pred_dir, ref_dir = folders
    _gzip_bomb(pred_dir / "b.nii.gz")
    assert (pred_dir / "b.nii.gz").stat().st_size < 1_500_000
    read = ev._read_labels

    def read_but_not_b(path):
        assert path.name != "b.nii.gz", f"{path} was read"
        return read(path)

    monkeypatch.setattr(ev, "_read_labels", read_but_not_b)
    monkeypatch.setattr(ev, "available_memory_bytes", lambda total=False: 64 << 30)  # the bomb passes the memory check
    res = evaluate_folder(pred_dir, ref_dir, None, progress=False)
    (err,) = res["errors"]
    assert err["case"] == "b" and res["mean"]["n_cases"] == 2
    assert "prediction shape (1024, 1024, 1024) differs from reference" in err["error"]
    assert "(12, 12, 12)" in err["error"] and "not read" in err["error"]
    # a trailing axis of size 1 is no mismatch (the readers drop it); files of other formats are not compared
    nib.save(nib.Nifti1Image(np.asarray(_pair()[0])[..., None], np.eye(4)), str(pred_dir / "c.nii.gz"))
    assert ev.declared_shape_mismatch(pred_dir / "c.nii.gz", ref_dir / "c.nii.gz") is None
    assert ev.declared_shape_mismatch(pred_dir / "b.nii.gz", ref_dir / "b.mha") is None


@pytest.mark.timeout(120)  # a regression blocks on the pipe: fail instead of hanging
def test_a_dataset_json_that_is_a_named_pipe_is_refused_not_opened(folders, tmp_path):
    import os

    pred_dir, ref_dir = folders
    os.mkfifo(ref_dir / "dataset.json")
    with pytest.raises(ValueError, match="dataset.json is not a regular file"):
        evaluate_folder(pred_dir, ref_dir, None, progress=False)
    # with the classes given, dataset.json is not needed: scored, with a note
    res = evaluate_folder(pred_dir, ref_dir, None, labels=[1], progress=False)
    assert res["mean"]["n_cases"] == 3 and any("dataset.json" in w for w in res["warnings"])


def test_memory_error_while_reading_or_scoring_fails_that_pair_only(folders, monkeypatch):
    pred_dir, ref_dir = folders
    read = ev._read_labels

    def read_or_fail(path):
        if path.name == "a.nii.gz" and path.parent == pred_dir:
            raise MemoryError()
        return read(path)

    monkeypatch.setattr(ev, "_read_labels", read_or_fail)
    res = evaluate_folder(pred_dir, ref_dir, None, progress=False)
    assert [e["case"] for e in res["errors"]] == ["a"] and res["mean"]["n_cases"] == 2
    assert "out of memory" in res["errors"][0]["error"] and str(pred_dir / "a.nii.gz") in res["errors"][0]["error"]

    def crash(*a, **k):
        raise MemoryError("Unable to allocate 9.1 TiB")

    monkeypatch.setattr(ev, "_read_labels", read)
    monkeypatch.setattr(ev, "case_metrics", crash)
    res = evaluate_folder(pred_dir, ref_dir, None, progress=False)
    assert len(res["errors"]) == 3 and "Unable to allocate" in res["errors"][0]["error"]


def test_unreadable_and_huge_files_fail_alone_with_workers(folders, tmp_path):
    pred_dir, ref_dir = folders
    _huge_header(pred_dir / "a.nii.gz")
    (pred_dir / "c.nii.gz").write_bytes(b"not a volume" * 10)
    res = evaluate_folder(pred_dir, ref_dir, tmp_path / "m.json", workers=2, progress=False)
    assert [e["case"] for e in res["errors"]] == ["a", "c"] and res["mean"]["n_cases"] == 1
    assert "c.nii.gz" in res["errors"][1]["error"]


def die_on_b(case, *args):
    """evaluate_case, except that the process scoring case b dies (as one killed for its memory)."""
    import os

    if case == "b":
        os._exit(9)
    return ev.evaluate_case(case, *args)


def test_a_dying_worker_loses_only_its_case(folders, monkeypatch):
    pred_dir, ref_dir = folders
    monkeypatch.setattr(ev, "evaluate_case", die_on_b)  # sent to the workers by name: this module's function
    res = evaluate_folder(pred_dir, ref_dir, None, workers=2, progress=False)
    assert [e["case"] for e in res["errors"]] == ["b"] and "died" in res["errors"][0]["error"]
    assert res["mean"]["n_cases"] == 2


def test_max_voxels_refuses_larger_files_from_their_header(folders):
    pred_dir, ref_dir = folders
    res = evaluate_folder(pred_dir, ref_dir, None, progress=False, max_voxels=1000)
    assert len(res["errors"]) == 3 and res["mean"]["n_cases"] == 0
    assert "12x12x12 = 1.73e+03 voxels" in res["errors"][0]["error"] and "--max-voxels" in res["errors"][0]["error"]
    assert evaluate_folder(pred_dir, ref_dir, None, progress=False, max_voxels=1728)["mean"]["n_cases"] == 3


def test_output_is_checked_before_scoring(folders, tmp_path, monkeypatch):
    pred_dir, ref_dir = folders
    monkeypatch.setattr(ev, "evaluate_case", lambda *a: pytest.fail("scored before the output was checked"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        evaluate_folder(pred_dir, ref_dir, tmp_path / "file" / "m.json", progress=False)
    with pytest.raises(ValueError, match="existing folder"):
        evaluate_folder(pred_dir, ref_dir, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------- ignore labels


def _ignore_case(tmp_path, ignore_value, dtype=np.uint8):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = np.zeros((10, 10, 10), dtype)
    ref[2:6, 2:6, 2:6] = 1
    ref[7:10] = ignore_value  # an unlabelled slab
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:6] = 1
    pred[7:10, :5] = 1  # predictions inside the unlabelled slab: not errors
    _save(ref_dir / "x.nii.gz", ref, dtype)
    _save(pred_dir / "x.nii.gz", pred, dtype)
    return pred_dir, ref_dir


@pytest.mark.parametrize("value,dtype", [(255, np.uint8), (-1, np.int16)])
def test_undeclared_255_or_negative_is_ignored_with_a_warning(tmp_path, capsys, value, dtype):
    pred_dir, ref_dir = _ignore_case(tmp_path, value, dtype)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert list(data["settings"]["classes"]) == ["1"]  # never a class of its own
    assert data["mean"]["per_class"]["1"]["dice"] == 1.0  # the slab is left out
    assert data["settings"]["ignore_labels"] == [value] and data["settings"]["ignore_labels_undeclared"] == [value]
    assert data["cases"][0]["ignored_voxels"] == {str(value): 300}
    err = capsys.readouterr().err
    assert f"warning: reference value {value} is not a declared class" in err and "--ignore-label" in err


def test_declared_ignore_labels_are_silent_and_classes_win(tmp_path, capsys):
    pred_dir, ref_dir = _ignore_case(tmp_path, 255)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(out), "--ignore-label", "255",
                 "--no-progress", "--workers", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads(out.read_text())["settings"]["ignore_labels_undeclared"] == []
    # 255 declared as a class is scored, not ignored
    res = evaluate_folder(pred_dir, ref_dir, None, labels=[1, 255], progress=False)
    assert res["mean"]["per_class"]["1"]["dice"] < 1.0 and res["mean"]["per_class"]["255"]["dice"] == 0.0
    with pytest.raises(ValueError, match="both a class"):
        evaluate_folder(pred_dir, ref_dir, None, labels=[1, 255], ignore_labels=[255], progress=False)


def test_nnunet_dataset_json_ignore_label(tmp_path):
    root = tmp_path / "Dataset001_X"
    pred_dir, ref_dir = _ignore_case(tmp_path, 2)
    root.mkdir()
    ref_dir.rename(root / "labelsTr")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "ignore": 2},
                                                   "channel_names": {"0": "T1"}, "file_ending": ".nii.gz"}))
    assert ev.dataset_labels(root / "labelsTr")[0] == [1] and ev.dataset_ignore_label(root / "labelsTr") == 2
    res = evaluate_folder(pred_dir, root / "labelsTr", None, progress=False)
    assert list(res["settings"]["classes"]) == ["1"] and res["mean"]["dice"] == 1.0
    assert res["settings"]["ignore_labels"] == [2] and res["warnings"] == []
