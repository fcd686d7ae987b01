"""The patch stream: purity in (seed, index), exact reads with padding, foreground bias, channels,
case sampling by size, and the loader's global-batch contract (workers, ranks, resume)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from volssl.bench.loader import write_dataset
from volssl.data.patches import PatchSampler, make_loader, read_window
from volssl.data.storage import load_array

PATCH = 16
SHAPES = {"big": (40, 36, 32), "small": (10, 12, 9), "mid": (24, 30, 20)}


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    x, y, z = (s // 3 for s in shape)
    label[x : x + 2, y : y + 2, z : z + 2] = 1  # two tiny foreground blobs
    label[-2:, -2:, -1] = 2
    return image, label


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("pre")
    return write_dataset(root, ((cid, *_case(rng, shape)) for cid, shape in SHAPES.items()))


def _expected(ds, item, pad_value=0.0):
    """The patch cut from the fully decoded volume, padded by hand."""
    full = load_array(ds.image_path(item["case"]))
    padded = np.pad(full, [(0, 0)] + [(PATCH, PATCH)] * 3, constant_values=pad_value)
    o = item["origin"].numpy() + PATCH
    return padded[:, o[0] : o[0] + PATCH, o[1] : o[1] + PATCH, o[2] : o[2] + PATCH]


def _same(a: dict, b: dict) -> bool:
    return a["case"] == b["case"] and torch.equal(a["origin"], b["origin"]) and torch.equal(a["image"], b["image"])


def test_item_is_pure_function_of_seed_and_index(ds):
    s1 = PatchSampler(ds, PATCH, seed=3)
    s2 = PatchSampler(ds.root, PATCH, seed=3)
    forward = [s1[k] for k in range(6)]
    backward = [s2[k] for k in reversed(range(6))][::-1]
    assert all(_same(a, b) for a, b in zip(forward, backward))
    assert _same(s1[4], forward[4])


def test_stream_does_not_depend_on_the_manifest_order(ds, tmp_path):
    """Parallel preprocessing appends manifest rows in the order its workers finish (a fresh demo run gave
    brain_001, brain_000, ... once and brain_000, brain_001, ... the next time): the stream must not care."""
    import shutil

    from volssl.data.dataset import PreprocessedDataset

    copy = tmp_path / "copy"
    shutil.copytree(ds.root, copy)
    for f in sorted((copy / "manifest").glob("*.jsonl")):
        lines = f.read_text().splitlines(keepends=True)
        f.write_text("".join(reversed(lines)))
    flipped = PreprocessedDataset(copy)
    assert [r.id for r in flipped.cases] == sorted(r.id for r in flipped.cases) == [r.id for r in ds.cases]
    a, b = PatchSampler(ds, PATCH, seed=5), PatchSampler(flipped, PATCH, seed=5)
    assert all(a[k]["case"] == b[k]["case"] and torch.equal(a[k]["image"], b[k]["image"]) for k in range(8))


def test_different_seeds_differ(ds):
    a = [PatchSampler(ds, PATCH, seed=1)[k] for k in range(6)]
    b = [PatchSampler(ds, PATCH, seed=2)[k] for k in range(6)]
    assert not all(_same(x, y) for x, y in zip(a, b))


def test_patch_equals_slice_of_full_volume(ds):
    sampler = PatchSampler(ds, PATCH, seed=5, pad_value=-3.5)
    cases = set()
    for k in range(12):
        item = sampler[k]
        cases.add(item["case"])
        assert item["image"].dtype == torch.float32 and item["image"].shape == (2, PATCH, PATCH, PATCH)
        assert np.array_equal(item["image"].numpy(), _expected(ds, item, -3.5))
    assert len(cases) >= 2


def test_volume_smaller_than_patch_is_padded_whole(ds):
    sampler = PatchSampler(ds, PATCH, seed=0, cases=["small"], pad_value=-7.0, with_labels=True)
    volume = load_array(ds.image_path("small"))
    origins = set()
    for k in range(5):
        item = sampler[k]
        o = item["origin"].numpy()
        origins.add(tuple(o))
        assert all(SHAPES["small"][i] - PATCH <= o[i] <= 0 for i in range(3))
        inside = tuple(slice(-o[i], -o[i] + SHAPES["small"][i]) for i in range(3))
        img = item["image"].numpy()
        assert np.array_equal(img[(slice(None),) + inside], volume)
        assert (img == -7.0).sum() == img.size - volume.size
        assert item["label"].shape == (1, PATCH, PATCH, PATCH) and item["label"].dtype == torch.int64
    assert len(origins) > 1  # the volume is placed at random inside the patch


def test_uniform_origins_stay_inside_larger_volumes(ds):
    sampler = PatchSampler(ds, PATCH, seed=9, cases=["big"])
    for k in range(10):
        o = sampler.draw(k)["origin"]
        assert all(0 <= o[i] <= SHAPES["big"][i] - PATCH for i in range(3))


def test_foreground_prob_one_always_hits_a_label(ds):
    sampler = PatchSampler(ds, PATCH, foreground_prob=1.0, seed=11, with_labels=True)
    classes = set()
    for k in range(20):
        label = sampler[k]["label"]
        assert (label > 0).any()
        classes |= set(label.unique().tolist())
    assert {1, 2} <= classes
    # without the bias, the tiny blobs are missed by some patches
    plain = PatchSampler(ds, PATCH, foreground_prob=0.0, seed=11, with_labels=True, cases=["big"])
    assert not all((plain[k]["label"] > 0).any() for k in range(20))


@pytest.mark.parametrize("batch, prob, forced", [(2, 0.33, [1]), (4, 0.33, [3]), (6, 0.33, [4, 5]), (2, 0.0, [])])
def test_nnunet_oversampling_forces_the_last_places_of_every_batch(ds, batch, prob, forced):
    # nnU-Net: sample i of a batch is foreground iff not i < round(B * (1 - p)): with B = 2 at least one
    # patch of every batch sees a label (an independent coin of 0.33 left 45% of batches of 2 without)
    nn = PatchSampler(ds, PATCH, foreground_prob=prob, seed=11, with_labels=True, cases=["big"],
                      foreground_batch=batch)
    coin = PatchSampler(ds, PATCH, foreground_prob=prob, seed=11, with_labels=True, cases=["big"])
    for k in range(3 * batch):
        item = nn[k]
        if k % batch in forced:
            assert (item["label"] > 0).any(), k
        # the other draws (case, channel, symmetry) are the coin stream's
        assert item["case"] == coin[k]["case"] and item["symmetry"] == coin[k]["symmetry"]
    with pytest.raises(ValueError, match="foreground_batch"):
        PatchSampler(ds, PATCH, foreground_prob=0.5, foreground_batch=0)


def test_channel_modes(ds):
    single = PatchSampler(ds, PATCH, seed=4, channel_mode="single")
    both = PatchSampler(ds, PATCH, seed=4, channel_mode="all")
    picked = set()
    for k in range(10):
        one = single[k]
        assert one["image"].shape == (1, PATCH, PATCH, PATCH)
        full = _expected(ds, one)
        match = [c for c in range(2) if np.array_equal(one["image"][0].numpy(), full[c])]
        assert len(match) == 1
        picked.add(match[0])
    assert picked == {0, 1}
    assert both[0]["image"].shape == (2, PATCH, PATCH, PATCH)


def test_size_sampling_follows_voxel_counts(ds):
    sampler = PatchSampler(ds, PATCH, seed=0, sampling="size")
    n = 600
    counts = {c: 0 for c in SHAPES}
    for k in range(n):
        counts[sampler.draw(k)["record"].id] += 1
    sizes = {c: np.prod(s) for c, s in SHAPES.items()}
    total = sum(sizes.values())
    for c in SHAPES:
        expected = n * sizes[c] / total
        assert abs(counts[c] - expected) < 4 * np.sqrt(expected) + 2, (counts, expected)


def test_pickled_sampler_gives_same_items_without_open_handles(ds):
    sampler = PatchSampler(ds, PATCH, seed=8)
    first = sampler[3]
    assert len(sampler._arrays) == 1
    clone = pickle.loads(pickle.dumps(sampler))
    assert len(clone._arrays) == 0
    assert _same(clone[3], first)


def test_open_handles_are_bounded(ds):
    sampler = PatchSampler(ds, PATCH, seed=8, max_open=2, with_labels=True)
    for k in range(12):
        sampler[k]
    assert len(sampler._arrays) <= 2


def test_read_window_on_numpy_matches_padding():
    a = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    w = read_window(a, (-2, 3, 4), (4, 4, 4), (slice(1, 2),), pad_value=-1)
    ref = np.pad(a[1:2], [(0, 0), (2, 0), (0, 1), (0, 1)], constant_values=-1)[:, 0:4, 3:7, 4:8]
    assert w.shape == (1, 4, 4, 4) and np.array_equal(w, ref)
    outside = read_window(a, (10, 0, 0), (3, 3, 3), (), pad_value=2)
    assert outside.shape == (2, 3, 3, 3) and (outside == 2).all()


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _equal_batches(a: list[dict], b: list[dict]) -> bool:
    return all(
        x["case"] == y["case"] and torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
        for x, y in zip(a, b)
    )


def test_loader_independent_of_workers_and_resumable(ds):
    sampler = PatchSampler(ds, PATCH, seed=21, with_labels=True)
    ref = _batches(make_loader(sampler, 4, num_workers=0), 4)
    assert ref[0]["image"].shape == (4, 2, PATCH, PATCH, PATCH) and ref[0]["label"].shape == (4, 1, PATCH, PATCH, PATCH)
    assert ref[1]["index"].tolist() == [4, 5, 6, 7]
    workers = _batches(make_loader(sampler, 4, num_workers=2), 4)
    assert _equal_batches(ref, workers)
    resumed = _batches(make_loader(sampler, 4, num_workers=0, start_batch=2), 2)
    assert _equal_batches(ref[2:], resumed)


def test_ranks_split_the_global_batch(ds):
    sampler = PatchSampler(ds, PATCH, seed=22)
    one = _batches(make_loader(sampler, 4, start_batch=1), 2)
    r0 = _batches(make_loader(sampler, 4, start_batch=1, rank=0, world_size=2), 2)
    r1 = _batches(make_loader(sampler, 4, start_batch=1, rank=1, world_size=2), 2)
    for b in range(2):
        assert torch.equal(torch.cat([r0[b]["image"], r1[b]["image"]]), one[b]["image"])
        assert r0[b]["case"] + r1[b]["case"] == one[b]["case"]


def test_invalid_arguments(ds):
    sampler = PatchSampler(ds, PATCH)
    with pytest.raises(ValueError, match="not divisible by world size"):
        make_loader(sampler, 6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        make_loader(sampler, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="channel_mode"):
        PatchSampler(ds, PATCH, channel_mode="mean")
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler(ds, (16, 16))
    with pytest.raises(KeyError, match="nope"):
        PatchSampler(ds, PATCH, cases=["nope"])
    with pytest.raises(IndexError):
        sampler[-1]


def test_symmetries_and_crop_zscore_options(ds):
    """data.symmetries / data.crop_zscore on the preprocessed path: off = identity (symmetry 0); on = a
    symmetry of the (permuted) window, labels transformed alike, each patch z-scored."""
    from volssl.data.cube_symmetries import invert_symmetry

    plain = PatchSampler(ds, (16, 12, 8), seed=4, foreground_prob=0.5, with_labels=True)
    sym = PatchSampler(ds, (16, 12, 8), seed=4, foreground_prob=0.5, with_labels=True, symmetries=True)
    seen = set()
    for k in range(30):
        a = plain[k]
        assert a["symmetry"] == 0
        b = sym[k]
        d = sym.draw(k)
        assert b["image"].shape == (2, 16, 12, 8) and b["label"].shape == (1, 16, 12, 8)
        w, o = d["window"], np.array(d["origin"])
        full = load_array(ds.image_path(b["case"]))
        pad = 16
        padded = np.pad(full, [(0, 0)] + [(pad, pad)] * 3)
        window = padded[:, o[0] + pad:o[0] + pad + w[0], o[1] + pad:o[1] + pad + w[1], o[2] + pad:o[2] + pad + w[2]]
        np.testing.assert_array_equal(invert_symmetry(b["image"].numpy(), b["symmetry"]), window)
        assert invert_symmetry(b["label"].numpy(), b["symmetry"]).shape == (1, *w)
        seen.add(b["symmetry"])
    assert len(seen) > 15
    z = PatchSampler(ds, 16, seed=4, crop_zscore=True, channel_mode="single")
    for k in range(5):
        x = z[k]["image"].double()
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
