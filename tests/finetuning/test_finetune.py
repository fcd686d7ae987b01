"""finetune end to end on phantoms: the stages in a real run (what is trainable / updated, lr per step),
the checkpoint `volssl predict` loads, run.json and splits.json, exact resume, guard rails."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch

import volssl.finetuning.finetune as ft
from volssl.cli import main as cli
from volssl.finetuning.recipes import get_recipe, tiny_optim
from volssl.finetuning.transfer import trainable_names
from volssl.training.checkpoint import load_checkpoint
from volssl.training.logging import read_scalars

STEM = "encoder.stem.convs.0.conv.weight"
# channel_fusion=stem: these tests check the paper's multi-channel rule (Table 6: the single-channel stem
# replicated over T1/T2/FLAIR / 3, frozen in the decoder warm-up); the -tiny default, per-channel
# features, is tested in test_transfer_equivalence.py and tests/models/test_channel_fusion.py
SMALL = ["patch_size=32,32,32", "num_workers=0", "train.log_every=1", "train.device=cpu", "train.checkpoint_every=2",
         "channel_fusion=stem"]


def run(tmp, checkpoint, dataset, monkeypatch=None, stop_after=None, snapshots=None, **kw):
    """finetune s3d-tiny with 2 + 2 + 2 steps; ``snapshots`` collects (weights, trainable names) before every
    step; ``stop_after``: SIGUSR1 during that step (the loop finishes it, saves and stops)."""
    if monkeypatch is not None:
        real = ft.run_loop

        def spy(out, tc, job, **kwargs):
            module, on_step, forward = job.module, job.on_step, job.forward

            def hook(step):
                changed = on_step(step)
                if snapshots is not None:
                    snapshots[step] = ({k: v.detach().clone() for k, v in module.state_dict().items()},
                                       {n for n, p in module.named_parameters() if p.requires_grad})
                return changed

            def stopping_forward(model, batch, step):
                if step == stop_after:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return forward(model, batch, step)

            job.on_step, job.forward = hook, stopping_forward
            return real(out, tc, job, **kwargs)

        monkeypatch.setattr(ft, "run_loop", spy)
    kw.setdefault("recipe", "s3d-tiny")
    kw.setdefault("stage_steps", [2, 2, 2])
    kw["overrides"] = SMALL + list(kw.get("overrides", []))
    return ft.finetune(checkpoint, dataset, tmp, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(pretrained, preprocessed, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    snaps: dict = {}
    mp = pytest.MonkeyPatch()
    try:
        summary = run(out, pretrained, preprocessed, monkeypatch=mp, snapshots=snaps)
    finally:
        mp.undo()
    return out, summary, snaps


def test_stages_train_what_the_recipe_says(reference, pretrained):
    out, summary, snaps = reference
    assert summary["status"] == "finished" and summary["step"] == 6 and sorted(snaps) == [0, 1, 2, 3, 4, 5]
    final = load_checkpoint(out / "checkpoints" / "final.pt")["network"]
    w0, trainable0 = snaps[0]
    decoder = {n for n in w0 if n.startswith("decoder.")}
    # the pre-trained single-channel stem, replicated over T1/T2/FLAIR and divided by 3
    stem = load_checkpoint(pretrained)["network"][STEM]
    assert torch.equal(w0[STEM], stem.repeat(1, 3, 1, 1, 1) / 3)
    # stage 1, decoder warm-up: only decoder parameters require gradients; encoder and stem unchanged
    assert trainable0 == {n for n in decoder if n in trainable0} and trainable0 == set(snaps[1][1])
    assert all(n.startswith("decoder.") for n in trainable0) and not any("stem" in n for n in trainable0)
    w2, trainable2 = snaps[2]
    for name in w0:
        if name.startswith("encoder."):
            assert torch.equal(w2[name], w0[name]), name
    moved = {n for n in decoder if not torch.equal(w2[n], w0[n])}
    assert {n for n in decoder if ".stages." in n or "transpconvs" in n} <= moved
    # stage 2, whole-network warm-up: everything trainable; the stem and the encoder change
    assert trainable2 == {n for n, _ in _named(w0)} and trainable2 == snaps[4][1]
    w4 = snaps[4][0]
    assert not torch.equal(w4[STEM], w2[STEM])
    assert not torch.equal(w4["encoder.stages.2.blocks.0.conv1.conv.weight"], w2["encoder.stages.2.blocks.0.conv1.conv.weight"])
    assert not torch.equal(final[STEM], w4[STEM])  # stage 3 trains it too


def test_small_head_init_starts_every_voxel_at_equal_probabilities(reference, pretrained, preprocessed, tmp_path,
                                                                   monkeypatch):
    snaps: dict = {}
    run(tmp_path / "small", pretrained, preprocessed, monkeypatch=monkeypatch, snapshots=snaps,
        stage_steps=[1, 1, 1], overrides=["head_init=small"])
    small, he = snaps[0][0], reference[2][0][0]
    heads = [n for n in small if n.startswith("decoder.seg_layers.")]
    assert heads and all(small[n].abs().max() <= 4e-5 for n in heads)
    assert any(he[n].abs().max() > 0.1 for n in heads if n.endswith(".weight"))  # the He init it replaces
    for name in small:  # the transfer and every other tensor are as with the He head
        if name not in heads:
            assert torch.equal(small[name], he[name]), name
    assert json.loads((tmp_path / "small" / "config.json").read_text())["recipe"]["head_init"] == "small"


def _named(weights):
    from volssl.models.registry import build_model
    from volssl.config import ModelConfig

    net = build_model(ModelConfig(arch="resenc-tiny", in_channels=3, out_channels=2))
    return [(n, p) for n, p in net.named_parameters() if n in set(trainable_names(net, "all"))]


def test_lr_of_every_step(reference):
    out, _, _ = reference
    rows = read_scalars(out / "scalars.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    peak = tiny_optim(get_recipe("s3d"), get_recipe("s3d-tiny").total_steps).lr
    assert peak == pytest.approx(2e-3)  # s3d's SGD peak 1e-3 -> AdamW 2e-3 on CPU
    assert [r["lr"] for r in rows] == pytest.approx([peak / 2, peak, peak / 2, peak, peak, peak * 0.5 ** 0.9],
                                                    rel=1e-6)


def test_the_checkpoint_follows_the_fine_tuned_model_contract(reference, preprocessed):
    from volssl.inference.predict import load_finetuned

    out, summary, _ = reference
    ck = load_checkpoint(out / "checkpoints" / "final.pt")
    assert ck["kind"] == "finetune" and ck["format"] == "volssl" and ck["version"] == 1
    assert ck["labels"] == {"background": 0, "lesion": 1} and ck["channels"] == ["T1", "T2", "FLAIR"]
    assert ck["patch_size"] == [32, 32, 32] and ck["deep_supervision"] is True
    assert ck["model"]["in_channels"] == 3 and ck["model"]["out_channels"] == 2
    assert ck["plan"] == json.loads((preprocessed / "plan.json").read_text())
    assert ck["transfer"]["replicated"] == [STEM] and all(k.startswith("decoder.seg_layers.") for k in ck["transfer"]["new"])
    model = load_finetuned(out)
    with torch.no_grad():
        logits = model.network(torch.zeros(1, 3, 32, 32, 32))
    assert logits.shape == (1, 2, 32, 32, 32)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["method"] == "s3d" and run_json["pretrained"] is True and run_json["dataset"] == "Dataset001_Phantoms"
    assert (run_json["fold"], run_json["seed"], run_json["n_train"]) == (0, 0, 4)
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["folds"]) == 5 and splits["n_train"] == 4 and splits["test"] == ["brain_006"]
    assert set(splits["train"]) | set(splits["val"]) == {f"brain_{i:03d}" for i in range(6)}


def test_a_stopped_run_resumes_exactly(reference, pretrained, preprocessed, tmp_path, monkeypatch):
    ref_out, _, _ = reference
    summary = run(tmp_path, pretrained, preprocessed, monkeypatch=monkeypatch, stop_after=2)
    assert (summary["status"], summary["signal"], summary["step"]) == ("stopped", "SIGUSR1", 3)
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 3
    monkeypatch.undo()
    summary = run(tmp_path, pretrained, preprocessed, resume=True)
    assert summary["status"] == "finished"
    key = lambda r: (r["step"], r["loss"], r["loss_ema"], r["lr"])  # noqa: E731
    assert [key(r) for r in read_scalars(tmp_path / "scalars.csv")] == [key(r) for r in read_scalars(ref_out / "scalars.csv")]
    a = load_checkpoint(tmp_path / "checkpoints" / "final.pt")["network"]
    b = load_checkpoint(ref_out / "checkpoints" / "final.pt")["network"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_phantoms_to_scratch_finetune_to_predict_on_the_command_line(tmp_path):
    raw, out, pred = tmp_path / "raw", tmp_path / "ft", tmp_path / "pred"
    assert cli(["phantoms", str(raw), "--kind", "brain", "--n", "5", "--n-test", "1", "--shape", "24",
                "--no-progress"]) == 0
    assert cli(["finetune", "--checkpoint", "none", "--recipe", "scratch-tiny", "--dataset", str(raw), "--out", str(out),
                "--stage-steps", "3", "--n-train", "2", "--seed", "3", "--set", "patch_size=32,32,32", "--set",
                "num_workers=0", "--set", "batch_size=2", "--no-progress"]) == 0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json == {"method": "scratch", "dataset": "raw", "n_train": 2, "seed": 3, "fold": 0,
                        "pretrained": False, "recipe": "scratch-tiny", "checkpoint": None}
    ck = load_checkpoint(out / "checkpoints" / "final.pt")
    assert ck["kind"] == "finetune" and ck["step"] == 3 and ck["model"]["arch"] == "resenc-tiny"
    assert (out / "preprocessed" / "plan.json").is_file()
    assert cli(["predict", "--model", str(out), "--input", str(raw / "imagesTs"), "--output", str(pred),
                "--no-mirror", "--no-progress"]) == 0
    src = nib.load(raw / "imagesTs" / "brain_005_0000.nii.gz")
    seg = nib.load(pred / "brain_005.nii.gz")
    assert seg.shape == src.shape and (seg.affine == src.affine).all()


def test_guard_rails(reference, pretrained, preprocessed, tmp_path):
    ref_out, _, _ = reference
    with pytest.raises(ValueError, match="trains from scratch"):
        run(tmp_path / "a", pretrained, preprocessed, recipe="scratch-tiny", stage_steps=[2])
    with pytest.raises(ValueError, match="transfers pre-trained weights"):
        run(tmp_path / "b", None, preprocessed)
    with pytest.raises(ValueError, match="already holds a run"):
        run(ref_out, pretrained, preprocessed)
    with pytest.raises(ValueError, match="cannot resume.*recipe.optim.lr"):
        run(ref_out, pretrained, preprocessed, resume=True, overrides=["optim.lr=0.1"])
    with pytest.raises(ValueError, match="a 'finetune' checkpoint"):
        run(tmp_path / "c", ref_out / "checkpoints" / "final.pt", preprocessed)
    other = tmp_path / "other_plan"
    other.mkdir()
    plan = json.loads((preprocessed / "plan.json").read_text())
    (other / "plan.json").write_text(json.dumps(dict(plan, target_spacing=[2.0, 2.0, 2.0])))
    with pytest.raises(ValueError, match="another plan.*target_spacing"):
        run(tmp_path / "d", pretrained, other)
    relabelled = tmp_path / "relabelled"
    shutil.copytree(preprocessed, relabelled)
    meta = json.loads((relabelled / "dataset.json").read_text())
    (relabelled / "dataset.json").write_text(json.dumps(dict(meta, labels={"background": 0, "tumour": 2})))
    with pytest.raises(ValueError, match=r"label values \[1\] are not declared"):
        run(tmp_path / "e", pretrained, relabelled)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_across_stages(pretrained, preprocessed, tmp_path):
    args = ["finetune", "--checkpoint", str(pretrained), "--dataset", str(preprocessed), "--recipe", "s3d-tiny",
            "--stage-steps", "1,1,2", "--no-progress"] + [a for s in SMALL for a in ("--set", s)]
    # SGD with s3d's real weight decay (at the -tiny peak lr), not the -tiny AdamW: Adam divides by sqrt(v),
    # which turns float-rounding differences of near-zero gradients (2 processes vs 1) into lr-sized steps;
    # this test is about the data-parallel loop
    args += ["--set", "optim.name=sgd", "--set", "optim.weight_decay=3e-5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, launcher in (("one", [sys.executable, "-m", "volssl"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", "-m", "volssl"])):
        proc = subprocess.run(launcher + args + ["--out", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("one", "two"):
        assert json.loads((tmp_path / name / "config.json").read_text())["recipe"]["optim"]["name"] == "sgd"
    one, two = (read_scalars(tmp_path / n / "scalars.csv") for n in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=0) and b["lr"] == a["lr"]
    w1, w2 = (load_checkpoint(tmp_path / n / "checkpoints" / "final.pt") for n in ("one", "two"))
    assert w2["world_size"] == 2
    for k, v in w1["network"].items():
        torch.testing.assert_close(w2["network"][k], v, atol=1e-5, rtol=0)
