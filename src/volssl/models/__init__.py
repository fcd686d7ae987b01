"""Backbone networks: the Residual Encoder U-Net and its named presets (see registry)."""
from volssl.models.registry import ARCHITECTURES, ArchSpec, build_model, count_parameters, get_arch
from volssl.models.resenc_unet import ResEncUNet, ResidualEncoder, UNetDecoder, masked_instance_norm

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ResEncUNet",
    "ResidualEncoder",
    "UNetDecoder",
    "build_model",
    "count_parameters",
    "get_arch",
    "masked_instance_norm",
]
