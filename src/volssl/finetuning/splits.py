"""Cross-validation folds by subject and low-data training subsets, seeded and saved as ``splits.json``.

* :func:`make_folds`: ``n_folds`` folds over the labelled training cases; all cases of one subject
  (``CaseRecord.subject``, a BIDS ``sub-<label>``; the case id when unknown) fall in the same fold.
  Subjects are shuffled with ``np.random.default_rng([split_seed, n_folds])`` and dealt into
  ``n_folds`` groups of sizes differing by at most one subject. Fold ``k`` validates on group ``k``
  and trains on the others (nnU-Net's ``splits_final.json`` layout: ``[{"train", "val"}, ...]``).
* :func:`draw_subset`: the low-data regime (the paper's 10 / 20 / 30 / 40 labelled cases, or a
  fraction): the first ``n`` cases of a permutation of the fold's training cases drawn from
  ``np.random.default_rng([seed, fold])``, so with one seed the subsets are nested (the 10 cases
  are among the 20).

Folds depend only on ``split_seed`` (the same for every method and seed, so methods compare on
the same folds); subsets depend on the run's ``seed`` and the fold. Test cases (nnU-Net
``imagesTs``, ``split == "test"``) never enter a fold.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from volssl.util.atomic import write_json_atomic

SPLITS_VERSION = 1


def make_folds(cases: Sequence[str], subjects: Mapping[str, str | None] | None = None, n_folds: int = 5,
               split_seed: int = 0) -> list[dict[str, list[str]]]:
    """``n_folds`` folds ``{"train": [...], "val": [...]}`` (sorted ids) over ``cases``, grouped by subject.

    Raises ValueError when there are fewer subjects than folds or duplicate case ids.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(set(cases)) != len(cases):
        raise ValueError("make_folds: duplicate case ids")
    subjects = subjects or {}
    groups: dict[str, list[str]] = {}
    for case in sorted(cases):
        groups.setdefault(subjects.get(case) or case, []).append(case)
    if len(groups) < n_folds:
        raise ValueError(f"{len(groups)} subject(s) ({len(cases)} labelled training cases) cannot be split into "
                         f"{n_folds} folds; fine-tuning needs at least {n_folds}")
    names = sorted(groups)
    order = np.random.default_rng([int(split_seed), int(n_folds)]).permutation(len(names))
    folds = []
    for chunk in np.array_split(order, n_folds):
        val = sorted(c for i in chunk for c in groups[names[int(i)]])
        held = set(val)
        folds.append({"train": sorted(c for c in cases if c not in held), "val": val})
    return folds


def subset_size(n_available: int, n_train: int | None = None, fraction: float | None = None) -> int:
    """The number of training cases: ``n_train``, ``round(fraction * n_available)`` (at least 1), or all."""
    if n_train is not None and fraction is not None:
        raise ValueError("give n_train or fraction, not both")
    if n_train is not None:
        if n_train < 1:
            raise ValueError(f"n_train must be >= 1, got {n_train}")
        if n_train > n_available:
            raise ValueError(f"n_train={n_train} but the fold has only {n_available} training cases")
        return int(n_train)
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        return max(1, min(n_available, int(math.floor(fraction * n_available + 0.5))))
    return n_available


def draw_subset(train_cases: Sequence[str], n: int, seed: int = 0, fold: int = 0) -> list[str]:
    """The first ``n`` cases of the seeded permutation of ``train_cases`` (sorted ids; nested in ``n``)."""
    pool = sorted(train_cases)
    if not 1 <= n <= len(pool):
        raise ValueError(f"draw_subset: n must lie in [1, {len(pool)}], got {n}")
    order = np.random.default_rng([int(seed), int(fold)]).permutation(len(pool))
    return sorted(pool[int(i)] for i in order[:n])


def make_splits(records: Sequence[Any], fold: int = 0, n_train: int | None = None, fraction: float | None = None,
                seed: int = 0, split_seed: int = 0, n_folds: int = 5) -> dict[str, Any]:
    """The ``splits.json`` content for one run.

    Args:
        records: the dataset's usable :class:`~volssl.data.manifest.CaseRecord` s (``id``, ``subject``,
            ``split``, ``has_label``).
        fold: the fold to train (``0 <= fold < n_folds``).
        n_train / fraction: low-data subset of the fold's training cases (None: all of them).
        seed: the run seed (subset); split_seed: the fold seed.

    Returns:
        ``{"version", "n_folds", "split_seed", "folds": [{"train", "val"}, ...], "fold", "seed",
        "n_train", "fraction", "train": the cases this run trains on, "val": the fold's validation
        cases, "test": the labelled or unlabelled test-split cases}``.
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must lie in [0, {n_folds}), got {fold}")
    pool = [r for r in records if r.has_label and r.split != "test"]
    folds = make_folds([r.id for r in pool], {r.id: r.subject for r in pool}, n_folds, split_seed)
    available = folds[fold]["train"]
    n = subset_size(len(available), n_train, fraction)
    train = draw_subset(available, n, seed, fold) if n < len(available) else list(available)
    return {
        "version": SPLITS_VERSION, "n_folds": n_folds, "split_seed": int(split_seed), "folds": folds,
        "fold": int(fold), "seed": int(seed), "n_train": len(train), "fraction": fraction, "train": train,
        "val": folds[fold]["val"], "test": sorted(r.id for r in records if r.split == "test"),
    }


def save_splits(path: str | os.PathLike, splits: dict[str, Any]) -> Path:
    """Write ``splits`` to ``path``; an existing file must hold the same splits (ValueError otherwise)."""
    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(splits)):
            changed = sorted(k for k in set(old) | set(splits) if old.get(k) != splits.get(k))
            raise ValueError(f"{path} holds other splits (differs in: {', '.join(changed)}); the dataset, fold, "
                             "n_train, fraction or seeds changed: use a new output directory")
        return path
    write_json_atomic(path, splits)
    return path
