"""Named presets: the papers' tables as data, one module per paper or baseline family.

:func:`load` imports every module in it, and each module registers its presets with
:func:`volssl.config.register_preset` (and, through its imports, the methods they use) and the
benchmark arms of its paper with :func:`volssl.presets.arms.register_arm`. Importing the package alone
imports none of them (the methods import torch): the package root hands :func:`load` to
``volssl.config.SPEC_LOADERS``, which ``get_preset``, ``build_method`` and ``arms.get_arms`` call on demand.
Each real preset has a ``-tiny`` CPU sibling that runs the same code path with small widths,
patches and step counts. A preset named after a paper configuration (``s3d-b``) holds that paper's
values, not ours.
"""
from __future__ import annotations

import importlib
import pkgutil

#: the papers' modules first (their arms lead ``volssl benchmark --list``), then any other module, by name
_FIRST = ("s3d", "baselines", "amaes", "swinunetr", "mae_xnt")


def load() -> None:
    """Import (once) every preset module of this package, registering its presets, methods and arms."""
    for name in sorted((m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")),
                       key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n)):
        importlib.import_module(f"{__name__}.{name}")
