"""One torch thread per test: CI and dev machines have 2 cores, and OpenMP threads competing for busy
cores slow small 3D convolutions down by an order of magnitude. ``load_script``: the measurement scripts
that docs/evidence.md cites (scripts/ is not a package: loaded by path)."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_script():
    """``load_script("name")`` imports ``scripts/name.py`` as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
