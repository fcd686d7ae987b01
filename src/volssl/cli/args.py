"""Argument types of the command modules (:func:`~volssl.util.parsing.cubic_size`, which the benchmarks
use too, lives in :mod:`volssl.util.parsing` and is re-exported here)."""
from __future__ import annotations

import argparse
import math
from typing import Callable

from volssl.util.parsing import cubic_size  # noqa: F401 - re-exported: the command modules import it here


def number(lo: float | None = None, hi: float | None = None, hi_open: bool = False, example: str = "0.5",
           unit: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in [``lo``, ``hi``] (``hi`` excluded with ``hi_open``); a bad value
    is ``expected a number in [0, 1), e.g. 0.5; got 'x'`` instead of Python's conversion text."""
    bounds = ("" if lo is None and hi is None else
              f" >= {lo:g}" if hi is None else f" in [{lo:g}, {hi:g}{')' if hi_open else ']'}")
    what = f"a {unit or 'number'}{bounds}, e.g. {example}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = math.isfinite(value) and (lo is None or value >= lo) and (
            hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (``1e6`` accepted)."""
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_run_folder_arguments(p: argparse.ArgumentParser, folder: str, outputs: str) -> None:
    """``--resume`` / ``--overwrite`` (mutually exclusive) of a command that writes a run into ``folder``
    (the name its help uses); ``outputs`` lists what ``--overwrite`` replaces."""
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help=f"continue from {folder}/checkpoints/latest.pt, else from the run's newest intact "
                            f"checkpoint (with a warning); refuses when none is intact; an empty {folder} starts "
                            "afresh")
    again.add_argument("--overwrite", action="store_true",
                       help=f"replace the run already in {folder} ({outputs}); without it, a new run refuses to "
                            "start over an existing one")


def check_checkpoint_argument(checkpoint: str, option: str = "--checkpoint") -> None:
    """A local checkpoint path must exist and be readable; an ``hf://ORG/NAME[@REVISION]`` address
    must be well formed (it is downloaded when the checkpoint is loaded)."""
    from volssl.util.errors import check_input_path
    from volssl.util.hub import is_hub_reference, parse_hub_reference

    if is_hub_reference(checkpoint):
        parse_hub_reference(checkpoint)
    else:
        check_input_path(checkpoint, option)
