"""S3D / Spark3D: sparse masked autoencoding for the Residual Encoder U-Net.

(The method module itself is being written; the configuration below is its contract.)
"""
from __future__ import annotations

from dataclasses import dataclass

from volssl.config import MethodConfig, register_method_config


@register_method_config
@dataclass
class S3DConfig(MethodConfig):
    """S3D settings (paper: "Revisiting MAE pre-training for 3D medical image segmentation").

    Each sparsification switch corresponds to a row of the paper's Table 1a ablation.
    """

    name: str = "s3d"
    mask_ratio: float = 0.75  # static ratio, used when mask_ratio_range is None
    mask_ratio_range: tuple[float, float] | None = (0.6, 0.9)  # dynamic: U[lo, hi] per sample (S3D-B)
    mask_block: int | None = None  # side of a mask block in voxels; None: the encoder's total stride
    mask_input: bool = True  # zero masked blocks of the input before the stem
    sparse_conv: bool = True  # re-apply the mask after every conv / pooling of the encoder
    masked_norm: bool = True  # instance-norm statistics over visible voxels only
    mask_token: bool = True  # learnable per-stage token fills masked positions before decoding
    densify: bool = True  # 3x3x3 conv on every resolution but the highest before decoding
    loss_masked_only: bool = True  # L2 on masked voxels only (False: whole patch)
