"""The `volssl` command: help, presets, config show, error messages."""
import json
import subprocess
import sys

from volssl.cli import main


def test_help_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("presets", "config"):
        assert cmd in out


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"s3d-b", "s3d-b-tiny"} <= {r["name"] for r in rows}


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "s3d-b", "--json", "--set", "optim.lr=0.5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.5 and cfg["preset"] == "s3d-b"


def test_config_show_bad_override_is_a_clear_error(capsys):
    assert main(["config", "show", "s3d-b", "--set", "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "volssl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("volssl ")
