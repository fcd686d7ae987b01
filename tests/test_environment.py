"""Set-up keeps the tested torch and pulls no CUDA packages onto a CPU install."""
from pathlib import Path

from volssl.environment import check_environment, read_constraints

ROOT = Path(__file__).resolve().parents[1]


def test_installed_environment_is_clean():
    assert check_environment(ROOT / "constraints.txt") == []


def test_constraints_pin_torch_and_every_dependency():
    import tomllib

    pins = read_constraints(ROOT / "constraints.txt")
    assert "torch" in pins
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = dep.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not pinned in constraints.txt"


def test_no_dependency_caps_or_pins_torch_above_the_installed_one():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = [d for d in deps if d.split(">")[0].split("=")[0].strip() == "torch"]
    assert torch_dep == ["torch>=2.3"], "torch must stay a floor requirement"
    assert not any(d.split(">")[0].split("=")[0].strip() in ("torchvision", "timm") for d in deps)
