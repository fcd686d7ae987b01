"""The checkpoint formats ``volssl import-checkpoint --format`` knows (importable without torch)."""
from __future__ import annotations

import importlib
import os
from typing import Any


# --------------------------------------------------------------------------- formats
#: ``--format`` name -> ("module:function", help). Each converter takes ``(src, arch=None)`` and
#: returns ``(payload, report)`` like :func:`convert_nnssl` (the report has ``summary()``).
IMPORT_FORMATS: dict[str, tuple[str, str]] = {
    "nnssl": ("volssl.models.checkpoint_import:convert_nnssl",
              "nnssl network_weights of a dynamic-network-architectures ResidualEncoderUNet"),
    "amaes": ("volssl.models.import_amaes:convert_amaes",
              "AMAES (asbjrnmunk/amaes) Yucca U-Net / MedNeXt state dict, _orig_mod. keys allowed"),
    "swinunetr": ("volssl.models.import_swinunetr:convert_swinunetr",
                  "SwinUNETR: the authors' SSL Swin ViT (module./swinViT./swin_vit. keys) or a MONAI SwinUNETR "
                  "state dict"),
}


def convert_checkpoint(fmt: str, src: str | os.PathLike, arch: str | None = None) -> tuple[dict[str, Any], Any]:
    """Convert ``src`` written in format ``fmt`` (a key of :data:`IMPORT_FORMATS`) to a volssl payload."""
    if fmt not in IMPORT_FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(sorted(IMPORT_FORMATS))}")
    module, func = IMPORT_FORMATS[fmt][0].split(":")
    return getattr(importlib.import_module(module), func)(src, arch)
