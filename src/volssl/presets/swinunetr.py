"""SwinUNETR SSL presets (Tang et al. 2022, "Self-Supervised Pre-Training of Swin Transformers for 3D
Medical Image Analysis"; the AMAES paper's SwinUNETR baseline).

Values: the defaults of the authors' pre-training script (MONAI research-contributions,
``SwinUNETR/Pretrain/main.py``, run with ``--lrdecay`` as its README shows): ROI 96^3; per GPU 2
volumes x 2 random crops (``batch_size`` 2, ``sw_batch_size`` 2) = 4 patches, which is also the group
the authors' NT-Xent contrasts; AdamW lr 4e-4, weight decay 0.1 (``--decay``); ``WarmupCosineSchedule``
with 500 warm-up steps; 100k steps; AMP; no gradient clipping unless ``--grad_clip``; no spatial
augmentation (random crops, then rotation and cut-outs inside the method). The AMAES paper re-ran
this configuration on brain MRI with 128^3 patches (its Sec. 5).
"""
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
from volssl.methods.swinunetr_ssl import SwinUNETRSSLConfig
from volssl.presets._tiny import tiny as _tiny
from volssl.presets.arms import Arm, register_arm


@register_preset("swinunetr-ssl")
def swinunetr_ssl() -> RunConfig:
    return RunConfig(
        description="SwinUNETR SSL (Tang et al. 2022; the authors' Pretrain/main.py defaults): SwinUNETR F=48, "
                    "rotation + NT-Xent (T 0.5) + L1 inpainting of cut-outs, weights 1/1/1; 96^3, batch 4, AdamW "
                    "lr 4e-4 wd 0.1, 500 warm-up steps then cosine, 100k steps",
        data=DataConfig(patch_size=(96, 96, 96), batch_size=4, num_workers=4),
        model=ModelConfig(arch="swinunetr"),
        method=SwinUNETRSSLConfig(),
        optim=OptimConfig(name="adamw", lr=4e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8,
                          schedule="cosine", warmup_steps=500, grad_clip=None),
        augment=AugmentConfig(enabled=False),
        train=TrainConfig(steps=100_000, precision="bf16"),
    )


@register_preset("swinunetr-ssl-tiny")
def swinunetr_ssl_tiny() -> RunConfig:
    cfg = _tiny(swinunetr_ssl())
    # the shared rule rescales an SGD lr; this preset is AdamW already: keep its lr and weight decay
    cfg.optim.lr = 4e-4
    cfg.optim.weight_decay = 0.1
    return cfg


# ------------------------------------------------------------------ benchmark arms
# MONAI's SwinUNETR instance-normalises its 1/32-resolution features: a 32^3 patch (1^3) cannot train
register_arm(
    Arm("swinunetr-ssl", "SwinUNETR self-supervised (rotation + contrastive + inpainting)", "swinunetr",
        preset="swinunetr-ssl", plan="amaes", min_patch=64, twin="scratch-swinunetr"),
    Arm("scratch-swinunetr", "SwinUNETR from scratch", "scratch-swinunetr", plan="amaes", arch="swinunetr",
        min_patch=64),
)
