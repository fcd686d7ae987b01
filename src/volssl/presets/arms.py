"""Benchmark arms: a pre-training preset (or none) plus its fine-tuning recipe, registered beside the presets.

An *arm* is one row of the papers' comparisons. Each preset module registers the arms of its paper
with :func:`register_arm` (S3D and its from-scratch baselines in ``s3d.py``, AMAES and its U-Net twin
in ``amaes.py``, ...); ``volssl benchmark`` runs them (docs/design.md, "Adding a method").
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One row of the comparison: a pre-training preset (None: from scratch) and a fine-tuning recipe.

    ``recipe`` and ``preset`` are real-scale names; the tiny scales use their ``-tiny`` siblings.
    ``plan`` preprocesses the unlabeled pool and the labeled data (the paper's "fixed" setting: the
    pre-training plan; from scratch the same plan unless ``plan="dynamic"``). ``label`` is the
    paper's name for the row.
    """

    name: str
    label: str
    recipe: str
    preset: str | None = None
    plan: str = "s3d"
    arch: str | None = None  # from scratch: the architecture (real scale; the tiny scale uses its sibling)
    finetune_overrides: tuple[str, ...] = ()
    min_patch: int | None = None  # smallest patch side the architecture trains on (tiny scales raise theirs to it)
    own_pretrain_patch: bool = False  # pre-train on the preset's patch (VoCo: a grid of base crops), not the scale's
    twin: str | None = None  # the from-scratch arm it is paired with in the report (same network, plan, schedule)


#: arm name -> Arm, in registration order (the built-in ones once :func:`get_arms` has loaded the presets)
ARMS: dict[str, Arm] = {}


def get_arms() -> dict[str, Arm]:
    """:data:`ARMS` with the built-in arms registered (the preset modules are imported on first use)."""
    from volssl.config import load_builtin_specs

    load_builtin_specs()
    return ARMS


def register_arm(*arms: Arm) -> None:
    """Register ``arms`` (ValueError for a name registered twice with different values)."""
    for arm in arms:
        if ARMS.get(arm.name, arm) != arm:
            raise ValueError(f"benchmark arm {arm.name!r} registered twice with different values")
        ARMS[arm.name] = arm
