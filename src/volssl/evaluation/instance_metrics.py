"""Instance segmentation metrics (axons, XPRESS challenge): VOI, adapted Rand, expected run length.

Stateless functions on numpy label arrays ``seg`` (the segmentation) and ``gt`` (the reference
instance ids), same shape, any integer dtype; 0 is background. Voxels where ``gt`` is in
``ignore_gt`` (default: 0) are left out of VOI and Rand, as in skimage, waterz, funlib.evaluate
and the XPRESS evaluation; a segmentation id 0 inside a reference object is an ordinary segment.

Definitions (``n_ij`` voxels with ``gt = i`` and ``seg = j``, ``a_i = sum_j n_ij``,
``b_j = sum_i n_ij``, ``N = sum n_ij``, ``p = n / N``)
    * VOI split ``H(seg | gt) = -sum p_ij log2(p_ij / p_i)`` (over-segmentation) and VOI merge
      ``H(gt | seg) = -sum p_ij log2(p_ij / p_j)`` (under-segmentation), in bits; equal to
      ``skimage.metrics.variation_of_information(gt, seg, ignore_labels=ignore_gt)``.
    * Rand split ``= sum n_ij^2 / sum a_i^2``: the fraction of voxel pairs in one reference object
      that one segment holds together (recall-like; 1 = no split). Rand merge
      ``= sum n_ij^2 / sum b_j^2``: the fraction of voxel pairs in one segment that belong to one
      reference object (precision-like; 1 = no merge). These are the XPRESS "Rand split/merge
      (higher better)" scores (funlib.evaluate ``rand_voi`` / waterz). Adapted Rand error
      ``= 1 - 2 sum n_ij^2 / (sum a_i^2 + sum b_j^2)`` (1 - the F-score of the two; SNEMI3D).
      By default a pair is two *distinct* voxels (every sum of squares less ``N``), as in
      ``skimage.metrics.adapted_rand_error``, whose ``(error, prec, rec)`` equal our
      ``(rand_error, rand_split, rand_merge)`` (skimage's "precision" divides by the reference's
      sizes); ``self_pairs=True`` counts a voxel paired with itself too, as funlib/waterz and hence
      the XPRESS evaluation do (differences are O(1 / object size)).
    * Expected run length (ERL; Januszewski et al. 2018, funlib.evaluate ``expected_run_length`` as
      used by the XPRESS evaluation): on reference skeletons (graphs with nodes in voxel
      coordinates), each node takes the segment id under it. An edge is *correct* when both ends
      have the same non-zero id; an edge between different ids is a split, one touching id 0 is
      omitted. A non-zero id under nodes of two or more skeletons is a *merge*: with
      ``merge_penalty="skeleton"`` (funlib/XPRESS, default) every edge of every skeleton it touches
      counts 0, with ``"segment"`` only that segment's edges do. For skeleton ``s`` of length
      ``L_s`` (sum of its edge lengths, in ``spacing`` units) and segment ``m``, the run ``r_sm`` is
      the total length of ``s``'s correct edges with id ``m`` (as in funlib, the edges of one
      segment count as one run even if the segment leaves and re-enters the skeleton);
      ``ERL = sum_s (L_s / L) sum_m r_sm^2 / L_s`` with ``L = sum_s L_s``: the expected length of
      error-free segment found from a random point of the skeletons. ``erl_max`` is the ERL of a
      perfect segmentation (``sum_s L_s^2 / L``), ``erl_normalised = ERL / mean_s L_s`` (XPRESS; a
      perfect segmentation scores ``E[L^2] / E[L]^2 >= 1``, more than 1 for skeletons of unequal
      lengths) and ``erl_fraction = ERL / erl_max`` (in [0, 1], 1 = perfect).
    * XPRESS score ``= (erl_normalised + (rand_split + rand_merge) / 2) / 2`` (higher better), where
      the XPRESS evaluation (github.com/trivoldus28/xray-challenge-eval) computes Rand on the
      skeleton nodes only (:func:`skeleton_rand_voi`), not on dense labels.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
from scipy import ndimage

#: one skeleton: nodes (N, 3) float voxel coordinates (array axes order) and edges (E, 2) int node indices
Skeleton = tuple[np.ndarray, np.ndarray]
Skeletons = Union[Sequence[Skeleton], Mapping[Any, Skeleton], np.ndarray]

MERGE_PENALTIES = ("skeleton", "segment")


def _check_pair(seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seg, gt = np.asarray(seg), np.asarray(gt)
    if seg.shape != gt.shape:
        raise ValueError(f"seg and gt must have the same shape, got {seg.shape} and {gt.shape}")
    for name, a in (("seg", seg), ("gt", gt)):
        if a.dtype.kind not in "iub":
            raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    return seg, gt


def contingency(seg: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlap counts of (gt id, seg id) pairs, voxels with ``gt`` in ``ignore_gt`` left out.

    Returns:
        ``(n_ij, a_i, b_j)`` as int64 arrays: the non-zero pair counts (in no particular order), the
        reference object sizes and the segment sizes (within the counted voxels).
    """
    seg, gt = _check_pair(seg, gt)
    keep = ~np.isin(gt, list(ignore_gt)) if len(ignore_gt) else np.ones(gt.shape, bool)
    g, s = gt[keep].ravel(), seg[keep].ravel()
    if g.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    _, gi = np.unique(g, return_inverse=True)
    s_ids, si = np.unique(s, return_inverse=True)
    key = gi.astype(np.int64).ravel() * np.int64(s_ids.size) + si.astype(np.int64).ravel()
    _, n_ij = np.unique(key, return_counts=True)
    a_i = np.bincount(gi.ravel()).astype(np.int64)
    b_j = np.bincount(si.ravel()).astype(np.int64)
    return n_ij.astype(np.int64), a_i, b_j


