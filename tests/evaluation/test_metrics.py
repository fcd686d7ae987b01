"""Dice and NSD against MONAI 1.6 (compute_dice, compute_surface_dice) and the empty-class conventions."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_surface_dice
from scipy import ndimage

from volssl.evaluation.metrics import case_metrics, dice, normalized_surface_distance, surface

# MONAI warns about its own deprecated argument and about empty classes (tested on purpose)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:the (ground truth|prediction) of class")


def _blobs(rng: np.random.Generator, shape, n_classes: int) -> np.ndarray:
    """Label map of smooth random blobs: classes 1..n_classes, background 0."""
    field = ndimage.gaussian_filter(rng.standard_normal((n_classes + 1, *shape)), sigma=(0, 3, 3, 2))
    field[0] += 0.08  # background wins most voxels
    return field.argmax(0).astype(np.int16)


def _perturb(rng: np.random.Generator, ref: np.ndarray) -> np.ndarray:
    """A plausible prediction: shifted, with a few classes grown/shrunk and salt noise."""
    pred = np.roll(ref, shift=tuple(int(s) for s in rng.integers(-2, 3, size=ref.ndim)), axis=tuple(range(ref.ndim)))
    pred = pred.copy()
    for c in np.unique(ref)[1:]:
        m = pred == c
        if rng.random() < 0.5:
            pred[ndimage.binary_dilation(m) & (pred == 0)] = c
        else:
            pred[m & ~ndimage.binary_erosion(m)] = 0
    noise = rng.random(ref.shape) < 0.003
    pred[noise] = rng.integers(0, ref.max() + 1, size=int(noise.sum()))
    return pred


def _onehot(seg: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([seg == c for c in range(n + 1)])[None].astype(np.float32))


@pytest.mark.parametrize("seed,spacing,tolerance", [
    (0, (0.8, 1.3, 2.1), 1.0),
    (1, (1.0, 1.0, 1.0), 1.0),  # many distances exactly at the tolerance
    (2, (0.45, 0.45, 3.0), 2.5),
    (3, (1.7, 0.6, 0.9), 0.5),
])
def test_agrees_with_monai(seed, spacing, tolerance):
    rng = np.random.default_rng(seed)
    n = 3
    ref = _blobs(rng, (34, 30, 22), n)
    pred = _perturb(rng, ref)
    labels = list(range(1, n + 1))
    assert all((ref == c).any() and (pred == c).any() for c in labels)

    y_pred, y = _onehot(pred, n), _onehot(ref, n)
    monai_dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False)[0].numpy()
    monai_nsd = compute_surface_dice(y_pred, y, class_thresholds=[tolerance] * n, include_background=False,
                                     spacing=list(spacing))[0].numpy()
    ours = case_metrics(pred, ref, labels, spacing, tolerance)
    for i, c in enumerate(labels):
        assert abs(ours[i][0] - monai_dice[i]) < 1e-6
        assert abs(ours[i][1] - monai_nsd[i]) < 1e-6
        assert ours[i][0] == dice(pred, ref, c)
        assert ours[i][1] == normalized_surface_distance(pred, ref, c, spacing, tolerance)
    # not trivially perfect: the test would catch a wrong surface or distance
    assert all(0.0 < d < 1.0 for d, _ in ours) and all(0.0 < s < 1.0 for _, s in ours)


def test_agrees_with_monai_on_objects_touching_the_border():
    rng = np.random.default_rng(7)
    ref = np.zeros((20, 18, 16), np.uint8)
    ref[:9, 3:12, 5:] = 1
    ref[12:, 10:, :6] = 2
    pred = _perturb(rng, ref)
    spacing, tol = (0.9, 1.1, 1.6), 1.2
    y_pred, y = _onehot(pred, 2), _onehot(ref, 2)
    monai_nsd = compute_surface_dice(y_pred, y, class_thresholds=[tol] * 2, spacing=list(spacing))[0].numpy()
    ours = case_metrics(pred, ref, [1, 2], spacing, tol)
    assert np.allclose([s for _, s in ours], monai_nsd, atol=1e-6, rtol=0)


def test_tolerance_counts_boundary_voxels_at_known_distances():
    # two slabs one voxel apart along z (3 mm): surfaces 3 mm apart on their facing sides
    ref = np.zeros((6, 6, 10), np.uint8)
    ref[:, :, :5] = 1
    pred = np.zeros_like(ref)
    pred[:, :, :6] = 1
    spacing = (1.0, 1.0, 3.0)
    assert normalized_surface_distance(pred, ref, 1, spacing, 3.0) == 1.0
    below = normalized_surface_distance(pred, ref, 1, spacing, 2.9)
    assert 0.0 < below < 1.0
    assert dice(pred, ref, 1) == pytest.approx(2 * 180 / (180 + 216))


def test_surface_is_the_face_connected_boundary():
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    s = surface(m)
    assert s.sum() == 26 and not s[2, 2, 2]
    full = np.ones((3, 3, 3), bool)  # the array border is a boundary
    assert surface(full).sum() == 26


def test_empty_class_conventions():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    empty = np.zeros_like(ref)
    sp = (1.0, 1.0, 1.0)
    # absent from both: NaN (excluded from means) or the chosen empty_score
    assert math.isnan(dice(empty, empty, 1)) and math.isnan(normalized_surface_distance(empty, empty, 1, sp, 1.0))
    assert dice(empty, empty, 1, empty_score=1.0) == 1.0
    assert normalized_surface_distance(empty, empty, 1, sp, 1.0, empty_score=1.0) == 1.0
    # present in one map only: 0 (missed structure, or false positive)
    for p, r in ((empty, ref), (ref, empty)):
        assert dice(p, r, 1) == 0.0 and normalized_surface_distance(p, r, 1, sp, 5.0) == 0.0
    # MONAI: same NSD conventions; Dice 1 for both empty with ignore_empty=False
    y0, y1 = _onehot(empty, 1), _onehot(ref, 1)
    assert math.isnan(float(compute_surface_dice(y0, y0, [1.0])[0, 0]))
    assert float(compute_surface_dice(y0, y1, [1.0])[0, 0]) == 0.0
    assert float(compute_dice(y0, y0, include_background=False, ignore_empty=False)[0, 0]) == 1.0


def test_regions_are_scored_as_unions():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4] = 1
    ref[4:6] = 2
    pred = np.zeros_like(ref)
    pred[1:6] = 2  # wrong sub-labels, right union
    assert dice(pred, ref, (1, 2)) == 1.0
    assert normalized_surface_distance(pred, ref, (1, 2), (1, 1, 1), 0.0) == 1.0
    assert dice(pred, ref, 1) == 0.0


def test_bad_arguments_are_clear_errors():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 4, 5), np.uint8), 1)
    with pytest.raises(ValueError, match="spacing_mm needs 3"):
        normalized_surface_distance(a, a, 1, (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="tolerance_mm"):
        normalized_surface_distance(a, a, 1, (1.0, 1.0, 1.0), -1.0)
