"""Transfer moves every tensor it should: at fine-tuning step 0 the network's encoder computes exactly what
the pre-trained encoder computed, for S3D, AMAES and MAE-XNT (issue 11: diagnose before tuning).

Each method pre-trains 2 steps of the real loop; ``finetune`` then runs with its own ``-tiny`` recipe and
is stopped before its first update. The fine-tuning network takes the dataset's 3 channels (T1, T2,
FLAIR) through a stem replicated over them (divided by 3), so a stack of 3 identical channels must give
the single-channel pre-trained encoder's features, stage by stage (or token by token)."""
from __future__ import annotations

import pytest
import torch

import volssl.finetuning.finetune as ft
from volssl.config import config_from_dict
from volssl.methods import build_method
from volssl.training.checkpoint import load_checkpoint

CASES = {  # preset -> (fine-tuning recipe, pre-training patch); each with both multi-channel fusions
    "s3d-b-tiny": ("s3d-tiny", 32),
    "amaes-unet-b-tiny": ("amaes-tiny", 32),
    "mae-xnt-tiny": ("mae-xnt-tiny", 16),
}


class _Stop(Exception):
    pass


def _features(out) -> list[torch.Tensor]:
    if hasattr(out, "tokens"):  # ViT: tokens after the final norm (+ any hidden states)
        return [out.tokens, *out.hidden_states]
    return list(out)


@pytest.mark.parametrize("fusion", ["stem", "features"])
@pytest.mark.parametrize("preset", sorted(CASES))
def test_encoder_output_at_step_0_equals_the_pretrained_encoder(preset, fusion, preprocessed, tmp_path, monkeypatch):
    from volssl.config import resolve
    from volssl.training.trainer import pretrain

    recipe, p = CASES[preset]
    cfg = resolve(preset, ["train.steps=2", f"data.patch_size={p},{p},{p}", "data.num_workers=0", "train.device=cpu",
                           "train.checkpoint_every=2", "train.preview_every=2"])
    pretrain(cfg, preprocessed, tmp_path / "pre", progress=False)
    state = load_checkpoint(tmp_path / "pre" / "checkpoints" / "final.pt")
    method = build_method(config_from_dict(state["config"]))
    method.load_state_dict(state["method_state"])
    encoder = method.network.encoder.eval()

    captured = {}

    def spy(out, tc, job, **kwargs):
        captured["network"] = job.module
        raise _Stop

    monkeypatch.setattr(ft, "run_loop", spy)
    vit_fused = fusion == "features" and preset == "mae-xnt-tiny"
    with pytest.raises(ValueError if vit_fused else _Stop, match="CNN encoder" if vit_fused else None):
        ft.finetune(tmp_path / "pre", preprocessed, tmp_path / "ft", recipe=recipe, progress=False,
                    overrides=[f"patch_size={p},{p},{p}", "num_workers=0", "train.device=cpu",
                               f"channel_fusion={fusion}"])
    if vit_fused:  # a ViT has no per-stage feature maps to fuse: refused with a clear message
        return
    network = captured["network"].eval()
    fused = fusion == "features"
    assert network.encoder.in_channels == (1 if fused else 3)

    x = torch.randn(2, 1, p, p, p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _features(encoder(x))
        if fused:  # each channel through the encoder, per-stage fusion initialised to the mean
            got = network.fuse(network.encoder(x.repeat(1, 3, 1, 1, 1).reshape(-1, 1, p, p, p)), 2)
        else:  # the stem replicated over the channels and divided by 3
            got = _features(network.encoder(x.repeat(1, 3, 1, 1, 1)))
    assert len(got) >= len(want) >= 1
    for k, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape, f"{preset}: feature {k} shapes differ"
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{preset}: encoder feature {k} differs")


@pytest.mark.parametrize("kind,plan,preset,recipe", [("nuclei", "xnt", "mae-xnt-tiny", "mae-xnt-tiny"),
                                                      ("brain", "s3d", "s3d-b-tiny", "s3d-tiny")])
def test_finetuning_feeds_the_intensities_pretraining_saw(kind, plan, preset, recipe, tmp_path, monkeypatch):
    """The encoder sees z-scored intensities in pre-training (a per-volume z-score, or MAE-XNT's per-crop one);
    fine-tuning batches must be on the same scale (the "xnt" plan once stored raw grey values: mean ~1000)."""
    import numpy as np

    from volssl.config import resolve
    from volssl.data.phantoms import generate_phantoms
    from volssl.data.preprocess import get_plan, preprocess
    from volssl.training.trainer import _default_batches

    raw = generate_phantoms(tmp_path / "raw", kind, n=6, n_test=1, seed=0, shape=(32, 32, 32), progress=False)
    pool = tmp_path / "pool"
    the_plan = get_plan(plan)
    the_plan.rules.min_file_bytes = the_plan.rules.min_fov_mm = None  # small phantoms
    preprocess(raw, pool, plan=the_plan, progress=False)
    cfg = resolve(preset, ["data.patch_size=16,16,16", "data.num_workers=0", "data.batch_size=4"])
    batches, _ = _default_batches(cfg, pool)
    pre = next(iter(batches(0, 0, 1)))["image"].numpy()
    seen = []

    def spy(out, tc, job, **kwargs):
        seen.append(next(iter(job.batches(0, 0, 1)))["image"].numpy())
        raise _Stop

    monkeypatch.setattr(ft, "run_loop", spy)
    with pytest.raises(_Stop):
        ft.finetune(None if recipe.startswith("scratch") else _tiny_checkpoint(cfg, pool, tmp_path), raw,
                    tmp_path / "ft", recipe=recipe, progress=False,
                    overrides=["patch_size=16,16,16", "num_workers=0", "train.device=cpu"])
    fine = seen[0]
    for name, x in (("pre-training", pre), ("fine-tuning", fine)):
        assert abs(float(np.mean(x))) < 1.0 and 0.3 < float(np.std(x)) < 3.0, \
            f"{preset}: {name} batch mean {np.mean(x):.1f}, std {np.std(x):.1f}"


def _tiny_checkpoint(cfg, pool, tmp_path):
    from volssl.config import apply_overrides
    from volssl.training.trainer import pretrain

    cfg = apply_overrides(cfg, ["train.steps=1", "train.device=cpu", "train.checkpoint_every=1",
                                "train.preview_every=1"])
    pretrain(cfg, pool, tmp_path / "pre", progress=False)
    return tmp_path / "pre"
