"""The S3D paper's pre-training baselines on ResEncL (paper: "Revisiting MAE pre-training for 3D medical
image segmentation", Appendix A): Models Genesis, VolumeFusion and VoCo.

Appendix A: every baseline uses the S3D pre-training data and preprocessing, the ResEnc U-Net, 250k
steps and SGD (lr 1e-2, PolyLR, momentum 0.99, weight decay 3e-5); batch 6 and 160^3 patches unless
stated. Models Genesis keeps the official deformation hyper-parameters (A.1); VolumeFusion uses
K = 5 levels, 10-40 boxes of [8, 100] voxels per axis (A.2); VoCo uses 192 x 192 x 64 patches cut
into 3 x 3 x 1 base crops of 64^3, 5 random crops and batch 12 (A.3).
"""
from __future__ import annotations

from volssl.config import AugmentConfig, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, register_preset
from volssl.methods.models_genesis import ModelsGenesisConfig
from volssl.methods.voco import VoCoConfig
from volssl.methods.volume_fusion import VolumeFusionConfig
from volssl.presets._tiny import tiny as _tiny
from volssl.presets.arms import Arm, register_arm


def _appendix_a_optim() -> OptimConfig:
    """Appendix A's optimiser for every baseline: SGD lr 1e-2, PolyLR 0.9, Nesterov momentum 0.99, wd 3e-5."""
    return OptimConfig(name="sgd", lr=1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True, schedule="poly",
                       poly_exponent=0.9)


def _appendix_a(description: str, method, patch_size=(160, 160, 160), batch_size: int = 6, num_workers: int = 6,
                augment: bool = True) -> RunConfig:
    """Appendix A's shared recipe: ResEncL, SGD (:func:`_appendix_a_optim`), 250k steps in bf16; the
    method, patches, batch and whole-patch augmentation per baseline."""
    return RunConfig(
        description=description,
        data=DataConfig(patch_size=patch_size, batch_size=batch_size, num_workers=num_workers),
        model=ModelConfig(arch="resenc-l"),
        method=method,
        optim=_appendix_a_optim(),
        augment=AugmentConfig(enabled=augment),
        train=TrainConfig(steps=250_000, precision="bf16"),
    )


@register_preset("models-genesis")
def models_genesis() -> RunConfig:
    return _appendix_a(
        "Models Genesis (S3D paper App. A.1): ResEncL, 160^3, batch 6, SGD lr 1e-2 poly, 250k steps; "
        "official deformations (flip .4, local shuffle .5, Bezier map .9, painting .9: out .8 / in .2), "
        "MSE restoration in per-patch [0, 1]",
        ModelsGenesisConfig())


@register_preset("volume-fusion")
def volume_fusion() -> RunConfig:
    return _appendix_a(
        "VolumeFusion (S3D paper App. A.2): ResEncL, 160^3, batch 6, SGD lr 1e-2 poly, 250k steps; "
        "K=5 levels, 10-40 boxes of 8..100 voxels (62.5% of the patch), Dice + CE",
        VolumeFusionConfig(levels=5, boxes=(10, 40), box_min=8, box_max_fraction=0.625))


@register_preset("voco")
def voco() -> RunConfig:
    return _appendix_a(
        "VoCo (S3D paper App. A.3): ResEncL encoder, 192x192x64 patches = 3x3x1 base crops of 64^3, "
        "5 random crops, batch 12, SGD lr 1e-2 poly, 250k steps, momentum teacher (official code); "
        "crops augmented independently (flips, rot90), no whole-patch augmentation",
        VoCoConfig(grid=(3, 3, 1), random_crops=5, teacher=True, momentum=0.9),
        patch_size=(192, 192, 64), batch_size=12, num_workers=8, augment=False)


@register_preset("models-genesis-tiny")
def models_genesis_tiny() -> RunConfig:
    return _tiny(models_genesis())


@register_preset("volume-fusion-tiny")
def volume_fusion_tiny() -> RunConfig:
    return _tiny(volume_fusion())


@register_preset("voco-tiny")
def voco_tiny() -> RunConfig:
    cfg = _tiny(voco())
    cfg.data.patch_size = (96, 96, 32)  # the 3 x 3 x 1 grid of 32^3 crops (resenc-tiny: total stride 16)
    cfg.method.proj_hidden = 512
    cfg.method.proj_dim = 512
    return cfg


# ------------------------------------------------------------------ benchmark arms (the S3D paper's SSL baselines)
register_arm(
    Arm("models-genesis", "Models Genesis (ResEnc)", "s3d", preset="models-genesis", twin="no-fixed"),
    Arm("volume-fusion", "VolumeFusion (ResEnc)", "s3d", preset="volume-fusion", twin="no-fixed"),
    Arm("voco", "VoCo (ResEnc encoder)", "s3d-encoder", preset="voco", own_pretrain_patch=True, twin="no-fixed"),
)
