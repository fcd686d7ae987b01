"""Crops read straight from TIFF / Zarr / blosc2 volumes: purity in (seed, index), exact windows (with
and without cube symmetries), per-crop z-score, size-proportional volume sampling, reads limited to the
window, errors naming the file, the loader contract, and `volssl pretrain --data <volumes>`."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile
import torch
import zarr

from volssl.data.cube_symmetries import invert_symmetry
from volssl.data.patches import make_loader, zscore_crop
from volssl.data.readers import VolumeError
from volssl.data.volume_crops import (
    VolumeCropSampler, discover_volumes, inspect_volume, open_volume, read_crop, volume_plan, volume_stats,
)

ZYX = (40, 36, 48)  # stored (z, y, x) shape: the volume is (X, Y, Z) = (48, 36, 40)


def _stored(seed=0, shape=ZYX, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, shape).astype(dtype)


def _write_zarr(path, a, chunks=(16, 16, 16)):
    z = zarr.create_array(str(path), shape=a.shape, chunks=chunks, dtype=a.dtype)
    z[...] = a
    return path


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    """One volume per reader kind, all holding the same (z, y, x) array."""
    root = tmp_path_factory.mktemp("vols")
    a = _stored()
    paths = {
        "zarr": _write_zarr(root / "a.zarr", a),
        "tiff-raw": root / "striped.tif",
        "tiff-zarr": root / "tiled.tiff",
    }
    tifffile.imwrite(paths["tiff-raw"], a, bigtiff=True)
    tifffile.imwrite(paths["tiff-zarr"], a, bigtiff=True, tile=(16, 16), compression="zlib")
    # OME-Zarr style group: (t, c, z, y, x) with singleton t, c; level 0 under "s0"
    g = zarr.open_group(str(root / "ome.zarr"), mode="w")
    g.create_array("s0", shape=(1, 1, *a.shape), chunks=(1, 1, 16, 16, 16), dtype=a.dtype)[...] = a[None, None]
    g.create_array("s1", shape=(1, 1, 20, 18, 24), chunks=(1, 1, 16, 16, 16), dtype=a.dtype)
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n, "type": t} for n, t in
                                                           zip("tczyx", ["time", "channel", "space", "space", "space"])],
                               "datasets": [{"path": "s0"}, {"path": "s1"}]}]
    paths["ome-zarr"] = root / "ome.zarr"
    from volssl.data.storage import save_array

    save_array(root / "pre.b2nd", a.transpose(2, 1, 0)[None].astype(np.float32))  # (C, X, Y, Z)
    paths["b2nd"] = root / "pre.b2nd"
    return a, paths


@pytest.mark.parametrize("kind", ["zarr", "tiff-raw", "tiff-zarr", "ome-zarr", "b2nd"])
def test_window_matches_the_full_array(vols, kind):
    a, paths = vols
    vol = inspect_volume(paths[kind])
    assert vol.shape == (48, 36, 40) and vol.kind == kind.replace("ome-", "")
    full = a.transpose(2, 1, 0)  # (X, Y, Z)
    crop = read_crop(vol, open_volume(vol), (3, 5, 7), (20, 11, 9))
    assert np.array_equal(crop, full[3:23, 5:16, 7:16])
    s = VolumeCropSampler([paths[kind]], (16, 12, 8), seed=3, zscore=False)
    for k in range(5):
        item = s[k]
        o = item["origin"].numpy()
        assert item["image"].shape == (1, 16, 12, 8) and item["image"].dtype == torch.float32
        assert item["symmetry"] == 0 and item["index"] == k and item["case"] == vol.name
        np.testing.assert_array_equal(item["image"][0].numpy(), full[o[0]:o[0] + 16, o[1]:o[1] + 12, o[2]:o[2] + 8])


def test_symmetric_crops_invert_to_the_window(vols):
    a, paths = vols
    full = a.transpose(2, 1, 0).astype(np.float32)
    s = VolumeCropSampler([paths["zarr"]], (16, 12, 8), seed=1, symmetries=True, zscore=False)
    seen = set()
    for k in range(40):
        item = s[k]
        d = s.draw(k)
        assert item["image"].shape == (1, 16, 12, 8)
        o, w = d["origin"], d["window"]
        window = full[o[0]:o[0] + w[0], o[1]:o[1] + w[1], o[2]:o[2] + w[2]]
        np.testing.assert_array_equal(invert_symmetry(item["image"][0].numpy(), item["symmetry"]), window)
        seen.add(item["symmetry"])
    assert len(seen) > 20  # symmetries are actually drawn


def test_same_seed_same_crop_and_pickling(vols):
    _, paths = vols
    s = VolumeCropSampler([paths["zarr"], paths["tiff-raw"]], 16, seed=7, symmetries=True)
    s2 = VolumeCropSampler([paths["zarr"], paths["tiff-raw"]], 16, seed=7, symmetries=True)
    other = VolumeCropSampler([paths["zarr"], paths["tiff-raw"]], 16, seed=8, symmetries=True)
    for k in (0, 5, 123):
        assert torch.equal(s[k]["image"], s2[k]["image"])
    assert not torch.equal(s[5]["image"], other[5]["image"])
    # item k does not depend on what was read before
    a, b = s[9]["image"], VolumeCropSampler([paths["zarr"], paths["tiff-raw"]], 16, seed=7, symmetries=True)[9]["image"]
    assert torch.equal(a, b)
    blob = pickle.dumps(s)  # open handles never travel
    assert len(s._arrays) > 0
    clone = pickle.loads(blob)
    assert len(clone._arrays) == 0 and torch.equal(clone[5]["image"], s[5]["image"])


def test_per_crop_zscore(vols):
    _, paths = vols
    s = VolumeCropSampler([paths["tiff-raw"]], 16, seed=0, symmetries=True)
    for k in range(5):
        x = s[k]["image"].double()
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
    # a constant crop becomes zeros, not NaN
    assert np.array_equal(zscore_crop(np.full((1, 4, 4, 4), 7, np.uint8)), np.zeros((1, 4, 4, 4), np.float32))
    const = np.full((1, 4, 4, 4), 123456.0, np.float32)
    assert np.all(zscore_crop(const) == 0)
    src = np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4)
    out = zscore_crop(src)
    assert out is not src and src[0, 0, 0, 1] == 1  # not in place unless asked
    with pytest.raises(ValueError, match="inplace"):
        zscore_crop(np.zeros((1, 2, 2, 2), np.uint8), inplace=True)


def _affine_of(item, full):
    """``(mean, std)`` with ``image = (window - mean) / std`` for a crop without symmetry (least squares)."""
    o = item["origin"].numpy()
    size = item["image"].shape[1:]
    window = full[o[0]:o[0] + size[0], o[1]:o[1] + size[1], o[2]:o[2] + size[2]].astype(np.float64).ravel()
    image = item["image"][0].numpy().astype(np.float64).ravel()
    slope, intercept = np.polyfit(window, image, 1)  # image = slope * window + intercept
    np.testing.assert_allclose(image, slope * window + intercept, atol=1e-4)  # an affine map of the window
    return -intercept / slope, 1.0 / slope


@pytest.mark.parametrize("kind", ["zarr", "tiff-raw", "b2nd"])
def test_volume_norm_gives_every_crop_the_volume_statistics(vols, kind):
    """crop_norm="volume" (public MAE_XNT): every crop of a volume is (x - mean) / std with the whole
    volume's numpy mean / std; crop_norm="crop" (the default) is unchanged."""
    a, paths = vols
    full = a.transpose(2, 1, 0)
    s = VolumeCropSampler([paths[kind]], 16, seed=0, crop_norm="volume")
    affines = [_affine_of(s[k], full) for k in range(3)]
    for mean, std in affines:
        assert mean == pytest.approx(float(a.mean(dtype=np.float64)), rel=1e-4)
        assert std == pytest.approx(float(a.std(dtype=np.float64)), rel=1e-4)
    assert s.volume_stats(0) == pytest.approx((a.mean(dtype=np.float64), a.std(dtype=np.float64)), rel=1e-9)
    means = [float(s[k]["image"].mean()) for k in range(6)]
    assert max(abs(m) for m in means) > 1e-4  # unlike per-crop z-scores, crop means are not all 0
    # the cache travels with a pickled sampler (plain numbers) and gives the same crops
    clone = pickle.loads(pickle.dumps(s))
    assert clone._stats == s._stats and torch.equal(clone[4]["image"], s[4]["image"])
    assert s.describe()["crop_norm"] == "volume"
    # crop mode: the default, each crop z-scored on its own statistics, exactly as before
    c = VolumeCropSampler([paths[kind]], 16, seed=0, crop_norm="crop")
    d = VolumeCropSampler([paths[kind]], 16, seed=0)
    raw = VolumeCropSampler([paths[kind]], 16, seed=0, zscore=False)
    for k in range(3):
        assert torch.equal(c[k]["image"], d[k]["image"])
        assert torch.equal(c[k]["image"], torch.from_numpy(zscore_crop(raw[k]["image"].numpy())))
    assert c.describe()["crop_norm"] == "crop" and not c._stats  # no volume statistics computed
    with pytest.raises(ValueError, match="crop_norm"):
        VolumeCropSampler([paths[kind]], 16, crop_norm="global")


