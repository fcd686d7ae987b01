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

CASES = {  # preset -> (fine-tuning recipe, pre-training patch)
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


@pytest.mark.parametrize("preset", sorted(CASES))
def test_encoder_output_at_step_0_equals_the_pretrained_encoder(preset, preprocessed, tmp_path, monkeypatch):
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

    def spy(out, tc, **kwargs):
        captured["network"] = kwargs["module"]
        raise _Stop

    monkeypatch.setattr(ft, "run_loop", spy)
    with pytest.raises(_Stop):
        ft.finetune(tmp_path / "pre", preprocessed, tmp_path / "ft", recipe=recipe, progress=False,
                    overrides=[f"patch_size={p},{p},{p}", "num_workers=0", "train.device=cpu"])
    network = captured["network"].eval()
    assert network.encoder.in_channels == 3

    x = torch.randn(2, 1, p, p, p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _features(encoder(x))
        got = _features(network.encoder(x.repeat(1, 3, 1, 1, 1)))
    assert len(got) >= len(want) >= 1
    for k, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape, f"{preset}: feature {k} shapes differ"
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{preset}: encoder feature {k} differs")
