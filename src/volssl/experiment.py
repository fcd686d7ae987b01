"""fit -> predict -> score: one fine-tuning experiment, shared by ``volssl benchmark`` (its cells, the demo's
runs) and ``volssl search`` (its trials).

A task of this layer (:class:`ExperimentTask`, one per task of :data:`volssl.finetuning.tasks.TASKS`)
composes the training half (:mod:`volssl.finetuning.tasks`: what the network predicts, its loss) with
its prediction and its scoring:

* ``"semantic"`` (:class:`SemanticExperiment`): :func:`volssl.inference.predict.predict_folder` into
  ``OUT/predictions``, :func:`volssl.evaluation.evaluate.evaluate_folder` into ``OUT/metrics.json``
  (Dice, NSD);
* ``"affinities"`` (:class:`InstanceExperiment`): the affinity model's instance maps at every
  agglomeration threshold (``OUT/predictions/t<T>/``), each scored with
  :func:`volssl.evaluation.instance_evaluate.evaluate_instances_folder` into ``OUT/metrics_t<T>.json``
  (VOI, adapted Rand, ERL, XPRESS); the first threshold is the headline.

The task of an experiment comes from one place: a labeled dataset's ``instance_labels``
(:func:`task_of_dataset`, the benchmark) or the recipe's ``task`` (:func:`task_of_recipe`, the search).
:func:`fit_predict_score` fine-tunes (resumed or started over: :func:`volssl.training.trainer.
resume_or_start_over`), predicts the given test images (or the run's validation cases) and scores them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from volssl.finetuning.tasks import Affinities, SemanticSegmentation, Task
from volssl.util.atomic import write_json_atomic

#: agglomeration thresholds an instance experiment predicts by default (MAE-XNT's search set); the first
#: is the headline (a benchmark cell's metrics.json)
AGGLOMERATION_THRESHOLDS = (0.5, 0.6, 0.7)

#: the task of a benchmark cell or demo run that names none
DEFAULT_TASK = SemanticSegmentation.name

PathLike = str | os.PathLike


@dataclass(frozen=True)
class FitSpec:
    """One fine-tuning run (the arguments of :func:`volssl.finetuning.finetune.finetune`)."""

    checkpoint: str | None  # pre-trained checkpoint or run dir; None: from scratch
    dataset: str  # nnU-Net raw or preprocessed dataset
    run: Path  # the run directory
    recipe: str
    n_train: int | None = None
    fraction: float | None = None
    seed: int = 0
    overrides: Sequence[str] = ()
    stage_steps: Sequence[int] | None = None
    method_name: str | None = None  # run.json's "method" (None: finetune's default)

    def fit(self, progress: bool = False) -> dict[str, Any]:
        """Fine-tune (resume the run, or start it over when it has no intact checkpoint); the summary."""
        from volssl.finetuning.finetune import finetune
        from volssl.training.trainer import resume_or_start_over

        return resume_or_start_over(finetune, self.checkpoint, self.dataset, self.run, recipe=self.recipe,
                                    n_train=self.n_train, fraction=self.fraction, seed=self.seed,
                                    overrides=self.overrides, stage_steps=self.stage_steps,
                                    method_name=self.method_name, progress=progress)


@dataclass(frozen=True)
class Scores:
    """What scoring one folder of predictions gives.

    ``metrics``: the headline metrics.json content (semantic: Dice/NSD; instances: the first
    threshold's); ``per_threshold``: instances only, ``{threshold: mean instance metrics}`` (NaN for none).
    """

    metrics: dict[str, Any]
    per_threshold: dict[float, dict[str, float]] | None = None


class ExperimentTask:
    """A task's prediction and scoring on top of its training half (:attr:`training`)."""

    #: the training half (finetuning/tasks.py); its name is the task's name
    training: ClassVar[type[Task]]
    #: recipe overrides that make a recipe train this task
    recipe_overrides: ClassVar[tuple[str, ...]] = ()
    #: the representation probe (a linear segmentation head) can be scored on a dataset of this task
    probe: ClassVar[bool] = False

    def __init__(self, thresholds: Sequence[float] = AGGLOMERATION_THRESHOLDS) -> None:
        self.thresholds = tuple(thresholds)

    @property
    def name(self) -> str:
        return self.training.name

    def predict(self, model: Any, images: PathLike, out: Path, device: str = "cpu",
                progress: bool = False) -> dict[str, Any]:
        """Predict ``images`` with ``model`` (run dir, checkpoint or FineTunedModel) into ``out/predictions``."""
        raise NotImplementedError

    def score(self, out: Path, labels: PathLike, progress: bool = False) -> Scores:
        """Score ``out/predictions`` against the reference ``labels``, metrics files in ``out``."""
        raise NotImplementedError

    def predict_and_score(self, model: Any, images: PathLike, labels: PathLike, out: PathLike,
                          device: str = "cpu", progress: bool = False) -> Scores:
        out = Path(out)
        self.predict(model, images, out, device, progress)
        return self.score(out, labels, progress)

    def cell_dir(self, run: Path) -> Path:
        """Where a benchmark cell (or generalisation target) ``run`` keeps its predictions and scores."""
        return run

    def record_cell(self, run: Path, scores: Scores) -> None:
        """Write what a benchmark cell ``run`` reports beyond :meth:`score`'s files (``run/metrics.json``)."""

    def objective(self, scores: Scores, metric: str) -> dict[str, Any]:
        """A search trial's score: ``{"value", "threshold", ...}`` (``metric`` of the mean, higher is better)."""
        raise NotImplementedError


class SemanticExperiment(ExperimentTask):
    """Class label maps scored with Dice and NSD (``OUT/predictions``, ``OUT/metrics.json``)."""

    training = SemanticSegmentation
    probe = True

    def predict(self, model: Any, images: PathLike, out: Path, device: str = "cpu",
                progress: bool = False) -> dict[str, Any]:
        from volssl.inference.predict import PredictOptions, predict_folder

        return predict_folder(model, images, out / "predictions", PredictOptions(mirror_axes=(), device=device),
                              progress=progress)

    def score(self, out: Path, labels: PathLike, progress: bool = False) -> Scores:
        from volssl.evaluation.evaluate import evaluate_folder

        return Scores(evaluate_folder(out / "predictions", labels, out / "metrics.json", progress=False))

    def objective(self, scores: Scores, metric: str) -> dict[str, Any]:
        return {"value": float(scores.metrics["mean"][metric]), "threshold": None}


class InstanceExperiment(ExperimentTask):
    """Affinities -> instances at every threshold, each scored with the instance metrics
    (``OUT/predictions/t<T>/``, ``OUT/metrics_t<T>.json``); a benchmark cell keeps them in ``run/instances``
    and reports the first threshold (``run/metrics.json``) and all (``run/threshold_sweep.json``)."""

    training = Affinities
    recipe_overrides = (f"task={Affinities.name}",)

    def predict(self, model: Any, images: PathLike, out: Path, device: str = "cpu",
                progress: bool = False) -> dict[str, Any]:
        from volssl.inference.predict import PredictOptions, predict_folder

        options = PredictOptions(mirror_axes=(), device=device, thresholds=self.thresholds)
        return predict_folder(model, images, out / "predictions", options, progress=progress)

    def score(self, out: Path, labels: PathLike, progress: bool = False) -> Scores:
        from volssl.evaluation.instance_evaluate import evaluate_instances_folder
        from volssl.inference.instances import threshold_dir

        per_threshold, headline = {}, None
        for t in self.thresholds:
            result = evaluate_instances_folder(threshold_dir(out / "predictions", t), labels, self.metrics_file(out, t),
                                               progress=progress)
            headline = result if headline is None else headline
            per_threshold[float(t)] = {k: (math.nan if v is None else float(v)) for k, v in result["mean"].items()
                                       if isinstance(v, (int, float)) or v is None}
        return Scores(headline, per_threshold)

    @staticmethod
    def metrics_file(out: Path, t: float) -> Path:
        return out / f"metrics_t{float(t):g}.json"

    def cell_dir(self, run: Path) -> Path:
        return run / "instances"

    def record_cell(self, run: Path, scores: Scores) -> None:
        write_json_atomic(run / "threshold_sweep.json", {str(t): v for t, v in scores.per_threshold.items()})
        chosen = self.metrics_file(self.cell_dir(run), self.thresholds[0])
        write_json_atomic(run / "metrics.json", json.loads(chosen.read_text()))

    def objective(self, scores: Scores, metric: str) -> dict[str, Any]:
        per = scores.per_threshold
        best = max(per, key=lambda t: per[t][metric])
        return {"value": float(per[best][metric]), "threshold": float(best),
                "per_threshold": {str(t): v for t, v in per.items()}}


#: task name (finetuning/tasks.py's TASKS) -> its experiment class
EXPERIMENT_TASKS: dict[str, type[ExperimentTask]] = {t.training.name: t for t in (SemanticExperiment,
                                                                                   InstanceExperiment)}


def get_task(name: str, thresholds: Sequence[float] = AGGLOMERATION_THRESHOLDS) -> ExperimentTask:
    """The experiment of task ``name``; ``thresholds``: the agglomeration thresholds of an instance task."""
    if name not in EXPERIMENT_TASKS:
        raise ValueError(f"task must be one of {tuple(EXPERIMENT_TASKS)}, got {name!r}")
    return EXPERIMENT_TASKS[name](thresholds)


def task_of_dataset(meta: Mapping[str, Any]) -> str:
    """The task a labeled dataset (its dataset.json ``meta``) is fine-tuned for: instance labels ->
    affinities, else semantic segmentation."""
    return (Affinities if meta.get("instance_labels") else SemanticSegmentation).name


def task_of_recipe(recipe: str, overrides: Sequence[str] = ()) -> str:
    """The task recipe ``recipe`` (with ``overrides``) trains."""
    from volssl.finetuning.recipes import resolve_recipe

    return resolve_recipe(recipe, list(overrides)).task


def validation_folders(run: Path, dest: Path) -> tuple[Path, Path]:
    """Folders ``dest/images``, ``dest/labels`` of links to the run's validation cases: raw images and
    labels (from the preprocessed manifest's sources)."""
    from volssl.data.dataset import PreprocessedDataset

    splits = json.loads((run / "splits.json").read_text())
    val = splits.get("val") or []
    if not val:
        raise ValueError(f"{run}: the fold has no validation cases to score a trial on")
    summary = json.loads((run / "summary.json").read_text())
    data = PreprocessedDataset(summary["preprocessed"])
    by_id = {r.id: r for r in data.cases}
    images, labels = dest / "images", dest / "labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in val:
        rec = by_id[case]
        if not rec.source or not rec.label_source:
            raise ValueError(f"{summary['preprocessed']}: case {case} records no source image or label file")
        for src in [*rec.source, rec.label_source]:
            folder = labels if src == rec.label_source else images
            link = folder / Path(src).name
            if not link.exists():
                os.symlink(src, link)
    return images, labels


def fit_predict_score(fit: FitSpec, task: ExperimentTask, out: PathLike, images: PathLike | None = None,
                      labels: PathLike | None = None, device: str = "cpu", progress: bool = False) -> Scores:
    """Fine-tune ``fit``, predict ``images`` (None: the run's validation cases, linked into ``out``) with
    the run's model and score them against ``labels`` with ``task``; predictions and metrics go to ``out``."""
    out = Path(out)
    fit.fit(progress)
    if images is None:
        images, labels = validation_folders(fit.run, out)
    return task.predict_and_score(fit.run, images, labels, out, device, progress)


def predict_instances_folder(model: Any, images: PathLike, labels: PathLike, out: PathLike,
                             thresholds: Sequence[float] = AGGLOMERATION_THRESHOLDS, device: str = "cpu",
                             progress: bool = False) -> dict[float, dict[str, float]]:
    """Predict ``images`` with the affinity model (a run dir, checkpoint or FineTunedModel) at every
    threshold, score each against ``labels``: ``{threshold: mean instance metrics}`` (metrics files in
    ``out/metrics_t<t>.json``, predictions in ``out/predictions``)."""
    return InstanceExperiment(thresholds).predict_and_score(model, images, labels, out, device,
                                                            progress).per_threshold