def _entropy_terms(counts: np.ndarray, total: float) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def voi(seg: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,)) -> dict[str, float]:
    """Variation of information, split and merge parts (bits; module docstring).

    Returns:
        ``{"voi_split": H(seg|gt), "voi_merge": H(gt|seg), "voi": their sum}``; NaN for both when
        no voxel is counted.
    """
    n_ij, a_i, b_j = contingency(seg, gt, ignore_gt)
    total = float(n_ij.sum())
    if total == 0:
        return {"voi_split": math.nan, "voi_merge": math.nan, "voi": math.nan}
    h_joint = _entropy_terms(n_ij, total)
    split = max(h_joint - _entropy_terms(a_i, total), 0.0)
    merge = max(h_joint - _entropy_terms(b_j, total), 0.0)
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge}


def adapted_rand(
    seg: np.ndarray, gt: np.ndarray, ignore_gt: Sequence[int] = (0,), self_pairs: bool = False
) -> dict[str, float]:
    """Adapted Rand error and the Rand split / merge scores (module docstring).

    Args:
        seg, gt: label arrays of the same shape.
        ignore_gt: reference ids whose voxels are left out (default: background 0).
        self_pairs: count a voxel paired with itself (funlib/waterz/XPRESS) instead of distinct pairs
            only (skimage, SNEMI3D).

    Returns:
        ``{"rand_error", "rand_split", "rand_merge"}``; a score whose pairs are all absent (e.g. every
        reference object a single voxel) is 1, everything is NaN when no voxel is counted.
    """
    n_ij, a_i, b_j = contingency(seg, gt, ignore_gt)
    n = float(n_ij.sum())
    if n == 0:
        return {"rand_error": math.nan, "rand_split": math.nan, "rand_merge": math.nan}
    less = 0.0 if self_pairs else n
    sum_n2 = float(np.dot(n_ij.astype(np.float64), n_ij)) - less
    sum_a2 = float(np.dot(a_i.astype(np.float64), a_i)) - less
    sum_b2 = float(np.dot(b_j.astype(np.float64), b_j)) - less
    split = sum_n2 / sum_a2 if sum_a2 > 0 else 1.0
    merge = sum_n2 / sum_b2 if sum_b2 > 0 else 1.0
    error = 1.0 - 2.0 * sum_n2 / (sum_a2 + sum_b2) if sum_a2 + sum_b2 > 0 else 0.0
    return {"rand_error": error, "rand_split": split, "rand_merge": merge}


