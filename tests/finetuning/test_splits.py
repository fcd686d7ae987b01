"""Folds by subject and low-data subsets: reproducible, disjoint, balanced, nested, saved."""
import json
from dataclasses import dataclass

import pytest

from volssl.finetuning.splits import draw_subset, make_folds, make_splits, save_splits, subset_size


@dataclass
class Rec:
    id: str
    subject: str | None = None
    split: str | None = "train"
    has_label: bool = True


def records(n: int = 50, per_subject: int = 2) -> list[Rec]:
    return [Rec(f"case_{i:03d}", subject=f"s{i // per_subject}") for i in range(n)]


def test_folds_are_reproducible_disjoint_complete_and_balanced():
    ids = [f"c{i}" for i in range(23)]
    folds = make_folds(ids, n_folds=5, split_seed=3)
    assert folds == make_folds(list(reversed(ids)), n_folds=5, split_seed=3)  # order of the input is irrelevant
    assert folds != make_folds(ids, n_folds=5, split_seed=4)
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(ids) and len(vals) == len(set(vals))
    assert sorted(len(f["val"]) for f in folds) == [4, 4, 5, 5, 5]
    for f in folds:
        assert set(f["train"]) | set(f["val"]) == set(ids) and not set(f["train"]) & set(f["val"])


def test_all_cases_of_a_subject_share_a_fold():
    recs = records(40, per_subject=4)
    folds = make_folds([r.id for r in recs], {r.id: r.subject for r in recs}, n_folds=5)
    for f in folds:
        subjects_val = {r.subject for r in recs if r.id in f["val"]}
        subjects_train = {r.subject for r in recs if r.id in f["train"]}
        assert not subjects_val & subjects_train
        assert len(f["val"]) == 8  # 10 subjects of 4 cases, 2 subjects per fold


def test_low_data_subsets_have_the_asked_sizes_and_are_nested():
    recs = records(60)
    subsets = {n: make_splits(recs, fold=1, n_train=n, seed=7)["train"] for n in (10, 20, 30, 40)}
    assert [len(s) for s in subsets.values()] == [10, 20, 30, 40]
    assert set(subsets[10]) < set(subsets[20]) < set(subsets[30]) < set(subsets[40])
    fold_train = set(make_splits(recs, fold=1)["train"])
    assert set(subsets[40]) <= fold_train and len(fold_train) == 48
    assert make_splits(recs, fold=1, n_train=10, seed=7) == make_splits(recs, fold=1, n_train=10, seed=7)
    assert make_splits(recs, fold=1, n_train=10, seed=8)["train"] != subsets[10]
    assert make_splits(recs, fold=1, n_train=10, seed=8)["folds"] == make_splits(recs, fold=1)["folds"]
    assert len(make_splits(recs, fold=0, fraction=0.25)["train"]) == 12
    assert subset_size(3, fraction=0.01) == 1 and subset_size(7) == 7
    assert draw_subset(["a", "b", "c"], 3) == ["a", "b", "c"]


def test_test_cases_and_unlabelled_cases_never_enter_a_fold():
    recs = records(10) + [Rec("test_0", split="test"), Rec("nolabel", has_label=False)]
    s = make_splits(recs, fold=0)
    inside = {c for f in s["folds"] for c in f["val"] + f["train"]}
    assert "test_0" not in inside and "nolabel" not in inside and s["test"] == ["test_0"]
    assert s["val"] == s["folds"][0]["val"] and s["n_train"] == len(s["train"]) == 8


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        make_folds(["a", "b", "c"])
    with pytest.raises(ValueError, match="only 8 training cases"):
        make_splits(records(10), n_train=9)
    with pytest.raises(ValueError, match="not both"):
        make_splits(records(10), n_train=2, fraction=0.5)
    with pytest.raises(ValueError, match="fold must lie"):
        make_splits(records(10), fold=5)


def test_saved_splits_are_checked_on_reuse(tmp_path):
    s = make_splits(records(20), fold=2, n_train=5)
    path = save_splits(tmp_path / "splits.json", s)
    assert json.loads(path.read_text())["train"] == s["train"]
    save_splits(path, s)  # the same splits: fine
    with pytest.raises(ValueError, match="other splits"):
        save_splits(path, make_splits(records(20), fold=2, n_train=6))
