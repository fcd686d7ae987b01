"""The quick demo runs end to end and records every stage."""
import json

import pytest


@pytest.mark.slow
def test_quick_demo(tmp_path):
    from volssl.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["preprocess"]["ok"] >= 5
    assert stages["patches"]["batch_shape"][-3:] == [64, 64, 64]
    assert stages["pretrain"]["status"] == "finished" and stages["pretrain"]["step"] == 12
    assert stages["pretrain"]["preview"].endswith(".png")
    # rerun resumes: nothing is redone and the summary is the same run
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["stages"]["pretrain"]["step"] == 12