# ----------------------------------------------------------------------------------------------
# skeletons


# the 13 "forward" offsets of the 26-neighbourhood (each undirected neighbour pair once)
_FORWARD_26 = [o for o in ((i - 1, j - 1, k - 1) for i, j, k in np.ndindex(3, 3, 3)) if o > (0, 0, 0)]


def voxels_to_graph(coords: np.ndarray) -> Skeleton:
    """A tree over voxel coordinates ``(N, 3)``: the minimum spanning forest (Euclidean edge lengths)
    of their 26-neighbourhood graph, so that a one-voxel-wide curve becomes a chain without the
    diagonal shortcuts that would inflate its length.

    Returns:
        ``(nodes (N, 3) float64, edges (E, 2) int64)``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    n = coords.shape[0]
    if n < 2:
        return coords.astype(np.float64), np.zeros((0, 2), dtype=np.int64)
    lo = coords.min(0)
    local = coords - lo + 1
    index = -np.ones(tuple(local.max(0) + 2), dtype=np.int64)
    index[tuple(local.T)] = np.arange(n)
    rows, cols, weights = [], [], []
    for off in _FORWARD_26:
        other = index[tuple((local + np.array(off)).T)]
        hit = other >= 0
        rows.append(np.flatnonzero(hit))
        cols.append(other[hit])
        weights.append(np.full(int(hit.sum()), math.sqrt(sum(v * v for v in off))))
    r, c, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    tree = minimum_spanning_tree(coo_matrix((w, (r, c)), shape=(n, n)).tocsr()).tocoo()
    edges = np.stack([tree.row, tree.col], axis=1).astype(np.int64)
    return coords.astype(np.float64), edges


def skeleton_graphs(volume: np.ndarray) -> dict[int, Skeleton]:
    """Skeletons drawn as a label volume (each skeleton's voxels carry its non-zero id) as graphs
    (:func:`voxels_to_graph` per id): ``{id: (nodes, edges)}``."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype.kind not in "iub":
        raise ValueError(f"a skeleton volume must be a 3D integer label array, got {volume.dtype} {volume.shape}")
    return {i: voxels_to_graph(np.argwhere(mask) + origin) for i, mask, origin in _instance_masks(volume)}


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, dense)``: ``dense`` (int64, labels' shape) numbers the non-zero ids 1..n in the order of
    ``ids`` (``ids[0] = 0``), for ``ndimage.find_objects``."""
    ids, inverse = np.unique(labels, return_inverse=True)
    dense = inverse.reshape(labels.shape).astype(np.int64)
    if ids.size == 0 or ids[0] != 0:
        dense += 1
        ids = np.concatenate([np.zeros(1, ids.dtype), ids])
    return ids, dense


def _instance_masks(labels: np.ndarray, pad: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(id, mask, origin)`` per non-zero id of ``labels``, in increasing id order: ``mask`` (bool) is
    the id's voxels in its bounding box grown by ``pad`` voxels per side (clipped to the volume),
    ``origin`` (3,) int the box's first voxel, so ``np.argwhere(mask) + origin`` are volume coordinates."""
    ids, dense = _dense_ids(labels)
    for k, box in enumerate(ndimage.find_objects(dense), start=1):
        if box is not None:
            box = tuple(slice(max(0, b.start - pad), b.stop + pad) for b in box)
            yield int(ids[k]), dense[box] == k, np.array([b.start for b in box])


def skeletonize_labels(labels: np.ndarray) -> dict[int, Skeleton]:
    """Reference skeletons of an instance label map (e.g. the axon phantoms): each instance is thinned
    with ``skimage.morphology.skeletonize`` (Lee's 3D method) and its skeleton voxels become a graph
    (:func:`voxels_to_graph`); an instance that thins away entirely keeps one node (its EDT maximum).

    Returns:
        ``{instance id: (nodes (N, 3) voxel coordinates, edges (E, 2))}``.
    """
    from skimage.morphology import skeletonize

    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 3D integer instance map, got {labels.dtype} {labels.shape}")
    out: dict[int, Skeleton] = {}
    for i, mask, origin in _instance_masks(labels, pad=1):
        coords = np.argwhere(skeletonize(mask) & mask)
        if coords.size == 0:
            coords = np.array([ndimage.maximum_position(ndimage.distance_transform_edt(mask))])
        out[i] = voxels_to_graph(coords + origin)
    return out


def _skeleton_list(skeletons: Skeletons, shape: tuple[int, ...]) -> list[Skeleton]:
    if isinstance(skeletons, np.ndarray):
        if skeletons.shape != shape:
            raise ValueError(f"a skeleton volume must have the segmentation's shape {shape}, got {skeletons.shape}")
        return list(skeleton_graphs(skeletons).values())
    items = list(skeletons.values()) if isinstance(skeletons, Mapping) else list(skeletons)
    out = []
    for i, item in enumerate(items):
        try:
            nodes, edges = item
        except (TypeError, ValueError):
            raise ValueError(f"skeleton {i} must be a pair (nodes (N, 3), edges (E, 2))") from None
        nodes = np.asarray(nodes, dtype=np.float64).reshape(-1, len(shape))
        edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        if edges.size and (edges.min() < 0 or edges.max() >= nodes.shape[0]):
            raise ValueError(f"skeleton {i}: edges refer to nodes outside 0..{nodes.shape[0] - 1}")
        out.append((nodes, edges))
    return out


def expected_run_length(
    seg: np.ndarray,
    skeletons: Skeletons,
    spacing: Sequence[float] | None = None,
    merge_penalty: str = "skeleton",
) -> dict[str, float]:
    """Expected run length of ``seg`` on reference skeletons (module docstring).

    Args:
        seg: segmentation ``(X, Y, Z)``, integer ids (0 = background).
        skeletons: a list (or dict) of ``(nodes (N, 3) voxel coordinates in array axis order,
            edges (E, 2) node index pairs)``, one entry per reference object, or a skeleton label
            volume of ``seg``'s shape. Node coordinates are rounded to the nearest voxel; nodes
            outside the volume are dropped with their edges.
        spacing: voxel size per axis for edge lengths (default 1: lengths in voxels).
        merge_penalty: "skeleton" (funlib/XPRESS: a merged skeleton scores 0) or "segment".

    Returns:
        ``{"erl", "erl_max", "erl_normalised", "erl_fraction", "skeleton_length_mean", "skeleton_length_total",
        "n_skeletons", "n_merged_skeletons", "n_split_edges", "n_omitted_edges", "n_nodes_outside"}``
        (lengths in ``spacing`` units; NaN ERLs when no skeleton has an edge).
    """
    seg = np.asarray(seg)
    if seg.dtype.kind not in "iub":
        raise ValueError(f"seg must hold integer ids, got dtype {seg.dtype}")
    if merge_penalty not in MERGE_PENALTIES:
        raise ValueError(f"merge_penalty must be one of {MERGE_PENALTIES}, got {merge_penalty!r}")
    scale = np.ones(seg.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if scale.shape != (seg.ndim,) or not np.all(scale > 0):
        raise ValueError(f"spacing must be {seg.ndim} positive numbers, got {spacing!r}")
    skels = _skeleton_list(skeletons, seg.shape)
    bound = np.array(seg.shape)
    n_outside = 0
    per_skeleton = []  # (node segment ids, edges, edge lengths)
    for nodes, edges in skels:
        idx = np.rint(nodes).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < bound), axis=1)
        n_outside += int((~inside).sum())
        ids = np.zeros(len(nodes), dtype=np.int64)
        if inside.any():
            ids[inside] = seg[tuple(idx[inside].T)].astype(np.int64)
        edges = edges[inside[edges[:, 0]] & inside[edges[:, 1]]] if edges.size else edges
        lengths = np.linalg.norm((nodes[edges[:, 0]] - nodes[edges[:, 1]]) * scale, axis=1) if edges.size else np.zeros(0)
        per_skeleton.append((ids[inside], ids, edges, lengths))
    # segments under nodes of two or more skeletons
    owners: dict[int, set[int]] = {}
    for s, (node_ids, _, _, _) in enumerate(per_skeleton):
        for m in np.unique(node_ids):
            if m != 0:
                owners.setdefault(int(m), set()).add(s)
    merging = {m for m, s in owners.items() if len(s) > 1}
    merged_skeletons = set().union(*(owners[m] for m in merging)) if merging else set()
    lengths_all = np.array([float(p[3].sum()) for p in per_skeleton])
    total = float(lengths_all.sum())
    erl = 0.0
    n_split = n_omitted = 0
    for s, (_, ids, edges, lengths) in enumerate(per_skeleton):
        if not edges.size:
            continue
        u, v = ids[edges[:, 0]], ids[edges[:, 1]]
        omitted = (u == 0) | (v == 0)
        split = ~omitted & (u != v)
        n_omitted += int(omitted.sum())
        n_split += int(split.sum())
        if merge_penalty == "skeleton" and s in merged_skeletons:
            continue
        correct = ~omitted & (u == v)
        if merge_penalty == "segment" and merging:
            correct &= ~np.isin(u, np.fromiter(merging, dtype=np.int64))
        if correct.any():
            _, inv = np.unique(u[correct], return_inverse=True)
            runs = np.bincount(inv.ravel(), weights=lengths[correct])
            erl += float((runs ** 2).sum())
    used = lengths_all[lengths_all > 0]
    mean_len = float(used.mean()) if used.size else math.nan
    if total > 0:
        erl /= total
        erl_max = float((lengths_all ** 2).sum()) / total
    else:
        erl = erl_max = math.nan
    return {
        "erl": erl,
        "erl_max": erl_max,
        "erl_normalised": erl / mean_len if used.size else math.nan,
        "erl_fraction": erl / erl_max if total > 0 else math.nan,
        "skeleton_length_mean": mean_len,
        "skeleton_length_total": total,
        "n_skeletons": int(used.size),
        "n_merged_skeletons": len(merged_skeletons),
        "n_split_edges": n_split,
        "n_omitted_edges": n_omitted,
        "n_nodes_outside": n_outside,
    }


