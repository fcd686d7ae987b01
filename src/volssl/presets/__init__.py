"""Named presets: the papers' tables as data, one module per paper or baseline family.

Importing this package imports every module in it, and each module registers its presets with
:func:`volssl.config.register_preset` (and, through its imports, the method configs they use).
Each real preset has a ``-tiny`` CPU sibling that runs the same code path with small widths,
patches and step counts. A preset named after a paper configuration (``s3d-b``) holds that paper's
values, not ours.
"""
from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
