"""Check that set-up kept the tested torch and pulled no CUDA packages onto a CPU-only install.

Exit status 1 with a message naming the problem; 0 otherwise. Run by `make` after installing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from volssl.environment import check_environment  # noqa: E402

problems = check_environment(Path(__file__).resolve().parents[1] / "constraints.txt")
for p in problems:
    print(f"check_env: {p}", file=sys.stderr)
if not problems:
    print("check_env: torch and dependencies as pinned; no CUDA packages on a CPU install")
sys.exit(1 if problems else 0)
