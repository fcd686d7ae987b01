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


# --------------------------------------------------------------------------------------------------
# variants, the CT kind and the named tasks

# sha1 of (images, label, affine, tissue) of cases made before variants existed: the old kinds must not change
_GOLDEN = {
    ("brain", 0): "ff56b8640ff779fe548774f1e0307139193786b6",
    ("brain", 1): "7f7ef2cc8492cc817b6c8f0347fdde21f2ff8076",
    ("nuclei", 0): "47516bb1683c84a30f4f4af02b0920862cb5c9ee",
    ("axons", 1): "6a2d7037154a6b890363db71556346e31de7a2a4",
}


def _sha1(case) -> str:
    import hashlib

    h = hashlib.sha1()
    for a in (case.images, case.label, case.affine, case.tissue):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_old_kinds_unchanged_and_default_variant_is_the_brain_kind() -> None:
    from volssl.data.phantoms import BrainVariant

    for (kind, index), digest in _GOLDEN.items():
        assert _sha1(make_case(kind, 0, index, SMALL)) == digest, (kind, index)
    assert _sha1(make_case("brain", 0, 1, SMALL, BrainVariant())) == _GOLDEN[("brain", 1)]
    # a named variant draws its own subjects, even with the default settings
    assert _sha1(make_case("brain", 0, 1, SMALL, BrainVariant(name="other"))) != _GOLDEN[("brain", 1)]
    with pytest.raises(ValueError, match="brain variants"):
        make_case("nuclei", 0, 0, SMALL, BrainVariant())


def test_variants_are_validated() -> None:
    from volssl.data.phantoms import BrainVariant

    for bad, match in (({"contrast": "x"}, "contrast"), ({"channels": ("T1", "T1")}, "channels"),
                       ({"channels": ("DWI",)}, "channels"), ({"lesions": "cysts"}, "lesions"),
                       ({"noise": (0.2, 0.1)}, "noise"), ({"spacing_factor": 0.0}, "spacing_factor"),
                       ({"thick_factors": (0.5,)}, "thick_factors"), ({"blur": -1.0}, "blur")):
        with pytest.raises(ValueError, match=match):
            BrainVariant(**bad)


def test_tasks_are_deterministic_and_written_as_nnunet_datasets(tmp_path: Path) -> None:
    from volssl.data.phantoms import PHANTOM_TASKS, generate_task

    for name, task in PHANTOM_TASKS.items():
        a = generate_task(tmp_path / name / "a", name, 1, n_test=1, shape=SMALL, progress=False)
        b = generate_task(tmp_path / name / "b", name, 1, n_test=1, shape=SMALL, progress=False)
        c = generate_task(tmp_path / name / "c", name, 1, n_test=0, seed=task.seed + 1, shape=SMALL, progress=False)
        files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
        assert len(files) == 2 * (len(task.channel_names) + 1)
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
        first = Path("imagesTr") / f"{name.replace('-', '_')}_000_0000.nii.gz"
        assert first in files and (a / first).read_bytes() != (c / first).read_bytes()
        meta = json.loads((a / "dataset.json").read_text())
        assert meta["labels"] == task.labels and meta["channel_names"] == {
            str(i): ch for i, ch in enumerate(task.channel_names)}
        assert meta["volssl_phantoms"]["task"] == name and meta["volssl_phantoms"]["seed"] == task.seed
        label = np.asanyarray(nib.load(a / "labelsTr" / f"{name.replace('-', '_')}_000.nii.gz").dataobj)
        assert set(np.unique(label).tolist()) <= set(task.labels.values())
    # the task's variant has its own subjects: brain-lesions-centre-b at seed 0 is not brain-lesions at seed 0
    spec = PHANTOM_TASKS["brain-lesions-centre-b"]
    assert _sha1(make_case("brain", 0, 0, SMALL, spec.variant)) != _GOLDEN[("brain", 0)]
    with pytest.raises(ValueError, match="unknown phantom task"):
        generate_task(tmp_path / "x", "brain-nothing", 1)


def test_centre_b_differs_in_contrast_noise_and_spacing() -> None:
    from volssl.data.phantoms import PHANTOM_TASKS

    t = {name: i for i, name in enumerate(BRAIN_TISSUES)}

    def stats(task: str) -> np.ndarray:
        spec = PHANTOM_TASKS[task]
        rows = []
        for i in range(4):
            case = make_case("brain", spec.seed, i, (48, 48, 48), spec.variant)
            sp = np.sort(case.spacing)
            t1, _, flair = case.images
            wm, gm, csf, air = (case.tissue == t[k] for k in ("wm", "gm", "csf", "air"))
            rows.append([sp[0], sp[2] / sp[0], np.median(t1[wm]) / np.median(t1[gm]),
                         np.median(flair[csf]) / np.median(flair[wm]), np.std(t1[air]) / np.median(t1[wm])])
        return np.array(rows)

    a, b = stats("brain-lesions"), stats("brain-lesions-centre-b")
    med_a, med_b = np.median(a, 0), np.median(b, 0)
    assert med_b[0] > 1.1 * med_a[0]  # coarser in-plane voxels
    assert b[:, 1].min() >= 1.5 - 1e-6  # always thick slices
    assert med_a[2] > med_b[2] + 0.15  # less grey/white contrast in T1
    assert med_b[3] > med_a[3] + 0.1  # FLAIR: CSF less suppressed
    assert med_b[4] > 1.25 * med_a[4]  # noisier
    for i in range(3):  # the same label: lesions in white matter, present in every case
        spec = PHANTOM_TASKS["brain-lesions-centre-b"]
        case = make_case("brain", spec.seed, i, (48, 48, 48), spec.variant)
        assert case.label.max() == 1 and (case.label == 1).sum() >= 5 and case.channel_names == ("T1", "T2", "FLAIR")


