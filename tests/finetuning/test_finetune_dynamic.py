"""``scratch-dynamic`` ("No (Dyn.)"): fine-tuning from scratch with the dataset's own nnU-Net-style plan
(fingerprint -> spacing, normalisation, depth, patch), recorded in the run; CT normalisation end to end;
and the generalisation set-up (train on phantom centre A, predict centre B, as D2 -> D13)."""
from __future__ import annotations

import json

import pytest
import torch

import volssl.finetuning.finetune as ft
from volssl.finetuning.recipes import get_recipe
from volssl.training.checkpoint import load_checkpoint

SMALL = ["num_workers=0", "train.device=cpu", "train.log_every=1", "train.val_every=0", "batch_size=2"]


def test_recipe_and_plan_names():
    r, tiny = get_recipe("scratch-dynamic"), get_recipe("scratch-dynamic-tiny")
    assert (r.plan, r.transfer, r.arch, r.patch_size, r.optim.lr) == ("dynamic", "none", "resenc-l", None, 1e-2)
    assert (tiny.plan, tiny.arch, tiny.patch_size, tiny.train.precision) == ("dynamic", "resenc-tiny", None, "fp32")
    assert ft.is_dynamic("dynamic") and ft.is_dynamic("dynamic:8") and not ft.is_dynamic("s3d")


def test_scratch_dynamic_tiny_trains_with_the_datasets_plan(raw_dataset, tmp_path):
    out = tmp_path / "ft"
    summary = ft.finetune(None, raw_dataset, out, recipe="scratch-dynamic-tiny", stage_steps=[2], overrides=SMALL,
                          progress=False)
    assert summary["method"] == "scratch-dynamic"
    record = json.loads((out / "plan.json").read_text())
    plan, model, patch = record["plan"], record["model"], record["patch_size"]
    assert plan["name"] == "dynamic" and plan["normalization"] == "zscore"  # MR channels (T1, T2, FLAIR)
    assert max(patch) <= 64 and record["info"]["fits_budget"]
    fingerprint = json.loads((out / "preprocessed" / "fingerprint.json").read_text())
    assert fingerprint["n_cases"] == 6 and fingerprint["channel_names"] == ["T1", "T2", "FLAIR"]
    assert plan["target_spacing"] == pytest.approx(record["info"]["target_spacing"])
    # the checkpoint is the planned network, trained on planned patches of data preprocessed with the plan
    ck = load_checkpoint(out / "checkpoints" / "final.pt")
    assert ck["model"]["arch"] == "resenc-tiny" and list(ck["model"]["features"]) == model["features"]
    assert list(ck["model"]["strides"]) == model["strides"] and ck["patch_size"] == patch
    assert ck["plan"]["name"] == "dynamic" and ck["plan"]["target_spacing"] == plan["target_spacing"]
    pre = json.loads((out / "preprocessed" / "plan.json").read_text())
    assert pre["target_spacing"] == plan["target_spacing"] and pre["label_interpolation"] == "linear"
    # a second run on the same preprocessed folder reuses the cached fingerprint and the arrays
    again = ft.finetune(None, raw_dataset, tmp_path / "ft2", recipe="scratch-dynamic-tiny", stage_steps=[1],
                        overrides=SMALL, progress=False, preprocessed_dir=out / "preprocessed")
    assert json.loads((tmp_path / "ft2" / "plan.json").read_text())["patch_size"] == patch
    assert again["preprocessed"] == str((out / "preprocessed").resolve())
    # a memory budget in the plan name; a preprocessed folder without a fingerprint is refused
    with pytest.raises(ValueError, match="memory budget"):
        ft.finetune(None, raw_dataset, tmp_path / "bad", recipe="scratch-dynamic-tiny", stage_steps=[1],
                    overrides=SMALL + ["plan=dynamic:lots"], progress=False)


def test_dynamic_plan_of_a_preprocessed_folder_needs_its_fingerprint(preprocessed, tmp_path):
    with pytest.raises(ValueError, match="fingerprint.json"):
        ft.finetune(None, preprocessed, tmp_path / "ft", recipe="scratch-dynamic-tiny", stage_steps=[1],
                    overrides=SMALL, progress=False)


def test_ct_dynamic_plan_end_to_end_and_centre_generalisation(tmp_path):
    """CT phantoms get the "ct" scheme (dataset statistics in the checkpoint's plan, used again by predict);
    a model trained on centre A predicts the unseen centre B (other contrast, noise and spacing)."""
    from volssl.data.phantoms import generate_task
    from volssl.evaluation.evaluate import evaluate_folder
    from volssl.inference.predict import PredictOptions, predict_folder

    ct = generate_task(tmp_path / "ct", "ct-organs", 5, n_test=1, shape=(24, 24, 24), progress=False)
    ft.finetune(None, ct, tmp_path / "ft-ct", recipe="scratch-dynamic-tiny", stage_steps=[2], overrides=SMALL,
                progress=False)
    ck = load_checkpoint(tmp_path / "ft-ct" / "checkpoints" / "final.pt")
    assert ck["plan"]["normalization"] == "ct" and ck["channels"] == ["CT"]
    hu = ck["plan"]["ct_intensities"][0]
    assert -200 < hu["percentile_00_5"] < hu["mean"] < hu["percentile_99_5"] < 400
    assert ck["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    pred = predict_folder(tmp_path / "ft-ct", ct / "imagesTs", tmp_path / "pred-ct",
                          PredictOptions(mirror_axes=(), device="cpu"), progress=False)
    assert pred["n_predicted"] == 1 and pred["n_failed"] == 0

    a = generate_task(tmp_path / "a", "brain-lesions", 5, n_test=0, shape=(24, 24, 24), progress=False)
    b = generate_task(tmp_path / "b", "brain-lesions-centre-b", 1, n_test=1, shape=(24, 24, 24), progress=False)
    ft.finetune(None, a, tmp_path / "ft-a", recipe="scratch-dynamic-tiny", stage_steps=[2], overrides=SMALL,
                progress=False)
    pred = predict_folder(tmp_path / "ft-a", b / "imagesTs", tmp_path / "pred-b",
                          PredictOptions(mirror_axes=(), device="cpu"), progress=False)
    assert pred["n_predicted"] == 1
    metrics = evaluate_folder(tmp_path / "pred-b", b / "labelsTs", tmp_path / "metrics.json", progress=False)
    assert [c["case"] for c in metrics["cases"]] == ["brain_lesions_centre_b_001"] and not metrics["missing"]
    assert torch.get_num_threads() == 1