def test_volume_statistics_of_a_large_volume_are_a_bounded_estimate(tmp_path):
    """Above max_voxels the statistics come from a 4^3 grid of windows (64^3 at the default 2^24 budget,
    19^3 here): at most max_voxels read, close to
    numpy's values (an intensity ramp along z plus noise), deterministic."""
    rng = np.random.default_rng(0)
    zyx = (150, 100, 130)
    ramp = np.linspace(0, 1000, zyx[0])[:, None, None]
    a = (ramp + rng.normal(0, 200, zyx)).astype(np.float32)
    vol = inspect_volume(_write_zarr(tmp_path / "big.zarr", a, chunks=(32, 32, 32)))

    class Counting:
        def __init__(self, arr):
            self.arr, self.shape, self.voxels = arr, arr.shape, 0

        def __getitem__(self, key):
            out = self.arr[key]
            self.voxels += out.size
            return out

    counting = Counting(a)
    mean, std = volume_stats(vol, counting, max_voxels=500_000)
    assert counting.voxels == 4 ** 3 * 19 ** 3 <= 500_000 < a.size  # 64 windows of 19^3 (64 w^3 <= budget)
    assert mean == pytest.approx(float(a.mean(dtype=np.float64)), rel=0.02)
    assert std == pytest.approx(float(a.std(dtype=np.float64)), rel=0.02)
    assert volume_stats(vol, open_volume(vol), max_voxels=500_000) == (mean, std)  # deterministic, any reader
    exact = Counting(a)
    assert volume_stats(vol, exact) == pytest.approx((a.mean(dtype=np.float64), a.std(dtype=np.float64)), rel=1e-9)
    assert exact.voxels == a.size  # small enough: read whole (in slabs), exact
    # a constant volume normalises to zeros, never NaN
    flat = _write_zarr(tmp_path / "flat.zarr", np.full((16, 16, 16), 9, np.uint8))
    s = VolumeCropSampler([flat], 8, crop_norm="volume")
    assert s.volume_stats(0) == (9.0, 0.0) and torch.equal(s[0]["image"], torch.zeros(1, 8, 8, 8))


