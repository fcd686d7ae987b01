"""Reorientation, crop, resampling and their exact inverse, on nibabel's real scanner files."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from volssl.data.geometry import (
    GeometryRecord,
    lowres_axis,
    nonzero_bbox,
    ras_orientation,
    reorient,
    resample_image,
    resample_label,
    target_shape,
    to_original,
    to_preprocessed,
    unreorient,
)
from volssl.data.readers import read_volume

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def real_files(tmp_path: Path) -> dict[str, Path]:
    """nibabel's real files, plus copies of them in unusual orientations / spacings.

    example4d.nii.gz and example_nifti2.nii.gz hold two volumes (the pipeline excludes them as not
    3D); here their first volume is saved as a 3D file with the original affine (oblique).
    resampled_anat_moved.nii contains NaNs (excluded by the pipeline); here NaN -> 0.
    """
    files = {n: NIB_DATA / n for n in ("anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii")}
    for name, cls in (("example4d.nii.gz", nib.Nifti1Image), ("example_nifti2.nii.gz", nib.Nifti2Image)):
        img = nib.load(NIB_DATA / name)
        files[name + "[0]"] = tmp_path / f"vol0_{name}"
        nib.save(cls(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header), files[name + "[0]"])
    img = nib.load(NIB_DATA / "resampled_anat_moved.nii")
    files["resampled_anat_moved.nii(nan->0)"] = tmp_path / "resampled_anat_moved_nonan.nii"
    nib.save(nib.Nifti1Image(np.nan_to_num(img.get_fdata(dtype=np.float32)), img.affine, img.header),
             files["resampled_anat_moved.nii(nan->0)"])
    anat = nib.load(NIB_DATA / "anatomical.nii")
    for codes in (("P", "S", "L"), ("I", "L", "P")):
        re = anat.as_reoriented(ornt_transform(io_orientation(anat.affine), axcodes2ornt(codes)))
        files["anatomical-" + "".join(codes)] = tmp_path / f"anat_{''.join(codes)}.nii.gz"
        nib.save(re, files["anatomical-" + "".join(codes)])
    thick = anat.affine.copy()
    thick[:3, 2] *= 4.0  # 2 x 2 x 8 mm: strongly anisotropic (separate-z path)
    files["anatomical-thick"] = tmp_path / "anat_thick.nii"
    nib.save(nib.Nifti1Image(np.asanyarray(anat.dataobj), thick), files["anatomical-thick"])
    return files


def _record(array, affine, target=(1.0, 1.0, 1.0), crop=True, extra=None):
    ornt = ras_orientation(affine)
    mask = array != 0 if extra is None else (array != 0) | (extra != 0)
    bbox = nonzero_bbox(reorient(mask, ornt)) if crop else None
    return GeometryRecord.create(array.shape, affine, target, bbox)


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("target", [(1.0, 1.0, 1.0), (3.0, 2.5, 1.5)])
def test_round_trip_on_real_files_is_exact_in_shape_and_affine(tmp_path, target):
    for name, path in real_files(tmp_path).items():
        src = nib.load(path)
        array, affine = read_volume(path)
        image = array.astype(np.float32)
        rec = _record(image, affine, target)
        # through JSON, as stored in props/<id>.json
        rec = GeometryRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
        pre = to_preprocessed(image, rec)
        assert pre.shape == tuple(rec.shape), name
        assert nib.aff2axcodes(np.array(rec.affine)) == ("R", "A", "S"), name
        back = to_original(pre, rec, order=1)
        assert back.shape == src.shape[:3], name
        assert np.array_equal(np.array(rec.original_affine), src.affine), name
        # written with the recorded affine and the source header, the file's geometry is reproduced
        out = tmp_path / f"back_{abs(hash(name))}.nii.gz"
        nib.save(type(src)(back, np.array(rec.original_affine), src.header), out)
        again = nib.load(out)
        assert again.shape[:3] == src.shape[:3] and np.array_equal(again.affine, src.affine), name
        # and the content comes back where it was
        fg = image != 0
        if target == (1.0, 1.0, 1.0) and np.unique(image[fg]).size > 2:
            assert np.corrcoef(image[fg], back[fg])[0, 1] > 0.98, name
        assert np.all(back[~nonzero_mask_box(image, rec)] == 0), name


def nonzero_mask_box(image, rec):
    """Source-grid mask of the crop box (what to_original fills with data)."""
    box = np.zeros(rec.reoriented_shape, bool)
    box[tuple(slice(lo, hi) for lo, hi in rec.crop_bbox)] = True
    return unreorient(box, rec.orientation)


def test_label_survives_round_trip(tmp_path):
    """Exact back to the source grid when upsampling by an integer factor; high Dice otherwise."""
    from scipy.ndimage import gaussian_filter

    files = real_files(tmp_path)
    for name in ("anatomical.nii", "anatomical-PSL", "example4d.nii.gz[0]", "anatomical-thick",
                 "reoriented_anat_moved.nii"):
        array, affine = read_volume(files[name])
        smooth = gaussian_filter(array.astype(np.float32), 1.0)
        label = (smooth > np.percentile(smooth, 60)).astype(np.uint8)
        label[smooth > np.percentile(smooth, 85)] = 2
        for target, interp, min_dice in (((1.0, 1.0, 1.0), "nearest", 0.99), ((1.5, 1.5, 1.5), "linear", 0.99),
                                         ((3.0, 3.0, 3.0), "linear", 0.85), ((3.0, 3.0, 3.0), "nearest", 0.8)):
            rec = _record(array.astype(np.float32), affine, target, extra=label)
            pre = to_preprocessed(label, rec, is_label=True, label_interpolation=interp)
            assert pre.dtype == np.uint8 and set(np.unique(pre)) <= {0, 1, 2}
            back = to_original(pre, rec, is_label=True, label_interpolation=interp)
            assert back.shape == label.shape and back.dtype == np.uint8
            dice = [_dice(back == c, label == c) for c in (1, 2)]
            assert min(dice) >= min_dice, (name, target, interp, dice)
            if target == (1.0, 1.0, 1.0) and all(float(s).is_integer() for s in rec.reoriented_spacing):
                assert np.array_equal(back, label), name  # integer upsampling: nearest is exactly invertible


def test_preprocessed_affine_points_at_the_same_world_location():
    """Sampling a world-coordinate ramp: value at a preprocessed voxel = world x of rec.affine there."""
    a, b = np.deg2rad(25), np.deg2rad(-10)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.7, 1.3, -2.2])  # oblique, two flipped axes
    affine[:3, 3] = [12.0, -7.0, 30.0]
    affine[:3, :3] = affine[:3, [2, 0, 1]]  # and permuted voxel axes
    shape = (30, 24, 20)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    ramp = world[..., 1].astype(np.float32)  # world y (A) coordinate of each voxel
    rec = GeometryRecord.create(shape, affine, (1.0, 1.0, 1.0), None)
    pre = to_preprocessed(ramp, rec, order=1)
    pijk = np.stack(np.meshgrid(*[np.arange(n) for n in rec.shape], indexing="ij"), -1).astype(np.float64)
    expect = (pijk @ np.array(rec.affine)[:3, :3].T + np.array(rec.affine)[:3, 3])[..., 1]
    inner = tuple(slice(3, n - 3) for n in rec.shape)  # away from edge clamping
    assert np.allclose(pre[inner], expect[inner], atol=1e-3)
    # the preprocessed voxel size is the requested one up to rounding of the shape
    assert np.allclose(rec.spacing, 1.0, atol=0.05)


def test_reorient_inverse_for_all_48_orientations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5))
    perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    for perm in perms:
        for flips in np.ndindex(2, 2, 2):
            aff = np.eye(4)
            aff[:3, :3] = np.eye(3)[:, perm] * np.where(np.array(flips), -1.0, 1.0)
            ornt = ras_orientation(aff)
            r = reorient(x, ornt)
            assert np.array_equal(unreorient(r, ornt), x)
            rec = GeometryRecord.create(x.shape[1:], aff, None, None)
            assert r.shape[1:] == tuple(rec.reoriented_shape)
            assert nib.aff2axcodes(np.array(rec.reoriented_affine)) == ("R", "A", "S")
            # with no resampling and no crop, the whole trip is the identity, channels included
            assert np.array_equal(to_original(to_preprocessed(x, rec), rec), x.astype(np.float32))


def test_bbox_target_shape_and_lowres_axis():
    m = np.zeros((6, 7, 8), bool)
    assert nonzero_bbox(m) == [[0, 6], [0, 7], [0, 8]]
    m[1, 2:4, 7] = True
    assert nonzero_bbox(m) == [[1, 2], [2, 4], [7, 8]]
    assert target_shape((10, 10, 3), (1.0, 1.0, 5.0), (2.0, 2.0, 2.0)) == (5, 5, 8)
    assert target_shape((1, 10, 10), (0.1, 1, 1), (1, 1, 1)) == (1, 10, 10)
    assert target_shape((7, 8, 9), (1, 1, 1), None) == (7, 8, 9)
    assert lowres_axis((1, 1, 5), (1, 1, 1), 3.0) == 2
    assert lowres_axis((1, 1, 2), (1, 1, 1), 3.0) is None
    assert lowres_axis((5, 5, 1), (1, 1, 1), 3.0) is None  # two low-resolution axes: no separate z
    assert lowres_axis((1, 1, 1), (4, 1, 1), 3.0) == 0  # the target decides when the source is isotropic
    assert lowres_axis((1, 1, 5), (1, 1, 1), None) is None


def test_separate_z_never_blends_thick_slices():
    rng = np.random.default_rng(1)
    planes = rng.normal(size=5).astype(np.float32)
    x = np.broadcast_to(planes, (16, 16, 5)).copy()  # constant within each thick z-slice
    sep = resample_image(x, (24, 24, 20), (1.5, 1.5, 5.0), (1.0, 1.0, 1.25), order=3)
    assert sep.shape == (24, 24, 20) and sep.dtype == np.float32
    assert np.allclose(np.unique(sep.round(5)), np.unique(planes.round(5)))  # only original plane values
    blended = resample_image(x, (24, 24, 20), (1.5, 1.5, 5.0), (1.0, 1.0, 1.25), order=3, anisotropy_threshold=None)
    assert np.unique(blended.round(5)).size > 5
    c = resample_image(np.full((2, 9, 9, 9), 3.0, np.float32), (5, 13, 4), (1, 1, 1), (1, 1, 1))
    assert c.shape == (2, 5, 13, 4) and np.allclose(c, 3.0)  # a constant stays constant, per channel


def test_resample_label_modes():
    lab = np.zeros((20, 20, 20), np.int16)
    lab[5:15, 5:15, 5:15] = 3
    lab[8:12, 8:12, 8:12] = -1  # e.g. an ignore value
    for mode in ("nearest", "linear"):
        out = resample_label(lab, (10, 30, 20), (1, 1, 1), (2, 0.66, 1), mode)
        assert out.dtype == np.int16 and set(np.unique(out)) == {-1, 0, 3}
    with pytest.raises(ValueError, match="nearest"):
        resample_label(lab, (10, 10, 10), (1, 1, 1), (2, 2, 2), "cubic")
    assert resample_label(lab, lab.shape, (1, 1, 1), (1, 1, 1)) is lab


def test_shape_mismatch_is_a_clear_error():
    rec = GeometryRecord.create((10, 10, 10), np.eye(4), (2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="preprocessed shape"):
        to_original(np.zeros((10, 10, 10)), rec)
    with pytest.raises(ValueError, match="source shape"):
        to_preprocessed(np.zeros((5, 5, 5)), rec)
    with pytest.raises(ValueError, match="does not fit"):
        GeometryRecord.create((10, 10, 10), np.eye(4), None, [[0, 11], [0, 10], [0, 10]])
