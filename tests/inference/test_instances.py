"""Affinity models end to end: fine-tune on axon phantoms (task "affinities"), predict instances, score them."""
from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_affinity_finetune_predict_and_score(tmp_path):
    import nibabel as nib

    from volssl.data.phantoms import generate_phantoms
    from volssl.finetuning.finetune import finetune
    from volssl.experiment import predict_instances_folder
    from volssl.inference.instances import threshold_dir
    from volssl.inference.predict import load_finetuned

    raw = generate_phantoms(tmp_path / "axons", "axons", n=5, n_test=1, seed=0, shape=(40, 40, 40), progress=False)
    run = tmp_path / "ft"
    finetune(None, raw, run, recipe="scratch-s3d-schedule-tiny", n_train=2, progress=False,
             overrides=["task=affinities", "affinity_distances=1,3", "arch=resenc-tiny", "patch_size=32,32,32",
                        "num_workers=0", "plan=xnt", "train.val_every=0", "train.device=cpu"],
             stage_steps=[1, 1, 2])
    model = load_finetuned(run)
    assert model.task == "affinities" and len(model.offsets) == 6 and model.offsets[0] in ((-1, 0, 0), (1, 0, 0))
    assert model.network.decoder.seg_layers[-1].out_channels == 6
    scores = predict_instances_folder(run, raw / "imagesTs", raw / "labelsTs", tmp_path / "pred",
                                      thresholds=(0.5, 0.7))
    assert set(scores) == {0.5, 0.7}
    for t in (0.5, 0.7):
        assert {"voi_split", "voi_merge", "rand_error"} <= set(scores[t])
        seg_file = next(threshold_dir(tmp_path / "pred" / "predictions", t).glob("*.nii.gz"))
        ref = nib.load(next((raw / "labelsTs").glob("*.nii.gz")))
        seg = nib.load(seg_file)
        assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-4)
        assert np.issubdtype(np.asarray(seg.dataobj).dtype, np.integer)
    summary = json.loads((tmp_path / "pred" / "predictions" / "predict.json").read_text())
    assert summary["settings"]["task"] == "affinities" and summary["n_failed"] == 0


def test_affinity_recipe_is_validated():
    from volssl.finetuning.recipes import resolve_recipe

    cfg = resolve_recipe("scratch-s3d-schedule", ["task=affinities"])
    assert cfg.task == "affinities" and cfg.affinity_distances == (1, 3, 9, 27)
    with pytest.raises(ValueError, match="task must be one of"):
        resolve_recipe("scratch-s3d-schedule", ["task=boxes"])