def test_size_proportional_sampling(tmp_path):
    shapes = [(16, 16, 16), (32, 16, 16), (32, 32, 40)]  # stored (z, y, x); voxels 1 : 2 : 10
    paths = [_write_zarr(tmp_path / f"v{i}.zarr", np.zeros(s, np.uint8)) for i, s in enumerate(shapes)]
    n = 4000
    s = VolumeCropSampler(tmp_path, 8, seed=0, sampling="size")
    assert [v.name for v in s.volumes] == ["v0", "v1", "v2"]
    counts = np.bincount([s.draw(k)["volume"] for k in range(n)], minlength=3)
    p = np.array([1, 2, 10]) / 13
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4.5 * sigma), counts
    u = VolumeCropSampler(paths, 8, seed=0, sampling="uniform")
    counts = np.bincount([u.draw(k)["volume"] for k in range(n)], minlength=3)
    assert np.all(np.abs(counts - n / 3) < 4.5 * np.sqrt(n * 2 / 9)), counts
    # origins cover the valid range of the (X, Y, Z) = (40, 32, 32) volume and the crop always fits
    origins = np.array([s.draw(k)["origin"] for k in range(n) if s.draw(k)["volume"] == 2])
    assert origins.min(0).tolist() == [0, 0, 0] and origins.max(0).tolist() == [32, 24, 24]


