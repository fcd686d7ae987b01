"""Training machinery shared by every pre-training method.

``optim`` (optimisers, lr schedules), ``augment`` (batched spatial augmentation), ``checkpoint``
(atomic, ``weights_only``-loadable checkpoints), ``distributed`` (torchrun data parallelism),
``logging`` (CSV + TensorBoard scalars, preview PNGs) and ``trainer`` (:func:`pretrain`, the loop).
"""
from volssl.training.checkpoint import load_checkpoint, save_checkpoint
from volssl.training.optim import StepSchedule, build_optimizer, lr_at
from volssl.training.trainer import pretrain

__all__ = ["StepSchedule", "build_optimizer", "load_checkpoint", "lr_at", "pretrain", "save_checkpoint"]
