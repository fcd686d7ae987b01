"""MAE-XNT presets (paper: "MAE-XNT: A Foundation Model for Segmenting Neuronal Tissue Volumes Generated
with X-Ray Nanotomography", Sec. 3; supplement Sec. 7, Tables 4 and 7).

``mae-xnt``: ViT-B (768 wide, 12 blocks, 12 heads) on 4^3 patches of 64^3 crops (4096 tokens), fixed
3D sin-cos positions, no class token; 90% of the tokens masked; a 2-block transformer decoder; L2 on
the masked patches. Batch 320, AdamW with lr 1.5e-4 x batch / 256, weight decay 0.05, betas (0.9,
0.95), 10 warm-up epochs then cosine, bf16. Each crop is z-scored on its own and transformed by one
of the 48 cube symmetries; volumes are sampled in proportion to their size.

Values the paper leaves open come from the public code (xni-esrf/MAE_XNT): an epoch is 960,000
crops (3,000 steps at batch 320), 300 epochs, the cosine ends at lr / 10, no gradient clipping, the
decoder is 768 wide with 12 heads. The Table 4 ablation rows use Table 7's batch sizes (224, 256,
280, 320; 1792 with 8^3 patches) with the same linear lr scaling and the same number of epochs.

Per-crop z-scoring suits nanotomography volumes (no background). On preprocessed data with background
(an MRI head in air), fine-tuning sees the plan's per-volume z-score, so a pre-training crop z-scored on
its own is shifted against it (+0.78 +- 0.26 on the brain phantoms); ``--set data.crop_zscore=false``
pre-trains on the plan's intensities instead (docs/evidence.md, MAE-XNT).
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
from volssl.methods.mae_xnt import MAEXNTConfig
from volssl.presets._tiny import tiny as _tiny
from volssl.presets.arms import Arm, register_arm

CROPS_PER_EPOCH = 960_000  # public code: one epoch = 960k crops
EPOCHS = 300
WARMUP_EPOCHS = 10
BASE_LR = 1.5e-4  # per 256 crops


def _mae_xnt(description: str, mask_ratio: float, batch: int, arch: str = "vit-b-unetr") -> RunConfig:
    steps_per_epoch = CROPS_PER_EPOCH // batch  # the public loader drops the last incomplete batch
    lr = BASE_LR * batch / 256
    return RunConfig(
        description=description,
        data=DataConfig(patch_size=(64, 64, 64), batch_size=batch, num_workers=16, sampling="size",
                        channel_mode="single", symmetries=True, crop_zscore=True),
        model=ModelConfig(arch=arch),
        method=MAEXNTConfig(mask_ratio=mask_ratio),
        optim=OptimConfig(name="adamw", lr=lr, weight_decay=0.05, betas=(0.9, 0.95), schedule="cosine",
                          warmup_steps=WARMUP_EPOCHS * steps_per_epoch, min_lr=lr / 10, grad_clip=None),
        # the cube symmetries (data.symmetries) are MAE-XNT's only augmentation
        augment=AugmentConfig(enabled=False, p_rotation=0.0, p_scale=0.0, p_mirror=0.0),
        train=TrainConfig(steps=EPOCHS * steps_per_epoch, precision="bf16"),
    )


def _tiny_mae_xnt(cfg: RunConfig) -> RunConfig:
    """The CPU sibling: tiny ViT, 32^3 crops, batch 4, AdamW lr 1e-3 (the shared rule's lr, scaled from
    SGD's 1e-2, is far too low for a 300-step MAE), the real preset's betas and weight decay."""
    real = cfg.optim
    cfg = _tiny(cfg)
    cfg.data.patch_size = (32, 32, 32)
    cfg.data.batch_size = 4
    cfg.method.decoder_dim, cfg.method.decoder_heads = 96, 3
    cfg.optim.lr, cfg.optim.min_lr = 1e-3, 1e-4
    cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip = real.betas, real.weight_decay, None
    return cfg


_ROWS = {  # name: (mask ratio, patch arch, batch) -- supplement Table 4 / Table 7 (first column)
    "mae-xnt-r75": (0.75, "vit-b-unetr", 224),
    "mae-xnt-r80": (0.80, "vit-b-unetr", 256),
    "mae-xnt-r85": (0.85, "vit-b-unetr", 280),
    "mae-xnt-r90": (0.90, "vit-b-unetr", 320),
    "mae-xnt-p8": (0.90, "vit-b-unetr-p8", 1792),
}


@register_preset("mae-xnt")
def mae_xnt() -> RunConfig:
    return _mae_xnt("MAE-XNT: ViT-B, 4^3 patches of 64^3 crops, mask ratio 0.90, 2-block decoder, L2 on masked "
                    "patches; batch 320, AdamW lr 1.5e-4 x 320/256, wd 0.05, betas (0.9, 0.95), 10 warm-up "
                    "epochs then cosine, 300 epochs of 960k crops, bf16; per-crop z-score, 48 cube symmetries, "
                    "volumes sampled by size", 0.90, 320)


@register_preset("mae-xnt-tiny")
def mae_xnt_tiny() -> RunConfig:
    return _tiny_mae_xnt(mae_xnt())


def _register_row(name: str, ratio: float, arch: str, batch: int) -> None:
    patch = 8 if arch.endswith("-p8") else 4

    def real() -> RunConfig:
        return _mae_xnt(f"MAE-XNT Table 4 row: mask ratio {ratio:.2f}, {patch}^3 patches, batch {batch} (Table 7), "
                        f"lr 1.5e-4 x {batch}/256; otherwise as mae-xnt", ratio, batch, arch)

    register_preset(name)(real)
    register_preset(f"{name}-tiny")(lambda: _tiny_mae_xnt(real()))


for _name, (_ratio, _arch, _batch) in _ROWS.items():
    _register_row(_name, _ratio, _arch, _batch)


# ------------------------------------------------------------------ benchmark arms
register_arm(
    Arm("mae-xnt", "MAE-XNT (ViT-B MAE, UNETR)", "mae-xnt", preset="mae-xnt", plan="xnt", twin="scratch-vit"),
    Arm("scratch-vit", "ViT-B UNETR from scratch (MAE-XNT schedule)", "scratch-mae-xnt-schedule", plan="xnt",
        arch="vit-b-unetr"),
)
