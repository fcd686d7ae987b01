"""Ranking of methods across datasets: average rank (the S3D paper's Table 3) and bootstrapped rank
stability (its Fig. 3).

Conventions: rank 1 is best; on each dataset methods are ranked by their mean score (higher is better
unless ``higher_is_better=False``), tied scores share the average of their ranks (1, 2.5, 2.5, 4);
the average rank of a method is the mean of its per-dataset ranks. Every method must have a score on
every dataset (the caller picks the datasets all methods were evaluated on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata


def rank_rows(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank the methods along the last axis of ``scores`` (..., M); ties averaged, 1 = best.

    NaN scores rank last (tied among themselves).
    """
    scores = np.asarray(scores, dtype=np.float64)
    key = -scores if higher_is_better else scores
    key = np.where(np.isnan(key), np.inf, key)
    return rankdata(key, method="average", axis=-1)


def _table_array(
    table: Mapping[str, Mapping[str, float]],
) -> tuple[list[str], list[str], np.ndarray]:
    methods = list(table)
    if not methods:
        raise ValueError("the table has no methods")
    datasets = list(dict.fromkeys(d for m in methods for d in table[m]))
    missing = [f"{m}/{d}" for m in methods for d in datasets if d not in table[m]]
    if missing:
        raise ValueError(f"every method needs a score on every dataset; missing: {', '.join(missing)}")
    if not datasets:
        raise ValueError("the table has no datasets")
    scores = np.array([[float(table[m][d]) for m in methods] for d in datasets], dtype=np.float64)  # (D, M)
    return methods, datasets, scores


def dataset_ranks(
    table: Mapping[str, Mapping[str, float]], higher_is_better: bool = True
) -> dict[str, dict[str, float]]:
    """Rank of each method on each dataset.

    Args:
        table: ``table[method][dataset]`` = mean score (e.g. mean Dice) of the method on the dataset.
        higher_is_better: False for errors/distances.

    Returns:
        ``ranks[method][dataset]`` (1 = best, ties averaged).
    """
    methods, datasets, scores = _table_array(table)
    ranks = rank_rows(scores, higher_is_better)  # (D, M)
    return {m: {d: float(ranks[i, j]) for i, d in enumerate(datasets)} for j, m in enumerate(methods)}


def average_ranks(table: Mapping[str, Mapping[str, float]], higher_is_better: bool = True) -> dict[str, float]:
    """Average over datasets of each method's per-dataset rank (see :func:`dataset_ranks`)."""
    return {m: float(np.mean(list(r.values()))) for m, r in dataset_ranks(table, higher_is_better).items()}


@dataclass(frozen=True)
class BootstrapRanks:
    """Ranks of every bootstrap sample.

    Attributes:
        methods: method names, the order of the last axis of every array.
        datasets: dataset names, the order of axis 1 of ``dataset_ranks``.
        dataset_ranks: (n_boot, D, M) rank of each method on each dataset in each sample.
        mean_rank: (n_boot, M) average over datasets of ``dataset_ranks``.
        aggregated: (n_boot, M) rank of ``mean_rank`` among the methods (ties averaged): the
            "aggregated rank across all datasets" whose distribution Fig. 3 shows.
    """

    methods: list[str]
    datasets: list[str]
    dataset_ranks: np.ndarray
    mean_rank: np.ndarray
    aggregated: np.ndarray

    def frequencies(self, dataset: str | None = None) -> dict[str, dict[float, float]]:
        """``freq[method][rank]`` = fraction of bootstrap samples in which the method had that rank,
        on ``dataset``, or aggregated over all datasets when ``dataset`` is None."""
        ranks = self.aggregated if dataset is None else self.dataset_ranks[:, self.datasets.index(dataset)]
        out = {}
        for j, m in enumerate(self.methods):
            values, counts = np.unique(ranks[:, j], return_counts=True)
            out[m] = {float(v): float(c) / ranks.shape[0] for v, c in zip(values, counts)}
        return out


def bootstrap_ranks(
    per_case_scores: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]],
    n_boot: int = 1000,
    seed: int = 0,
    higher_is_better: bool = True,
) -> BootstrapRanks:
    """Rank distribution of each method over bootstrap samples of the test cases.

    Each sample draws, for every dataset independently, as many cases as it has with replacement;
    the same cases for every method (the scores are paired by case). Per sample and dataset the
    methods are ranked by their mean score over the drawn cases (NaN scores, e.g. a class absent from
    both maps, are left out of that mean; a method with no finite score ranks last); the per-dataset
    ranks are averaged over datasets (``mean_rank``), and those averages ranked (``aggregated``).

    Args:
        per_case_scores: ``scores[dataset][method]`` = array (n_cases,) of per-case scores; within a
            dataset every method's array has the same length and case order.
        n_boot: number of bootstrap samples (>= 1).
        seed: seed of the case draws (numpy ``default_rng``); datasets are drawn in the given order.
        higher_is_better: False for errors/distances.

    Returns:
        :class:`BootstrapRanks`.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    datasets = list(per_case_scores)
    if not datasets:
        raise ValueError("per_case_scores has no datasets")
    methods = list(per_case_scores[datasets[0]])
    if not methods:
        raise ValueError(f"dataset {datasets[0]!r} has no methods")
    rng = np.random.default_rng(seed)
    ranks = np.empty((n_boot, len(datasets), len(methods)), dtype=np.float64)
    for i, d in enumerate(datasets):
        if set(per_case_scores[d]) != set(methods):
            raise ValueError(f"dataset {d!r} has methods {sorted(per_case_scores[d])}, "
                             f"dataset {datasets[0]!r} has {sorted(methods)}")
        scores = [np.asarray(per_case_scores[d][m], dtype=np.float64).ravel() for m in methods]
        n = scores[0].size
        if n == 0 or any(s.size != n for s in scores):
            raise ValueError(f"dataset {d!r}: every method needs the same number (> 0) of per-case scores, "
                             f"got {dict(zip(methods, (s.size for s in scores)))}")
        s = np.stack(scores)  # (M, n)
        idx = rng.integers(0, n, size=(n_boot, n))
        chunk = max(1, 4_000_000 // (len(methods) * n))  # bound memory of the (M, chunk, n) gather
        for b0 in range(0, n_boot, chunk):
            drawn = s[:, idx[b0:b0 + chunk]]  # (M, chunk, n)
            finite = ~np.isnan(drawn)
            count = finite.sum(-1)
            total = np.where(finite, drawn, 0.0).sum(-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.where(count > 0, total / np.maximum(count, 1), np.nan)  # (M, chunk)
            ranks[b0:b0 + chunk, i] = rank_rows(means.T, higher_is_better)
    mean_rank = ranks.mean(1)
    aggregated = rank_rows(mean_rank, higher_is_better=False)
    return BootstrapRanks(methods, datasets, ranks, mean_rank, aggregated)
