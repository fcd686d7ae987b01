"""S3D presets (paper: "Revisiting MAE pre-training for 3D medical image segmentation", Table 1 / Sec. 3)."""
from __future__ import annotations

from volssl.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    register_preset,
)
from volssl.methods.s3d import S3DConfig
from volssl.presets._tiny import tiny as _tiny
from volssl.presets.arms import Arm, register_arm


# ------------------------------------------------------------------ S3D (Table 1 / Sec. 3)
@register_preset("s3d-b")
def s3d_b() -> RunConfig:
    return RunConfig(
        description="S3D-B: ResEncL, 160^3, batch 6, SGD lr 1e-2, 250k steps, dynamic mask ratio U[0.6, 0.9]",
        data=DataConfig(patch_size=(160, 160, 160), batch_size=6, num_workers=6),
        model=ModelConfig(arch="resenc-l"),
        method=S3DConfig(mask_ratio_range=(0.6, 0.9)),
        optim=OptimConfig(name="sgd", lr=1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True,
                          schedule="poly", poly_exponent=0.9),
        augment=AugmentConfig(enabled=True),
        train=TrainConfig(steps=250_000, precision="bf16"),
    )


@register_preset("s3d-l")
def s3d_l() -> RunConfig:
    cfg = s3d_b()
    cfg.description = "S3D-L: S3D-B compound-scaled, batch 48, lr 3e-2, 1M steps (same architecture)"
    cfg.data.batch_size = 48
    cfg.data.num_workers = 12
    cfg.optim.lr = 3e-2
    cfg.train.steps = 1_000_000
    return cfg


@register_preset("s3d-b-tiny")
def s3d_b_tiny() -> RunConfig:
    return _tiny(s3d_b())


@register_preset("s3d-l-tiny")
def s3d_l_tiny() -> RunConfig:
    cfg = _tiny(s3d_l())
    cfg.data.batch_size = 4
    return cfg


# ------------------------------------------------------------------ benchmark arms (Table 1: S3D and its baselines)
register_arm(
    Arm("s3d", "S3D (sparse MAE, ResEnc)", "s3d", preset="s3d-b", twin="no-fixed"),
    Arm("no-fixed", "No (Fixed): ResEnc from scratch, pre-training plan", "scratch-s3d-schedule", arch="resenc-l"),
    Arm("no-dyn", "No (Dyn.): ResEnc from scratch, nnU-Net-style dynamic plan", "scratch-dynamic", plan="dynamic"),
)
