"""Discovery of cases and reading of every input format (NIfTI, ITK formats, TIFF, Zarr)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volssl.data.readers import (
    VolumeError,
    check_affine,
    discover,
    fingerprint,
    read_volume,
    sanitize_id,
    source_bytes,
    source_files,
    subject_of,
)

def _oblique_affine() -> np.ndarray:
    """An orthonormal (ITK-compatible) but oblique, left-handed direction with anisotropic voxels."""
    a, b = np.deg2rad(20), np.deg2rad(15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-1.0, 1.0, 1.0]) @ np.diag([0.9, 1.1, 2.4])
    aff[:3, 3] = [40.0, -12.5, 7.0]
    return aff


OBLIQUE = _oblique_affine()


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


# ------------------------------------------------------------------------------------------ NIfTI


def test_nifti_3d_and_singleton_4d(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    a, aff = read_volume(_nifti(tmp_path / "a.nii.gz", data, OBLIQUE))
    assert a.shape == (5, 6, 7) and np.array_equal(a, data)
    assert np.allclose(aff, OBLIQUE, atol=1e-5)
    b, _ = read_volume(_nifti(tmp_path / "b.nii", data[..., None], OBLIQUE))
    assert np.array_equal(b, data)


def test_nifti_bad_files_raise_volume_error(tmp_path):
    data = np.random.default_rng(0).normal(size=(20, 20, 20, 2)).astype(np.float32)
    with pytest.raises(VolumeError) as e:
        read_volume(_nifti(tmp_path / "4d.nii", data))
    assert e.value.rule == "not_3d" and "(20, 20, 20, 2)" in e.value.reason
    with pytest.raises(VolumeError) as e:
        read_volume(_nifti(tmp_path / "2d.nii", data[:, :, 0, 0]))
    assert e.value.rule == "not_3d"

    good = _nifti(tmp_path / "good.nii.gz", data[..., 0])
    raw = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "trunc.nii.gz")
    assert e.value.rule == "unreadable" and str(tmp_path / "trunc.nii.gz") == e.value.path
    plain = _nifti(tmp_path / "good.nii", data[..., 0]).read_bytes()
    (tmp_path / "trunc.nii").write_bytes(plain[: len(plain) // 2])
    with pytest.raises(VolumeError, match="cannot read"):
        read_volume(tmp_path / "trunc.nii")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image at all" * 100)
    with pytest.raises(VolumeError, match="cannot read"):
        read_volume(tmp_path / "garbage.nii.gz")
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "absent.nii.gz")
    assert e.value.rule == "missing"


def test_singular_or_nonfinite_affine_is_rejected():
    aff = np.eye(4)
    aff[2, 2] = 0.0
    with pytest.raises(VolumeError) as e:
        check_affine("s.nii", aff)
    assert e.value.rule == "bad_affine" and e.value.path == "s.nii"
    aff = np.eye(4)
    aff[:3, 2] = aff[:3, 0]  # two voxel axes pointing the same way
    with pytest.raises(VolumeError, match="singular"):
        check_affine("s.nii", aff)
    aff = np.eye(4)
    aff[0, 3] = np.nan
    with pytest.raises(VolumeError, match="finite"):
        check_affine("s.nii", aff)
    check_affine("ok.nii", OBLIQUE)


# ------------------------------------------------------------------------------------------ ITK formats


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_match_nibabel_geometry(tmp_path, suffix):
    """SimpleITK's own NIfTI reader converts RAS -> LPS; our LPS -> RAS must undo it exactly."""
    import SimpleITK as sitk

    data = np.random.default_rng(1).integers(0, 1000, size=(6, 7, 8)).astype(np.int16)
    nii = _nifti(tmp_path / "ref.nii", data, OBLIQUE)
    img = sitk.ReadImage(str(nii))
    out = tmp_path / f"conv{suffix}"
    sitk.WriteImage(img, str(out))
    a, aff = read_volume(out)
    ref_a, ref_aff = read_volume(nii)
    assert a.shape == ref_a.shape and np.array_equal(a, ref_a)
    assert np.allclose(aff, ref_aff, atol=1e-4)
    if suffix == ".mhd":
        files = source_files(out)
        assert len(files) == 2 and files[1].suffix in (".raw", ".zraw")
        assert source_bytes(out) == sum(f.stat().st_size for f in files)


def test_itk_vector_image_is_not_3d(tmp_path):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(img, str(tmp_path / "v.mha"))
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "v.mha")
    assert e.value.rule == "not_3d"


# ------------------------------------------------------------------------------------------ TIFF