def skeleton_rand_voi(seg: np.ndarray, skeletons: Skeletons) -> dict[str, float]:
    """Rand split / merge and VOI on the skeleton nodes only, as the XPRESS evaluation computes them.

    The reference is the skeletons rasterised at their nodes' voxels (skeleton ``k`` -> id ``k + 1``;
    a voxel shared by nodes of several skeletons keeps one of them), compared with ``seg`` at those
    voxels only; a node on segment id 0 gets an id of its own (XPRESS: an unlabelled node is a split);
    pairs include self-pairs (funlib ``rand_voi``). Boundary voxels of the objects therefore do not
    count, unlike :func:`adapted_rand` on dense labels.

    Returns:
        ``{"rand_split", "rand_merge", "voi_split", "voi_merge"}`` (NaN without nodes inside ``seg``).
    """
    seg = np.asarray(seg)
    skels = _skeleton_list(skeletons, seg.shape)
    bound = np.array(seg.shape)
    lin, ref = [], []
    for k, (nodes, _) in enumerate(skels):
        idx = np.rint(nodes).astype(np.int64)
        idx = idx[np.all((idx >= 0) & (idx < bound), axis=1)]
        lin.append(np.ravel_multi_index(tuple(idx.T), seg.shape) if idx.size else np.zeros(0, np.int64))
        ref.append(np.full(len(lin[-1]), k + 1, dtype=np.int64))
    if not lin or not sum(len(v) for v in lin):
        return {"rand_split": math.nan, "rand_merge": math.nan, "voi_split": math.nan, "voi_merge": math.nan}
    lin_all, ref_all = np.concatenate(lin), np.concatenate(ref)
    voxels, first = np.unique(lin_all, return_index=True)
    ref_ids = ref_all[first]
    seg_ids = seg.ravel()[voxels].astype(np.int64)
    unlabelled = seg_ids == 0
    if unlabelled.any():
        seg_ids = seg_ids.copy()
        seg_ids[unlabelled] = int(seg_ids.max()) + 1 + np.arange(int(unlabelled.sum()))
    out = adapted_rand(seg_ids, ref_ids, ignore_gt=(), self_pairs=True)
    del out["rand_error"]
    out.update({k: v for k, v in voi(seg_ids, ref_ids, ignore_gt=()).items() if k != "voi"})
    return out


