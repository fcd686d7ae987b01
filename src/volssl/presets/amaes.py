"""AMAES presets (paper: "AMAES: Augmented Masked Autoencoder Pretraining on Public Brain MRI Data for
3D-Native Segmentation", Sec. 3-4 and Appendix A/B).

Appendix A, pre-training columns: AdamW (amsgrad, eps 1e-8), weight decay 3e-5, cosine decay after 5
linear warm-up epochs, bf16-mixed, torch.compile, 128^3 patches, mask ratio 0.6 on 4^3 tokens;
batch 16 (U-Net XL, B) / 8 (MedNeXt L, M); base learning rate 1e-4 (U-Net XL, B, MedNeXt L) and 5e-4
(MedNeXt M). The flattened table lists six learning rates (1e-4 1e-4 1e-4 5e-4 6e-4 1e-4) for ten
columns; we read them as the batch-size row is laid out (16 16 8 8 2 | 4): one value per
pre-training column (XL, B, L, M, SwinUNETR 6e-4) and one shared by every fine-tuning column (1e-4,
the ``amaes`` fine-tuning recipe).

Epochs. The paper pre-trains 100 epochs, one epoch being one patch from each volume of BRAINS-45K
(44,756 volumes), i.e. ``44,756 // batch`` steps per epoch: 2,797 steps at batch 16 (279,700 steps,
13,985 warm-up) and 5,594 at batch 8 (559,400 steps, 27,970 warm-up). The step counts are fixed here
for that dataset; for another pool set ``train.steps`` and ``optim.warmup_steps`` to 100 and 5 epochs
of it (:func:`epoch_steps`).

Augmentation (Appendix B): spatial augmentation of the sample by the trainer (elastic deformation p
0.33 with alpha 200-600 and sigma 20-30 voxels, rotation p 0.2 within +-30 degrees, scaling p 0.2 in
0.9-1.1, no mirroring; the paper rotates each axis with p 0.66, our rotation turns all three axes of a
rotated sample), then the method copies the target and corrupts the input with the MRI intensity
artifacts (``method.intensity``, :class:`~volssl.data.intensity_artifacts.ArtifactConfig`).
``amaes-unet-b-no-intensity`` turns those off (Table 3's "No augmentations" row keeps nothing; we keep
the spatial part, which the target shares, and ablate the invariance to intensity artifacts).
``amaes-unet-b-skips`` is Sec. 3's decoder ablation: the light-weight decoder with U-Net skip connections
during pre-training (the paper: Dice 56.22 with, 56.65 without, BraTS21, not significant).
``amaes-unet-b-no-intensity-skips`` is ours, not the paper's: both ablations together, the variant that
the CPU evidence scale measures (docs/evidence.md, AMAES).
"""
from __future__ import annotations

from volssl.config import AugmentConfig, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, register_preset
from volssl.data.intensity_artifacts import ArtifactConfig
from volssl.methods.amaes import AMAESConfig
from volssl.presets._tiny import tiny as _tiny
from volssl.presets.arms import Arm, register_arm

BRAINS_45K_VOLUMES = 44_756  # Table 1
EPOCHS = 100
WARMUP_EPOCHS = 5


def epoch_steps(batch_size: int, n_volumes: int = BRAINS_45K_VOLUMES) -> int:
    """Steps of one AMAES epoch (one patch per volume) at global batch ``batch_size``: ``n_volumes // batch``."""
    if batch_size < 1 or n_volumes < batch_size:
        raise ValueError(f"epoch_steps: need 1 <= batch_size <= n_volumes, got {batch_size} and {n_volumes}")
    return n_volumes // batch_size


def amaes_spatial() -> AugmentConfig:
    """AMAES spatial augmentation (Appendix B): elastic .33 (alpha 200-600, sigma 20-30), rotation .2
    (+-30 deg), scaling .2 (0.9-1.1), no mirroring."""
    return AugmentConfig(enabled=True, p_rotation=0.2, rotation_deg=30.0, p_scale=0.2, scale_range=(0.9, 1.1),
                         p_mirror=0.0, p_elastic=0.33, elastic_alpha=(200.0, 600.0), elastic_sigma=(20.0, 30.0))