def test_tiff_axis_convention_and_spacing_override(tmp_path):
    import tifffile

    zyx = np.random.default_rng(2).integers(0, 60000, size=(4, 5, 6)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", zyx, photometric="minisblack")
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "s.tif")
    assert e.value.rule == "no_spacing" and "--spacing" in e.value.reason
    a, aff = read_volume(tmp_path / "s.tif", spacing=(0.5, 0.6, 2.0))
    assert a.shape == (6, 5, 4) and np.array_equal(a, zyx.transpose(2, 1, 0))
    assert np.array_equal(aff, np.diag([0.5, 0.6, 2.0, 1.0]))


def test_tiff_spacing_from_metadata(tmp_path):
    import tifffile

    zyx = np.zeros((4, 5, 6), np.uint16)
    zyx[1, 2, 3] = 7
    # ImageJ: 2 pixels per micron in x/y, 3 micron between slices
    tifffile.imwrite(tmp_path / "ij.tif", zyx, imagej=True, resolution=(2.0, 2.0),
                     metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"})
    a, aff = read_volume(tmp_path / "ij.tif", spacing=(9.0, 9.0, 9.0))  # the file's own spacing wins
    assert a[3, 2, 1] == 7
    assert np.allclose(np.diag(aff)[:3], [0.5e-3, 0.5e-3, 3e-3])
    tifffile.imwrite(tmp_path / "o.ome.tif", zyx, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0,
        "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm", "PhysicalSizeZUnit": "nm"})
    _, aff = read_volume(tmp_path / "o.ome.tif")
    assert np.allclose(np.diag(aff)[:3], [0.25e-6, 0.5e-6, 2e-6])
    # nnU-Net's sidecar convention: {"spacing": [z, y, x]}
    tifffile.imwrite(tmp_path / "case_0000.tif", zyx, photometric="minisblack")
    (tmp_path / "case_0000.json").write_text(json.dumps({"spacing": [3.0, 2.0, 1.0]}))
    _, aff = read_volume(tmp_path / "case_0000.tif")
    assert np.array_equal(np.diag(aff)[:3], [1.0, 2.0, 3.0])


def test_tiff_rgb_is_not_3d(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "rgb.tif", spacing=(1, 1, 1))
    assert e.value.rule == "not_3d"
    tifffile.imwrite(tmp_path / "rgbs.tif", np.zeros((3, 8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "rgbs.tif", spacing=(1, 1, 1))
    assert e.value.rule == "not_3d"


# ------------------------------------------------------------------------------------------ Zarr


def test_zarr_array_and_group(tmp_path):
    import zarr

    zyx = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    z = zarr.open_array(tmp_path / "a.zarr", mode="w", shape=zyx.shape, dtype="f4", zarr_format=2)
    z[:] = zyx
    a, aff = read_volume(tmp_path / "a.zarr", spacing=(1.0, 1.0, 4.0))
    assert np.array_equal(a, zyx.transpose(2, 1, 0)) and aff[2, 2] == 4.0
    with pytest.raises(VolumeError) as e:
        read_volume(tmp_path / "a.zarr")
    assert e.value.rule == "no_spacing"

    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("x", shape=(2, 2, 2), dtype="f4")
    g.create_array("y", shape=(2, 2, 2), dtype="f4")
    with pytest.raises(VolumeError, match="2 arrays"):
        read_volume(tmp_path / "g.zarr", spacing=(1, 1, 1))


def test_ome_zarr_takes_level0_and_its_scale(tmp_path):
    import zarr

    czyx = np.random.default_rng(3).normal(size=(1, 4, 5, 6)).astype(np.float32)
    g = zarr.open_group(tmp_path / "o.ome.zarr", mode="w")
    g.create_array("0", shape=czyx.shape, dtype="f4")[:] = czyx
    g.create_array("1", shape=(1, 2, 2, 3), dtype="f4")[:] = 0
    g.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}] + [
            {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 0.5, 0.25]}]},
            {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 4.0, 1.0, 0.5]}]},
        ],
    }]
    a, aff = read_volume(tmp_path / "o.ome.zarr")
    assert np.array_equal(a, czyx[0].transpose(2, 1, 0))
    assert np.allclose(np.diag(aff)[:3], [0.25e-3, 0.5e-3, 2e-3])


# ------------------------------------------------------------------------------------------ discovery


def _nnunet(root: Path, cases: dict[str, int], channels=("T1", "T2"), test_cases=(), labels=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": labels or {"background": 0, "tumor": 1, "edema": [1, 2]},
            "file_ending": ".nii.gz", "numTraining": len(cases)}
    (root / "dataset.json").write_text(json.dumps(meta))
    vol = np.ones((3, 3, 3), np.float32)
    for case, n_ch in cases.items():
        for c in range(n_ch):
            _nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", vol)
        _nifti(root / "labelsTr" / f"{case}.nii.gz", vol.astype(np.uint8))
    for case in test_cases:
        for c in range(len(channels)):
            _nifti(root / "imagesTs" / f"{case}_{c:04d}.nii.gz", vol)
    (root / "imagesTr" / ".DS_Store").write_text("x")
    return root


