"""VOI and adapted Rand against scikit-image and waterz; ERL on hand-made skeletons; skeletonisation."""
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error, variation_of_information

from volssl.data.phantoms import axons_case
from volssl.evaluation.instance_metrics import (
    adapted_rand,
    evaluate_instances,
    expected_run_length,
    skeleton_graphs,
    skeleton_rand_voi,
    skeletonize_labels,
    voi,
    voxels_to_graph,
    xpress_score,
)


def _random_pair(rng, shape=(20, 18, 16)):
    """A blob instance map and a perturbed segmentation of it (splits, merges, shifts, noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal((6, *shape)), sigma=(0, 2, 2, 2))
    gt = field.argmax(0).astype(np.int32)  # 0..5, 0 = background
    seg = np.roll(gt, 1, axis=0).astype(np.int64) * 3  # shifted, renamed (0, 3, 6, ..., 15)
    half = seg[:, : shape[1] // 2]
    half[half == 3] = 4  # split object 1
    seg[seg == 15] = 12  # merge objects 4 and 5
    noise = rng.random(shape) < 0.02
    seg[noise] = rng.integers(0, 20, int(noise.sum()))
    return seg, gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_rand_equal_skimage_on_random_cases(seed):
    seg, gt = _random_pair(np.random.default_rng(seed))
    for ignore in ((0,), ()):
        ours = voi(seg, gt, ignore_gt=ignore)
        split, merge = variation_of_information(gt, seg, ignore_labels=list(ignore))
        assert ours["voi_split"] == pytest.approx(split, abs=1e-10)
        assert ours["voi_merge"] == pytest.approx(merge, abs=1e-10)
    r = adapted_rand(seg, gt)
    are, prec, rec = adapted_rand_error(gt, seg)
    assert r["rand_error"] == pytest.approx(are, abs=1e-12)
    assert r["rand_split"] == pytest.approx(prec, abs=1e-12)  # skimage's "precision" divides by the gt sizes
    assert r["rand_merge"] == pytest.approx(rec, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_self_pair_rand_and_voi_equal_waterz(seed):
    import waterz

    from volssl.inference.agglomerate import quiet_stdout

    seg, gt = _random_pair(np.random.default_rng(seed))
    with quiet_stdout():
        ref = waterz.evaluate(np.ascontiguousarray(seg, dtype=np.uint64), np.ascontiguousarray(gt, dtype=np.uint64))
    r = adapted_rand(seg, gt, self_pairs=True)
    v = voi(seg, gt)
    assert r["rand_split"] == pytest.approx(ref["rand_split"], rel=1e-9)
    assert r["rand_merge"] == pytest.approx(ref["rand_merge"], rel=1e-9)
    assert v["voi_split"] == pytest.approx(ref["voi_split"], abs=1e-9)
    assert v["voi_merge"] == pytest.approx(ref["voi_merge"], abs=1e-9)


def test_hand_made_split_and_merge():
    gt = np.zeros((8, 4, 4), np.int64)
    gt[:4], gt[4:] = 1, 2
    perfect = gt * 7  # renamed
    assert voi(perfect, gt)["voi"] == 0.0
    assert adapted_rand(perfect, gt) == {"rand_error": 0.0, "rand_split": 1.0, "rand_merge": 1.0}
    split = gt.copy()
    split[:2] = 5  # object 1 cut in two halves
    v, r = voi(split, gt), adapted_rand(split, gt)
    assert v["voi_split"] == pytest.approx(0.5) and v["voi_merge"] == 0.0  # half the voxels: 1 bit
    assert r["rand_merge"] == 1.0 and r["rand_split"] < 1.0
    merged = np.ones_like(gt)
    v, r = voi(merged, gt), adapted_rand(merged, gt)
    assert v["voi_merge"] == pytest.approx(1.0) and v["voi_split"] == 0.0
    assert r["rand_split"] == 1.0 and r["rand_merge"] < 1.0
    # skimage agrees on the hand-made cases too
    for s in (split, merged):
        are, prec, rec = adapted_rand_error(gt, s)
        assert adapted_rand(s, gt)["rand_error"] == pytest.approx(are)
        np.testing.assert_allclose(variation_of_information(gt, s, ignore_labels=[0]),
                                   [voi(s, gt)["voi_split"], voi(s, gt)["voi_merge"]], atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        voi(gt[:-1], gt)


def _line(y=2, z=2, n=11, x0=0):
    nodes = np.array([[x0 + i, y, z] for i in range(n)], np.float64)
    edges = np.array([[i, i + 1] for i in range(n - 1)])
    return nodes, edges


def test_erl_straight_skeleton_perfect_split_merge():
    seg = np.zeros((12, 10, 5), np.int64)
    seg[:, :5] = 1
    skel = _line()
    perfect = expected_run_length(seg, [skel])
    assert perfect["erl"] == pytest.approx(10.0) and perfect["erl_max"] == pytest.approx(10.0)
    assert perfect["erl_normalised"] == pytest.approx(1.0) and perfect["erl_fraction"] == pytest.approx(1.0)
    # split in the middle: runs of 5 and 4 voxels (the edge across the cut is lost): (25 + 16) / 10
    split = seg.copy()
    split[6:, :5] = 2
    r = expected_run_length(split, [skel])
    assert r["erl"] == pytest.approx(4.1) and r["n_split_edges"] == 1
    # the same with anisotropic voxels: lengths scale, the normalised ERL does not
    r2 = expected_run_length(split, [skel], spacing=(2.0, 1.0, 1.0))
    assert r2["erl"] == pytest.approx(8.2) and r2["erl_normalised"] == pytest.approx(r["erl_normalised"])
    # merge: a second skeleton (y = 7) in the same segment -> both score 0
    merged = seg.copy()
    merged[:, 5:] = 1
    other = _line(y=7)
    m = expected_run_length(merged, [skel, other])
    assert m["erl"] == 0.0 and m["n_merged_skeletons"] == 2
    # same skeletons, separate segments: full length each
    sep = seg.copy()
    sep[:, 5:] = 3
    assert expected_run_length(sep, [skel, other])["erl"] == pytest.approx(10.0)
    # merge_penalty="segment": a skeleton keeps its runs on segments that merge nothing
    part = merged.copy()
    part[6:, :5] = 4  # second half of skeleton 1 on its own segment
    seg_mode = expected_run_length(part, [skel, other], merge_penalty="segment")
    assert seg_mode["erl"] == pytest.approx(16 / 20)  # only the 4-long run of skeleton 1 counts
    assert expected_run_length(part, [skel, other])["erl"] == 0.0


def test_erl_background_nodes_and_outside_nodes():
    seg = np.zeros((12, 10, 5), np.int64)
    seg[:, :5] = 1
    seg[5, 2, 2] = 0  # a hole under node 5: edges 4-5 and 5-6 omitted
    r = expected_run_length(seg, [_line()])
    # funlib's convention: the correct edges of one segment form one run, across the hole: 8^2 / 10
    assert r["n_omitted_edges"] == 2 and r["erl"] == pytest.approx(64 / 10)
    # nodes beyond the volume are dropped with their edges
    r = expected_run_length(seg[:8], [_line()])
    assert r["n_nodes_outside"] == 3 and r["skeleton_length_total"] == pytest.approx(7.0)
    with pytest.raises(ValueError, match="merge_penalty"):
        expected_run_length(seg, [_line()], merge_penalty="all")


def test_voxels_to_graph_has_no_diagonal_shortcuts():
    # an L: (0,0,0) - (1,0,0) - (1,1,0); the 26-graph has a sqrt(2) shortcut the tree must drop
    nodes, edges = voxels_to_graph(np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0]]))
    lengths = np.linalg.norm(nodes[edges[:, 0]] - nodes[edges[:, 1]], axis=1)
    assert len(edges) == 2 and lengths.sum() == pytest.approx(2.0)
    # a diagonal line keeps its diagonal steps
    nodes, edges = voxels_to_graph(np.array([[i, i, 0] for i in range(5)]))
    lengths = np.linalg.norm(nodes[edges[:, 0]] - nodes[edges[:, 1]], axis=1)
    assert lengths.sum() == pytest.approx(4 * math.sqrt(2))


def test_skeleton_volume_and_skeletonize_labels():
    vol = np.zeros((12, 10, 5), np.uint8)
    vol[0:11, 2, 2] = 1
    vol[0:11, 7, 2] = 2
    graphs = skeleton_graphs(vol)
    assert sorted(graphs) == [1, 2]
    seg = np.zeros(vol.shape, np.int64)
    seg[:, :5], seg[:, 5:] = 1, 2
    assert expected_run_length(seg, vol)["erl"] == pytest.approx(10.0)  # a skeleton volume works too
    # a straight tube thins to its centre line, about as long as the tube
    tube = np.zeros((30, 11, 11), np.int32)
    zz, yy = np.mgrid[:11, :11]
    tube[2:28][:, (yy - 5) ** 2 + (zz - 5) ** 2 <= 9] = 4
    skel = skeletonize_labels(tube)
    assert list(skel) == [4]
    nodes, edges = skel[4]
    assert len(edges) == len(nodes) - 1
    length = np.linalg.norm(nodes[edges[:, 0]] - nodes[edges[:, 1]], axis=1).sum()
    assert 20 <= length <= 26
    assert (tube[tuple(nodes.astype(int).T)] == 4).all()


def test_xpress_score_and_skeleton_rand():
    assert xpress_score(0.8, 0.9, 0.7) == pytest.approx(0.8)
    seg = np.zeros((12, 10, 5), np.int64)
    seg[:, :5] = 1
    seg[:, 5:] = 2
    two = [_line(), _line(y=7)]
    r = skeleton_rand_voi(seg, two)
    assert r["rand_split"] == 1.0 and r["rand_merge"] == 1.0 and r["voi_split"] == 0.0
    # an unlabelled node is a split of its own, not a merge of the skeletons
    holed = seg.copy()
    holed[3, 2, 2] = 0
    holed[3, 7, 2] = 0
    r = skeleton_rand_voi(holed, two)
    assert r["rand_merge"] == 1.0 and r["rand_split"] < 1.0
    # 11 nodes per skeleton: 10 on the segment, 1 alone -> (100 + 1) / 121 per skeleton
    assert r["rand_split"] == pytest.approx(101 / 121)


def test_evaluate_instances_on_a_phantom():
    gt = axons_case(np.random.default_rng(5), (40, 40, 40)).label.astype(np.int64)
    skel = skeletonize_labels(gt)
    assert len(skel) == np.unique(gt).size - 1
    m = evaluate_instances(gt * 3, gt, skel)
    assert m["voi"] == 0.0 and m["rand_error"] == 0.0 and m["n_gt"] == m["n_seg"]
    assert m["erl_fraction"] == pytest.approx(1.0) and m["n_split_edges"] == 0
    assert m["xpress_rand_split"] == 1.0 and m["xpress_rand_merge"] == 1.0
    assert m["xpress"] == pytest.approx(0.5 * m["erl_normalised"] + 0.5)
    # merging everything: ERL drops to 0 (every skeleton merged), Rand merge drops
    bad = evaluate_instances((gt > 0).astype(np.int64), gt, skel)
    assert bad["erl"] == 0.0 and bad["rand_merge"] < 0.5 and bad["xpress"] < m["xpress"]
    assert "erl" not in evaluate_instances(gt, gt)
