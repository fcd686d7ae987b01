"""Optimisers and learning-rate schedules, configured by :class:`volssl.config.OptimConfig`.

* ``sgd``: SGD with (Nesterov) momentum, the nnU-Net / S3D default (momentum 0.99, lr 1e-2, wd 3e-5).
* ``adamw``: AdamW (betas, eps, amsgrad) for AMAES and MAE-XNT.

Schedules are pure functions of the step (:func:`lr_at`): ``poly`` (``lr * (1 - t)^0.9``), ``cosine``
(to ``min_lr``) and ``constant``, each optionally preceded by a linear warm-up. :class:`StepSchedule`
applies them to an optimiser; its only state is the step, so a resumed run gets exactly the learning
rates of an uninterrupted one. Parameter groups may carry an ``"lr_scale"`` entry (layer-wise decay,
fine-tuning stages): the group's lr is ``lr_at(step) * lr_scale``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from volssl.config import OptimConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")


def _check(cfg: OptimConfig) -> None:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimiser {cfg.name!r}; known: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")
    if not cfg.lr > 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"optim.min_lr must lie in [0, optim.lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ValueError(f"optim.grad_clip must be > 0 or None, got {cfg.grad_clip}")


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over ``params`` (parameters or parameter-group dicts).

    Group dicts may set their own ``weight_decay`` and an ``lr_scale`` (used by :class:`StepSchedule`);
    every group starts at ``cfg.lr * lr_scale``.
    """
    _check(cfg)
    params = list(params)
    if not params:
        raise ValueError("build_optimizer: no parameters to optimise")
    if isinstance(params[0], dict):
        params = [dict(g, lr=cfg.lr * float(g.get("lr_scale", 1.0))) for g in params]
    if cfg.name == "sgd":
        if cfg.nesterov and not cfg.momentum > 0:
            raise ValueError(f"optim.nesterov needs optim.momentum > 0, got {cfg.momentum}")
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)


def lr_at(step: int, total: int, cfg: OptimConfig, peak: float | None = None) -> float:
    """Learning rate of update ``step`` (0-based) of a run of ``total`` updates.

    Warm-up (``cfg.warmup_steps = w > 0``): ``peak * (step + 1) / w`` for ``step < w``. Afterwards,
    with ``t = (step - w) / (total - w)`` clipped to [0, 1]:
    ``poly``: ``peak * (1 - t) ** poly_exponent``; ``cosine``: ``min_lr + (peak - min_lr) * (1 + cos(pi t)) / 2``;
    ``constant``: ``peak``. ``peak`` defaults to ``cfg.lr``.
    """
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if total <= 0:
        raise ValueError(f"lr_at: total steps must be > 0, got {total}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")
    peak = cfg.lr if peak is None else float(peak)
    w = int(cfg.warmup_steps)
    if w > 0 and step < w:
        return peak * (step + 1) / w
    t = min(max((step - w) / max(total - w, 1), 0.0), 1.0)
    if cfg.schedule == "poly":
        return peak * (1.0 - t) ** cfg.poly_exponent
    if cfg.schedule == "cosine":
        floor = min(cfg.min_lr, peak)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return peak


class StepSchedule:
    """Sets each parameter group's lr to ``lr_fn(step) * group.get("lr_scale", 1)``.

    The schedule holds nothing but ``step`` (the index of the next update), so ``state_dict()`` is
    ``{"step": int}`` and resuming is exact. Call :meth:`step` after every ``optimizer.step()``.
    ``lr_fn`` defaults to ``lambda s: lr_at(s, total_steps, cfg)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig,
                 lr_fn: Callable[[int], float] | None = None, step: int = 0) -> None:
        if total_steps <= 0:
            raise ValueError(f"StepSchedule: total_steps must be > 0, got {total_steps}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.cfg = cfg
        self.lr_fn = lr_fn or (lambda s: lr_at(s, self.total_steps, self.cfg))
        self.set_step(step)

    def set_step(self, step: int) -> float:
        """Move to update ``step``; returns the base lr (before group scales)."""
        self._step = int(step)
        lr = float(self.lr_fn(self._step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))
        self._last = lr
        return lr

    def step(self) -> float:
        return self.set_step(self._step + 1)

    @property
    def current_step(self) -> int:
        return self._step

    @property
    def last_lr(self) -> float:
        """Base lr (scale 1) of the current step."""
        return self._last

    def state_dict(self) -> dict:
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"StepSchedule.load_state_dict: expected {{'step': int}}, got {state!r}")
        self.set_step(int(state["step"]))


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to ``max_norm`` (None: no clipping); returns the norm
    before clipping as a 0-d tensor (on the parameters' device, no host sync)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, float(max_norm))