def _amaes(name: str, arch: str, batch: int, lr: float, intensity: bool = True, skips: bool = False) -> RunConfig:
    spe = epoch_steps(batch)
    augmentation = ("spatial augmentation, then intensity artifacts on the input only" if intensity else
                    "spatial augmentation only (no intensity artifacts: Table 3 ablation)")
    decoder = ("light-weight decoder WITH U-Net skips (Sec. 3 ablation: 56.22 with, 56.65 without)" if skips
               else "light-weight decoder without skips")
    return RunConfig(
        description=f"AMAES {name}: {arch}, 128^3, batch {batch}, AdamW (amsgrad, eps 1e-8, wd 3e-5) lr {lr:g}, "
                    f"{WARMUP_EPOCHS} warm-up epochs then cosine, {EPOCHS} epochs of one patch per BRAINS-45K volume "
                    f"({EPOCHS * spe} steps), bf16, compile; 4^3 tokens masked with p 0.6, {decoder}, MSE on the "
                    f"whole volume; {augmentation}",
        data=DataConfig(patch_size=(128, 128, 128), batch_size=batch, num_workers=8, channel_mode="single"),
        model=ModelConfig(arch=arch),
        method=AMAESConfig(intensity=ArtifactConfig(enabled=intensity), decoder_skips=skips),
        optim=OptimConfig(name="adamw", lr=lr, weight_decay=3e-5, betas=(0.9, 0.999), eps=1e-8, amsgrad=True,
                          schedule="cosine", warmup_steps=WARMUP_EPOCHS * spe, min_lr=0.0, grad_clip=None),
        augment=amaes_spatial(),
        train=TrainConfig(steps=EPOCHS * spe, precision="bf16", compile=True),
    )


def _amaes_tiny(cfg: RunConfig) -> RunConfig:
    """The CPU sibling: the shared tiny rule, then AMAES's optimiser kind back (AdamW with amsgrad)
    at lr 1e-3 (300 CPU steps), no compile."""
    cfg = _tiny(cfg)
    cfg.optim.lr, cfg.optim.amsgrad, cfg.optim.eps, cfg.optim.weight_decay = 1e-3, True, 1e-8, 3e-5
    cfg.optim.grad_clip = None
    cfg.train.compile = False
    return cfg


@register_preset("amaes-unet-b")
def amaes_unet_b() -> RunConfig:
    return _amaes("U-Net B", "unet-b", 16, 1e-4)


@register_preset("amaes-unet-xl")
def amaes_unet_xl() -> RunConfig:
    return _amaes("U-Net XL", "unet-xl", 16, 1e-4)


@register_preset("amaes-mednext-m")
def amaes_mednext_m() -> RunConfig:
    return _amaes("MedNeXt M", "mednext-m", 8, 5e-4)


@register_preset("amaes-mednext-l")
def amaes_mednext_l() -> RunConfig:
    return _amaes("MedNeXt L", "mednext-l", 8, 1e-4)


@register_preset("amaes-unet-b-no-intensity")
def amaes_unet_b_no_intensity() -> RunConfig:
    return _amaes("U-Net B without intensity artifacts", "unet-b", 16, 1e-4, intensity=False)


@register_preset("amaes-unet-b-skips")
def amaes_unet_b_skips() -> RunConfig:
    return _amaes("U-Net B, pre-training decoder with skips", "unet-b", 16, 1e-4, skips=True)


@register_preset("amaes-unet-b-no-intensity-skips")
def amaes_unet_b_no_intensity_skips() -> RunConfig:
    return _amaes("U-Net B, both ablations (ours: Table 3's and Sec. 3's together)", "unet-b", 16, 1e-4,
                  intensity=False, skips=True)


for _name, _fn in (("amaes-unet-b", amaes_unet_b), ("amaes-unet-xl", amaes_unet_xl),
                   ("amaes-mednext-m", amaes_mednext_m), ("amaes-mednext-l", amaes_mednext_l),
                   ("amaes-unet-b-no-intensity", amaes_unet_b_no_intensity), ("amaes-unet-b-skips", amaes_unet_b_skips),
                   ("amaes-unet-b-no-intensity-skips", amaes_unet_b_no_intensity_skips)):
    register_preset(f"{_name}-tiny")(lambda fn=_fn: _amaes_tiny(fn()))


# ------------------------------------------------------------------ benchmark arms
register_arm(
    Arm("amaes-unet", "AMAES (U-Net B)", "amaes", preset="amaes-unet-b", plan="amaes", twin="scratch-unet"),
    Arm("amaes-unet-no-intensity", "AMAES without intensity augmentation (U-Net B)", "amaes",
        preset="amaes-unet-b-no-intensity", plan="amaes", twin="scratch-unet"),
    Arm("amaes-unet-skips", "AMAES with a pre-training decoder with skips (U-Net B)", "amaes",
        preset="amaes-unet-b-skips", plan="amaes", twin="scratch-unet"),
    Arm("amaes-unet-no-intensity-skips", "AMAES without intensity augmentation, decoder with skips (U-Net B)",
        "amaes", preset="amaes-unet-b-no-intensity-skips", plan="amaes", twin="scratch-unet"),
    Arm("scratch-unet", "U-Net B from scratch (AMAES schedule)", "scratch-amaes-schedule", plan="amaes",
        arch="unet-b"),
)
