"""The shared rule that shrinks a real preset to its CPU sibling (``NAME-tiny``)."""
from __future__ import annotations

from volssl.config import OptimConfig, RunConfig
from volssl.models.registry import tiny_arch


def tiny(cfg: RunConfig, steps: int = 300) -> RunConfig:
    """Shrink a real preset to its CPU sibling: same method and optimiser, tiny network and patches."""
    cfg.model.arch = tiny_arch(cfg.model.arch)
    cfg.data.patch_size = (64, 64, 64)
    cfg.data.batch_size = 2
    cfg.data.num_workers = 1
    # A few hundred CPU steps are too few for SGD with momentum 0.99 (measured on brain phantoms,
    # resenc-tiny: the loss plateaus at ~1.0, the mean prediction, after 200 steps), so the tiny
    # siblings use AdamW with a short warm-up and cosine decay, keeping the real preset's lr ratios.
    cfg.optim = OptimConfig(name="adamw", lr=2e-3 * cfg.optim.lr / 1e-2, weight_decay=1e-2,
                            schedule="cosine", warmup_steps=max(10, steps // 20),
                            grad_clip=cfg.optim.grad_clip)
    cfg.train.steps = steps
    cfg.train.precision = "fp32"
    cfg.train.log_every = 10
    cfg.train.preview_every = 100
    cfg.train.checkpoint_every = 100
    cfg.description += " [tiny CPU sibling: same code path, small widths/patches/steps]"
    return cfg
