"""``volssl search``: random search of fine-tuning hyper-parameters (MAE-XNT supplement, Sec. 8-9).

A *search space* (:data:`SPACES`) names the fine-tuning recipe, the categorical values of each
hyper-parameter (the supplement's Tables 5, 6, 8 and 9) and the score to maximise. Each trial draws
one value per hyper-parameter with Optuna's :class:`~optuna.samplers.RandomSampler`, fine-tunes the
checkpoint with them (``OUT/trials/<key>/``: a normal fine-tuning run directory), predicts the
fold's *validation* cases (never the test cases) and scores them; instance spaces also evaluate
each agglomeration threshold of the space and keep the best (the threshold is recorded per trial).

The study lives in an Optuna storage (default ``sqlite:///OUT/study.db``): rerunning the command
resumes it, running the command in several processes (or machines sharing a database URL via
``--storage``) runs trials in parallel; trials whose process died are marked failed through
Optuna's heartbeat and their parameters are queued again, and since a trial's run directory is
named after its parameters, its fine-tuning resumes from the last checkpoint. ``--trials N`` is
the number of completed trials the study should reach.

Outputs: ``OUT/trials.csv`` (one row per trial: state, value, parameters, threshold, run),
``OUT/best.json`` (best value, parameters and the recipe overrides reproducing it),
``OUT/search.md`` and ``OUT/search.png`` (score per trial, and per value of each parameter).

With a *launcher* (``--launcher local|slurm``, :mod:`volssl.launch`) this process draws the trials and
each one runs as a submitit job with the launcher's resources: rounds of up to ``max_parallel`` trials
(default all that are missing) are drawn (``study.ask``), run as jobs and their scores told to the study
here (this process keeps the trials' heartbeat while their jobs run, so a study whose driver died has its
trials failed and queued again like any other). A job that fails is a failed trial; resume, pruning of
repeated draws and the outputs are the same as without a launcher.

Each trial draws from a random stream seeded by ``(seed, number of trials so far)``, so a resumed study
continues with new draws instead of repeating the first ones; processes working on one study in
parallel should be given different ``--seed`` values. A draw equal to an already evaluated parameter
set is pruned (not run again), and the search stops early once every set of the space is evaluated.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from volssl.util.atomic import atomic_path, write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # volssl.launch (submitit) is imported only when a launcher is given
    from volssl.launch import LaunchSpec

MAX_CONSECUTIVE_FAILURES = 3
#: hyper-parameter name -> the recipe override it sets ("steps" and "hours" set the stage lengths)
PARAM_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "layer_decay": "layer_decay"}


@dataclass(frozen=True)
class SearchSpace:
    """One random-search space: recipe, hyper-parameter values, score.

    ``params`` maps a name (``lr``, ``weight_decay``, ``layer_decay``, ``hours`` or ``steps``) to its
    candidate values. ``hours`` is converted to fine-tuning steps with ``steps_per_hour`` (None: the
    user gives ``--steps-per-hour``, which depends on the GPU). ``metric``: "dice" (semantic) or
    "xpress" (instances, with the agglomeration ``thresholds``).
    """

    name: str
    description: str
    recipe: str
    params: dict[str, tuple[float, ...]]
    metric: str = "dice"
    thresholds: tuple[float, ...] = ()
    steps_per_hour: float | None = None
    fraction: float | None = None  # share of the fold's training cases (Tables 5/6: 10% of iid)


_T5 = {"lr": (5e-6, 1e-5, 5e-5, 1e-4, 5e-4), "weight_decay": (1e-5, 1e-4, 1e-3), "hours": (2, 4, 6, 8),
       "layer_decay": (0.60, 0.75, 0.90, 1.0)}
_T6 = {"lr": (1e-5, 5e-5, 1e-4, 5e-4, 1e-3), "weight_decay": (1e-5, 1e-4, 1e-3), "hours": (4, 8, 12, 16)}
_T8 = {"lr": (2e-3, 1e-3, 5e-4, 2.5e-4, 1e-4, 5e-5), "weight_decay": (0.01, 0.05, 0.001, 0.005),
       "steps": (200, 300, 400, 500), "layer_decay": (0.60, 0.75, 0.90, 1.0)}
_T9 = {"lr": (5e-3, 1e-3, 5e-4, 1e-4, 5e-5, 1e-5), "weight_decay": (0.01, 0.05, 0.001, 0.005, 0.0005),
       "steps": (500, 1000, 1500, 2000, 3000), "layer_decay": (1.0,)}
_THRESHOLDS = (0.5, 0.6, 0.7)

SPACES: dict[str, SearchSpace] = {s.name: s for s in (
    SearchSpace("xnt-nuclei", "Table 5: foundation model, cell nuclei, 10% of the training data", "mae-xnt", _T5,
                fraction=0.1),
    SearchSpace("xnt-nuclei-scratch", "Table 6: from scratch, cell nuclei, 10% of the training data",
                "scratch-mae-xnt-schedule", _T6, fraction=0.1),
    SearchSpace("xnt-axons", "Table 8: foundation model, axons (affinities + agglomeration)", "mae-xnt-axons", _T8,
                metric="xpress", thresholds=_THRESHOLDS),
    SearchSpace("xnt-axons-scratch", "Table 9: from scratch, axons (affinities + agglomeration)",
                "scratch-mae-xnt-axons", _T9, metric="xpress", thresholds=_THRESHOLDS),
)}
# CPU siblings: the same spaces on the -tiny recipes, with hours/steps shrunk to a few dozen steps
for _s in list(SPACES.values()):
    _p = dict(_s.params)
    if "steps" in _p:
        _p["steps"] = tuple(max(2, int(v) // 50) for v in _p["steps"])
    SPACES[f"{_s.name}-tiny"] = SearchSpace(
        f"{_s.name}-tiny", _s.description + " [tiny CPU sibling: -tiny recipe, ~1/50 of the steps]",
        f"{_s.recipe}-tiny", _p, _s.metric, _s.thresholds, steps_per_hour=5.0 if "hours" in _p else None,
        fraction=_s.fraction)


def get_space(name: str) -> SearchSpace:
    if name not in SPACES:
        raise KeyError(f"unknown search space {name!r}; known: {', '.join(sorted(SPACES))}")
    return SPACES[name]


def trial_overrides(space: SearchSpace, params: dict[str, float], steps_per_hour: float | None = None
                    ) -> tuple[list[str], list[int] | None]:
    """The recipe overrides and stage lengths of one trial's ``params`` (see :class:`SearchSpace`)."""
    from volssl.benchmark import stage_lengths

    overrides = [f"{PARAM_KEYS[k]}={v!r}" for k, v in sorted(params.items()) if k in PARAM_KEYS]
    total = None
    if "steps" in params:
        total = int(params["steps"])
    elif "hours" in params:
        rate = steps_per_hour or space.steps_per_hour
        if not rate:
            raise ValueError(f"search space {space.name!r} searches the training time in hours: give "
                             "--steps-per-hour (your GPU's fine-tuning steps per hour)")
        total = max(1, int(round(float(params["hours"]) * rate)))
    return overrides, (stage_lengths(space.recipe, total) if total else None)


