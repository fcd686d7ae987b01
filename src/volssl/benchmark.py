"""``volssl benchmark``: the papers' comparison on the user's data (or on phantom tasks), from one command.

For every *arm* (a pre-training method plus its fine-tuning recipe, or a from-scratch baseline; see
:func:`volssl.presets.arms.get_arms`) and every labeled dataset, the benchmark

1. pre-trains the arm's preset once per unlabeled pool (``OUT/pretrain/<arm>/``; the pool is
   preprocessed once per preprocessing plan into ``OUT/pool/<plan>/``);
2. preprocesses each labeled dataset once per plan (``OUT/labeled/<dataset>/<plan>/``);
3. fine-tunes each (arm, dataset, n_train, seed) *cell* (``OUT/finetune/<dataset>/<arm>_n<N>_s<S>/``),
   predicts the dataset's held-out cases in their original geometry and evaluates them (Dice, NSD);
   with ``generalisation`` pairs ``A:B``, the runs trained on A also predict B's test cases
   (``OUT/finetune/A->B/...``: a run.json naming the dataset ``A->B`` and its metrics.json);
4. writes ``volssl report`` (``OUT/report/``): the Dice/NSD table with average ranks, bootstrapped rank
   stability, the low-data curve, and the generalisation column; and ``OUT/benchmark.json`` (every cell).

Resumable: a cell whose metrics.json exists is not recomputed, a finished pre-training is reused,
an interrupted one continues from its latest checkpoint. Cells run ``workers`` at a time (spawned
processes, one CPU thread each), or, with a ``launcher`` (:mod:`volssl.launch`: submitit's LocalExecutor or
SLURM), each cell and each pre-training is one job with the launcher's resources (``cpus_per_task`` torch
threads); results, resume and failures are the same either way.

Scales (:class:`BenchScale`): ``tiny`` (the demo scale: 64^3 phantoms at 2 mm, 32^3 patches, the
presets' ``-tiny`` siblings, a few hundred steps; fits 2 CPU cores), ``evidence`` (does pre-training
pay? 120 unlabeled phantoms, the recipes' own ``-tiny`` fine-tuning, 5 seeds on 2 independent draws,
the representation probe during pre-training; docs/evidence.md) and ``quick`` (CI: a handful of
steps, numbers meaningless). Real-scale presets run with ``scale="full"`` (the presets' own patch,
steps and recipes, on a GPU). Each arm names its from-scratch ``twin``; the report pairs their runs
(same draw, dataset, n_train and seed) and gives the difference with a bootstrap 95% interval.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from volssl.experiment import AGGLOMERATION_THRESHOLDS, DEFAULT_TASK, FitSpec, fit_predict_score, get_task, \
    task_of_dataset
from volssl.presets.arms import Arm, get_arms  # the arms are registered by the preset modules, next to their presets
from volssl.util.atomic import write_json_atomic
from volssl.util.workers import use_job_threads, watched_pool

if TYPE_CHECKING:  # volssl.launch (submitit) is imported only when a launcher is given
    from volssl.launch import LaunchSpec

# AGGLOMERATION_THRESHOLDS (from volssl.experiment): thresholds predicted for instance datasets; the first is reported
#: phantom kind -> the domain of its unlabeled pool; domain -> the phantom kind the pool is made of
DOMAINS = {"brain": "brain", "nuclei": "xnt", "axons": "xnt", "organs": "ct"}
POOL_KINDS = {"brain": "brain", "xnt": "nuclei", "ct": "organs"}


@dataclass(frozen=True)
class BenchScale:
    """Sizes of a benchmark variant (``None``: the preset's / recipe's own value)."""

    name: str
    tiny: bool  # use the -tiny presets and recipes
    spacing: tuple[float, float, float] | None  # target spacing of every plan (None: the plan's)
    patch: int | None  # pre-training and fine-tuning patch side
    pretrain_steps: int | None
    finetune_steps: int | None  # total fine-tuning steps, split over a recipe's stages in its proportions
    n_unlabeled: int = 24  # phantom pool size
    phantom_shape: int = 64
    n_labeled: int = 16
    n_test: int = 4
    probe_every: int | None = None  # representation probe during pre-training (None: none)
    seeds: tuple[int, ...] = (0, 1, 2)  # default fine-tuning seeds
    draws: tuple[int, ...] | None = None  # default independent phantom draws (None: one, the ``seed``)
    n_trains: tuple[int | None, ...] = (2,)  # default labelled training cases per cell


SCALES: dict[str, BenchScale] = {s.name: s for s in (
    BenchScale("tiny", True, (2.0, 2.0, 2.0), 32, 400, 400),
    BenchScale("quick", True, (2.0, 2.0, 2.0), 32, 4, 6, n_unlabeled=4, phantom_shape=48, n_labeled=5, n_test=2),
    BenchScale("full", False, None, None, None, None, n_unlabeled=200, phantom_shape=160, n_labeled=40, n_test=10),
    # does pre-training pay? (docs/evidence.md) 120 unlabeled phantoms (x 3 contrasts), the recipes' own
    # -tiny fine-tuning, 5 seeds on 2 independent draws, 8 test cases per draw, the probe during pre-training
    BenchScale("evidence", True, (2.0, 2.0, 2.0), 32, 800, None, n_unlabeled=120, phantom_shape=64, n_labeled=16,
               n_test=8, probe_every=200, seeds=(0, 1, 2, 3, 4), draws=(0, 1), n_trains=(2,)),
)}
#: said in the report next to a paired difference that is not a clear gain
EVIDENCE_NOTE = "see docs/evidence.md for the measured cause and the scale at which a gain is expected"


def stage_lengths(recipe: str, total: int) -> list[int]:
    """``recipe``'s stage lengths rescaled to sum to ``total`` (each >= 1), in the recipe's proportions."""
    from volssl.finetuning.recipes import get_recipe

    steps = [s.steps for s in get_recipe(recipe).stages]
    if total < len(steps):
        raise ValueError(f"{total} fine-tuning steps cannot cover the {len(steps)} stages of recipe {recipe!r}")
    raw = [max(1, round(total * s / sum(steps))) for s in steps]
    raw[-1] = max(1, total - sum(raw[:-1]))
    return raw


def _tiny(name: str | None, scale: BenchScale) -> str | None:
    if name is None or not scale.tiny or name.endswith("-tiny"):
        return name
    return f"{name}-tiny"


def cell_name(arm: str, n_train: int | float | None, seed: int) -> str:
    """``<arm>_n<N>_s<S>`` (``nall`` for every training case, ``f0.1`` for a fraction)."""
    n = "all" if n_train is None else (f"f{n_train:g}" if isinstance(n_train, float) else str(n_train))
    return f"{arm}_n{n}_s{seed}"


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one cell, predict its test cases (and generalisation targets), evaluate; returns its scores.

    Runs in a worker process (one CPU thread); a cell with a metrics.json is only read back. The job's
    ``task`` (set from the dataset's instance labels; default semantic) picks prediction and scoring
    (:mod:`volssl.experiment`): instance cells keep theirs in ``run/instances`` and report the first
    agglomeration threshold in metrics.json, every one in threshold_sweep.json.
    """
    use_job_threads(job)
    run = Path(job["run"])
    metrics = run / "metrics.json"
    t0 = time.time()
    task = get_task(job.get("task") or DEFAULT_TASK, tuple(job.get("thresholds") or AGGLOMERATION_THRESHOLDS))
    device = job.get("device", "cpu")
    if not metrics.exists():
        n_train = job["n_train"]
        fit = FitSpec(job["checkpoint"], job["dataset"], run, job["recipe"],
                      n_train=n_train if isinstance(n_train, int) else None,
                      fraction=n_train if isinstance(n_train, float) else None, seed=job["seed"],
                      overrides=job["overrides"], stage_steps=job.get("stage_steps"), method_name=job["method"])
        scores = fit_predict_score(fit, task, task.cell_dir(run), job["test_images"], job["test_labels"], device)
        task.record_cell(run, scores)
    out = {"method": job["method"], "dataset": job["dataset_name"], "n_train": json.loads(
        (run / "run.json").read_text())["n_train"], "seed": job["seed"], "run": str(run),
           **_means(metrics), "generalisation": []}
    if (run / "threshold_sweep.json").exists():
        out["threshold_sweep"] = json.loads((run / "threshold_sweep.json").read_text())
    for target in job.get("generalisation", []):
        gdir = Path(target["run"])
        gmetrics = gdir / "metrics.json"
        if not gmetrics.exists():
            scores = task.predict_and_score(run, target["test_images"], target["test_labels"], task.cell_dir(gdir),
                                            device)
            task.record_cell(gdir, scores)
            run_json = json.loads((run / "run.json").read_text())
            write_json_atomic(gdir / "run.json", {**run_json, "dataset": target["name"], "trained_on": str(run)})
        out["generalisation"].append({"dataset": target["name"], "run": str(gdir), **_means(gmetrics)})
    out["seconds"] = round(time.time() - t0, 1)
    return out


