"""Fine-tuning on labelled data: recipes (the S3D paper's Table 2 rows), weight transfer, splits,
Dice + CE losses and :func:`finetune` (``volssl finetune``), on the training loop shared with
pre-training (:func:`volssl.training.trainer.run_loop`).

``finetune`` and the recipe functions are imported on first use (``volssl --help`` stays fast).
"""
from __future__ import annotations

from typing import Any

__all__ = ["finetune", "get_recipe", "list_recipes", "resolve_recipe"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from volssl.finetuning.finetune import finetune

        return finetune
    if name in ("get_recipe", "list_recipes", "resolve_recipe"):
        from volssl.finetuning import recipes

        return getattr(recipes, name)
    raise AttributeError(f"module 'volssl.finetuning' has no attribute {name!r}")