def test_discover_nnunet_dataset(tmp_path):
    root = _nnunet(tmp_path / "Dataset002_X", {"BraTS_001": 2, "BraTS_002": 1}, test_cases=["BraTS_101"])
    cases = {c.id: c for c in discover(root)}
    assert set(cases) == {"BraTS_001", "BraTS_002", "BraTS_101"}
    c = cases["BraTS_001"]
    assert c.channels == ("T1", "T2")
    assert [Path(p).name for p in c.images] == ["BraTS_001_0000.nii.gz", "BraTS_001_0001.nii.gz"]
    assert Path(c.label).name == "BraTS_001.nii.gz" and c.split == "train"
    assert c.label_values == (0, 1, 2) and c.error is None
    assert "BraTS_002_0001.nii.gz" in cases["BraTS_002"].error
    t = cases["BraTS_101"]
    assert t.split == "test" and t.label is None and len(t.images) == 2


def test_discover_explicit_dataset_lists(tmp_path):
    root = tmp_path / "D"
    _nifti(root / "imgs" / "a_t1.nii.gz", np.ones((3, 3, 3), np.float32))
    _nifti(root / "segs" / "a.nii.gz", np.ones((3, 3, 3), np.uint8))
    (root / "imagesTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz",
        "dataset": {"a": {"images": ["imgs/a_t1.nii.gz"], "label": "segs/a.nii.gz"}}}))
    (c,) = discover(root)
    assert c.id == "a" and c.images[0].endswith("imgs/a_t1.nii.gz") and c.label.endswith("segs/a.nii.gz")


def test_discover_decathlon_lists(tmp_path):
    root = tmp_path / "Task02_Heart"
    (root / "imagesTr").mkdir(parents=True)
    _nifti(root / "imagesTr" / "la_003.nii.gz", np.ones((3, 3, 3), np.float32))
    _nifti(root / "labelsTr" / "la_003.nii.gz", np.ones((3, 3, 3), np.uint8))
    _nifti(root / "imagesTs" / "la_001.nii.gz", np.ones((3, 3, 3), np.float32))
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}],
        "test": ["./imagesTs/la_001.nii.gz"]}))
    tr, ts = discover(root)
    assert (tr.id, tr.split, tr.channels, tr.label_values) == ("la_003", "train", ("MRI",), (0, 1))
    assert tr.label.endswith("labelsTr/la_003.nii.gz")
    assert (ts.id, ts.split, ts.label) == ("la_001", "test", None)


def test_discover_plain_folder_bids_nested_and_zarr(tmp_path):
    import zarr

    vol = np.ones((3, 3, 3), np.float32)
    _nifti(tmp_path / "sub-01" / "anat" / "sub-01_ses-2_T1w.nii.gz", vol)
    _nifti(tmp_path / "sub-01" / "anat" / "sub-01_FLAIR.nii", vol)
    _nifti(tmp_path / "other" / "scan a.nii.gz", vol)
    _nifti(tmp_path / "other" / "scan_a.nii.gz", vol)  # sanitises to the same id
    _nifti(tmp_path / ".hidden" / "x.nii.gz", vol)
    (tmp_path / "notes.txt").write_text("x")
    zarr.open_array(tmp_path / "stack.zarr", mode="w", shape=(2, 2, 2), dtype="f4")
    _nnunet(tmp_path / "raw" / "Dataset003_Y", {"c1": 1}, channels=("CT",))
    cases = discover(tmp_path, spacing=(1, 2, 3))
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)) == 6
    by = {c.id: c for c in cases}
    t1 = by["sub-01_anat_sub-01_ses-2_T1w"]
    assert t1.subject == "sub-01" and t1.channels == ("T1w",) and t1.split is None and t1.label is None
    assert by["sub-01_anat_sub-01_FLAIR"].channels == ("FLAIR",)
    assert "other_scan_a" in by and any(i.startswith("other_scan_a-") for i in ids)
    assert by["stack"].images[0].endswith("stack.zarr") and by["stack"].spacing == (1.0, 2.0, 3.0)
    nested = by["raw_Dataset003_Y_c1"]
    assert nested.label is not None and nested.channels == ("CT",) and nested.split == "train"
    assert discover(tmp_path) == discover(tmp_path)  # deterministic


def test_ids_subjects_and_fingerprint(tmp_path):
    assert sanitize_id("a b/c:d.e") == "a_b_c_d.e" and sanitize_id("..x") == "x"
    assert subject_of("ds/sub-A12/anat/x.nii") == "sub-A12" and subject_of("patient7.nii") is None
    f = _nifti(tmp_path / "a.nii", np.ones((3, 3, 3), np.float32))
    fp = fingerprint([f, None])
    assert fp == fingerprint([f, None]) and fp.startswith("stat-")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint([f, None]) != fp
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "nope")
