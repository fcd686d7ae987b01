"""The training half of a fine-tuning *task*: what the network predicts and how it is trained.

A recipe's ``task`` (:class:`volssl.finetuning.recipes.FinetuneRecipe`) names one of :data:`TASKS`:

* ``"semantic"`` (:class:`SemanticSegmentation`): one logit per class of the dataset's labels, Dice + CE
  (with deep supervision when the recipe asks for it);
* ``"affinities"`` (:class:`Affinities`, MAE-XNT's axons): instance labels -> one affinity per offset
  (``affinity_distances`` along each axis; :mod:`volssl.finetuning.affinities`), class-balanced MSE on
  the full-resolution output only (no deep supervision); the dataset must declare instance labels.

:func:`get_task` builds the task of a recipe for a dataset's :class:`~volssl.finetuning.losses.LabelMap`.
Each task owns its number of outputs, its loss, whether deep supervision is allowed, its dataset check
and the fields it adds to a fine-tuned checkpoint (``task``, ``offsets``: docs/design.md, "Fine-tuned
model"). Prediction and scoring of a task live above (:mod:`volssl.inference`, :mod:`volssl.experiment`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

if TYPE_CHECKING:  # torch is imported on first use: the benchmark and search modules import this one
    from torch import Tensor

    from volssl.finetuning.losses import LabelMap


class Task:
    """What a fine-tuned network predicts from a dataset's labels (base class; see :data:`TASKS`)."""

    name: ClassVar[str]
    #: deep supervision (a loss on every decoder resolution) may be used
    deep_supervision: ClassVar[bool] = True

    def __init__(self, label_map: LabelMap) -> None:
        self.label_map = label_map

    @classmethod
    def from_recipe(cls, label_map: LabelMap, affinity_distances: Sequence[int] | None = None) -> Task:
        """The task for a dataset's ``label_map`` with a recipe's settings (``affinity_distances``)."""
        return cls(label_map)

    def n_outputs(self) -> int:
        """Output channels of the network."""
        raise NotImplementedError

    def loss(self, outputs: Tensor | Sequence[Tensor], label: Tensor) -> Tensor:
        """The training loss of the network's ``outputs`` against an integer ``label`` batch ``(B, 1, *patch)``."""
        raise NotImplementedError

    def check_dataset(self, meta: Mapping[str, Any], root: str | Path, recipe: str) -> None:
        """ValueError if the dataset (``meta``: :func:`volssl.finetuning.finetune.dataset_meta`) cannot train it."""

    def checkpoint_fields(self) -> dict[str, Any]:
        """The task's fields of a fine-tuned checkpoint (read back by :func:`volssl.inference.model.load_finetuned`)."""
        return {"task": self.name, "offsets": None}


class SemanticSegmentation(Task):
    """One logit per class (label values in increasing order), Dice + CE with optional deep supervision."""

    name = "semantic"

    def n_outputs(self) -> int:
        return self.label_map.n_classes

    def loss(self, outputs: Tensor | Sequence[Tensor], label: Tensor) -> Tensor:
        from volssl.finetuning.losses import deep_supervision_loss

        return deep_supervision_loss(outputs, self.label_map(label))


class Affinities(Task):
    """Instance labels -> one affinity per offset (MAE-XNT axons), class-balanced MSE, no deep supervision."""

    name = "affinities"
    deep_supervision = False

    def __init__(self, label_map: LabelMap, distances: Sequence[int] | None = None) -> None:
        from volssl.finetuning.affinities import AFFINITY_DISTANCES, make_offsets

        super().__init__(label_map)
        self.offsets = make_offsets(AFFINITY_DISTANCES if distances is None else distances)

    @classmethod
    def from_recipe(cls, label_map: LabelMap, affinity_distances: Sequence[int] | None = None) -> Task:
        return cls(label_map, affinity_distances)

    def n_outputs(self) -> int:
        return len(self.offsets)

    def loss(self, outputs: Tensor | Sequence[Tensor], label: Tensor) -> Tensor:
        from volssl.finetuning.affinities import affinity_loss, affinity_targets

        target, valid = affinity_targets(label, self.offsets)
        return affinity_loss(outputs[0] if isinstance(outputs, (list, tuple)) else outputs, target, valid)

    def check_dataset(self, meta: Mapping[str, Any], root: str | Path, recipe: str) -> None:
        if not meta["instance"]:
            raise ValueError(f"recipe {recipe!r} predicts affinities from instance labels, but {root}'s "
                             "dataset.json does not declare instance labels")

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"task": self.name, "offsets": [list(o) for o in self.offsets]}


#: task name (a recipe's ``task``, a fine-tuned checkpoint's ``"task"``) -> its class
TASKS: dict[str, type[Task]] = {t.name: t for t in (SemanticSegmentation, Affinities)}


def get_task(name: str, label_map: LabelMap, affinity_distances: Sequence[int] | None = None) -> Task:
    """The task ``name`` (a recipe's ``task``) for a dataset's ``label_map``; ``affinity_distances``
    (a recipe's) set the offsets of the affinity task."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name].from_recipe(label_map, affinity_distances)
