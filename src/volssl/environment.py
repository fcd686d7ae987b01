"""Installation checks: pinned versions kept, no CUDA wheels pulled onto a CPU-only torch."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path


def read_constraints(path: Path) -> dict[str, str]:
    """Parse ``name==version`` lines of a pip constraints file into ``{normalised name: version}``."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def check_environment(constraints: Path | None = None) -> list[str]:
    """Return a list of problems with the current environment (empty when fine).

    - torch must be the version pinned in ``constraints`` (local CPU build on our machines);
    - a CPU build of torch must not come with ``nvidia-*`` packages (a sign that some requirement
      asked for a CUDA torch and pip fetched several GB of wheels).
    """
    import torch

    problems: list[str] = []
    installed = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in metadata.distributions()}
    if constraints is not None and Path(constraints).exists():
        want = read_constraints(Path(constraints)).get("torch")
        have = torch.__version__.split("+")[0]
        if want and have != want:
            problems.append(f"torch {torch.__version__} installed, constraints.txt pins {want}")
    nvidia = sorted(n for n in installed if n.startswith("nvidia-"))
    if torch.version.cuda is None and nvidia:
        problems.append(f"CPU torch with CUDA packages installed: {', '.join(nvidia)}")
    for banned in ("torchvision", "timm"):
        if banned in installed:
            problems.append(f"{banned} is installed; volssl must not need it (it pulls a CUDA torch)")
    return problems