def xpress_score(erl_normalised: float, rand_split: float, rand_merge: float) -> float:
    """XPRESS challenge score ``(erl_normalised + (rand_split + rand_merge) / 2) / 2`` (higher better)."""
    return 0.5 * float(erl_normalised) + 0.25 * (float(rand_split) + float(rand_merge))


def evaluate_instances(
    seg: np.ndarray,
    gt: np.ndarray,
    skeletons: Skeletons | None = None,
    spacing: Sequence[float] | None = None,
    ignore_gt: Sequence[int] = (0,),
    self_pairs: bool = False,
    merge_penalty: str = "skeleton",
) -> dict[str, float]:
    """All instance metrics of one case.

    Args:
        seg, gt: segmentation and reference instance ids, same shape.
        skeletons: reference skeletons for ERL (see :func:`expected_run_length`); None: no ERL and no
            XPRESS score. Use ``skeletonize_labels(gt)`` when the reference has no skeletons.
        spacing, merge_penalty: for ERL; ignore_gt, self_pairs: for VOI / Rand.

    Returns:
        ``{"voi_split", "voi_merge", "voi", "rand_error", "rand_split", "rand_merge", "n_gt",
        "n_seg"}`` on the dense labels, plus, with skeletons, the keys of
        :func:`expected_run_length`, the XPRESS-style skeleton scores of :func:`skeleton_rand_voi`
        as ``"xpress_rand_split"``, ``"xpress_rand_merge"``, ``"xpress_voi_split"``,
        ``"xpress_voi_merge"`` and the score ``"xpress"`` from ``erl_normalised`` and those two Rand
        scores (what the XPRESS challenge ranks by). ``n_gt`` / ``n_seg`` count the non-zero ids of
        the reference / segmentation.
    """
    seg, gt = _check_pair(seg, gt)
    out: dict[str, float] = {}
    out.update(voi(seg, gt, ignore_gt))
    out.update(adapted_rand(seg, gt, ignore_gt, self_pairs=self_pairs))
    out["n_gt"] = int(np.count_nonzero(np.unique(gt)))
    out["n_seg"] = int(np.count_nonzero(np.unique(seg)))
    if skeletons is not None:
        skels = _skeleton_list(skeletons, seg.shape)
        out.update(expected_run_length(seg, skels, spacing=spacing, merge_penalty=merge_penalty))
        out.update({f"xpress_{k}": v for k, v in skeleton_rand_voi(seg, skels).items()})
        out["xpress"] = xpress_score(out["erl_normalised"], out["xpress_rand_split"], out["xpress_rand_merge"])
    return out