def trial_key(params: dict[str, float]) -> str:
    """A short name for a parameter set (the trial's run directory): equal parameters, same directory."""
    text = json.dumps({k: float(v) for k, v in sorted(params.items())}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: the model to fine-tune, the data and the run settings.

    ``checkpoint``: pre-trained checkpoint or run dir (None / "none": from scratch); ``dataset``: labeled
    dataset (nnU-Net v2 raw or preprocessed); ``steps_per_hour``: converts a space's ``hours`` to steps;
    ``seed``: sampler and fine-tuning seed; ``n_train``: labeled cases (None: the space's fraction);
    ``overrides``: recipe overrides applied to every trial; ``device``: prediction device.
    """

    checkpoint: str | None
    dataset: str
    steps_per_hour: float | None = None
    seed: int = 0
    n_train: int | None = None
    overrides: Sequence[str] = ()
    device: str = "auto"


def run_trial(space: SearchSpace, params: dict[str, float], setup: TrialSetup, out: Path,
              progress: bool = False) -> dict[str, Any]:
    """Fine-tune with ``params``, predict and score the validation cases; ``{"value", "threshold", "run"}``.

    The recipe's task decides prediction and scoring (:mod:`volssl.experiment`): Dice of the semantic
    predictions, or the best agglomeration threshold's ``space.metric`` of the instance predictions.
    """
    from volssl.experiment import FitSpec, fit_predict_score, get_task, task_of_recipe

    extra, stages = trial_overrides(space, params, setup.steps_per_hour)
    run = out / "trials" / trial_key(params)
    score_file = run / "trial.json"
    if score_file.exists():
        return json.loads(score_file.read_text())
    overrides = [*setup.overrides, *extra]
    task = get_task(task_of_recipe(space.recipe, overrides), space.thresholds)
    fit = FitSpec(setup.checkpoint, setup.dataset, run, space.recipe, n_train=setup.n_train,
                  fraction=None if setup.n_train else space.fraction, seed=setup.seed, overrides=overrides,
                  stage_steps=stages)
    scores = fit_predict_score(fit, task, run / "validation", device=setup.device, progress=progress)
    result = task.objective(scores, space.metric)
    result.update(params={k: float(v) for k, v in params.items()}, run=str(run), overrides=[*setup.overrides, *extra],
                  stage_steps=stages)
    write_json_atomic(score_file, result)
    return result


def trial_job(job: dict[str, Any]) -> dict[str, Any]:
    """A launcher job: :func:`run_trial` of ``job``'s ``space``, ``params``, ``setup`` and ``out`` (with
    ``threads`` torch threads); ``{"error": why}`` when it raises."""
    from volssl.util.errors import describe_error

    from volssl.util.workers import use_job_threads

    try:
        use_job_threads(job)
        return run_trial(job["space"], job["params"], job["setup"], Path(job["out"]))
    except Exception as e:  # noqa: BLE001 - a failed trial, reported to the study
        return {"error": describe_error(e)}


def run_search(space: str | SearchSpace, trials: int, setup: TrialSetup, out: str | Path,
               storage: str | None = None, study_name: str | None = None, progress: bool = True,
               launcher: LaunchSpec | None = None) -> dict[str, Any]:
    """Run (or resume, or join) the random search until the study has ``trials`` completed trials.

    ``setup``: the checkpoint, dataset and settings every trial shares (:class:`TrialSetup`);
    ``storage``: Optuna storage URL (default ``sqlite:///OUT/study.db``); ``study_name``: default
    ``volssl-<space>``; ``launcher``: run each trial as a submitit job (:class:`volssl.launch.LaunchSpec`;
    None: one trial after the other in this process). Returns ``best.json``'s content. See the module
    docstring for the files written.
    """
    import optuna

    sp = space if isinstance(space, SearchSpace) else get_space(space)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    checkpoint = setup.checkpoint
    if (checkpoint is None or str(checkpoint).lower() == "none") != sp.recipe.startswith("scratch"):
        raise ValueError(f"search space {sp.name!r} uses recipe {sp.recipe!r}: "
                         + ("train from scratch with --checkpoint none" if sp.recipe.startswith("scratch")
                            else "give a pre-trained --checkpoint"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study, store = _open_study(sp, out, storage, study_name, setup.seed)
    if launcher is not None:
        _search_with_launcher(study, store, sp, trials, setup, out, launcher)
        return write_results(study, sp, out, setup.steps_per_hour)

    def completed_keys() -> set[str]:
        return {trial_key(t.params) for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE}

    def objective(trial: optuna.Trial) -> float:
        params = _draw(trial, sp)
        if trial_key(params) in completed_keys():  # drawn again: no new information, draw anew
            raise optuna.TrialPruned("these parameters were already evaluated")
        try:
            result = run_trial(sp, params, setup, out)
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            raise
        return _record(trial, result)

    def n_complete() -> int:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

    from tqdm import tqdm

    bar = tqdm(total=trials, initial=min(n_complete(), trials), desc=f"search {sp.name}", unit="trial",
               disable=not progress)
    failures = 0
    n_space = math.prod(len(v) for v in sp.params.values())
    while n_complete() < trials:
        if len(completed_keys()) >= n_space:
            print(f"volssl search: all {n_space} parameter sets of {sp.name!r} are evaluated", file=sys.stderr)
            break
        _reseed(study, setup.seed)
        study.optimize(objective, n_trials=1, catch=(RuntimeError, ValueError, FloatingPointError))
        last = study.get_trials(deepcopy=False)[-1]
        failures = failures + 1 if last.state == optuna.trial.TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"search {sp.name}: {failures} trials in a row failed; last: "
                               f"{last.user_attrs.get('error', 'unknown error')} (run {out / 'trials'})")
        bar.n = min(n_complete(), trials)
        bar.refresh()
    bar.close()
    return write_results(study, sp, out, setup.steps_per_hour)


def _reseed(study: Any, seed: int) -> None:
    """A fresh random stream per trial: a resumed or parallel process continues instead of repeating the
    draws of the first trials (reproducible for a given seed and study history)."""
    import optuna

    study.sampler = optuna.samplers.RandomSampler(seed=seed * 1_000_003 + len(study.trials))


def _draw(trial: Any, sp: SearchSpace) -> dict[str, float]:
    """One value per hyper-parameter of ``sp``, drawn by ``trial``'s sampler."""
    return {name: trial.suggest_categorical(name, list(values)) for name, values in sp.params.items()}


def _record(trial: Any, result: dict[str, Any]) -> float:
    """Keep a finished trial's run folder and threshold on ``trial``; its value (NaN when not finite)."""
    trial.set_user_attr("run", result["run"])
    trial.set_user_attr("threshold", result["threshold"])
    value = result["value"]
    return value if math.isfinite(value) else float("nan")


def _open_study(sp: SearchSpace, out: Path, storage: str | None, study_name: str | None, seed: int
                ) -> tuple[Any, Any]:
    """The Optuna study of ``sp`` in ``storage`` (created, or loaded to resume / join it), stale trials failed
    and failed trials queued again once (their run resumes from its checkpoint); and the storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat API
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    store = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(study_name=study_name or f"volssl-{sp.name}", storage=store, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed), load_if_exists=True)
    study.set_user_attr("space", sp.name)
    optuna.storages.fail_stale_trials(study)  # RUNNING trials whose process stopped beating: FAIL
    # failed trials (a killed process, an error) are queued again once: their run resumes from its checkpoint
    done_params = {trial_key(t.params) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    queued = {trial_key(t.params) for t in study.trials if t.state == optuna.trial.TrialState.WAITING}
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL and t.params and trial_key(t.params) not in done_params | queued:
            study.enqueue_trial(t.params)
            queued.add(trial_key(t.params))
    return study, store


def _search_with_launcher(study: Any, store: Any, sp: SearchSpace, trials: int, setup: TrialSetup, out: Path,
                          launcher: LaunchSpec) -> None:
    """Rounds of trials drawn here and run as launcher jobs until ``trials`` are complete (module docstring);
    RuntimeError after :data:`MAX_CONSECUTIVE_FAILURES` failed trials in a row."""
    import optuna

    from volssl.launch import map_jobs

    n_space = math.prod(len(v) for v in sp.params.values())
    failures = 0
    while True:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        done, n_done = {trial_key(t.params) for t in complete}, len(complete)
        if n_done >= trials:
            return
        if len(done) >= n_space:
            print(f"volssl search: all {n_space} parameter sets of {sp.name!r} are evaluated", file=sys.stderr)
            return
        missing = trials - n_done
        batch = _ask_trials(study, sp, setup.seed, min(missing, launcher.max_parallel or missing), done, n_space)
        if not batch:
            return
        _say(f"{len(batch)} trial(s) as {launcher.kind} jobs ({n_done} of {trials} complete; logs: {launcher.folder})")
        jobs = [{"space": sp, "params": params, "setup": setup, "out": str(out), "threads": launcher.cpus_per_task}
                for _, params in batch]
        results = map_jobs(trial_job, jobs, launcher, on_failure=lambda job, why: {"error": why},
                           poll=_heartbeat(store, [trial for trial, _ in batch]))
        worst = 0
        for (trial, params), result in zip(batch, results):
            failures = failures + 1 if _tell(study, trial, params, result) else 0
            worst = max(worst, failures)
        if worst >= MAX_CONSECUTIVE_FAILURES:
            last = next(r for r in reversed(results) if "error" in r)
            raise RuntimeError(f"search {sp.name}: {worst} trials in a row failed; last: {last['error']} "
                               f"(run {out / 'trials'})")


def _ask_trials(study: Any, sp: SearchSpace, seed: int, k: int, taken: set[str], n_space: int
                ) -> list[tuple[Any, dict[str, float]]]:
    """Up to ``k`` new trials of ``study`` (queued ones first), each with a parameter set not in ``taken``
    nor drawn before in the batch (a repeat is told PRUNED and drawn anew, as without a launcher)."""
    import optuna

    taken = set(taken)
    batch: list[tuple[Any, dict[str, float]]] = []
    for _ in range(20 * k + 20):
        if len(batch) >= k or len(taken) >= n_space:
            break
        _reseed(study, seed)
        with warnings.catch_warnings():  # "heartbeat ... with Study.optimize": _heartbeat keeps it here
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask()
        params = _draw(trial, sp)
        if trial_key(params) in taken:  # drawn again: no new information, draw anew
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        taken.add(trial_key(params))
        batch.append((trial, params))
    return batch


def _heartbeat(store: Any, trials: list[Any], every_s: float = 30.0) -> Callable[[], None]:
    """A ``poll`` for :func:`volssl.launch.map_jobs` that records the heartbeat of ``trials`` every ``every_s``
    (Optuna's stale-trial check fails them if this process dies); records it once now."""
    last = [0.0]

    def beat() -> None:
        if time.monotonic() - last[0] >= every_s:
            for trial in trials:
                store.record_heartbeat(trial._trial_id)  # noqa: SLF001 - Optuna's own heartbeat uses the id
            last[0] = time.monotonic()

    beat()
    return beat


def _tell(study: Any, trial: Any, params: dict[str, float], result: dict[str, Any]) -> bool:
    """Report one launcher job's ``result`` to the study; True when the trial failed."""
    import optuna

    shown = ", ".join(f"{k}={v:g}" for k, v in params.items())
    if "error" in result:
        trial.set_user_attr("error", result["error"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _say(f"  trial {trial.number} ({shown}) FAILED: {result['error']} (rerun to retry)")
        return True
    study.tell(trial, _record(trial, result))
    value = result["value"]
    _say(f"  trial {trial.number} ({shown}): {value:.4f}" + (f" at threshold {result['threshold']}"
                                                             if result.get("threshold") is not None else ""))
    return not math.isfinite(value)


def _say(msg: str) -> None:
    print(f"[volssl search] {msg}", flush=True)


def write_results(study: Any, space: SearchSpace, out: Path, steps_per_hour: float | None = None) -> dict[str, Any]:
    """trials.csv, best.json, search.md and search.png of ``study``; returns best.json's content."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "threshold": t.user_attrs.get("threshold"), **{k: t.params.get(k) for k in space.params},
                     "run": t.user_attrs.get("run")})
    with atomic_path(out / "trials.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["number", "state", "value", "threshold", *space.params, "run"])
        w.writeheader()
        w.writerows(rows)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    best: dict[str, Any] = {"space": space.name, "recipe": space.recipe, "metric": space.metric,
                            "n_complete": len(complete), "n_trials": len(rows)}
    if complete:
        b = max(complete, key=lambda t: t.value)
        extra, stages = trial_overrides(space, b.params, steps_per_hour)
        best.update(value=b.value, params=b.params, threshold=b.user_attrs.get("threshold"), overrides=extra,
                    stage_steps=stages, run=b.user_attrs.get("run"), trial=b.number)
    write_json_atomic(out / "best.json", best)
    lines = [f"# Random search `{space.name}`", "", space.description, "",
             f"{len(complete)} completed of {len(rows)} trials; score: validation {space.metric} (higher is better).",
             ""]
    if complete:
        lines += [f"Best: **{best['value']:.4f}** with " + ", ".join(f"{k}={v}" for k, v in best["params"].items())
                  + (f", threshold {best['threshold']}" if best.get("threshold") is not None else ""), ""]
    header = ["#", "state", space.metric, "threshold", *space.params]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: -(r["value"] if r["value"] is not None else -math.inf)):
        v = "" if r["value"] is None else f"{r['value']:.4f}"
        lines.append("| " + " | ".join([str(r["number"]), r["state"], v, str(r["threshold"] or "")]
                                       + [str(r[k]) for k in space.params]) + " |")
    write_text_atomic(out / "search.md", "\n".join(lines) + "\n\n![scores](search.png)\n")
    _plot(out / "search.png", complete, space)
    return best


def _plot(path: Path, trials: list, space: SearchSpace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(space.params)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 3), squeeze=False)
    ax = axes[0, 0]
    ax.plot([t.number for t in trials], [t.value for t in trials], "o")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {space.metric}")
    for a, name in zip(axes[0, 1:], names):
        values = list(space.params[name])
        a.scatter([values.index(t.params[name]) for t in trials], [t.value for t in trials], alpha=0.7)
        a.set_xticks(range(len(values)), [f"{v:g}" for v in values], rotation=45)
        a.set_xlabel(name)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def describe_spaces() -> list[dict[str, Any]]:
    return [{"name": s.name, "description": s.description, "recipe": s.recipe, "metric": s.metric,
             "params": {k: list(v) for k, v in s.params.items()}, "thresholds": list(s.thresholds)}
            for s in SPACES.values()]