def test_zarr_reads_only_touched_chunks(tmp_path, monkeypatch):
    a = _stored(shape=(64, 64, 64), dtype=np.uint8)
    path = _write_zarr(tmp_path / "big.zarr", a, chunks=(16, 16, 16))  # 64 chunks
    s = VolumeCropSampler([path], 16, seed=0, symmetries=True)
    keys: list[str] = []
    orig = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        keys.append(key)
        return await orig(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    for k in range(20):
        before = len(keys)
        s[k]
        chunk_keys = [key for key in keys[before:] if "/c/" in key or key.startswith("c/")]
        assert 1 <= len(chunk_keys) <= 8  # a 16^3 window touches at most 2 chunks per axis
    all_chunks = {key for key in keys if "/c/" in key or key.startswith("c/")}
    assert len(all_chunks) < 64


def test_tiff_reads_only_the_window(tmp_path):
    a = _stored(shape=(64, 64, 64), dtype=np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, a, bigtiff=True)
    s = VolumeCropSampler([path], 16, seed=0)
    assert s.volumes[0].kind == "tiff-raw"
    for k in range(10):
        s[k]
    arr = s.array(0)
    # per crop: 16 z-slices x (15 full rows + 16 voxels) at most
    assert arr.bytes_read <= 10 * 16 * (15 * 64 + 16)
    assert arr.bytes_read < a.nbytes


def test_discover_volumes(tmp_path, vols):
    a, _ = vols
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    _write_zarr(root / "sub" / "one.zarr", a)
    tifffile.imwrite(root / "two.tif", a)
    (root / "notes.txt").write_text("x")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), root / "three.nii.gz")
    found = discover_volumes(root)
    assert sorted((n, p.name) for n, p in found) == [("sub_one", "one.zarr"), ("two", "two.tif")]
    assert [n for n, _ in discover_volumes(root / "two.tif")] == ["two"]
    assert [n for n, _ in discover_volumes(root / "sub" / "one.zarr")] == ["one"]
    with pytest.raises(ValueError, match="three.nii.gz"):
        discover_volumes(root / "three.nii.gz")
    with pytest.raises(FileNotFoundError):
        discover_volumes(root / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no TIFF"):
        VolumeCropSampler(tmp_path / "empty", 8)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"this is not a tiff" * 10)
    with pytest.raises(VolumeError, match="broken.tif") as e:
        VolumeCropSampler([bad], 8)
    assert e.value.rule == "unreadable"
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((32, 32), np.uint8))
    with pytest.raises(VolumeError, match="flat.tif.*not 3D"):
        VolumeCropSampler([flat], 8)
    four = _write_zarr(tmp_path / "four.zarr", np.zeros((2, 8, 8, 8), np.uint8), chunks=(1, 8, 8, 8))
    with pytest.raises(VolumeError, match="four.zarr.*not 3D"):
        VolumeCropSampler([four], 4)
    small = _write_zarr(tmp_path / "small.zarr", np.zeros((8, 40, 40), np.uint8))  # (X, Y, Z) = (40, 40, 8)
    with pytest.raises(VolumeError, match="small.zarr.*smaller than the crop") as e:
        VolumeCropSampler([small], 16)
    assert e.value.rule == "too_small"
    VolumeCropSampler([small], (16, 16, 8))  # fits without symmetries
    with pytest.raises(VolumeError, match="small.zarr.*axis permutation"):
        VolumeCropSampler([small], (16, 16, 8), symmetries=True)
    g = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    g.create_array("a", shape=(8, 8, 8), dtype="u1")
    g.create_array("b", shape=(8, 8, 8), dtype="u1")
    with pytest.raises(VolumeError, match="two.zarr.*2 arrays"):
        VolumeCropSampler([tmp_path / "two.zarr"], 4)
    with pytest.raises(VolumeError, match="nothere.zarr"):
        VolumeCropSampler([tmp_path / "nothere.zarr"], 4)
    ok = _write_zarr(tmp_path / "ok.zarr", np.zeros((16, 16, 16), np.uint8))
    for kwargs, match in (({"sampling": "biggest"}, "sampling"), ({"seed": -1}, "seed"), ({"max_open": 0}, "max_open")):
        with pytest.raises(ValueError, match=match):
            VolumeCropSampler([ok], 8, **kwargs)
    with pytest.raises(ValueError, match="patch_size"):
        VolumeCropSampler([ok], (8, 8))
    with pytest.raises(IndexError):
        VolumeCropSampler([ok], 8).draw(-1)


