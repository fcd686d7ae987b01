"""Tests of volssl.data.phantoms: determinism, nnU-Net v2 layout, geometry, and the properties that
make the phantoms worth learning from (lesions in white matter with grey-matter mimics, axons as
separate tubes with dark sheaths, intensity thresholds that cannot solve the task)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from volssl.data.phantoms import (
    AXON_TISSUES,
    BRAIN_TISSUES,
    NUCLEI_TISSUES,
    generate_phantoms,
    make_case,
    render_phantom_preview,
    write_nifti,
)

SMALL = (32, 32, 32)


def _best_threshold_dice(x: np.ndarray, y: np.ndarray) -> float:
    """Best Dice of ``x > t`` against mask ``y`` over a grid of thresholds."""
    best = 0.0
    for t in np.quantile(x, np.linspace(0.5, 0.9999, 200)):
        p = x > t
        best = max(best, 2.0 * float((p & y).sum()) / float(p.sum() + y.sum()))
    return best


def test_same_seed_identical_different_seed_differs(tmp_path: Path) -> None:
    a = generate_phantoms(tmp_path / "a", "brain", 2, seed=7, n_test=1, shape=SMALL, progress=False)
    b = generate_phantoms(tmp_path / "b", "brain", 2, seed=7, n_test=1, shape=SMALL, progress=False)
    c = generate_phantoms(tmp_path / "c", "brain", 2, seed=8, n_test=1, shape=SMALL, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 3 * 3 + 3
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert any((a / rel).read_bytes() != (c / rel).read_bytes() for rel in files)
    # case i does not depend on n, and the in-memory case is what was written
    case = make_case("brain", 7, 1, SMALL)
    on_disk = nib.load(a / "imagesTr" / "brain_001_0002.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(on_disk.dataobj), case.images[2])
    np.testing.assert_allclose(on_disk.affine, case.affine)
    for kind in ("nuclei", "axons"):
        x, y = make_case(kind, 3, 0, SMALL), make_case(kind, 3, 0, SMALL)
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.label, y.label)
        assert not np.array_equal(x.images, make_case(kind, 4, 0, SMALL).images)


@pytest.mark.parametrize("kind", ["brain", "nuclei", "axons"])
def test_nnunet_raw_layout(tmp_path: Path, kind: str) -> None:
    out = generate_phantoms(tmp_path / kind, kind, 2, seed=0, n_test=1, shape=SMALL, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["file_ending"] == ".nii.gz"
    assert meta["labels"]["background"] == 0
    channels = meta["channel_names"]
    assert sorted(channels, key=int) == [str(i) for i in range(len(channels))]
    if kind == "brain":
        assert channels == {"0": "T1", "1": "T2", "2": "FLAIR"}
        assert meta["labels"] == {"background": 0, "lesion": 1}
    for split, count in (("Tr", meta["numTraining"]), ("Ts", meta["numTest"])):
        labels = sorted((out / f"labels{split}").glob("*.nii.gz"))
        images = sorted((out / f"images{split}").glob("*.nii.gz"))
        assert len(labels) == count and len(images) == count * len(channels)
        for lab_path in labels:
            case = lab_path.name[: -len(".nii.gz")]
            lab = nib.load(lab_path)
            values = np.unique(np.asanyarray(lab.dataobj))
            if meta["instance_labels"]:
                assert lab.get_data_dtype() == np.uint16
                np.testing.assert_array_equal(values, np.arange(values.max() + 1))  # ids 0..K, none missing
            else:
                assert set(values.tolist()) <= set(meta["labels"].values())
            for c in channels:
                img = nib.load(out / f"images{split}" / f"{case}_{int(c):04d}.nii.gz")
                assert img.shape == lab.shape and img.get_data_dtype() == np.int16
                np.testing.assert_allclose(img.affine, lab.affine)
                assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    with pytest.raises(ValueError, match="not empty"):
        generate_phantoms(out, kind, 1, shape=SMALL, progress=False)
    generate_phantoms(out, kind, 1, n_test=0, shape=SMALL, progress=False, overwrite=True)
    assert len(list((out / "labelsTr").iterdir())) == 1 and not (out / "labelsTs").exists()


def test_brain_lesions_in_white_matter_with_mimics() -> None:
    t = {name: i for i, name in enumerate(BRAIN_TISSUES)}
    for seed in range(3):
        case = make_case("brain", seed, 0, (64, 64, 64))
        lesion = case.label == 1
        assert lesion.sum() > 50
        assert np.all(case.tissue[lesion] == t["lesion"])
        assert not np.any(case.label[case.tissue == t["mimic"]])
        # lesions are surrounded mostly by white matter (they sit inside it), mimics by grey matter
        rim = ndimage.binary_dilation(lesion) & ~lesion
        rim_tissue = case.tissue[rim]
        assert np.mean((rim_tissue == t["wm"]) | (rim_tissue == t["lesion"])) > 0.6
        assert np.all(np.isin(rim_tissue, [t["wm"], t["gm"], t["deep_gm"], t["csf"], t["mimic"], t["lesion"]]))
        mimic = case.tissue == t["mimic"]
        assert mimic.sum() > 20
        flair, t2 = case.images[2], case.images[1]
        assert np.median(flair[mimic]) > 0.8 * np.median(flair[lesion])  # mimics look like lesions
        # T2: CSF (away from partial volume) is as bright as lesions; FLAIR: a threshold alone finds
        # lesions poorly
        assert np.percentile(t2[case.tissue == t["csf"]], 95) > np.median(t2[lesion])
        assert _best_threshold_dice(flair, lesion) < 0.5


def test_brain_default_size_passes_s3d_filter(tmp_path: Path) -> None:
    case = make_case("brain", 0, 2)  # default field of view (this one at 1 x 1.5 x 1 mm: quick to make)
    assert np.all(case.fov_mm >= 150.0) and np.all(case.fov_mm <= 200.0)
    assert np.all(case.spacing <= 3.0 + 1e-6) and np.all(case.spacing >= 0.8 - 1e-6)
    path = tmp_path / "t1.nii.gz"
    write_nifti(path, case.images[0], case.affine, np.int16)
    assert path.stat().st_size > 200_000
    small = make_case("brain", 0, 1, (64, 64, 64))
    assert np.all(small.fov_mm >= 50.0)
    # the head fits the field of view: brain tissue reaches no face but the inferior one (brainstem)
    ras = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(small.tissue, small.affine)).dataobj)
    brain = np.isin(ras, [BRAIN_TISSUES.index("gm"), BRAIN_TISSUES.index("wm")])
    border = np.zeros(brain.shape, bool)
    border[[0, -1], :, :] = border[:, [0, -1], :] = border[:, :, -1] = True
    assert brain.sum() > 0.1 * brain.size and not np.any(brain & border)


def test_brain_orientations_and_spacings_vary() -> None:
    affines = [make_case("brain", 0, i, SMALL).affine for i in range(8)]
    non_ras = 0
    spacings = []
    for a in affines:
        m = a[:3, :3]
        # axis-aligned: one non-zero per row and column
        assert np.all((np.abs(m) > 1e-9).sum(0) == 1) and np.all((np.abs(m) > 1e-9).sum(1) == 1)
        is_ras = np.allclose(m, np.diag(np.diag(m))) and np.all(np.diag(m) > 0)
        non_ras += not is_ras
        spacings.append(np.linalg.norm(m, axis=0))
    assert non_ras >= 3
    assert any(s.max() / s.min() > 1.2 for s in spacings)  # some thick-slice cases
    # the world-space anatomy is the same whatever the on-disk orientation: RAS brains look up-right
    case = make_case("brain", 0, 3, (48, 48, 48))
    ras = nib.as_closest_canonical(nib.Nifti1Image(case.tissue, case.affine))
    tissue = np.asanyarray(ras.dataobj)
    z_brain = np.argwhere(np.isin(tissue, [BRAIN_TISSUES.index("wm")]))[:, 2].mean()
    z_neck = np.argwhere(tissue == BRAIN_TISSUES.index("muscle"))[:, 2].mean()
    assert z_brain > z_neck  # superior axis points up


def test_nuclei_need_context() -> None:
    case = make_case("nuclei", 0, 0, (64, 64, 64))
    nucleus = case.label == 1
    assert 0.01 < nucleus.mean() < 0.3
    assert np.all(case.tissue[nucleus] == NUCLEI_TISSUES.index("nucleus"))
    img = case.images[0]
    bg = img[case.tissue == NUCLEI_TISSUES.index("neuropil")]
    # slightly brighter on average, but a smoothed-intensity threshold segments nuclei poorly
    assert np.mean(img[nucleus]) - np.mean(bg) < 1.5 * np.std(bg)
    assert _best_threshold_dice(ndimage.gaussian_filter(img, 1.0), nucleus) < 0.5


def test_axon_instances_are_separate_connected_tubes() -> None:
    case = make_case("axons", 1, 0, (64, 64, 64))
    lab = case.label
    assert lab.dtype == np.uint16
    ids = np.unique(lab)[1:]
    assert len(ids) >= 8
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    touches_two_faces = 0
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        _, n = ndimage.label(lab[sl] == k)
        assert n == 1, f"axon {k} has {n} pieces"
        region = lab == k
        faces = sum(int(np.any(np.take(region, i, axis=a))) for a in range(3) for i in (0, -1))
        touches_two_faces += faces >= 2
    assert touches_two_faces >= 0.9 * len(ids)  # tubes cross the volume
    # different axons never touch: a sheath or background lies between them
    for a in range(3):
        x = np.moveaxis(lab, a, 0)
        p, q = x[1:], x[:-1]
        assert not np.any((p > 0) & (q > 0) & (p != q))
    img, tissue = case.images[0], case.tissue
    inside = img[tissue == AXON_TISSUES.index("axoplasm")]
    outside = img[tissue == AXON_TISSUES.index("background")]
    sheath = img[tissue == AXON_TISSUES.index("myelin")]
    assert abs(inside.mean() - outside.mean()) < 0.5 * outside.std()  # inside looks like background
    assert sheath.mean() < outside.mean() - outside.std()  # dark sheaths define the instances


def test_preview_png(tmp_path: Path) -> None:
    out = generate_phantoms(tmp_path / "d", "axons", 1, n_test=0, shape=SMALL, progress=False)
    png = render_phantom_preview(out, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from volssl.cli import main

    out = tmp_path / "nuc"
    argv = ["phantoms", str(out), "--kind", "nuclei", "--n", "1", "--n-test", "0", "--shape", "32",
            "--preview", "--no-progress"]
    assert main(argv) == 0
    assert (out / "preview.png").exists() and (out / "imagesTr" / "nuclei_000_0000.nii.gz").exists()
    assert str(out / "dataset.json") in capsys.readouterr().out
    assert main(argv) == 2  # not empty without --overwrite
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["phantoms", str(out), "--shape", "8,8"])
