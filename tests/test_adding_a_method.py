"""Adding a method takes one or two files (docs/design.md, "Adding a method"): this file is the whole of a
test-only method, a denoising autoencoder on the ResEnc U-Net, registered from the test suite. It
pre-trains, fine-tunes with an existing recipe and is reported by the benchmark next to its twin.

In the package the same code would be two files: ``methods/toy_denoise.py`` (the config class and the
module, first part below) and ``presets/toy_denoise.py`` (presets and the benchmark arm, second part).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig, register_preset, resolve
from volssl.methods import METHODS, MethodOutput, build_method, register_method
from volssl.methods.base import MethodBase
from volssl.models.registry import build_model
from volssl.presets import arms
from volssl.presets.arms import Arm, register_arm
from volssl.presets.s3d import s3d_b


# ------------------------------------------------------------------ methods/toy_denoise.py
@dataclass
class ToyDenoiseConfig(MethodConfig):
    name: str = "toy-denoise"
    noise: float = 0.5  # std of the Gaussian noise added to the z-scored input


@register_method(ToyDenoiseConfig)
class ToyDenoise(MethodBase):
    """Denoising autoencoder: the ResEnc U-Net restores ``images`` from ``images + noise * N(0, 1)``."""

    def __init__(self, network: nn.Module, cfg: ToyDenoiseConfig) -> None:
        super().__init__()
        self.network, self.noise = network, cfg.noise

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "ToyDenoise":
        return cls(build_model(dataclasses.replace(cfg.model, out_channels=cfg.model.in_channels)), cfg.method)

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        b = images.shape[0]
        noise = torch.randn(global_batch or b, *images.shape[1:])[sample_offset:sample_offset + b]
        restored = self.network(images + self.noise * noise.to(images))
        loss = ((restored - images) ** 2).flatten(1).mean(1).mean()
        return MethodOutput(loss, {"input": images[:, :1], "reconstruction": restored[:, :1].detach()})

    def transfer_state_dict(self) -> dict[str, Tensor]:
        return self.network.state_dict()


# ------------------------------------------------------------------ presets/toy_denoise.py
@register_preset("toy-denoise")
def toy_denoise() -> RunConfig:
    cfg = s3d_b()
    cfg.method, cfg.description = ToyDenoiseConfig(), "toy denoising autoencoder on S3D-B's network and data"
    return cfg


@register_preset("toy-denoise-tiny")
def toy_denoise_tiny() -> RunConfig:
    cfg = resolve("s3d-b-tiny")
    cfg.method = ToyDenoiseConfig()
    return cfg


register_arm(Arm("toy-denoise", "Toy denoising AE (ResEnc)", "s3d", preset="toy-denoise", twin="no-fixed"))


# ------------------------------------------------------------------ the tests
def test_the_toy_method_is_registered_once_everywhere():
    assert METHODS["toy-denoise"] is ToyDenoise
    assert arms.ARMS["toy-denoise"].twin == "no-fixed"
    cfg = resolve("toy-denoise-tiny", ["data.patch_size=32,32,32"])
    method = build_method(cfg)
    assert isinstance(method, ToyDenoise)
    out = method(torch.randn(2, 1, 32, 32, 32), sample_offset=0, global_batch=2)
    assert out.loss.ndim == 0 and out.loss.item() > 0
    with pytest.raises(ValueError, match="registered twice"):
        register_arm(Arm("toy-denoise", "another label", "s3d"))


def test_the_toy_method_pretrains_finetunes_and_is_reported_by_the_benchmark(tmp_path):
    from volssl.benchmark import BenchmarkSpec, run_benchmark

    out = tmp_path / "bench"
    result = run_benchmark(out, BenchmarkSpec(["toy-denoise", "no-fixed"], ["brain"], n_trains=[2], seeds=[0],
                                              scale="quick"), workers=1)
    assert result["failed"] == 0
    cells = {c["method"]: c for c in result["cells"]}
    assert set(cells) == {"toy-denoise", "no-fixed"} and 0.0 <= cells["toy-denoise"]["dice"] <= 1.0
    pre = json.loads((out / "pretrain" / "toy-denoise@brain" / "summary.json").read_text())
    assert pre["status"] == "finished" and pre["step"] > 0
    run = json.loads((out / "finetune" / "brain" / "toy-denoise_n2_s0" / "run.json").read_text())
    assert run["pretrained"] is True and run["method"] == "toy-denoise"
    report = (out / "report" / "report.md").read_text()
    assert "toy-denoise" in report
    paired = (out / "report" / "paired.csv").read_text()
    assert "toy-denoise" in paired and "no-fixed" in paired
