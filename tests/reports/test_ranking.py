"""Average ranks (the S3D paper's Table 3) and bootstrapped rank stability (its Fig. 3)."""
import numpy as np
import pytest

from volssl.reports.ranking import average_ranks, bootstrap_ranks, dataset_ranks, rank_rows

# S3D paper, Table 3, Dice per test dataset (rows D1..D11) for the methods in this order; its
# "Avg. Rank" row is 4.64 4.55 6.27 4.36 3.18 2.00 3.00
PAPER_METHODS = ["No (Dyn.)", "No (Fixed)", "VoCo", "VF", "MG", "S3D-B", "S3D-L"]
PAPER_DICE = """57.81 59.82 59.70 59.29 58.64 60.35 59.85
63.66 56.53 56.25 61.01 65.39 65.24 64.81
89.18 89.24 88.78 89.03 89.38 89.60 89.34
63.28 65.52 62.97 65.76 65.93 66.95 64.58
85.64 83.44 83.07 84.24 83.91 84.08 84.02
60.28 78.17 77.40 80.09 79.67 80.00 80.01
77.94 79.44 78.14 78.96 78.85 79.70 79.89
59.00 61.85 57.47 61.49 62.52 62.11 61.93
66.73 65.90 67.65 63.34 68.00 68.62 67.94
93.07 92.51 91.97 92.16 92.36 92.19 92.90
46.76 41.97 40.16 44.96 45.48 47.26 44.15"""


def test_reproduces_the_papers_average_ranks():
    rows = [list(map(float, line.split())) for line in PAPER_DICE.splitlines()]
    table = {m: {f"D{i + 1}": rows[i][j] for i in range(len(rows))} for j, m in enumerate(PAPER_METHODS)}
    ranks = average_ranks(table)
    assert [round(ranks[m], 2) for m in PAPER_METHODS] == [4.64, 4.55, 6.27, 4.36, 3.18, 2.00, 3.00]


def test_ties_share_the_average_rank():
    table = {"A": {"d1": 0.9, "d2": 0.5}, "B": {"d1": 0.9, "d2": 0.7}, "C": {"d1": 0.8, "d2": 0.7}}
    assert dataset_ranks(table) == {"A": {"d1": 1.5, "d2": 3.0}, "B": {"d1": 1.5, "d2": 1.5},
                                    "C": {"d1": 3.0, "d2": 1.5}}
    assert average_ranks(table) == {"A": 2.25, "B": 1.5, "C": 2.25}
    assert average_ranks(table, higher_is_better=False) == {"A": 1.75, "B": 2.5, "C": 1.75}
    assert list(rank_rows(np.array([0.3, np.nan, 0.9]))) == [2.0, 3.0, 1.0]  # NaN ranks last


def test_missing_scores_are_an_error():
    with pytest.raises(ValueError, match="B/d2"):
        average_ranks({"A": {"d1": 1.0, "d2": 1.0}, "B": {"d1": 1.0}})


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for d, n in (("d1", 12), ("d2", 7)):
        base = rng.random(n)
        out[d] = {m: np.clip(base + rng.normal(0, 0.1, n) + shift, 0, 1)
                  for m, shift in (("a", 0.0), ("b", 0.02), ("c", 0.03))}
    return out


def test_bootstrap_is_reproducible_per_seed():
    s = _scores()
    r1, r2, r3 = bootstrap_ranks(s, 200, seed=5), bootstrap_ranks(s, 200, seed=5), bootstrap_ranks(s, 200, seed=6)
    assert np.array_equal(r1.dataset_ranks, r2.dataset_ranks) and np.array_equal(r1.aggregated, r2.aggregated)
    assert not np.array_equal(r1.dataset_ranks, r3.dataset_ranks)
    assert r1.dataset_ranks.shape == (200, 2, 3) and r1.aggregated.shape == (200, 3)
    # every sample is a ranking: ranks of M methods sum to M (M + 1) / 2
    assert np.allclose(r1.dataset_ranks.sum(-1), 6) and np.allclose(r1.aggregated.sum(-1), 6)
    freq = r1.frequencies()
    assert all(abs(sum(f.values()) - 1) < 1e-12 for f in freq.values())


def test_bootstrap_matches_a_plain_loop():
    s = _scores(1)
    n_boot, seed = 50, 3
    res = bootstrap_ranks(s, n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    expected = np.empty((n_boot, 2, 3))
    for i, d in enumerate(s):
        n = len(s[d]["a"])
        idx = rng.integers(0, n, size=(n_boot, n))
        for b in range(n_boot):
            means = [s[d][m][idx[b]].mean() for m in ("a", "b", "c")]
            order = np.argsort(-np.array(means))
            expected[b, i, order] = [1, 2, 3]  # no ties with continuous scores
    assert np.array_equal(res.dataset_ranks, expected)
    assert np.allclose(res.mean_rank, expected.mean(1))


def test_one_method_always_best_is_rank_one_in_every_sample():
    s = _scores(2)
    for d in s:
        s[d]["best"] = np.max([s[d][m] for m in ("a", "b", "c")], axis=0) + 0.01
    res = bootstrap_ranks(s, 300, seed=0)
    j = res.methods.index("best")
    assert np.all(res.dataset_ranks[:, :, j] == 1) and np.all(res.aggregated[:, j] == 1)
    assert res.frequencies("d2")["best"] == {1.0: 1.0}


def test_nan_case_scores_are_left_out_of_the_means():
    a = np.ones(8)
    a[1] = np.nan  # a sample drawing only this case has probability 8^-8
    s = {"d": {"a": a, "b": np.full(8, 0.9)}}
    res = bootstrap_ranks(s, 100, seed=0)
    assert np.all(res.dataset_ranks[:, 0, 0] == 1)  # a's mean over its finite cases is 1
    s = {"d": {"a": np.array([np.nan]), "b": np.array([0.1])}}
    assert np.all(bootstrap_ranks(s, 10).dataset_ranks[:, 0, 0] == 2)


def test_bootstrap_validates_pairing():
    with pytest.raises(ValueError, match="same number"):
        bootstrap_ranks({"d": {"a": [0.1, 0.2], "b": [0.3]}})
    with pytest.raises(ValueError, match="methods"):
        bootstrap_ranks({"d": {"a": [0.1], "b": [0.3]}, "e": {"a": [0.1]}})
