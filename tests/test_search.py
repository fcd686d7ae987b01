"""volssl search: the supplement's spaces, trial overrides, a tiny study that runs and resumes."""
from __future__ import annotations

import csv
import json

import pytest

from volssl.search import SPACES, SearchSpace, TrialSetup, get_space, run_search, trial_key, trial_overrides


def test_spaces_hold_the_supplement_tables():
    t5 = get_space("xnt-nuclei").params
    assert t5["lr"] == (5e-6, 1e-5, 5e-5, 1e-4, 5e-4) and t5["layer_decay"] == (0.60, 0.75, 0.90, 1.0)
    assert t5["hours"] == (2, 4, 6, 8) and get_space("xnt-nuclei").fraction == 0.1
    assert "layer_decay" not in get_space("xnt-nuclei-scratch").params
    t8 = get_space("xnt-axons")
    assert t8.params["steps"] == (200, 300, 400, 500) and t8.thresholds == (0.5, 0.6, 0.7) and t8.metric == "xpress"
    assert get_space("xnt-axons-scratch").params["steps"] == (500, 1000, 1500, 2000, 3000)
    assert all(f"{n}-tiny" in SPACES for n in ("xnt-nuclei", "xnt-axons"))
    with pytest.raises(KeyError, match="unknown search space"):
        get_space("nope")


def test_trial_overrides_map_params_to_recipe_keys():
    sp = get_space("xnt-axons")
    over, stages = trial_overrides(sp, {"lr": 5e-4, "weight_decay": 0.05, "steps": 400, "layer_decay": 0.75})
    assert "optim.lr=0.0005" in over and "optim.weight_decay=0.05" in over and "layer_decay=0.75" in over
    assert stages is None or sum(stages) == 400
    with pytest.raises(ValueError, match="steps-per-hour"):
        trial_overrides(get_space("xnt-nuclei"), {"lr": 1e-5, "weight_decay": 1e-4, "hours": 6, "layer_decay": 0.75})
    assert trial_key({"a": 1, "b": 2.0}) == trial_key({"b": 2, "a": 1.0}) != trial_key({"a": 2, "b": 2})


@pytest.mark.slow
def test_tiny_search_runs_and_resumes(tmp_path):
    from volssl.data.phantoms import generate_phantoms

    raw = generate_phantoms(tmp_path / "raw", "brain", n=6, n_test=1, seed=0, shape=(40, 40, 40), progress=False)
    space = SearchSpace("t", "test", "scratch-s3d-schedule-tiny",
                        {"lr": (1e-3, 2e-3), "weight_decay": (1e-2,), "steps": (3, 4)})
    setup = TrialSetup(checkpoint=None, dataset=str(raw), n_train=2, device="cpu",
                       overrides=["patch_size=32,32,32", "arch=resenc-tiny", "num_workers=0", "train.val_every=0"])
    kw = dict(setup=setup, out=tmp_path / "s", progress=False)
    best = run_search(space, 2, **kw)
    assert best["n_complete"] == 2 and 0.0 <= best["value"] <= 1.0
    rows = list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"COMPLETE"}
    trial = json.loads(next((tmp_path / "s" / "trials").glob("*/trial.json")).read_text())
    assert trial["overrides"][-2:] and sum(trial["stage_steps"]) in (3, 4)
    again = run_search(space, 2, **kw)  # resume: the study already has 2 completed trials
    assert again["n_complete"] == 2
    assert len(list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))) == 2
    more = run_search(space, 3, **kw)  # resume with a larger budget: a new parameter set, not a repeat
    done = [r for r in csv.DictReader(open(tmp_path / "s" / "trials.csv")) if r["state"] == "COMPLETE"]
    assert more["n_complete"] == 3 and len({(r["lr"], r["steps"]) for r in done}) == 3
    assert (tmp_path / "s" / "search.png").stat().st_size > 0 and "Best" in (tmp_path / "s" / "search.md").read_text()


@pytest.mark.slow
def test_instance_space_scores_the_best_threshold(tmp_path):
    from volssl.data.phantoms import generate_phantoms

    raw = generate_phantoms(tmp_path / "raw", "axons", n=5, n_test=1, seed=0, shape=(40, 40, 40), progress=False)
    space = SearchSpace("t", "test", "scratch-mae-xnt-axons-tiny", {"lr": (1e-3,), "steps": (2,)}, metric="xpress",
                        thresholds=(0.5, 0.6))
    setup = TrialSetup(None, str(raw), n_train=2, device="cpu",
                       overrides=["patch_size=32,32,32", "num_workers=0", "train.val_every=0", "plan=xnt"])
    best = run_search(space, 1, setup, tmp_path / "s", progress=False)
    trial = json.loads(next((tmp_path / "s" / "trials").glob("*/trial.json")).read_text())
    assert best["threshold"] in (0.5, 0.6) and set(trial["per_threshold"]) == {"0.5", "0.6"}
    assert best["value"] == pytest.approx(max(v["xpress"] for v in trial["per_threshold"].values()))