def test_truncated_tiff_names_the_file(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _stored(shape=(32, 32, 32), dtype=np.uint8))
    s = VolumeCropSampler([path], 16, seed=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    idx = next(k for k in range(100) if s.draw(k)["origin"][2] >= 4)  # a window reaching the cut-off z range
    with pytest.raises(VolumeError, match="cut.tif.*truncated"):
        s[idx]


def test_loader_contract_and_workers(vols):
    _, paths = vols
    s = VolumeCropSampler([paths["zarr"], paths["tiff-raw"]], 16, seed=2, symmetries=True)
    batch = next(iter(make_loader(s, 4, num_workers=0, start_batch=3)))
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["index"].tolist() == [12, 13, 14, 15]
    for j, k in enumerate(range(12, 16)):
        assert torch.equal(batch["image"][j], s[k]["image"])
    rank1 = next(iter(make_loader(s, 4, num_workers=1, start_batch=3, rank=1, world_size=2)))
    assert torch.equal(rank1["image"], batch["image"][2:])  # worker process, rows [2, 4)
    assert sorted(rank1["case"]) == sorted(batch["case"][2:])
    # a forked worker reads both kinds (Zarr after the parent used it, raw TIFF with its own descriptor)
    many = next(iter(make_loader(s, 12, num_workers=1)))
    assert set(many["case"]) == {"a", "striped"}
    assert all(torch.equal(many["image"][k], s[k]["image"]) for k in range(12))


def test_plan_describes_the_source(vols):
    _, paths = vols
    s = VolumeCropSampler([paths["zarr"]], 16, symmetries=True)
    plan = volume_plan(s)
    from volssl.data.preprocess import PreprocessPlan

    assert PreprocessPlan.from_dict(plan).name == "xnt"
    src = plan["source"]
    assert src["n_volumes"] == 1 and src["symmetries"] and src["crop_zscore"] and src["total_voxels"] == 48 * 36 * 40
    assert src["volumes"][0]["shape"] == [48, 36, 40]
    json.dumps(plan)


@pytest.mark.parametrize("fmt", ["zarr", "tiff"])
def test_pretrain_cli_on_raw_volumes(tmp_path, fmt, capsys):
    from volssl.cli import main
    from volssl.training.checkpoint import load_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    a = _stored(shape=(40, 40, 48), dtype=np.uint8)
    if fmt == "zarr":
        _write_zarr(data / "vol.zarr", a)
    else:
        tifffile.imwrite(data / "vol.tif", a, bigtiff=True)
    run = tmp_path / "run"
    rc = main(["pretrain", "--preset", "s3d-b-tiny", "--data", str(data), "--out", str(run), "--no-progress",
               "--set", "train.steps=3", "--set", "data.patch_size=32,32,32", "--set", "data.num_workers=0",
               "--set", "data.symmetries=true", "--set", "data.sampling=size", "--set", "train.log_every=1"])
    assert rc == 0, capsys.readouterr().err
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    assert final["step"] == 3
    assert final["plan"]["name"] == "xnt" and final["plan"]["source"]["volumes"][0]["name"] == "vol"
    assert json.loads((run / "config.json").read_text())["data"]["symmetries"] is True
