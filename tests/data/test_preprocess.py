"""``volssl preprocess``: the quality report, preprocessing, resuming, sharding, every input kind."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volssl.cli import main
from volssl.data.dataset import PreprocessedDataset
from volssl.data.geometry import GeometryRecord, to_original
from volssl.data.manifest import read_manifest, shard_file
from volssl.data.preprocess import (
    PLANS,
    PreprocessPlan,
    class_locations,
    get_plan,
    label_dtype,
    parse_shard,
    preprocess,
    shard_of,
)
from volssl.data.quality import QualityRules
from volssl.data.storage import load_array

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
NO_RULES = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None)


def _nifti(path: Path, data: np.ndarray, affine=None, zooms=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*(zooms or (1.0, 1.0, 1.0)), 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _head(rng, shape) -> np.ndarray:
    """A noisy blob on a zero background (so the nonzero crop has work to do)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    return (inside * (100 + 20 * rng.normal(size=shape))).astype(np.float32)


def _lps_affine(zooms) -> np.ndarray:
    aff = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    aff[:3, 3] = [30.0, 40.0, -20.0]
    return aff


# ---------------------------------------------------------------------------------------------- "done when"


def _mixed_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """A folder with good volumes (an nnU-Net dataset + a BIDS file) and one file of each bad kind.

    Returns the ids expected to be stored and {id: rule} of the ones expected to be excluded.
    """
    rng = np.random.default_rng(0)
    ds = root / "Dataset001_Mixed"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "lesion": 1},
        "file_ending": ".nii.gz", "numTraining": 6}))
    shape, zooms = (64, 60, 52), (1.25, 1.25, 1.25)  # FOV 80 x 75 x 65 mm, files > 200 kB (noise)

    def case(name, split="Tr", label=True, label_shape=shape, label_shift=0.0, label_value=1, singleton=False,
             t2_zooms=zooms):
        t1 = _head(rng, shape)
        for c, (img, z) in enumerate(((t1, zooms), (t1 * 0.5 + 10 * rng.normal(size=shape), t2_zooms))):
            data = img[..., None] if singleton else img
            _nifti(ds / f"images{split}" / f"{name}_{c:04d}.nii.gz", data.astype(np.float32), _lps_affine(z))
        if label:
            lab = np.zeros(label_shape, np.uint8)
            lab[20:28, 18:26, 15:25] = label_value
            aff = _lps_affine(zooms)
            aff[0, 3] += label_shift
            _nifti(ds / f"labels{split}" / f"{name}.nii.gz", lab, aff)

    case("good_a")
    case("good_b")
    case("good_4d", singleton=True)
    case("good_test", split="Ts", label=False)
    case("bad_label_shape", label_shape=(64, 60, 53))
    case("bad_label_affine", label_shift=3.0)
    case("bad_label_value", label_value=2)
    case("bad_channels", t2_zooms=(1.25, 1.25, 1.3))
    _nifti(root / "sub-07" / "anat" / "sub-07_T1w.nii.gz", _head(rng, (56, 56, 50)) + 1, zooms=(1.2, 1.2, 1.2))

    bad = root / "bad"
    _nifti(bad / "fov_small.nii", rng.normal(size=(60, 60, 30)).astype(np.float32))
    _nifti(bad / "spacing_large.nii", rng.normal(size=(64, 64, 16)).astype(np.float32), zooms=(1, 1, 7))
    _nifti(bad / "tiny.nii.gz", np.zeros((60, 60, 60), np.uint8) + np.arange(60, dtype=np.uint8))
    big = _nifti(bad / "whole.nii.gz", rng.normal(size=(80, 80, 80)).astype(np.float32)).read_bytes()
    (bad / "truncated.nii.gz").write_bytes(big[: len(big) * 6 // 10])
    (bad / "whole.nii.gz").unlink()
    _nifti(bad / "four_d.nii", rng.normal(size=(50, 50, 50, 2)).astype(np.float32))
    _nifti(bad / "constant.nii", np.full((60, 60, 60), 5.0, np.float32))
    nan = rng.normal(size=(60, 60, 60)).astype(np.float32)
    nan[10, 10, 10] = np.nan
    _nifti(bad / "nan.nii", nan)

    p = "Dataset001_Mixed_"
    good = {p + "good_a", p + "good_b", p + "good_4d", p + "good_test", "sub-07_anat_sub-07_T1w"}
    excluded = {
        p + "bad_label_shape": "label_shape", p + "bad_label_affine": "label_affine",
        p + "bad_label_value": "label_values", p + "bad_channels": "channel_geometry",
        "bad_fov_small": "fov", "bad_spacing_large": "spacing", "bad_tiny": "file_size",
        "bad_truncated": "unreadable", "bad_four_d": "not_3d", "bad_constant": "constant", "bad_nan": "nonfinite",
    }
    for f in (ds / "imagesTr").glob("good_*"):
        assert f.stat().st_size > 200_000  # the good ones pass the default size rule on their own merit
    return good, excluded


def test_done_when_mixed_folder(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    good, excluded = _mixed_folder(src)
    rc = main(["preprocess", str(src), str(out), "--workers", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0

    ds = PreprocessedDataset(out)
    assert {c.id for c in ds.cases} == good
    for rec in ds.cases:
        image = load_array(ds.image_path(rec.id))
        assert image.dtype == np.float32 and list(image.shape) == rec.shape
        assert np.allclose(rec.spacing, 1.0, atol=0.02)
        for ch in image:
            assert abs(ch.mean()) < 1e-3 and abs(ch.std() - 1) < 1e-3  # z-scored per channel
        props = ds.props(rec.id)
        assert props["geometry"]["shape"] == rec.shape[1:]
        if rec.id.startswith("Dataset001"):
            assert rec.channels == ["T1", "T2"] and image.shape[0] == 2  # channels kept together
            assert len(rec.source) == 2 and all("Dataset001_Mixed/images" in s for s in rec.source)
        else:
            assert rec.subject == "sub-07" and rec.channels == ["T1w"] and image.shape[0] == 1
    a = ds.cases[[c.id for c in ds.cases].index("Dataset001_Mixed_good_a")]
    assert a.has_label and a.split == "train" and a.label_source.endswith("labelsTr/good_a.nii.gz")
    label = load_array(ds.label_path(a.id))
    assert label.dtype == np.uint8 and label.shape == tuple(a.shape[1:]) and set(np.unique(label)) == {0, 1}
    locs = np.array(ds.props(a.id)["class_locations"]["1"])
    assert len(locs) > 0 and np.all(label[tuple(locs.T)] == 1)

    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["n_excluded"] == len(excluded) and report["n_ok"] == len(good)
    got = {e["id"]: [p["rule"] for p in e["problems"]] for e in report["excluded"]}
    assert got == {k: [v] for k, v in excluded.items()}
    for e in report["excluded"]:
        assert Path(e["problems"][0]["path"]).exists() and e["reason"]
        assert f"{e['id']}: {e['problems'][0]['path']}: {e['problems'][0]['reason']}" in printed
    assert f"{len(good)} ok, {len(excluded)} excluded" in printed

    # --strict: same data, nothing recomputed, exit code 3 because something was excluded
    rc = main(["preprocess", str(src), str(out), "--workers", "1", "--no-progress", "--strict", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 3 and summary["n_processed"] == 0 and summary["n_skipped"] == len(good) + len(excluded)


# ---------------------------------------------------------------------------------------------- resume / shards


def _small_folder(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(1)
    for i in range(n):
        _nifti(root / f"vol{i}.nii.gz", _head(rng, (20, 18, 16)), zooms=(2.0, 2.0, 2.5))
    return [f"vol{i}" for i in range(n)]


def _state(out: Path, case_id: str):
    st = (out / "images" / f"{case_id}.b2nd").stat()
    return st.st_ino, st.st_mtime_ns


def test_resume_redoes_only_unfinished_cases(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    ids = _small_folder(src, 4)
    plan = PreprocessPlan(rules=NO_RULES)
    s1 = preprocess(src, out, plan, progress=False)
    assert s1.n_processed == 4 and s1.n_ok == 4
    before = {i: _state(out, i) for i in ids}

    # a run killed after writing vol1's arrays but before its manifest row (plus a torn line) ...
    mf = shard_file(out, 0, 1)
    rows = [r for r in mf.read_text().splitlines() if '"id":"vol1"' not in r]
    mf.write_text("\n".join(rows) + '\n{"id":"vol1","sta')
    stray = out / "images" / ".vol1.b2nd.abcd1234.tmp.b2nd"
    stray.write_bytes(b"partial")
    other = out / "images" / ".unrelated.b2nd.abcd1234.tmp.b2nd"
    other.write_bytes(b"not ours")
    # ... and a source that changed since
    st = (src / "vol2.nii.gz").stat()
    os.utime(src / "vol2.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    s2 = preprocess(src, out, plan, progress=False)
    assert (s2.n_processed, s2.n_skipped, s2.n_ok) == (2, 2, 4)
    after = {i: _state(out, i) for i in ids}
    assert after["vol0"] == before["vol0"] and after["vol3"] == before["vol3"]  # not recomputed
    assert after["vol1"] != before["vol1"] and after["vol2"] != before["vol2"]  # redone
    assert not stray.exists() and other.exists()  # only this run's own leftovers are removed
    assert set(read_manifest(out)) == set(ids)

    with pytest.raises(ValueError, match="different plan"):
        preprocess(src, out, PreprocessPlan(rules=NO_RULES, normalization="none"), progress=False)


def test_shards_cover_every_case_once_and_manifest_is_readable_midway(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    ids = _small_folder(src, 6)
    plan = PreprocessPlan(rules=NO_RULES, target_spacing=None)
    s0 = preprocess(src, out, plan, shard=(0, 2), progress=False)
    mine = {i for i in ids if shard_of(i, 2) == 0}
    assert 0 < len(mine) < 6, "test data should land in both shards"
    # mid-way: shard 1 has not run; readers see shard 0's cases, the merged report says incomplete
    assert set(PreprocessedDataset(out).records) == mine and s0.n_cases == len(mine)
    assert json.loads((out / "report.json").read_text())["complete"] is False
    preprocess(src, out, plan, shard=(1, 2), progress=False)
    seen = []
    for k in (0, 1):
        seen += [json.loads(line)["id"] for line in shard_file(out, k, 2).read_text().splitlines()]
    assert sorted(seen) == sorted(ids)  # every case exactly once over the two shard files
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["n_ok"] == 6 and report["shards_reported"] == [0, 1]
    assert parse_shard("1/2") == (1, 2)
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("2/2")


def test_workers_give_the_same_result(tmp_path):
    src = tmp_path / "src"
    ids = _small_folder(src, 3)
    plan = PreprocessPlan(rules=NO_RULES)
    a = preprocess(src, tmp_path / "a", plan, workers=1, progress=False)
    b = preprocess(src, tmp_path / "b", plan, workers=2, progress=False)
    assert a.n_ok == b.n_ok == 3
    for i in ids:
        assert np.array_equal(load_array(tmp_path / "a" / "images" / f"{i}.b2nd"),
                              load_array(tmp_path / "b" / "images" / f"{i}.b2nd"))


# ---------------------------------------------------------------------------------------------- inputs


def test_tiff_and_zarr_inputs_with_spacing(tmp_path, capsys):
    import tifffile
    import zarr

    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    zyx = (rng.random((12, 20, 24)) * 1000).astype(np.uint16)
    tifffile.imwrite(src / "stack.tif", zyx, photometric="minisblack")
    z = zarr.open_array(src / "vol.zarr", mode="w", shape=zyx.shape, dtype="u2")
    z[:] = zyx
    g = zarr.open_group(src / "ome.zarr", mode="w")
    g.create_array("0", shape=zyx.shape, dtype="u2")[:] = zyx
    g.attrs["multiscales"] = [{"axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
                               "datasets": [{"path": "0", "coordinateTransformations": [
                                   {"type": "scale", "scale": [3.0, 1.0, 1.0]}]}]}]
    out = tmp_path / "out"
    # without --spacing: the files without spacing are reported, the OME-Zarr uses its own
    assert main(["preprocess", str(src), str(out), "--plan", "xnt", "--workers", "1", "--no-progress"]) == 0
    recs = read_manifest(out)
    assert recs["ome"].ok and np.allclose(recs["ome"].spacing, [1e-3, 1e-3, 3e-3])
    assert [p["rule"] for p in recs["stack"].problems] == ["no_spacing"]
    assert "--spacing" in capsys.readouterr().out
    out2 = tmp_path / "out2"
    assert main(["preprocess", str(src), str(out2), "--plan", "xnt", "--spacing", "0.5,0.5,2",
                 "--workers", "1", "--no-progress"]) == 0
    recs = read_manifest(out2)
    for name in ("stack", "vol"):
        assert recs[name].ok and recs[name].spacing == [0.5, 0.5, 2.0]
        image = load_array(out2 / "images" / f"{name}.b2nd")
        assert image.shape == (1, 24, 20, 12)  # (x, y, z) = the (z, y, x) stack transposed
        raw = zyx.transpose(2, 1, 0).astype(np.float64)  # xnt: z-score per volume, no resampling, no crop
        np.testing.assert_allclose(image[0], (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-4)
        geo = json.loads((out2 / "props" / f"{name}.json").read_text())["geometry"]
        assert geo["source_axes"] == "zyx"
    assert np.allclose(recs["ome"].spacing, [1e-3, 1e-3, 3e-3])  # the file's own spacing wins
    # with resampling to 1 mm on TIFF/Zarr, --target-spacing works in the same units
    out3 = tmp_path / "out3"
    assert main(["preprocess", str(src / "stack.tif"), str(out3), "--plan", "xnt", "--spacing", "0.5,0.5,2",
                 "--target-spacing", "1", "--workers", "1", "--no-progress"]) == 0
    assert read_manifest(out3)["stack"].shape == [1, 12, 10, 24]


# ---------------------------------------------------------------------------------------------- intensities


def _one(tmp_path, data, plan, zooms=(1.0, 1.0, 1.0)):
    src = tmp_path / "src"
    _nifti(src / "v.nii", data, zooms=zooms)
    out = tmp_path / f"out_{plan.name}_{plan.normalization}"
    s = preprocess(src, out, plan, progress=False)
    assert s.n_ok == 1, s.excluded
    return load_array(out / "images" / "v.b2nd")[0], json.loads((out / "props" / "v.json").read_text())


def test_normalisation_and_clipping(tmp_path):
    rng = np.random.default_rng(3)
    data = _head(rng, (24, 24, 24))
    data[12, 12, 12] = 1e5  # an outlier
    plan = PreprocessPlan(name="amaes", clip_percentiles=(0.0, 99.0), target_spacing=None, rules=NO_RULES)
    img, props = _one(tmp_path, data, plan)
    st = props["normalization"][0]
    assert st["clip"][1] < 200 and st["clip"][0] == pytest.approx(0.0)
    assert img.max() == pytest.approx((st["clip"][1] - st["mean"]) / st["std"], rel=1e-4)
    assert abs(img.mean()) < 1e-4 and img.std() == pytest.approx(1.0, abs=1e-4)

    plan = PreprocessPlan(name="nz", normalization="zscore_nonzero", target_spacing=None, crop_nonzero=False,
                          rules=NO_RULES)
    img, _ = _one(tmp_path, data.clip(max=300), plan)
    inside = data != 0
    assert np.all(img[~inside] == 0)
    assert abs(img[inside].mean()) < 1e-4 and img[inside].std() == pytest.approx(1.0, abs=1e-4)

    plan = PreprocessPlan(name="crop", target_spacing=None, rules=NO_RULES)
    img, props = _one(tmp_path, data, plan)
    box = props["geometry"]["crop_bbox"]
    nz = np.argwhere(data != 0)
    assert box == [[int(lo), int(hi) + 1] for lo, hi in zip(nz.min(0), nz.max(0))]
    assert img.shape == tuple(hi - lo for lo, hi in box)


def test_plans_labels_and_class_locations():
    assert set(PLANS) >= {"s3d", "amaes"}
    assert get_plan("amaes").clip_percentiles == (0.0, 99.0) and get_plan("s3d").clip_percentiles is None
    assert get_plan("s3d").rules == QualityRules()  # the S3D filter by default
    assert PreprocessPlan.from_dict(json.loads(json.dumps(get_plan("xnt").to_dict()))) == get_plan("xnt")
    with pytest.raises(KeyError):
        get_plan("nope")
    with pytest.raises(ValueError, match="normalization"):
        PreprocessPlan(normalization="minmax")
    assert label_dtype(np.array([0, 3])) == np.uint8 and label_dtype(np.array([0, 300])) == np.uint16
    assert label_dtype(np.array([-1, 3])) == np.int8
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[:5] = 1
    lab[9, 9, 9] = 2
    locs = class_locations(lab, 100, 1000, seed=0, case_id="a")
    assert set(locs) == {"1", "2"} and len(locs["1"]) == 100 and locs["2"] == [[9, 9, 9]]
    assert all(lab[tuple(p)] == 1 for p in locs["1"])
    assert locs == class_locations(lab, 100, 1000, seed=0, case_id="a")  # reproducible
    assert locs != class_locations(lab, 100, 1000, seed=1, case_id="a")
    many = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)
    assert sum(len(v) for v in class_locations(many, 100, 300, 0, "m").values()) <= 999  # total cap


# ---------------------------------------------------------------------------------------------- real files


def test_round_trip_through_the_pipeline_on_nibabel_files(tmp_path):
    """preprocess -> stored arrays + props -> to_original gives the source shape and affine exactly.

    example4d.nii.gz (two volumes) is excluded as not 3D, by design; resampled_anat_moved.nii holds
    NaNs and 8 mm slices and is excluded for both. A thresholded anatomy label comes back voxel-exact.
    """
    src = tmp_path / "src"
    src.mkdir()
    names = ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii", "example_nifti2.nii.gz",
             "example4d.nii.gz", "resampled_anat_moved.nii"]
    for n in names:
        shutil.copy(NIB_DATA / n, src / n)
    anat = nib.load(NIB_DATA / "anatomical.nii")
    ds = src / "Dataset009_Anat"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"bg": 0, "bright": 1},
                                                 "file_ending": ".nii.gz"}))
    data = np.asanyarray(anat.dataobj)
    nib.save(anat, ds / "imagesTr" / "anat_0000.nii.gz")
    label = (data > np.percentile(data, 75)).astype(np.uint8)
    (ds / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(label, anat.affine, anat.header), ds / "labelsTr" / "anat.nii.gz")

    out = tmp_path / "out"
    assert main(["preprocess", str(src), str(out), "--min-fov", "off", "--min-file-kb", "off",
                 "--workers", "1", "--no-progress"]) == 0
    recs = read_manifest(out)
    assert {k: [p["rule"] for p in r.problems] for k, r in recs.items() if not r.ok} == {
        "example4d": ["not_3d"], "example_nifti2": ["not_3d"], "resampled_anat_moved": ["spacing", "nonfinite"]}
    ok = {k: r for k, r in recs.items() if r.ok}
    assert set(ok) == {"anatomical", "standard", "reoriented_anat_moved", "Dataset009_Anat_anat"}
    for case_id, rec in ok.items():
        src_img = nib.load(rec.source[0])
        geo = GeometryRecord.from_dict(json.loads((out / "props" / f"{case_id}.json").read_text())["geometry"])
        image = load_array(out / "images" / f"{case_id}.b2nd")
        back = to_original(image[0], geo, order=1)
        assert back.shape == src_img.shape[:3], case_id
        assert np.array_equal(np.array(geo.original_affine), src_img.affine), case_id
    geo = json.loads((out / "props" / "Dataset009_Anat_anat.json").read_text())["geometry"]
    stored = load_array(out / "labels" / "Dataset009_Anat_anat.b2nd")
    assert np.array_equal(to_original(stored, geo, is_label=True), label)


# ---------------------------------------------------------------------------------------------- phantoms


def test_end_to_end_on_phantoms(tmp_path):
    phantoms = pytest.importorskip("volssl.data.phantoms")
    src = tmp_path / "src"
    phantoms.generate_phantoms(src / "brain", "brain", n=2, n_test=0, seed=0, shape=(64, 64, 64), progress=False)
    phantoms.generate_phantoms(src / "axons", "axons", n=1, n_test=0, seed=0, shape=(64, 64, 64), progress=False)
    _nifti(src / "bad" / "constant.nii", np.full((60, 60, 60), 5.0, np.float32))
    s = preprocess(src, tmp_path / "out", "s3d", progress=False)
    assert s.n_ok == 3 and [e["id"] for e in s.excluded] == ["bad_constant"]
    ds = PreprocessedDataset(tmp_path / "out")
    for rec in ds.cases:
        assert rec.has_label and ds.label(rec.id).shape == tuple(rec.shape[1:])
        assert list(ds.props(rec.id)["class_locations"]) == ["1"]  # axons: instance ids pooled into class 1
    brain = [r for r in ds.cases if r.id.startswith("brain")][0]
    assert brain.channels == ["T1", "T2", "FLAIR"] and brain.shape[0] == 3


# ---------------------------------------------------------------------------------------------- worker crash


def _work_or_die(case, checksum):
    """Stands in for process_case in a worker; the case "die" kills its process (like the OOM killer)."""
    from volssl.data.manifest import CaseRecord

    if case.id == "die":
        os._exit(9)
    return CaseRecord(id=case.id, checksum=checksum)


def test_a_dying_worker_excludes_only_its_own_case(tmp_path):
    from volssl.data.preprocess import _map_cases
    from volssl.data.readers import SourceCase

    ids = ["a", "b", "die", "c", "d", "e"]
    cases = [SourceCase(id=i, images=(str(tmp_path / f"{i}.nii"),), channels=("image",)) for i in ids]
    recs = list(_map_cases(cases, _work_or_die, 2, tmp_path, {i: f"sum-{i}" for i in ids}))
    assert sorted(r.id for r in recs) == sorted(ids)  # every case answered exactly once
    by = {r.id: r for r in recs}
    assert all(by[i].ok and by[i].checksum == f"sum-{i}" for i in ids if i != "die")
    assert not by["die"].ok and by["die"].problems[0]["rule"] == "error"
    assert "worker process died" in by["die"].reason


def test_ct_normalisation_with_dataset_statistics():
    """"ct": clip to the dataset's foreground percentiles, z-score with its foreground mean / std (nnU-Net's
    CTNormalization); a channel without statistics is z-scored per case; plans without it keep their dict."""
    from volssl.data.preprocess import normalize

    stats = {"mean": 50.0, "std": 25.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}
    plan = PreprocessPlan(name="ct", normalization="ct", ct_intensities=[stats, None])
    assert PreprocessPlan.from_dict(plan.to_dict()) == plan and plan.to_dict()["ct_intensities"] == [stats, None]
    assert "ct_intensities" not in get_plan("s3d").to_dict()
    rng = np.random.default_rng(0)
    image = np.stack([np.linspace(-1000, 1000, 1000, dtype=np.float32).reshape(10, 10, 10),
                      rng.normal(300, 30, (10, 10, 10)).astype(np.float32)])
    out, used = normalize(image.copy(), None, None, "ct", plan.ct_intensities)
    np.testing.assert_allclose(out[0].min(), (-100 - 50) / 25)
    np.testing.assert_allclose(out[0].max(), 6.0)
    mid = (image[0] > -100) & (image[0] < 200)
    np.testing.assert_allclose(out[0][mid], (image[0][mid] - 50) / 25, rtol=1e-5)
    assert abs(out[1].mean()) < 1e-4 and abs(out[1].std() - 1) < 1e-3  # per-case z-score
    assert used[0] == {"clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0} and used[1]["clip"] is None
    with pytest.raises(ValueError, match="one entry per channel"):
        normalize(image.copy(), None, None, "ct", [stats])
    with pytest.raises(ValueError, match="needs ct_intensities"):
        PreprocessPlan(normalization="ct")
    with pytest.raises(ValueError, match=r"ct_intensities\[0\]"):
        PreprocessPlan(normalization="ct", ct_intensities=[{"mean": 1.0}])
    with pytest.raises(ValueError, match=r"ct_intensities\[1\]"):
        PreprocessPlan(normalization="ct", ct_intensities=[None, {**stats, "std": -1.0}])
