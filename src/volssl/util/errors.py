"""How a caught exception is described where a run reports a failure and goes on."""
from __future__ import annotations

import traceback
from pathlib import Path


def describe_error(e: BaseException) -> str:
    """``"<Type>: <message> at <file>:<line>"`` (the innermost frame of the traceback, if any)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"
