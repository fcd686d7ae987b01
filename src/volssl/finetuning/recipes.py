"""Fine-tuning recipes as data: each :class:`FinetuneRecipe` is a row of the S3D paper's Table 2.

A recipe says which pre-trained weights are transferred (``transfer``), and lists the
:class:`Stage` s of the schedule: each stage runs ``steps`` updates with either the decoder or the
whole network trainable, and its learning rate either warms up linearly from 0 to the peak
(``optim.lr``) or decays from the peak (``optim.schedule``, poly by default) or stays constant.

The paper's best fine-tuning (Table 2, 71.76 average DSC; Table 8's full 275k-step schedule)::

    transfer encoder + decoder
    stage 1  decoder warm-up   12.5k steps  decoder only (encoder and stem frozen)  lr 0 -> 1e-3 linear
    stage 2  warm-up           12.5k steps  whole network                          lr 0 -> 1e-3 linear
    stage 3  training           250k steps  whole network                          lr 1e-3 -> 0 poly 0.9

Multi-channel datasets get the pre-trained single-channel stem replicated over their channels
(divided by the channel count) and kept frozen during the decoder warm-up (Table 6:
``stem_init="replicate"``, ``train_stem_with_decoder=False``).

From scratch. ``scratch`` is the paper's "No (Fixed)" baseline: the same preprocessing plan and
patch as the pre-trained runs, random initialisation, trained as nnU-Net trains from scratch (one
250k-step stage, poly from 1e-2, nnU-Net-like intensity augmentation). With random weights there is
nothing to protect with a decoder-only warm-up, so ``scratch-s3d-schedule`` maps the S3D schedule
onto a random network by keeping its stage lengths and learning-rate curve (peak 1e-3) with every
parameter trainable in every stage: a schedule- and compute-matched control.

Every recipe has a ``-tiny`` CPU sibling (same stages, 25 + 25 + 250 steps instead of
12.5k + 12.5k + 250k, the tiny network when training from scratch, 64^3 patches, fp32).
Overrides (``--set``): any field (``optim.lr=1e-2``, ``batch_size=4``), ``stages.K.FIELD=VALUE``
for stage ``K``; ``train.steps`` is always the sum of the stage lengths.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from volssl.config import AugmentConfig, OptimConfig, TrainConfig, Triple, apply_overrides, config_to_dict
from volssl.finetuning.transfer import HEAD_INIT_MODES
from volssl.models.registry import tiny_arch
from volssl.training.augment import IntensityConfig
from volssl.training.optim import lr_at

TRANSFERS = ("all", "encoder", "none")  # what moves from the checkpoint ("none": random init)
TRAINABLE = ("decoder", "all")  # what a stage trains
STAGE_LR = ("warmup", "decay", "constant")  # the stage's lr curve
TASKS = ("semantic", "affinities")  # what the network predicts
STEM_INITS = ("replicate", "random")  # multi-channel stem: replicated pre-trained weights, or fresh ones


@dataclass
class Stage:
    """One stage of a fine-tuning schedule.

    ``trainable="decoder"``: only the decoder (and, with ``train_stem_with_decoder``, the stem) is
    updated; ``"all"``: every parameter. ``lr="warmup"``: ``peak * (k + 1) / steps`` at the stage's
    update ``k``; ``"decay"``: ``optim.schedule`` from the peak to 0 over the stage (poly:
    ``peak * (1 - k / steps) ** 0.9``); ``"constant"``: the peak.
    """

    name: str = "train"
    steps: int = 250_000
    trainable: str = "all"
    lr: str = "decay"


@dataclass
class FinetuneRecipe:
    """Everything that defines how a network is fine-tuned (or trained from scratch) on labels.

    Attributes:
        name, description: the recipe's name and the paper row it reproduces.
        transfer: "all" (encoder + decoder), "encoder" (new decoder) or "none" (random init).
        stem_init: how a stem with more input channels than the checkpoint's is initialised.
        head_init: the output convs (``decoder.seg_layers``, every resolution): "he" (nnU-Net's He
            init, zero bias) or "small" (weights from a normal with std 2e-5 truncated at 2 std, zero
            bias: MAE's fine-tuning head init). "small" starts every voxel at equal class
            probabilities whatever the seed, where "he" gives some seeds confidently wrong initial
            logits; at the CPU evidence scale "small" left every 2-case run below p = 0.5 after 300
            steps (docs/evidence.md, "What the floor runs are"), so no recipe uses it.
        train_stem_with_decoder: whether the stem is trained during "decoder" stages (Table 6: no).
        stages: the schedule (see :class:`Stage`); ``train.steps`` is their total.
        arch: architecture without a checkpoint (None: the checkpoint's).
        plan: preprocessing plan name without a checkpoint (the checkpoint's plan otherwise).
        patch_size: training patch (None: the checkpoint's pre-training patch).
        batch_size: global batch; foreground_prob: probability that a patch is centred on a labelled
            voxel (nnU-Net's 0.33; nnU-Net forces the last ``round(0.33 B)`` patches of each batch
            instead, which is one patch in two at B = 2).
        num_workers: loader processes per rank.
        n_train: labelled training cases drawn from the fold when the caller gives no ``n_train`` /
            ``fraction`` (AMAES: 20); None: all of the fold's training cases.
        deep_supervision: Dice + CE on every decoder resolution (nnU-Net's weights), else full only.
        optim: optimiser; ``optim.lr`` is the peak lr, ``optim.schedule`` the decay of "decay" stages.
        layer_decay: layer-wise lr decay of a ViT encoder (:mod:`volssl.training.lr_decay`: block ``i``
            at ``layer_decay ** (L - i)`` times the lr, embeddings ``** (L + 1)``, decoder 1; biases and
            norms then get no weight decay, as in MAE); None: one lr for every parameter.
        encoder_lr_scale: the encoder's (and stem's) lr as a fraction of the schedule's (1: one lr for
            every parameter); protects pre-trained features from large optimiser steps.
        channel_fusion: with several input channels, "stem" (the pre-trained single-channel stem
            replicated over them, ``stem_init``; S3D Table 6) or "features" (the encoder runs on each
            channel, per-stage features fused by a 1x1x1 conv initialised to their mean;
            :mod:`volssl.models.channel_fusion`). From scratch it sets the architecture the same way.
        task: "semantic" (classes, Dice + CE) or "affinities" (instance labels -> one affinity per
            offset: ``affinity_distances`` along each axis, class-balanced MSE; MAE-XNT's axons).
        augment: spatial augmentation (images and labels); intensity: nnU-Net-like intensity augmentation.
        train: precision, seed, logging / checkpoint / validation intervals.
    """

    name: str = ""
    description: str = ""
    transfer: str = "all"
    stem_init: str = "replicate"
    head_init: str = "he"
    train_stem_with_decoder: bool = False
    stages: tuple[Stage, ...] = ()
    arch: str | None = None
    plan: str = "s3d"
    patch_size: Triple | None = None
    batch_size: int = 2
    foreground_prob: float = 0.33
    num_workers: int = 4
    n_train: int | None = None
    deep_supervision: bool = True
    layer_decay: float | None = None
    encoder_lr_scale: float = 1.0  # the encoder's lr (stem included) relative to the decoder's (CNN encoders)
    channel_fusion: str = "stem"  # several channels: "stem" (replicated stem, Table 6) or "features" (per channel)
    task: str = "semantic"  # "semantic" (Dice + CE on classes) or "affinities" (instance labels -> affinities)
    affinity_distances: tuple[int, ...] = (1, 3, 9, 27)  # task "affinities": offsets per axis (MAE-XNT axons)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=1e-3, weight_decay=3e-5, momentum=0.99, nesterov=True, schedule="poly", poly_exponent=0.9,
        grad_clip=12.0))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1, precision="bf16", log_every=50, preview_every=1000, checkpoint_every=1000, val_every=2500))

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def validate(self) -> "FinetuneRecipe":
        """ValueError naming the field unless the recipe is usable; returns self."""
        where = f"recipe {self.name!r}" if self.name else "recipe"
        if self.transfer not in TRANSFERS:
            raise ValueError(f"{where}: transfer must be one of {TRANSFERS}, got {self.transfer!r}")
        if self.stem_init not in STEM_INITS:
            raise ValueError(f"{where}: stem_init must be one of {STEM_INITS}, got {self.stem_init!r}")
        if self.head_init not in HEAD_INIT_MODES:
            raise ValueError(f"{where}: head_init must be one of {HEAD_INIT_MODES}, got {self.head_init!r}")
        if not self.stages:
            raise ValueError(f"{where}: no stages")
        for k, s in enumerate(self.stages):
            if not isinstance(s, Stage):
                raise ValueError(f"{where}: stages[{k}] is a {type(s).__name__}, not a Stage")
            if int(s.steps) < 1:
                raise ValueError(f"{where}: stages.{k}.steps ({s.name}) must be >= 1, got {s.steps}")
            if s.trainable not in TRAINABLE:
                raise ValueError(f"{where}: stages.{k}.trainable must be one of {TRAINABLE}, got {s.trainable!r}")
            if s.lr not in STAGE_LR:
                raise ValueError(f"{where}: stages.{k}.lr must be one of {STAGE_LR}, got {s.lr!r}")
        if self.optim.warmup_steps:
            raise ValueError(f"{where}: optim.warmup_steps must be 0: warm-ups are stages with lr='warmup'")
        if not self.optim.lr > 0:
            raise ValueError(f"{where}: optim.lr (the peak lr) must be > 0, got {self.optim.lr}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"{where}: layer_decay must lie in (0, 1] or be None, got {self.layer_decay}")
        if self.channel_fusion not in ("stem", "features"):
            raise ValueError(f"{where}: channel_fusion must be 'stem' or 'features', got {self.channel_fusion!r}")
        if not 0.0 < self.encoder_lr_scale <= 1.0:
            raise ValueError(f"{where}: encoder_lr_scale must lie in (0, 1], got {self.encoder_lr_scale}")
        if self.layer_decay is not None and self.encoder_lr_scale != 1.0:
            raise ValueError(f"{where}: set layer_decay (ViT) or encoder_lr_scale (CNN), not both")
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.foreground_prob <= 1.0:
            raise ValueError(f"{where}: foreground_prob must lie in [0, 1], got {self.foreground_prob}")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"{where}: n_train must be >= 1 or None, got {self.n_train}")
        if self.num_workers < 0:
            raise ValueError(f"{where}: num_workers must be >= 0, got {self.num_workers}")
        if self.task not in TASKS:
            raise ValueError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        if self.task == "affinities" and (not self.affinity_distances or min(self.affinity_distances) < 1):
            raise ValueError(f"{where}: affinity_distances must be positive integers, got {self.affinity_distances}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"{where}: patch_size must be three positive integers or None, got {self.patch_size}")
        if self.train.steps != self.total_steps:
            raise ValueError(f"{where}: train.steps ({self.train.steps}) must equal the sum of the stage lengths "
                             f"({self.total_steps}); set stage lengths, not train.steps")
        return self


# --------------------------------------------------------------------------- schedule
def stage_at(recipe: FinetuneRecipe, step: int) -> tuple[int, int]:
    """``(stage index, update index within the stage)`` of global update ``step`` (0-based).

    Steps at or past the end map to the last stage's end (``(n - 1, steps)``), where a decay is 0.
    """
    if step < 0:
        raise ValueError(f"stage_at: step must be >= 0, got {step}")
    first = 0
    for k, s in enumerate(recipe.stages):
        if step < first + s.steps:
            return k, step - first
        first += s.steps
    return len(recipe.stages) - 1, recipe.stages[-1].steps


def lr_at_step(recipe: FinetuneRecipe, step: int) -> float:
    """The learning rate of global update ``step``: its stage's curve (see :class:`Stage`)."""
    k, local = stage_at(recipe, step)
    stage, optim = recipe.stages[k], recipe.optim
    if stage.lr == "warmup":
        return lr_at(local, stage.steps, dataclasses.replace(optim, schedule="constant", warmup_steps=stage.steps))
    if stage.lr == "decay":
        return lr_at(local, stage.steps, dataclasses.replace(optim, warmup_steps=0))
    return float(optim.lr)


# --------------------------------------------------------------------------- registry
RECIPES: dict[str, Callable[[], FinetuneRecipe]] = {}
_DECODER_WARMUP = Stage("decoder-warmup", 12_500, "decoder", "warmup")
_WARMUP = Stage("warmup", 12_500, "all", "warmup")
_TRAIN = Stage("train", 250_000, "all", "decay")
#: -tiny siblings of the CNN rows on multi-channel data: each channel through the one-channel pre-trained
#: encoder, features fused per stage (models/channel_fusion.py). The replicated stem of Table 6 feeds the
#: mean of the channels, which the encoder never saw in pre-training: on the brain phantoms the probe of the
#: pre-trained encoder on that image is no better than a random one's (docs/evidence.md).
_CNN_TINY_FUSION = "features"
_TINY_STEPS = {12_500: 25, 250_000: 250, 25_000: 250, 2_500: 250, 400: 160, 1_000: 400}  # the -tiny siblings' stage lengths


def register_recipe(name: str, tiny_channel_fusion: str = "stem", tiny_cpu_regime: bool = False
                    ) -> Callable[[Callable[[], FinetuneRecipe]], Callable[[], FinetuneRecipe]]:
    """Decorator: register a zero-argument function returning recipe ``name`` (and its -tiny sibling,
    whose ``channel_fusion`` is ``tiny_channel_fusion``; with ``tiny_cpu_regime``, trained with
    :func:`cpu_regime` instead of the recipe's own optimiser, schedule and augmentation)."""

    def deco(fn: Callable[[], FinetuneRecipe]) -> Callable[[], FinetuneRecipe]:
        for n in (name, f"{name}-tiny"):
            if n in RECIPES:
                raise ValueError(f"fine-tuning recipe {n!r} registered twice")
        RECIPES[name] = fn

        def tiny_sibling() -> FinetuneRecipe:
            recipe = tiny(fn())
            return dataclasses.replace(cpu_regime(recipe) if tiny_cpu_regime else recipe,
                                       channel_fusion=tiny_channel_fusion)

        RECIPES[f"{name}-tiny"] = tiny_sibling
        return fn

    return deco


#: the -tiny siblings' CPU optimiser: AdamW at most this peak lr (measured: docs/evidence.md)
TINY_MAX_LR = 2e-3


def tiny_optim(recipe: FinetuneRecipe, tiny_steps: int) -> OptimConfig:
    """The CPU optimiser of ``recipe``'s -tiny sibling (which runs ``tiny_steps`` instead of its total).

    SGD with momentum 0.99 at the papers' peak lrs does not get past predicting background in a few
    hundred CPU steps (measured: Dice 0.000 for all 12 demo runs at 400 steps), so every -tiny recipe
    trains with AdamW (weight decay 1e-2, clipping and schedule kept):

    * SGD rows: ``2e-3 * lr / 1e-3`` (S3D's peak 1e-3 -> 2e-3, Table 2's 1e-4 row -> 2e-4), at most
      :data:`TINY_MAX_LR` (nnU-Net's from-scratch 1e-2 -> 2e-3);
    * AdamW rows: their lr times the step compression (real steps / tiny steps: the same integral of
      the lr over training), at most :data:`TINY_MAX_LR` (AMAES 1e-4 x 10 -> 1e-3, MAE-XNT 1e-5 x 100
      -> 1e-3).
    """
    o = recipe.optim
    if o.name == "sgd":
        lr = min(TINY_MAX_LR, 2e-3 * o.lr / 1e-3)
    else:
        lr = min(TINY_MAX_LR, o.lr * recipe.total_steps / max(1, tiny_steps))
    return dataclasses.replace(o, name="adamw", lr=lr, weight_decay=1e-2 if o.name == "sgd" else o.weight_decay,
                               min_lr=o.min_lr * lr / o.lr if o.lr else 0.0)


#: length of the -tiny CPU regime (:func:`cpu_regime`), as the S3D schedule's -tiny sibling (25 + 25 + 250)
CPU_REGIME_STEPS = 300


def cpu_regime(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """``recipe`` (a -tiny sibling) trained the way the S3D -tiny recipes train, which learns on CPU.

    Measured on the tuning draw (docs/evidence.md, AMAES): the AMAES -tiny recipe (AdamW amsgrad at
    1e-3, cosine, no deep supervision, AMAES augmentation with elastic deformation, 250 steps) gave a
    from-scratch U-Net 4.8 / 0.0 Dice on 2 seeds, and no single change of lr, steps, deep supervision,
    clipping or augmentation got it past 10 on both; all of them together, which is the S3D -tiny regime
    (one 300-step stage: AdamW 2e-3, weight decay 1e-2, poly, gradient clip 12, deep supervision,
    mirroring and scaling 0.7-1.4, no elastic deformation) gave 38.8 / 43.0, as the S3D schedule's own
    -tiny recipe does with the same U-Net (40.8 / 38.1). What the method transfers, its plan, network
    and intensity augmentation are kept; only the CPU training regime is shared.
    """
    optim = dataclasses.replace(recipe.optim, name="adamw", lr=TINY_MAX_LR, weight_decay=1e-2, amsgrad=False,
                                schedule="poly", warmup_steps=0, min_lr=0.0, grad_clip=12.0)
    augment = dataclasses.replace(recipe.augment, p_mirror=0.5, scale_range=(0.7, 1.4), p_elastic=0.0)
    return dataclasses.replace(
        recipe, stages=(Stage("train", CPU_REGIME_STEPS, "all", "decay"),), optim=optim, augment=augment,
        deep_supervision=True, description=recipe.description + "; CPU regime of the S3D -tiny recipes")


def tiny(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """The CPU sibling of ``recipe``: same stages with 25 / 250 instead of 12.5k / 250k steps, tiny
    network and 64^3 patches when training from scratch (otherwise the checkpoint's), batch <= 2, fp32,
    the CPU optimiser of :func:`tiny_optim`."""
    stages = tuple(dataclasses.replace(s, steps=_TINY_STEPS.get(s.steps, max(1, s.steps // 1000)))
                   for s in recipe.stages)
    return dataclasses.replace(
        recipe, stages=stages, description=recipe.description + " [tiny CPU sibling: 25/250-step stages, AdamW]",
        arch=tiny_arch(recipe.arch) if recipe.arch else None, patch_size=(64, 64, 64) if recipe.patch_size else None,
        num_workers=1, batch_size=min(recipe.batch_size, 2), optim=tiny_optim(recipe, sum(s.steps for s in stages)),
        train=dataclasses.replace(recipe.train, precision="fp32", log_every=10, preview_every=100, checkpoint_every=50,
                                  val_every=50),
    )


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> FinetuneRecipe:
    """A fresh copy of recipe ``name`` (KeyError listing the known names)."""
    if name not in RECIPES:
        raise KeyError(f"unknown fine-tuning recipe {name!r}; known: {', '.join(list_recipes())}")
    recipe = RECIPES[name]()
    recipe.name = name
    recipe.train.steps = recipe.total_steps
    return recipe.validate()


_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(\w+)$")


def resolve_recipe(name: str, overrides: Sequence[str] | None = None,
                   stage_steps: Sequence[int] | None = None, seed: int | None = None) -> FinetuneRecipe:
    """Recipe ``name`` with ``key=value`` overrides (``stages.K.FIELD=V`` for a stage), optional stage
    lengths (one per stage, in order) and the run seed; ``train.steps`` becomes the stages' total."""
    recipe = get_recipe(name)
    stages = [copy.copy(s) for s in recipe.stages]
    rest = []
    for item in overrides or []:
        key, _, value = item.partition("=")
        key = key.strip()
        m = _STAGE_KEY.match(key)
        if key in ("stages", "train.steps") or key.startswith("stages") and not m:
            raise ValueError(f"override {item!r}: set one stage field (stages.K.steps=N, stages.K.trainable=..., "
                             "stages.K.lr=...) or --stage-steps; train.steps is the sum of the stage lengths")
        if m:
            k = int(m.group(1))
            if k >= len(stages):
                raise ValueError(f"override {item!r}: recipe {name!r} has {len(stages)} stages "
                                 f"({', '.join(s.name for s in stages)})")
            apply_overrides(stages[k], [f"{m.group(2)}={value}"])
        else:
            rest.append(item)
    apply_overrides(recipe, rest)
    if stage_steps is not None:
        if len(stage_steps) != len(stages):
            raise ValueError(f"--stage-steps: recipe {name!r} has {len(stages)} stages "
                             f"({', '.join(s.name for s in stages)}), got {len(stage_steps)} lengths")
        for s, n in zip(stages, stage_steps):
            s.steps = int(n)
    recipe.stages = tuple(stages)
    recipe.train.steps = recipe.total_steps
    if seed is not None:
        recipe.train.seed = int(seed)
    return recipe.validate()


def describe_recipes() -> list[dict]:
    """One row per recipe: name, transfer, stages (name, steps, trainable, lr), peak lr, description."""
    rows = []
    for name in list_recipes():
        r = get_recipe(name)
        rows.append({"name": name, "transfer": r.transfer, "peak_lr": r.optim.lr, "total_steps": r.total_steps,
                     "stages": [config_to_dict(s) for s in r.stages], "augmentation":
                     "spatial + intensity" if r.intensity.enabled else "spatial", "description": r.description})
    return rows


# --------------------------------------------------------------------------- the paper's rows
def _s3d(description: str, stages: tuple[Stage, ...], lr: float = 1e-3, transfer: str = "all") -> FinetuneRecipe:
    recipe = FinetuneRecipe(description=description, transfer=transfer, stages=stages)
    recipe.optim.lr = lr
    return recipe


@register_recipe("s3d", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d() -> FinetuneRecipe:
    return _s3d("S3D Table 2 best row: transfer encoder + decoder; decoder warm-up 12.5k (encoder and stem frozen), "
                "whole-network warm-up 12.5k, training 250k, peak lr 1e-3, poly; multi-channel stem replicated "
                "and frozen in the decoder warm-up (Table 6)", (_DECODER_WARMUP, _WARMUP, _TRAIN))


@register_recipe("s3d-lr1e-2", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d_lr1e_2() -> FinetuneRecipe:
    return _s3d("S3D Table 2: as s3d (two warm-ups) with the nnU-Net default peak lr 1e-2",
                (_DECODER_WARMUP, _WARMUP, _TRAIN), lr=1e-2)


@register_recipe("s3d-lr1e-4", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d_lr1e_4() -> FinetuneRecipe:
    return _s3d("S3D Table 2: as s3d (two warm-ups) with peak lr 1e-4", (_DECODER_WARMUP, _WARMUP, _TRAIN), lr=1e-4)


@register_recipe("s3d-one-warmup", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d_one_warmup() -> FinetuneRecipe:
    return _s3d("S3D Table 2: transfer all, one whole-network warm-up 12.5k then training 250k, peak lr 1e-3",
                (_WARMUP, _TRAIN))


@register_recipe("s3d-no-warmup", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d_no_warmup() -> FinetuneRecipe:
    return _s3d("S3D Table 2: transfer all, no warm-up: training 250k from peak lr 1e-3 (poly)", (_TRAIN,))


@register_recipe("s3d-frozen-encoder", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d_frozen_encoder() -> FinetuneRecipe:
    return _s3d("S3D Table 2: transfer all, encoder frozen throughout: decoder warm-up 12.5k, decoder-only "
                "training 250k, peak lr 1e-3", (_DECODER_WARMUP, dataclasses.replace(_TRAIN, trainable="decoder")))


@register_recipe("s3d-encoder", tiny_channel_fusion=_CNN_TINY_FUSION)
def s3d_encoder() -> FinetuneRecipe:
    return _s3d("S3D Table 2: transfer the encoder only (new decoder); decoder warm-up 12.5k, whole-network "
                "warm-up 12.5k, training 250k, peak lr 1e-3", (_DECODER_WARMUP, _WARMUP, _TRAIN), transfer="encoder")


@register_recipe("scratch", tiny_channel_fusion=_CNN_TINY_FUSION)
def scratch() -> FinetuneRecipe:
    recipe = _s3d("'No (Fixed)': random init, the pre-training plan and patch (S3D: 1 mm, z-score, 160^3, "
                  "ResEncL), nnU-Net's from-scratch training: 250k steps, poly from lr 1e-2, no warm-up, "
                  "nnU-Net-like spatial + intensity augmentation", (_TRAIN,), lr=1e-2, transfer="none")
    recipe.arch, recipe.patch_size = "resenc-l", (160, 160, 160)
    recipe.intensity.enabled = True
    return recipe


@register_recipe("scratch-s3d-schedule", tiny_channel_fusion=_CNN_TINY_FUSION)
def scratch_s3d_schedule() -> FinetuneRecipe:
    recipe = _s3d("random init with the s3d schedule (12.5k + 12.5k warm-up steps, 250k training, peak lr 1e-3) "
                  "and every parameter trainable in every stage: a schedule-matched control for 'No (Fixed)'",
                  (Stage("warmup-1", 12_500, "all", "warmup"), Stage("warmup-2", 12_500, "all", "warmup"), _TRAIN),
                  transfer="none")
    recipe.arch, recipe.patch_size = "resenc-l", (160, 160, 160)
    recipe.intensity.enabled = True
    return recipe


# --------------------------------------------------------------------------- MAE-XNT (supplement Tab. 7)
_MAE_XNT_STEPS = 25_000  # see mae_xnt(): the supplement gives wall time, not steps


def _mae_xnt(description: str, lr: float, min_lr: float, weight_decay: float, layer_decay: float | None,
             transfer: str = "encoder") -> FinetuneRecipe:
    """A UNETR-XNT fine-tuning row: one cosine stage (lr -> ``min_lr`` = lr / 10, no warm-up), AdamW, no
    clipping, one full-resolution head (no deep supervision), mirroring only (the flips of the cube
    symmetries)."""
    return FinetuneRecipe(
        description=description, transfer=transfer, stages=(Stage("train", _MAE_XNT_STEPS, "all", "decay"),),
        batch_size=96, deep_supervision=False, layer_decay=layer_decay,
        optim=OptimConfig(name="adamw", lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), schedule="cosine",
                          min_lr=min_lr, grad_clip=None),
        augment=AugmentConfig(enabled=True, p_rotation=0.0, p_scale=0.0, p_mirror=0.5))


@register_recipe("mae-xnt")
def mae_xnt() -> FinetuneRecipe:
    return _mae_xnt("MAE-XNT supplement Table 7, row 0.90 / 4 / 320 (cell nuclei): transfer the ViT encoder, new "
                    "UNETR-XNT decoder; AdamW lr 1e-5, weight decay 1e-4, layer-wise lr decay 0.75; cosine to "
                    "lr/10 without warm-up and batch 96 (public code); 25k steps = the public code's 100 epochs of "
                    "24k crops (the paper trains 6 h on 2 H100s)", lr=1e-5, min_lr=1e-6, weight_decay=1e-4,
                    layer_decay=0.75)


@register_recipe("scratch-mae-xnt-schedule")
def scratch_mae_xnt_schedule() -> FinetuneRecipe:
    recipe = _mae_xnt("random init with the mae-xnt schedule (25k steps, cosine, batch 96) and the supplement's "
                      "Table 7 from-scratch values: AdamW lr 1e-4, weight decay 1e-5, no layer-wise decay; "
                      "vit-b-unetr on 64^3 crops", lr=1e-4, min_lr=1e-5, weight_decay=1e-5, layer_decay=None,
                      transfer="none")
    recipe.arch, recipe.patch_size = "vit-b-unetr", (64, 64, 64)
    return recipe


def _mae_xnt_axons(description: str, lr: float, weight_decay: float, steps: int, layer_decay: float | None,
                   transfer: str) -> FinetuneRecipe:
    """An XPRESS axon row (supplement Table 10): affinities at offsets 1, 3, 9, 27 per axis (class-balanced
    MSE), the UNETR-XNT schedule with the searched lr, weight decay, steps and layer-wise decay."""
    recipe = _mae_xnt(description, lr=lr, min_lr=lr / 10, weight_decay=weight_decay, layer_decay=layer_decay,
                      transfer=transfer)
    recipe.stages = (Stage("train", steps, "all", "decay"),)
    recipe.train = dataclasses.replace(recipe.train, steps=steps)
    recipe.task = "affinities"
    recipe.foreground_prob = 0.5
    return recipe


@register_recipe("mae-xnt-axons")
def mae_xnt_axons() -> FinetuneRecipe:
    return _mae_xnt_axons("MAE-XNT supplement Table 10, foundation model on XPRESS axons: transfer the ViT encoder, "
                          "predict 12 affinities; AdamW lr 5e-4, weight decay 0.05, 400 steps, layer-wise lr decay "
                          "0.75 (agglomeration threshold searched in {0.5, 0.6, 0.7} at prediction)",
                          lr=5e-4, weight_decay=0.05, steps=400, layer_decay=0.75, transfer="encoder")


@register_recipe("scratch-mae-xnt-axons")
def scratch_mae_xnt_axons() -> FinetuneRecipe:
    recipe = _mae_xnt_axons("MAE-XNT supplement Table 10, training from scratch on XPRESS axons: 12 affinities; "
                            "AdamW lr 1e-4, weight decay 0.05, 1000 steps; vit-b-unetr on 64^3 crops",
                            lr=1e-4, weight_decay=0.05, steps=1000, layer_decay=None, transfer="none")
    recipe.arch, recipe.patch_size = "vit-b-unetr", (64, 64, 64)
    return recipe


# --------------------------------------------------------------------------- AMAES (Sec. 3.2, 4.2, Appendix A)
#: AMAES fine-tuning augmentation (the public code's "basic" preset): rotation p .2 (+-30 deg) and
#: scaling p .2 (0.9-1.1); no mirroring, no elastic deformation, no intensity augmentation
_AMAES_SPATIAL = AugmentConfig(enabled=True, p_rotation=0.2, rotation_deg=30.0, p_scale=0.2, scale_range=(0.9, 1.1),
                               p_mirror=0.0)


def _amaes(description: str, transfer: str) -> FinetuneRecipe:
    """An AMAES fine-tuning row: 2500 steps, AdamW (amsgrad, eps 1e-8, weight decay 3e-5) at lr 1e-4 with
    cosine decay and no warm-up (Appendix A, fine-tune columns), batch 4, 128^3 patches, bf16, one
    full-resolution head (no deep supervision: the public code's default), 20 labelled cases."""
    return FinetuneRecipe(
        description=description, transfer=transfer, stages=(Stage("train", 2_500, "all", "decay"),),
        plan="amaes", batch_size=4, n_train=20, deep_supervision=False,
        optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=3e-5, betas=(0.9, 0.999), eps=1e-8, amsgrad=True,
                          schedule="cosine", grad_clip=None),
        augment=dataclasses.replace(_AMAES_SPATIAL),
        train=TrainConfig(steps=1, precision="bf16", log_every=50, preview_every=500, checkpoint_every=500,
                          val_every=250))


@register_recipe("amaes", tiny_channel_fusion=_CNN_TINY_FUSION, tiny_cpu_regime=True)
def amaes() -> FinetuneRecipe:
    return _amaes("AMAES fine-tuning (Sec. 3.2, 4.2, Appendix A): transfer the pre-trained encoder, new U-Net decoder "
                  "with skips; 2500 steps, AdamW amsgrad lr 1e-4 cosine, no warm-up, batch 4, spatial augmentation "
                  "only (rotation, scaling), 20 labelled cases", transfer="encoder")


@register_recipe("scratch-amaes-schedule", tiny_channel_fusion=_CNN_TINY_FUSION, tiny_cpu_regime=True)
def scratch_amaes_schedule() -> FinetuneRecipe:
    recipe = _amaes("U-Net B from scratch with the amaes schedule (2500 steps, AdamW lr 1e-4 cosine, batch 4, "
                    "128^3, 20 cases) and, as the paper's from-scratch baselines, the full augmentation: AMAES "
                    "spatial (with elastic deformation) + nnU-Net-like intensity augmentation", transfer="none")
    recipe.arch, recipe.patch_size = "unet-b", (128, 128, 128)
    recipe.augment = dataclasses.replace(_AMAES_SPATIAL, p_elastic=0.33, elastic_alpha=(200.0, 600.0),
                                         elastic_sigma=(20.0, 30.0))
    recipe.intensity.enabled = True
    return recipe


# --------------------------------------------------------------------------- SwinUNETR (Tang et al. 2022)
# The authors' fine-tuning (MONAI research-contributions SwinUNETR/BTCV/main.py defaults): AdamW lr 1e-4,
# weight decay 1e-5, LinearWarmupCosineAnnealingLR over 5000 epochs with 50 warm-up epochs (an epoch = the
# 24 BTCV training volumes at batch 1 -> 120k updates, 1.2k of warm-up), 1 volume x 4 crops (RandCropByPosNeg
# pos 1 : neg 1) of 96^3 per update, Dice + CE on the single output, flips p .2 per axis, intensity scaling
# p .1 (factor 1 +- 0.1); not mapped: RandRotate90 p .2 and intensity shift p .1 (+-0.1 of a [0, 1] range).
_SWIN_WARMUP = Stage("warmup", 1_200, "all", "warmup")
_SWIN_TRAIN = Stage("train", 118_800, "all", "decay")


def _swinunetr(description: str, transfer: str) -> FinetuneRecipe:
    intensity = IntensityConfig(enabled=True, p_noise=0.0, p_blur=0.0, p_brightness=0.1, brightness_range=(0.9, 1.1),
                                p_contrast=0.0, p_low_res=0.0, p_gamma_inverted=0.0, p_gamma=0.0)
    return FinetuneRecipe(
        description=description, transfer=transfer, stages=(_SWIN_WARMUP, _SWIN_TRAIN), patch_size=(96, 96, 96),
        batch_size=4, foreground_prob=0.5, deep_supervision=False,
        optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.999), eps=1e-8, schedule="cosine",
                          grad_clip=None),
        augment=AugmentConfig(enabled=True, p_rotation=0.0, p_scale=0.0, p_mirror=0.2), intensity=intensity)


@register_recipe("swinunetr")
def swinunetr() -> FinetuneRecipe:
    return _swinunetr("SwinUNETR fine-tuning (Tang et al. 2022; MONAI BTCV defaults): transfer the pre-trained Swin "
                      "ViT encoder into a new SwinUNETR (fresh conv decoder), 1.2k warm-up + 118.8k cosine steps, "
                      "AdamW lr 1e-4 wd 1e-5, batch 4, 96^3, one output head (no deep supervision)", "encoder")


@register_recipe("scratch-swinunetr")
def scratch_swinunetr() -> FinetuneRecipe:
    recipe = _swinunetr("SwinUNETR from scratch with the swinunetr schedule (1.2k warm-up + 118.8k cosine steps, "
                        "AdamW lr 1e-4 wd 1e-5, batch 4, 96^3, no deep supervision)", "none")
    recipe.arch = "swinunetr"
    return recipe


# --------------------------------------------------------------------------- "No (Dyn.)" (nnU-Net planned per dataset)
@register_recipe("scratch-dynamic")
def scratch_dynamic() -> FinetuneRecipe:
    recipe = _s3d("'No (Dyn.)': random init with the dataset's own nnU-Net-style plan (volssl.data.dynamic_plan: "
                  "median target spacing, normalisation by modality, patch and ResEncL depth from the median shape "
                  "under a 24 GB budget; plan=dynamic:<GB> for another), nnU-Net's from-scratch training: 250k "
                  "steps, poly from lr 1e-2, spatial + intensity augmentation", (_TRAIN,), lr=1e-2, transfer="none")
    recipe.arch, recipe.plan, recipe.patch_size = "resenc-l", "dynamic", None
    recipe.intensity.enabled = True
    return recipe
