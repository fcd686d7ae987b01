"""`volssl agglomerate` and `volssl evaluate-instances` on axon phantoms (.npy, .nii.gz, .zarr)."""
import json

import nibabel as nib
import numpy as np
import pytest

from volssl.cli import main
from volssl.cli.instances import ReversedAxes, open_affinities
from volssl.data.phantoms import axons_case
from volssl.data.readers import read_volume
from volssl.evaluation.instance_metrics import skeletonize_labels, voi
from volssl.finetuning.affinities import affinity_targets


@pytest.fixture(scope="module")
def phantom():
    gt = axons_case(np.random.default_rng(7), (32, 32, 32)).label.astype(np.int64)
    affs, _ = affinity_targets(gt)  # all 12 channels, as the network predicts them
    return gt, affs


def _same_partition(a, b) -> bool:
    return voi(a, b, ignore_gt=())["voi"] < 1e-9 and voi(b, a, ignore_gt=())["voi"] < 1e-9


def _write_gt(folder, name, gt, spacing=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(gt.astype(np.uint16), np.diag([spacing] * 3 + [1.0])), str(folder / f"{name}.nii.gz"))


def test_agglomerate_npy_then_evaluate(tmp_path, phantom, capsys):
    gt, affs = phantom
    (tmp_path / "affs").mkdir()
    np.save(tmp_path / "affs" / "axons_000.npy", affs)
    _write_gt(tmp_path / "gt", "axons_000", gt, spacing=0.5)
    out = tmp_path / "seg"
    assert main(["agglomerate", str(tmp_path / "affs"), str(out), "--thresholds", "0.5", "0.7", "--no-progress"]) == 0
    summary = json.loads((out / "agglomerate.json").read_text())
    assert summary["errors"] == [] and set(summary["cases"][0]["segmentations"]) == {"0.5", "0.7"}
    seg = np.load(out / "t0.5" / "axons_000.npy")
    assert seg.dtype == np.uint64 and seg.shape == gt.shape
    assert summary["cases"][0]["segmentations"]["0.5"]["n_segments"] == np.unique(seg).size - 1
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate-instances", str(out / "t0.5"), str(tmp_path / "gt"), "--out", str(metrics),
                 "--no-progress"]) == 0
    result = json.loads(metrics.read_text())
    assert result["n_cases"] == 1 and result["missing"] == [] and result["errors"] == []
    case = result["cases"][0]
    assert case["case"] == "axons_000"
    # perfect affinities: every skeleton node in the right segment, no merge
    assert case["xpress_rand_merge"] == 1.0 and case["xpress_rand_split"] > 0.95
    assert case["erl_fraction"] > 0.95 and case["n_merged_skeletons"] == 0
    # lengths in mm from the reference's 0.5 mm voxels
    ref = skeletonize_labels(gt)
    voxels = sum(np.linalg.norm(n[e[:, 0]] - n[e[:, 1]], axis=1).sum() for n, e in ref.values())
    assert case["skeleton_length_total"] == pytest.approx(0.5 * voxels)
    assert result["mean"]["xpress"] == pytest.approx(case["xpress"])
    assert "xpress" in capsys.readouterr().out


