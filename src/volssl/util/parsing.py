"""Parsing of small command-line values, shared by the CLI and the benchmarks (no CLI imports here)."""
from __future__ import annotations

import argparse


def cubic_size(text: str, minimum: int = 1, what: str = "size") -> tuple[int, int, int]:
    """``"64"`` -> (64, 64, 64); ``"64,64,48"`` (or ``64x64x48``) -> (64, 64, 48) voxels.

    Raises argparse.ArgumentTypeError naming ``what`` unless there are one or three integers >= ``minimum``.
    """
    try:
        sizes = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected N or X,Y,Z integers, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or min(sizes) < minimum:
        raise argparse.ArgumentTypeError(f"{what}: expected one or three sizes >= {minimum}, got {text!r}")
    return sizes  # type: ignore[return-value]