def safe_cell(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_cell`, but a failing cell is reported (``"error"``) instead of stopping the benchmark;
    rerunning the benchmark retries it (it has no metrics.json)."""
    from volssl.util.errors import describe_error

    try:
        return run_cell(job)
    except Exception as e:  # noqa: BLE001 - one broken cell must not cost the others
        return failed_cell(job, describe_error(e))


def failed_cell(job: dict[str, Any], why: str) -> dict[str, Any]:
    """The record of a cell that failed (``why``: the error, or why its launcher job ended)."""
    return {"method": job["method"], "dataset": job["dataset_name"], "n_train": job["n_train"],
            "seed": job["seed"], "run": job["run"], "error": why, "generalisation": [], "seconds": None}


def _means(metrics: Path) -> dict[str, float | None]:
    """The headline scores of a metrics.json: Dice and NSD, or the instance metrics of an instance run."""
    mean = json.loads(metrics.read_text())["mean"]
    if "voi_split" in mean:
        return {k: mean.get(k) for k in ("voi_split", "voi_merge", "rand_error", "xpress")}
    return {"dice": mean["dice"], "nsd": mean["nsd"]}


@dataclass
class BenchmarkPlan:
    """What :func:`run_benchmark` will do (resolved arms, datasets and cells); see :func:`plan_benchmark`."""

    arms: list[Arm]
    datasets: dict[str, dict[str, Any]]  # name -> {"raw": path, "domain": str}
    n_trains: list[int | float | None]
    seeds: list[int]
    generalisation: list[tuple[str, str]]
    scale: BenchScale
    cells: list[tuple[str, str, int | float | None, int]] = field(default_factory=list)


def parse_n_train(text: str) -> int | float | None:
    """``"all"`` -> None, ``"2"`` -> 2, ``"0.1"`` or ``"10%"`` -> 0.1 (a fraction of the fold's training cases)."""
    t = text.strip().lower()
    if t in ("all", "none", "100%"):
        return None
    if t.endswith("%"):
        value = float(t[:-1]) / 100
    elif "." in t:
        value = float(t)
    else:
        n = int(t)
        if n < 1:
            raise ValueError(f"n_train must be >= 1, a fraction in (0, 1] or 'all', got {text!r}")
        return n
    if not 0 < value <= 1:
        raise ValueError(f"a fraction of training cases must lie in (0, 1], got {text!r}")
    return None if value == 1 else value


@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark compares (its folder, parallelism and device aside); see :func:`run_benchmark`.

    Attributes:
        methods: names of the registered arms (:func:`volssl.presets.arms.get_arms`).
        datasets: phantom task names (``volssl phantoms --list-tasks``) or nnU-Net v2 raw dataset folders
            (with imagesTs/labelsTs for the held-out cases).
        n_trains: labeled training cases per cell: ints, fractions (``0.1``), or None / "all" (default:
            the scale's).
        seeds: fine-tuning seeds (subset, initialisation, patches; default: the scale's).
        scale: a key of :data:`SCALES`.
        generalisation: ``"A:B"`` pairs: runs trained on dataset A also predict B's test cases.
        unlabeled: an nnU-Net raw dataset or image folder as the unlabeled pool (default: phantoms of
            each dataset's domain, generated into ``out/unlabeled/<domain>``).
        seed: seed of the generated phantoms and of pre-training.
        pretrain_steps, finetune_steps, n_labeled: override the scale's step counts and the number of
            labeled phantoms generated per task (a changed value is a new experiment: use another ``out``).
        finetune_set: recipe overrides (``KEY=VALUE``, as ``volssl finetune --set``) applied to every arm's
            fine-tuning after the arm's own, so both sides of a pair change alike (e.g. ``head_init=small``);
            a changed value is a new experiment: use another ``out``.
        draws: independent phantom draws (default: the scale's; None there: the one draw ``seed``): each
            draw ``k`` is a whole benchmark in ``out/draw<k>`` (its own pool, datasets and pre-training,
            generated with seed ``k``), and one report covers them all (``out/report``).
    """

    methods: Sequence[str]
    datasets: Sequence[str]
    n_trains: Sequence[Any] | None = None
    seeds: Sequence[int] | None = None
    scale: str = "tiny"
    generalisation: Sequence[str] = ()
    unlabeled: str | None = None
    seed: int = 0
    pretrain_steps: int | None = None
    finetune_steps: int | None = None
    n_labeled: int | None = None
    draws: Sequence[int] | None = None
    finetune_set: Sequence[str] = ()


def run_benchmark(out: str | Path, spec: BenchmarkSpec, workers: int = 2, device: str = "cpu",
                  report: bool = True, launcher: LaunchSpec | None = None) -> dict[str, Any]:
    """Run the comparison ``spec`` into ``out`` (see the module docstring); returns ``benchmark.json``'s content.

    Args:
        out: the benchmark folder (rerunning resumes).
        spec: methods, datasets, cells, scale and draws (:class:`BenchmarkSpec`).
        workers: cells fine-tuned in parallel (one thread each); unused with a ``launcher``.
        device: "cpu", "cuda", ... (fine-tuning and prediction).
        report: write ``out/report`` (``volssl report``).
        launcher: run each pre-training and each cell as a submitit job (:class:`volssl.launch.LaunchSpec`;
            its ``max_parallel`` jobs at once); None: this machine's process pool.
    """
    if spec.scale not in SCALES:
        raise ValueError(f"unknown benchmark scale {spec.scale!r}; choose one of {', '.join(SCALES)}")
    sc = SCALES[spec.scale]
    spec = dataclasses.replace(spec, seeds=list(sc.seeds if spec.seeds is None else spec.seeds),
                               n_trains=list(sc.n_trains if spec.n_trains is None else spec.n_trains))
    draws = list(sc.draws if spec.draws is None and sc.draws else spec.draws or [])
    if draws:
        return _run_draws(out, spec, draws, workers, device, report, launcher)
    if spec.pretrain_steps or spec.finetune_steps or spec.n_labeled:
        sc = dataclasses.replace(sc, pretrain_steps=spec.pretrain_steps or sc.pretrain_steps,
                                 finetune_steps=spec.finetune_steps or sc.finetune_steps,
                                 n_labeled=spec.n_labeled or sc.n_labeled)
    methods, datasets = spec.methods, spec.datasets
    arms_by_name = get_arms()
    unknown = [m for m in methods if m not in arms_by_name]
    if unknown:
        raise ValueError(f"unknown benchmark method(s) {unknown}; known: {', '.join(arms_by_name)}")
    if not methods or not datasets:
        raise ValueError("give at least one method and one dataset")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    spec = dataclasses.replace(spec, n_trains=[
        parse_n_train(str(n)) if not (n is None or isinstance(n, (int, float))) else n for n in spec.n_trains])
    pairs = [tuple(g.split(":", 1)) for g in spec.generalisation]
    for g, pair in zip(spec.generalisation, pairs):
        if len(pair) != 2 or pair[0] not in datasets:
            raise ValueError(f"generalisation {g!r} must be 'A:B' with A one of the datasets {list(datasets)}")
    data = {name: _labeled_dataset(name, out, sc, spec.seed) for name in {*datasets, *(b for _, b in pairs)}}
    arms = [arms_by_name[m] for m in methods]

    # 1. pre-training, once per (arm, domain) --------------------------------------------------------
    checkpoints, broken = (_pretrain_arms(arms, spec, data, out, sc) if launcher is None
                           else _pretrain_arms_launched(arms, spec, data, out, sc, launcher))

    # 2./3. cells -----------------------------------------------------------------------------------
    jobs = _cell_jobs(arms, spec, data, pairs, out, sc, checkpoints, broken, device)
    n_trains, seeds = spec.n_trains, spec.seeds
    _say(f"{len(jobs)} fine-tuning cells ({len(arms)} methods x {len(datasets)} datasets x n_train "
         f"{['all' if n is None else n for n in n_trains]} x seeds {list(seeds)}), "
         + (f"{workers} at a time" if launcher is None else _as_jobs(launcher)))
    results = _run_cells(jobs, workers, launcher)
    failed = [r for r in results if "error" in r]

    # 4. report ---------------------------------------------------------------------------------------
    summary = {"scale": dataclasses.asdict(sc), "methods": {a.name: dataclasses.asdict(a) for a in arms},
               "datasets": {k: {"raw": str(v["raw"]), "domain": v["domain"], "task": v["task"]}
                            for k, v in data.items()},
               "checkpoints": {f"{a}@{d}": c for (a, d), c in checkpoints.items()},
               "cells": results, "failed": len(failed), "seconds": round(time.time() - t0, 1),
               "pretraining_failed": {f"{a}@{d}": why for (a, d), why in broken.items()}}
    if report:
        from volssl.reports.report import make_report

        make_report([out / "finetune"], out / "report", twins=twins_of(methods), probe_dirs=[out / "pretrain"],
                    evidence_note=EVIDENCE_NOTE)
        summary["report"] = str(out / "report" / "report.md")
    write_json_atomic(out / "benchmark.json", summary)
    _say(f"done in {summary['seconds']} s; {len(failed)} of {len(results)} cells failed; report: "
         f"{summary.get('report')}")
    return summary


#: what a failed pre-training raises (anything else is a bug and stops the benchmark)
PRETRAIN_ERRORS = (RuntimeError, ValueError, KeyError, FileNotFoundError)


def _pretrain_failure(why: BaseException | str) -> str:
    """How a failed pre-training is recorded: ``pre-training failed: <error>``."""
    return f"pre-training failed: {type(why).__name__}: {why}" if isinstance(why, BaseException) \
        else f"pre-training failed: {why}"


def _probe_dataset(spec: BenchmarkSpec, data: dict[str, dict[str, Any]], domain: str) -> str | None:
    """The first dataset of ``domain`` whose task has a representation probe (None: none)."""
    return next((str(data[d]["raw"]) for d in spec.datasets if data[d]["domain"] == domain
                 and get_task(data[d]["task"]).probe), None)


def _pretrain_arms(arms: list[Arm], spec: BenchmarkSpec, data: dict[str, dict[str, Any]], out: Path,
                   sc: BenchScale) -> tuple[dict[tuple[str, str], str | None], dict[tuple[str, str], str]]:
    """Pre-train every arm once per domain of ``spec.datasets``: ``({(arm, domain): checkpoint or None},
    {(arm, domain): why it failed})``; a failure is reported and the other arms go on."""
    checkpoints: dict[tuple[str, str], str | None] = {}
    broken: dict[tuple[str, str], str] = {}
    datasets = spec.datasets
    for arm in arms:
        for domain in sorted({data[d]["domain"] for d in datasets}):
            try:
                probe = _probe_dataset(spec, data, domain)
                checkpoints[(arm.name, domain)] = (None if arm.preset is None else
                                                   _pretrain(arm, domain, out, sc, spec.seed, spec.unlabeled, probe))
            except PRETRAIN_ERRORS as e:  # the other arms go on
                broken[(arm.name, domain)] = _pretrain_failure(e)
                _say(f"  {arm.name}@{domain}: {broken[(arm.name, domain)]} (rerun to retry)")
    return checkpoints, broken


def _pretrain_arms_launched(arms: list[Arm], spec: BenchmarkSpec, data: dict[str, dict[str, Any]], out: Path,
                            sc: BenchScale, launcher: LaunchSpec
                            ) -> tuple[dict[tuple[str, str], str | None], dict[tuple[str, str], str]]:
    """:func:`_pretrain_arms` with each pre-training a launcher job (all at once, up to the launcher's
    ``max_parallel``). The unlabeled pools are preprocessed here first, so no two jobs write one pool."""
    from volssl.launch import map_jobs

    checkpoints: dict[tuple[str, str], str | None] = {}
    broken: dict[tuple[str, str], str] = {}
    jobs = []
    for arm in arms:
        for domain in sorted({data[d]["domain"] for d in spec.datasets}):
            final = _pretrain_run(out, arm, domain) / "checkpoints" / "final.pt"
            if arm.preset is None or final.exists():
                checkpoints[(arm.name, domain)] = None if arm.preset is None else str(final)
                continue
            try:
                _prepare_pool(arm, domain, out, sc, spec.seed, spec.unlabeled)
            except PRETRAIN_ERRORS as e:
                broken[(arm.name, domain)] = _pretrain_failure(e)
                continue
            jobs.append({"arm": arm, "domain": domain, "out": str(out), "scale": sc, "seed": spec.seed,
                         "unlabeled": spec.unlabeled, "probe": _probe_dataset(spec, data, domain),
                         "threads": launcher.cpus_per_task})
    if jobs:
        _say(f"{len(jobs)} pre-training(s) as {_as_jobs(launcher)}")
    results = map_jobs(pretrain_arm, jobs, launcher, on_failure=lambda job, why: {"error": _pretrain_failure(why)})
    for job, r in zip(jobs, results):
        key = (job["arm"].name, job["domain"])
        if "error" in r:
            broken[key] = r["error"]
        else:
            checkpoints[key] = r["checkpoint"]
    for (arm_name, domain), why in broken.items():
        _say(f"  {arm_name}@{domain}: {why} (rerun to retry)")
    return checkpoints, broken


def pretrain_arm(job: dict[str, Any]) -> dict[str, Any]:
    """A launcher job: pre-train ``job["arm"]`` on the ``job["domain"]`` pool (already preprocessed);
    ``{"checkpoint": final.pt}`` or ``{"error": why}``."""
    use_job_threads(job)
    try:
        return {"checkpoint": _pretrain(job["arm"], job["domain"], Path(job["out"]), job["scale"], job["seed"],
                                        job["unlabeled"], job["probe"], prepared=True)}
    except PRETRAIN_ERRORS as e:
        return {"error": _pretrain_failure(e)}


def _as_jobs(launcher: LaunchSpec) -> str:
    """``"local jobs, 2 at a time (logs: DIR)"`` for the progress lines."""
    at_once = "all at once" if launcher.max_parallel is None else f"{launcher.max_parallel} at a time"
    return f"{launcher.kind} jobs, {at_once} (logs: {launcher.folder})"


def _arm_overrides(arm: Arm, sc: BenchScale) -> list[str]:
    """The fine-tuning recipe overrides of ``arm`` at scale ``sc`` (patch side, from-scratch architecture)."""
    overrides = list(arm.finetune_overrides)
    if sc.patch:
        side = max(sc.patch, arm.min_patch or 0)
        overrides.append(f"patch_size={side},{side},{side}")
    if arm.preset is None and arm.arch:
        from volssl.models.registry import tiny_arch

        overrides.append(f"arch={tiny_arch(arm.arch) if sc.tiny else arm.arch}")
    return overrides


def _cell_jobs(arms: list[Arm], spec: BenchmarkSpec, data: dict[str, dict[str, Any]], pairs: list[tuple[str, ...]],
               out: Path, sc: BenchScale, checkpoints: dict[tuple[str, str], str | None],
               broken: dict[tuple[str, str], str], device: str) -> list[dict[str, Any]]:
    """The :func:`run_cell` job of every (dataset, arm, n_train, seed) whose pre-training did not fail;
    each labeled dataset is preprocessed once per plan on the way."""
    jobs = []
    plans: dict[tuple[str, str], dict[str, Any]] = {}
    for d in spec.datasets:
        info = data[d]
        task = get_task(info["task"])  # from the dataset's instance labels (_labeled_dataset)
        for arm in arms:
            if (arm.name, info["domain"]) in broken:
                continue
            ckpt = checkpoints[(arm.name, info["domain"])]
            key = (arm.name, info["domain"])
            if key not in plans:  # read each checkpoint once, not once per dataset
                plans[key] = _plan(arm, sc, ckpt)
            plan = plans[key]
            pre = _prepare_labeled(info["raw"], plan, out / "labeled" / d / plan["name"])
            recipe = _tiny(arm.recipe, sc)
            overrides = _arm_overrides(arm, sc)
            steps = stage_lengths(recipe, sc.finetune_steps) if sc.finetune_steps else None
            for n in spec.n_trains:
                for s in spec.seeds:
                    run = out / "finetune" / d / cell_name(arm.name, n, s)
                    gen = [{"name": f"{d}->{b}", "run": str(out / "finetune" / f"{d}->{b}" / run.name),
                            "test_images": str(data[b]["raw"] / "imagesTs"),
                            "test_labels": str(data[b]["raw"] / "labelsTs")} for a, b in pairs if a == d]
                    jobs.append({"method": arm.name, "dataset_name": d, "checkpoint": ckpt, "dataset": str(pre),
                                 "recipe": recipe, "stage_steps": steps, "n_train": n, "task": task.name,
                                 "overrides": overrides + list(spec.finetune_set) + list(task.recipe_overrides),
                                 "seed": s, "run": str(run), "test_images": str(info["raw"] / "imagesTs"),
                                 "test_labels": str(info["raw"] / "labelsTs"), "generalisation": gen,
                                 "threads": 1, "device": device})
    return jobs


def _run_cells(jobs: list[dict[str, Any]], workers: int, launcher: LaunchSpec | None = None
               ) -> list[dict[str, Any]]:
    """:func:`safe_cell` of every job, ``workers`` at a time (spawned processes), or each one launcher job
    (``launcher.cpus_per_task`` threads; a job that fails is a failed cell), in job order."""
    if launcher is not None:
        return _run_cells_launched(jobs, launcher)
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(_done(safe_cell(job)))
    else:
        ctx = __import__("multiprocessing").get_context("spawn")
        with watched_pool(workers, ctx) as pool:  # its workers exit if this process is killed
            for r in pool.map(safe_cell, jobs):
                results.append(_done(r))
    return results


def _run_cells_launched(jobs: list[dict[str, Any]], launcher: LaunchSpec) -> list[dict[str, Any]]:
    """:func:`_run_cells` through ``launcher``: finished cells (metrics.json, and every generalisation
    target's) are read back here, the others each run as one job; results in job order."""
    from volssl.launch import map_jobs

    def finished(job: dict[str, Any]) -> bool:
        return all((Path(r) / "metrics.json").exists() for r in [job["run"], *(g["run"] for g in job["generalisation"])])

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        if finished(job):
            results[i] = _done(safe_cell({**job, "threads": None}))
        else:
            todo.append(i)
    if len(todo) < len(jobs):
        _say(f"{len(jobs) - len(todo)} finished cell(s) read back; {len(todo)} to run as jobs")
    ran = map_jobs(safe_cell, [{**jobs[i], "threads": launcher.cpus_per_task} for i in todo], launcher,
                   on_failure=failed_cell, on_done=_done)
    for i, r in zip(todo, ran):
        results[i] = r
    return results  # type: ignore[return-value]


def twins_of(methods: Sequence[str]) -> dict[str, str]:
    """``{arm: its from-scratch twin}`` for the arms of ``methods`` whose twin is also in ``methods``."""
    arms = get_arms()
    return {m: arms[m].twin for m in methods if m in arms and arms[m].twin in methods}


def _run_draws(out: str | Path, spec: BenchmarkSpec, draws: Sequence[int], workers: int, device: str,
               report: bool, launcher: LaunchSpec | None = None) -> dict[str, Any]:
    """:func:`run_benchmark` once per draw into ``out/draw<k>`` (seed ``k``), then one report over all draws."""
    from volssl.reports.report import make_report

    out = Path(out)
    t0 = time.time()
    per_draw = {}
    for k in draws:
        _say(f"draw {k} of {list(draws)} -> {out / f'draw{k}'}")
        per_draw[int(k)] = run_benchmark(out / f"draw{k}", dataclasses.replace(spec, seed=int(k), draws=[]),
                                         workers, device, report=False, launcher=launcher)
    summary: dict[str, Any] = {"draws": {str(k): v for k, v in per_draw.items()}, "seconds": round(time.time() - t0, 1),
                               "failed": sum(v["failed"] for v in per_draw.values())}
    if report:
        methods = spec.methods
        rep = make_report([out / f"draw{k}" / "finetune" for k in draws], out / "report", twins=twins_of(methods),
                          probe_dirs=[out / f"draw{k}" / "pretrain" for k in draws], evidence_note=EVIDENCE_NOTE)
        summary["report"] = str(out / "report" / "report.md")
        summary["paired"] = rep["paired"]
        for r in rep["paired"]:
            _say(f"{r['method']} vs {r['twin']} on {r['dataset']} (n_train {r['n_train']}, {r['n_pairs']} pairs): "
                 f"{100 * r['diff']:+.1f} Dice points, 95% CI [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]")
    write_json_atomic(out / "benchmark.json", summary)
    _say(f"all draws done in {summary['seconds']} s; report: {summary.get('report')}")
    return summary


def _say(msg: str) -> None:
    print(f"[volssl benchmark] {msg}", flush=True)


def _fmt(scores: dict[str, Any]) -> str:
    keys = ("dice", "nsd") if "dice" in scores else ("voi_split", "voi_merge", "rand_error", "xpress")
    return "  ".join(f"{k} {scores[k]:.3f}" if isinstance(scores.get(k), (int, float)) else f"{k} -" for k in keys)


def _done(r: dict[str, Any]) -> dict[str, Any]:
    if "error" in r:
        _say(f"  {r['dataset']}/{Path(r['run']).name:<34} FAILED: {r['error']} (rerun to retry)")
        return r
    gen = "".join(f"; {g['dataset']} {_fmt(g)}" for g in r["generalisation"])
    _say(f"  {r['dataset']}/{Path(r['run']).name:<34} {_fmt(r)}{gen} ({r['seconds']} s)")
    return r


def _labeled_dataset(name: str, out: Path, sc: BenchScale, seed: int) -> dict[str, Any]:
    """A labeled dataset: a folder, or a phantom task generated into ``out/datasets/<name>``."""
    from volssl.data import phantoms

    tasks = phantoms.PHANTOM_TASKS
    path = Path(name).expanduser()
    # a folder is a dataset; a phantom name is one even when a folder of that name (say, the --out of a
    # benchmark run from its parent) sits in the working directory without a dataset.json
    if path.is_dir() and ((path / "dataset.json").is_file() or name not in {*phantoms.PHANTOM_KINDS, *tasks}):
        if not (path / "dataset.json").is_file():
            raise ValueError(f"dataset folder {path} has no dataset.json (an nnU-Net v2 raw dataset needs one)")
        meta = json.loads((path / "dataset.json").read_text())
        kind = (meta.get("volssl_phantoms") or {}).get("kind", "brain")
        return {"raw": path.resolve(), "domain": DOMAINS.get(kind, "brain"), "task": task_of_dataset(meta)}
    if name not in phantoms.PHANTOM_KINDS and name not in tasks:
        raise ValueError(f"dataset {name!r} is neither a folder nor a phantom kind or task "
                         f"({', '.join([*phantoms.PHANTOM_KINDS, *tasks])})")
    raw = out / "datasets" / name
    if not (raw / "dataset.json").exists():
        _say(f"generating phantom task {name!r} ({sc.n_labeled} + {sc.n_test} cases, {sc.phantom_shape}^3) -> {raw}")
        if name in tasks:  # each task has its own seed (the --seed shifts it)
            phantoms.generate_task(raw, name, n=sc.n_labeled, n_test=sc.n_test, seed=tasks[name].seed + seed,
                                   shape=(sc.phantom_shape,) * 3, overwrite=True, progress=False)
        else:
            phantoms.generate_phantoms(raw, name, n=sc.n_labeled, n_test=sc.n_test, seed=seed,
                                       shape=(sc.phantom_shape,) * 3, overwrite=True, progress=False)
    meta = json.loads((raw / "dataset.json").read_text())
    kind = tasks[name].kind if name in tasks else name
    return {"raw": raw.resolve(), "domain": DOMAINS.get(kind, "brain"), "task": task_of_dataset(meta)}


def _pool(domain: str, out: Path, sc: BenchScale, seed: int, unlabeled: str | None) -> Path:
    from volssl.data import phantoms

    if unlabeled:
        return Path(unlabeled).expanduser()
    raw = out / "unlabeled" / domain
    if not (raw / "dataset.json").exists():
        kind = POOL_KINDS[domain]
        _say(f"generating the unlabeled {domain} pool ({sc.n_unlabeled} {kind} phantoms) -> {raw}")
        phantoms.generate_phantoms(raw, kind, n=sc.n_unlabeled, n_test=0, seed=seed + 1000,
                                   shape=(sc.phantom_shape,) * 3, overwrite=True, progress=False)
    return raw


def _scaled_plan(name: str, sc: BenchScale):
    from volssl.data.preprocess import get_plan

    plan = get_plan(name)
    if sc.spacing:
        plan.target_spacing = sc.spacing
    plan.rules.min_file_bytes = None  # small phantoms compress below the 200 kB rule meant for real scans
    return plan


def _prepare_pool(arm: Arm, domain: str, out: Path, sc: BenchScale, seed: int, unlabeled: str | None) -> Path:
    """The ``domain`` pool preprocessed with ``arm``'s plan into ``out/pool/<domain>/<plan>`` (resumable)."""
    from volssl.data.preprocess import preprocess

    plan = _scaled_plan(arm.plan, sc)
    pre = _pool_dir(out, domain, plan.name)
    preprocess(_pool(domain, out, sc, seed, unlabeled), pre, plan=plan, workers=2, progress=False)
    return pre


def _pool_dir(out: Path, domain: str, plan: str) -> Path:
    """Where the ``domain`` pool preprocessed with ``plan`` lives."""
    return out / "pool" / domain / plan


def _pretrain_run(out: Path, arm: Arm, domain: str) -> Path:
    """The run folder of ``arm``'s pre-training on the ``domain`` pool."""
    return out / "pretrain" / f"{arm.name}@{domain}"


def _pretrain(arm: Arm, domain: str, out: Path, sc: BenchScale, seed: int, unlabeled: str | None,
              probe_dataset: str | None = None, prepared: bool = False) -> str:
    """Pre-train ``arm`` on the ``domain`` pool (resumed if interrupted); its final checkpoint. With the
    scale's ``probe_every``, the representation probe runs on ``probe_dataset`` during pre-training.
    ``prepared``: the pool is already preprocessed (:func:`_prepare_pool`; launcher jobs)."""
    from volssl.config import resolve
    from volssl.training.trainer import pretrain, resume_or_start_over

    run = _pretrain_run(out, arm, domain)
    final = run / "checkpoints" / "final.pt"
    if final.exists():
        return str(final)
    pre = (_pool_dir(out, domain, _scaled_plan(arm.plan, sc).name) if prepared
           else _prepare_pool(arm, domain, out, sc, seed, unlabeled))
    overrides = [f"train.seed={seed}"]
    if sc.pretrain_steps:
        every = max(sc.pretrain_steps // 4, 1)
        overrides += [f"train.steps={sc.pretrain_steps}", f"train.preview_every={every}",
                      f"train.checkpoint_every={every}"]
    if sc.patch and not arm.own_pretrain_patch:
        side = max(sc.patch, arm.min_patch or 0)
        overrides.append(f"data.patch_size={side},{side},{side}")
    if sc.probe_every and probe_dataset:
        overrides += [f"train.probe_dataset={probe_dataset}", f"train.probe_every={sc.probe_every}"]
    cfg = resolve(_tiny(arm.preset, sc), overrides)
    _say(f"pre-training {arm.name} ({cfg.preset}: {cfg.model.arch}, {tuple(cfg.data.patch_size)}, "
         f"{cfg.train.steps} steps) on the {domain} pool -> {run}")
    res = resume_or_start_over(pretrain, cfg, pre, run, progress=False)
    _say(f"  {arm.name}: {res.get('status')} at step {res.get('step')}, loss EMA {res.get('loss_ema')}")
    if res.get("status") != "finished":
        raise RuntimeError(f"pre-training {arm.name} stopped at step {res.get('step')} ({res.get('signal')})")
    return str(final)


def _plan(arm: Arm, sc: BenchScale, checkpoint: str | None) -> dict[str, Any]:
    """The plan the arm's labeled data is preprocessed with: the checkpoint's, else the arm's own."""
    if checkpoint is not None:
        from volssl.training.checkpoint import load_checkpoint

        plan = load_checkpoint(checkpoint).get("plan")
        if plan:
            return plan
    if arm.plan == "dynamic":
        return {"name": "dynamic"}
    return _scaled_plan(arm.plan, sc).to_dict()


def _prepare_labeled(raw: Path, plan: dict[str, Any], dest: Path) -> Path:
    """``raw`` preprocessed with ``plan`` into ``dest`` (once); the dynamic plan is left to fine-tuning."""
    if plan.get("name") == "dynamic":
        return raw
    from volssl.finetuning.finetune import prepare_dataset

    return prepare_dataset(raw, plan, dest.parent, dest, workers=2, progress=False, check=True)


def __getattr__(name: str) -> Any:
    """``ARMS``: the registered arms, the built-in ones loaded on first access (start-up stays torch-free)."""
    if name == "ARMS":
        return get_arms()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