def test_agglomerate_zarr_blockwise_and_nifti_agree_with_npy(tmp_path, phantom):
    import zarr

    gt, affs = phantom
    np.save(tmp_path / "a.npy", affs)
    stored = zarr.create_array(str(tmp_path / "a.zarr"), shape=affs.transpose(0, 3, 2, 1).shape, chunks=(3, 16, 16, 16),
                               dtype="float32")
    stored[...] = affs.transpose(0, 3, 2, 1)  # (C, Z, Y, X) as stored
    nib.save(nib.Nifti1Image(np.moveaxis(affs, 0, -1), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "a.nii.gz"))
    view, _ = open_affinities(tmp_path / "a.zarr")
    np.testing.assert_array_equal(view[0:3, 2:5, 0:4, 7:9], affs[0:3, 2:5, 0:4, 7:9])
    for name in ("a.npy", "a.zarr", "a.nii.gz"):
        args = ["agglomerate", str(tmp_path / name), str(tmp_path / name.replace(".", "_")), "--thresholds", "0.6",
                "--no-progress"]
        if name == "a.zarr":
            args += ["--block", "16", "--overlap", "8"]
        assert main(args) == 0
    ref = np.load(tmp_path / "a_npy" / "t0.6" / "a.npy")
    from_zarr, _ = read_volume(tmp_path / "a_zarr" / "t0.6" / "a.zarr", spacing=(1.0, 1.0, 1.0))
    from_nifti = nib.load(str(tmp_path / "a_nii_gz" / "t0.6" / "a.nii.gz"))
    assert from_zarr.shape == ref.shape and _same_partition(from_zarr, ref)
    assert _same_partition(np.asarray(from_nifti.dataobj), ref)
    np.testing.assert_allclose(from_nifti.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_reversed_axes_view_writes_stored_order():
    store = np.zeros((4, 3, 2), np.int32)  # stored (Z, Y, X)
    view = ReversedAxes(store)
    assert view.shape == (2, 3, 4)
    data = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    view[:, :, :] = data
    np.testing.assert_array_equal(store, data.transpose(2, 1, 0))
    np.testing.assert_array_equal(view[0:1, 1:3, :], data[0:1, 1:3, :])


def test_agglomerate_reports_bad_files(tmp_path, capsys):
    folder = tmp_path / "affs"
    folder.mkdir()
    np.save(folder / "two_channels.npy", np.ones((2, 8, 8, 8), np.float32))
    np.save(folder / "good.npy", np.ones((3, 8, 8, 8), np.float32))
    assert main(["agglomerate", str(folder), str(tmp_path / "out"), "--thresholds", "0.5", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "two_channels.npy" in err and "C >= 3" in err
    summary = json.loads((tmp_path / "out" / "agglomerate.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["good"]
    assert summary["errors"][0]["case"] == "two_channels"
    assert main(["agglomerate", str(tmp_path / "nothing.npy"), str(tmp_path / "o2")]) == 2
    assert "nothing.npy" in capsys.readouterr().err


def test_evaluate_instances_pairs_cases_and_names_bad_files(tmp_path, phantom):
    gt, _ = phantom
    _write_gt(tmp_path / "gt", "a", gt)
    _write_gt(tmp_path / "gt", "b", gt)
    _write_gt(tmp_path / "gt", "c", gt)
    segs = tmp_path / "seg"
    segs.mkdir()
    np.save(segs / "a.npy", gt * 2)  # perfect
    np.save(segs / "b.npy", gt[:-1])  # wrong shape
    np.save(segs / "z.npy", gt)  # no reference
    # skeletons from a folder: case a as an npz of two straight skeletons
    skel_dir = tmp_path / "skel"
    skel_dir.mkdir()
    ref = skeletonize_labels(gt)
    nodes = np.concatenate([n for n, _ in ref.values()])
    ids = np.concatenate([np.full(len(n), k) for k, (n, _) in ref.items()])
    offsets = np.cumsum([0] + [len(n) for n, _ in ref.values()])[:-1]
    edges = np.concatenate([e + o for (_, e), o in zip(ref.values(), offsets)])
    np.savez(skel_dir / "a.npz", nodes=nodes, edges=edges, ids=ids)
    np.savez(skel_dir / "b.npz", nodes=nodes, edges=edges, ids=ids)
    out = tmp_path / "m.json"
    rc = main(["evaluate-instances", str(segs), str(tmp_path / "gt"), "--out", str(out), "--skeletons",
               str(skel_dir), "--strict", "--no-progress"])
    assert rc == 3
    result = json.loads(out.read_text())
    assert [c["case"] for c in result["cases"]] == ["a"]
    a = result["cases"][0]
    assert a["voi"] == 0.0 and a["erl_fraction"] == pytest.approx(1.0) and a["n_skeletons"] > 0
    assert result["missing"] == ["c"] and result["unmatched_predictions"] == ["z"]
    assert result["errors"][0]["case"] == "b" and "b.npy" in result["errors"][0]["error"]
    # without skeletons: no ERL, no XPRESS score
    assert main(["evaluate-instances", str(segs / "a.npy"), str(tmp_path / "gt" / "a.nii.gz"), "--out", str(out),
                 "--skeletons", "none", "--no-progress"]) == 0
    assert "erl" not in json.loads(out.read_text())["cases"][0]
