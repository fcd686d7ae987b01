import numpy as np
import pytest
import torch

from volssl.data.cube_symmetries import (
    CUBE_SYMMETRIES, N_SYMMETRIES, apply_symmetry, compose, inverse_index, invert_symmetry, source_shape,
    symmetry_matrix,
)


def _cube(n=5, seed=0):
    return np.random.default_rng(seed).standard_normal((2, n, n, n)).astype(np.float32)


def test_table_is_48_perm_flip_pairs_identity_first():
    assert N_SYMMETRIES == 48 and len(set(CUBE_SYMMETRIES)) == 48
    assert CUBE_SYMMETRIES[0] == ((0, 1, 2), (False, False, False))
    assert {p for p, _ in CUBE_SYMMETRIES} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    x = _cube()
    assert np.array_equal(apply_symmetry(x, 0), x)


def test_48_distinct_results_on_a_random_cube():
    x = _cube()
    outs = {np.ascontiguousarray(apply_symmetry(x, i)).tobytes() for i in range(48)}
    assert len(outs) == 48
    # each is a rearrangement of the same voxels
    for i in range(48):
        assert np.array_equal(np.sort(apply_symmetry(x, i), axis=None), np.sort(x, axis=None))


def test_known_symmetry_explicitly():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    i = CUBE_SYMMETRIES.index(((2, 0, 1), (True, False, False)))
    expected = np.flip(x.transpose(2, 0, 1), 0)
    assert np.array_equal(apply_symmetry(x, i), expected)
    assert apply_symmetry(x, i).shape == (4, 2, 3)


@pytest.mark.parametrize("as_torch", [False, True])
def test_inverse_round_trip(as_torch):
    x = _cube()
    if as_torch:
        x = torch.from_numpy(x)
    for i in range(48):
        y = apply_symmetry(x, i)
        back = invert_symmetry(y, i)
        again = apply_symmetry(y, inverse_index(i))
        if as_torch:
            assert isinstance(back, torch.Tensor)
            assert torch.equal(back, x) and torch.equal(again, x)
        else:
            assert np.array_equal(back, x) and np.array_equal(again, x)


def test_torch_and_numpy_agree_and_3d_input():
    x = _cube()[0]
    for i in (1, 13, 47):
        assert np.array_equal(apply_symmetry(torch.from_numpy(x), i).numpy(), apply_symmetry(x, i))


def test_group_closure_matches_composition():
    x = _cube(seed=1)
    for a in range(48):
        for b in range(0, 48, 5):
            k = compose(a, b)
            assert 0 <= k < 48
            assert np.array_equal(apply_symmetry(apply_symmetry(x, a), b), apply_symmetry(x, k))
    # closure as a set: products of all pairs are exactly the 48 elements
    assert {compose(a, b) for a in range(48) for b in range(48)} == set(range(48))
    assert all(compose(a, inverse_index(a)) == 0 for a in range(48))


def test_matrix_is_signed_permutation_with_det_pm1():
    dets = [round(np.linalg.det(symmetry_matrix(i))) for i in range(48)]
    assert sorted(set(dets)) == [-1, 1] and dets.count(1) == 24  # 24 rotations, 24 reflections


def test_source_shape_gives_requested_output_shape():
    want = (6, 4, 3)
    x_full = np.zeros((8, 8, 8))
    for i in range(48):
        w = source_shape(want, i)
        assert sorted(w) == sorted(want)
        assert apply_symmetry(x_full[: w[0], : w[1], : w[2]], i).shape == want


def test_errors():
    with pytest.raises(ValueError, match="index"):
        apply_symmetry(_cube(), 48)
    with pytest.raises(ValueError, match="index"):
        apply_symmetry(_cube(), -1)
    with pytest.raises(ValueError, match="at least 3"):
        apply_symmetry(np.zeros((4, 4)), 1)
    with pytest.raises(ValueError, match="3 entries"):
        source_shape((4, 4), 0)
