"""volssl: self-supervised pre-training of 3D segmentation networks and few-label fine-tuning.

The Python API mirrors the ``volssl`` command (imports are lazy, so ``import volssl`` is cheap)::

    from volssl import generate_phantoms, preprocess, pretrain, resolve
    generate_phantoms("raw", "brain", n=20)
    preprocess("raw", "pre", plan="s3d")
    pretrain(resolve("s3d-b-tiny", ["train.steps=100"]), "pre", "runs/s3d")
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (one entry per CLI command's function)
_API = {
    "generate_phantoms": "volssl.data.phantoms",
    "preprocess": "volssl.data.preprocess",
    "PreprocessPlan": "volssl.data.preprocess",
    "PreprocessedDataset": "volssl.data.dataset",
    "PatchSampler": "volssl.data.patches",
    "make_loader": "volssl.data.patches",
    "build_model": "volssl.models.registry",
    "build_method": "volssl.methods",
    "pretrain": "volssl.training.trainer",
    "resolve": "volssl.config",
    "get_preset": "volssl.config",
    "list_presets": "volssl.config",
    "RunConfig": "volssl.config",
    "finetune": "volssl.finetuning.finetune",
    "predict_folder": "volssl.inference.predict",
    "load_finetuned": "volssl.inference.predict",
    "evaluate_folder": "volssl.evaluation.evaluate",
    "make_report": "volssl.reports.report",
    "run_demo": "volssl.demo",
    "generate_task": "volssl.data.phantoms",
    "VolumeCropSampler": "volssl.data.volume_crops",
    "dataset_fingerprint": "volssl.data.fingerprint",
    "dynamic_plan": "volssl.data.dynamic_plan",
    "convert_checkpoint": "volssl.models.import_formats",
    "segment": "volssl.inference.agglomerate",
    "segment_blockwise": "volssl.inference.agglomerate",
    "predict_instances_folder": "volssl.experiment",
    "evaluate_instances": "volssl.evaluation.instance_metrics",
    "evaluate_instances_folder": "volssl.evaluation.instance_evaluate",
    "run_benchmark": "volssl.benchmark",
    "run_search": "volssl.search",
}

__all__ = sorted(_API) + ["__version__"]


def _load_builtin_specs() -> None:
    """Register the built-in presets and the method configurations they use (called by volssl.config on demand)."""
    from volssl.presets import load

    load()


from volssl import config as _config  # noqa: E402  (the root wires the presets into the config registry)

if _load_builtin_specs not in _config.SPEC_LOADERS:
    _config.SPEC_LOADERS.append(_load_builtin_specs)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'volssl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