def test_tumour_and_lacunes() -> None:
    from volssl.data.phantoms import PHANTOM_TASKS

    t = {name: i for i, name in enumerate(BRAIN_TISSUES)}
    spec = PHANTOM_TASKS["brain-tumour"]
    for i in range(2):
        case = make_case("brain", spec.seed, i, (48, 48, 48), spec.variant)
        edema, core = case.label == 1, case.label == 2
        assert edema.sum() > 30 and core.sum() > 30
        assert ndimage.label(core)[1] == 1  # one mass
        assert (ndimage.binary_dilation(core, iterations=2) & edema).any()  # the edema surrounds the core
        assert np.all(case.tissue[core] == t["tumour_core"]) and np.all(case.tissue[edema] == t["edema"])
        flair, wm = case.images[2], case.tissue == t["wm"]
        assert np.median(flair[edema]) > 1.3 * np.median(flair[wm])  # edema is FLAIR-bright
    spec = PHANTOM_TASKS["brain-lacunes"]
    for i in range(2):
        case = make_case("brain", spec.seed, i, (48, 48, 48), spec.variant)
        assert case.channel_names == ("T1", "FLAIR") and case.images.shape[0] == 2
        comps, n = ndimage.label(case.label == 1)
        assert n >= 5  # many
        sizes = np.bincount(comps.ravel())[1:]
        assert np.median(sizes) < 40  # tiny
        t1 = case.images[0]
        assert np.median(t1[case.label == 1]) < 0.75 * np.median(t1[case.tissue == t["wm"]])  # CSF-like, dark in T1
        assert not case.label[case.tissue == t["mimic"]].any()  # CSF-like grey-matter dots stay unlabelled


def test_ct_organs() -> None:
    from volssl.data.phantoms import ORGAN_TISSUES

    o = {name: i for i, name in enumerate(ORGAN_TISSUES)}
    liver_hu = []
    for i in range(3):
        case = make_case("organs", 3, i, (48, 48, 40))
        assert case.channel_names == ("CT",) and case.images.shape == (1, *case.label.shape)
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3}
        img = case.images[0]
        assert img.min() >= -1024 and img.max() <= 3071 and np.allclose(img, np.rint(img))
        assert np.median(img[case.tissue == o["air"]]) < -900
        assert np.median(img[case.tissue == o["fat"]]) < -50
        liver_hu.append(float(np.median(img[case.label == 1])))
        assert 30 < liver_hu[-1] < 150
        # liver and spleen overlap in intensity: a threshold between them separates them poorly
        spleen = float(np.median(img[case.label == 3]))
        assert abs(spleen - liver_hu[-1]) < 40
        fov = np.sort(case.fov_mm)  # 190-250 mm cranio-caudal, 330-390 mm in-plane, whatever the on-disk order
        assert 185 < fov[0] < 255 and 320 < fov[1] <= fov[2] < 400


def test_cli_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from volssl.cli import main

    assert main(["phantoms", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("brain-lesions", "brain-tumour", "brain-lacunes", "ct-organs",
                                            "brain-lesions-centre-b"))
    out = tmp_path / "tumour"
    assert main(["phantoms", "--task", "brain-tumour", "--out", str(out), "--n", "1", "--n-test", "0", "--shape",
                 "24", "--no-progress"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "edema": 1, "core": 2} and meta["volssl_phantoms"]["seed"] == 1
    assert (out / "imagesTr" / "brain_tumour_000_0002.nii.gz").is_file()
    assert "brain-tumour (seed 1)" in capsys.readouterr().out
    assert main(["phantoms", "--kind", "organs", "--out", str(tmp_path / "ct"), "--n", "1", "--n-test", "0",
                 "--shape", "24", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ct" / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    with pytest.raises(SystemExit):  # a kind and a task
        main(["phantoms", str(tmp_path / "x"), "--kind", "brain", "--task", "ct-organs"])
    with pytest.raises(SystemExit):  # no output directory
        main(["phantoms", "--task", "ct-organs"])
    with pytest.raises(SystemExit):  # two different ones
        main(["phantoms", str(tmp_path / "x"), "--out", str(tmp_path / "y")])
