"""The quick demo runs every stage end to end and writes results.json and the report."""
import json
import time

import pytest


@pytest.mark.slow
def test_quick_demo(tmp_path):
    from volssl.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert {(r["init"], r["n_train"] == 2) for r in runs} == {("s3d", True), ("s3d", False),
                                                              ("scratch", True), ("scratch", False)}
    for r in runs:
        assert set(r) == {"init", "n_train", "seed", "dice", "nsd"}
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0
    assert [c["n_train"] for c in results["comparison"]][0] == 2
    stages = results["stages"]
    assert stages["preprocess"]["ok"] >= 4 and stages["pretrain"]["status"] == "finished"
    assert stages["patches"]["batch_shape"][-3:] == [32, 32, 32]
    for name in ("report.md", "table.md", "low_data.png", "rank_stability.png", "paired.csv", "probe_curves.png"):
        assert (tmp_path / "report" / name).exists(), name
    assert (tmp_path / "pretrain" / "probe.png").exists()  # the representation probe ran during pre-training
    # predictions are in the original geometry of the held-out files
    import nibabel as nib
    import numpy as np

    run = tmp_path / "finetune" / "s3d_n2_s0"
    for pred in (run / "predictions").glob("*.nii.gz"):
        src = nib.load(tmp_path / "labeled" / "labelsTs" / pred.name)
        out = nib.load(pred)
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    # a rerun resumes: nothing is fine-tuned again
    mtime = (run / "metrics.json").stat().st_mtime
    t = time.time()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert (run / "metrics.json").stat().st_mtime == mtime
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == runs
    assert time.time() - t < 60
