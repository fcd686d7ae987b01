"""Watershed fragments, waterz agglomeration on hand-made cases, blockwise = whole-volume segmentation."""
import numpy as np
import pytest
from scipy import ndimage

from volssl.data.phantoms import axons_case
from volssl.evaluation.instance_metrics import voi
from volssl.finetuning.affinities import affinity_targets
from volssl.inference.agglomerate import agglomerate, fragments, segment, segment_blockwise

NN = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]


def _partition(seg: np.ndarray) -> set[frozenset]:
    """The labelling as a set of voxel sets (ids do not matter), background left out."""
    flat = seg.ravel()
    return {frozenset(np.flatnonzero(flat == i).tolist()) for i in np.unique(flat) if i != 0}


def _hand_made():
    """(12, 14, 6): cubes A (x 0-5) and B (x 6-11) touch at x 5|6 for y 0-5 (interface affinity 0.2:
    score 0.8); object C (y 8-13) is one object with a weak seam at x 5|6 (affinity 0.55: score
    0.45); y 6-7 background. Fragments A, B, C1 (x 0-5), C2 (x 6-11)."""
    gt = np.zeros((12, 14, 6), np.int64)
    gt[:6, :6] = 1
    gt[6:, :6] = 2
    gt[:, 8:] = 3
    affs, _ = affinity_targets(gt, NN)
    affs[0, 6, :6] = 0.2
    affs[0, 6, 8:] = 0.55
    frag = np.zeros(gt.shape, np.uint64)
    frag[:6, :6], frag[6:, :6], frag[:6, 8:], frag[6:, 8:] = 1, 2, 3, 4
    return affs, frag


def _ids(seg, frag):
    """Segment id of each fragment 1..4 (each fragment must lie in one segment)."""
    out = []
    for f in range(1, 5):
        ids = np.unique(seg[frag == f])
        assert ids.size == 1 and ids[0] != 0
        out.append(int(ids[0]))
    return out


def test_agglomeration_known_answer():
    affs, frag = _hand_made()
    before = frag.copy()
    result = agglomerate(affs, frag, [0.9, 0.3, 0.5, 0.79, 0.81])
    assert list(result) == [0.9, 0.3, 0.5, 0.79, 0.81]  # the order asked for
    np.testing.assert_array_equal(frag, before)  # waterz writes into its input: we pass a copy
    a, b, c1, c2 = _ids(result[0.3], frag)
    assert len({a, b, c1, c2}) == 4  # below the seam score (0.45) everything stays split
    for t in (0.5, 0.79):  # above the seam, below the interface (0.8)
        a, b, c1, c2 = _ids(result[t], frag)
        assert c1 == c2 and len({a, b, c1}) == 3
    for t in (0.81, 0.9):  # above the interface score: the cubes merge too
        a, b, c1, c2 = _ids(result[t], frag)
        assert a == b and c1 == c2 and a != c1
    for seg in result.values():
        assert seg.dtype == np.uint64 and (seg[frag == 0] == 0).all()


def test_agglomerate_keeps_large_fragment_ids():
    affs, frag = _hand_made()
    big = frag.astype(np.uint64) * np.uint64(10**12)
    seg = agglomerate(affs, big, 0.5)[0.5]
    assert set(np.unique(seg).tolist()) <= set(np.unique(big).tolist())
    assert _partition(seg) == _partition(agglomerate(affs, frag, 0.5)[0.5])


def test_agglomerate_validation():
    affs, frag = _hand_made()
    with pytest.raises(ValueError, match="C >= 3"):
        agglomerate(affs[:2], frag, 0.5)
    with pytest.raises(ValueError, match="spatial shape"):
        agglomerate(affs, frag[:-1], 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        agglomerate(affs, frag, [])


def test_fragments_separate_objects_and_seed_every_component():
    gt = np.zeros((20, 20, 12), np.int64)
    gt[1:12, 1:12, 1:11] = 1  # a big cube
    gt[13:16, 1:4, 1:4] = 2  # a small one 1 voxel away: its EDT maxima lose to the big cube's
    gt[1:12, 14:19, 2:10] = 3
    affs, _ = affinity_targets(gt, NN)
    frag = fragments(affs, seed_window=9)
    assert frag.dtype == np.uint64 and frag.shape == gt.shape
    ids = np.unique(frag)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0 then consecutive
    assert (frag[gt == 0] == 0).all()
    for f in ids[1:]:  # no fragment crosses objects
        assert np.unique(gt[frag == f]).size == 1
    for k in (1, 2, 3):  # every object has fragments
        assert (frag[gt == k] > 0).any()
    # only voxels with at most one "outside" backward neighbour are in the mask (mean affinity > 0.5)
    mean = affs.mean(0)
    np.testing.assert_array_equal(frag > 0, mean > 0.5)


def test_segment_recovers_objects_from_perfect_affinities():
    gt = axons_case(np.random.default_rng(3), (40, 40, 40)).label.astype(np.int64)
    affs, _ = affinity_targets(gt, NN)
    seg = segment(affs, [0.5, 0.7])
    for t in (0.5, 0.7):
        s = seg[t]
        both = (s > 0) & (gt > 0)
        assert (s[gt == 0] == 0).all()
        parts = voi(s[both], gt[both])
        assert parts["voi_split"] < 1e-9 and parts["voi_merge"] < 1e-9


class _Recorder:
    """Array-like that records the size of every read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(out.shape)
        return out


def _noisy_affinities(seed: int, shape):
    rng = np.random.default_rng(seed)
    gt = axons_case(rng, shape).label.astype(np.int64)
    affs, _ = affinity_targets(gt, NN)
    noisy = ndimage.gaussian_filter(affs, (0, 1, 1, 1)) + rng.normal(0, 0.1, affs.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


def test_blockwise_equals_whole_volume(tmp_path):
    import zarr

    affs = _noisy_affinities(0, (40, 40, 40))
    whole = segment(affs, [0.5, 0.7])
    out_np = np.zeros(affs.shape[1:], np.uint64)
    out_zarr = zarr.create_array(str(tmp_path / "seg.zarr"), shape=affs.shape[1:], chunks=(16, 16, 16), dtype="uint64")
    source = _Recorder(affs)
    counts = segment_blockwise(source, [out_np, out_zarr], [0.5, 0.7], block=16, overlap=8)
    # never more than one block with its context in memory (16 + 2 * 8 per axis, 3 channels)
    assert max(int(np.prod(r)) for r in source.reads) <= 3 * 32 ** 3
    for t, out in ((0.5, out_np), (0.7, np.asarray(out_zarr[...]))):
        # identical up to relabelling (VOI both ways 0 up to rounding; we allow 1e-9 bits)
        a, b = voi(out, whole[t], ignore_gt=()), voi(whole[t], out, ignore_gt=())
        assert a["voi"] < 1e-9 and b["voi"] < 1e-9
        assert counts[t] == np.unique(out).size - 1
        ids = np.unique(out)
        np.testing.assert_array_equal(ids, np.arange(ids.size))  # consecutive ids


def test_blockwise_validation():
    affs = np.ones((3, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="one array per threshold"):
        segment_blockwise(affs, np.zeros((8, 8, 8), np.uint64), [0.5, 0.6])
    with pytest.raises(ValueError, match="spatial shape"):
        segment_blockwise(affs, np.zeros((8, 8, 7), np.uint64), 0.5)
    with pytest.raises(ValueError, match="integer dtype"):
        segment_blockwise(affs, np.zeros((8, 8, 8), np.float32), 0.5)
    with pytest.raises(ValueError, match="block"):
        segment_blockwise(affs, np.zeros((8, 8, 8), np.uint64), 0.5, block=0)
