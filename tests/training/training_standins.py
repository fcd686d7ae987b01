"""Stand-ins for the trainer tests: a tiny masked autoencoder honouring the method contract, an
in-memory patch stream with make_loader's start_batch/rank semantics, a tiny preprocessed dataset, and
a command-line entry (``python training_standins.py OUT ...``) for subprocess / torchrun tests."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from volssl.config import RunConfig, apply_overrides, get_preset

from volssl.methods.base import MethodBase  # noqa: E402

MethodOutput = namedtuple("MethodOutput", ["loss", "previews"])


class TinyNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, width, 3, stride=2, padding=1), nn.LeakyReLU(0.01),
                                     nn.Conv3d(width, width, 3, padding=1), nn.LeakyReLU(0.01))
        self.decoder = nn.Sequential(nn.ConvTranspose3d(width, width, 2, stride=2), nn.LeakyReLU(0.01),
                                     nn.Conv3d(width, 1, 3, padding=1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


class TinyMAE(MethodBase):
    """Masked autoencoder on 4^3 blocks; masks drawn for the global batch from the global torch RNG,
    loss = mean over samples of the per-sample masked-voxel MSE (the method contract)."""

    def __init__(self, block: int = 4, step_delay: float = 0.0) -> None:
        super().__init__()
        self.network = TinyNet()
        self.mask_token = nn.Parameter(torch.zeros(1))
        self.block = block
        self.step_delay = step_delay

    def transfer_state_dict(self):
        return self.network.state_dict()

    def forward(self, images, sample_offset: int = 0, global_batch: int | None = None):
        if self.step_delay:
            time.sleep(self.step_delay)
        b = images.shape[0]
        g = b if global_batch is None else global_batch
        grid = [s // self.block for s in images.shape[2:]]
        rows = slice(sample_offset, sample_offset + b)
        ratio = (0.6 + 0.3 * torch.rand(g))[rows]
        noise = torch.rand(g, int(np.prod(grid)))[rows]
        visible = (noise >= ratio[:, None]).float().view(b, 1, *grid).to(images.device)
        visible = F.interpolate(visible, scale_factor=self.block, mode="nearest")
        masked = images * visible + (1 - visible) * self.mask_token
        recon = self.network(masked)
        hidden = 1 - visible
        per_sample = ((recon - images) ** 2 * hidden).sum(dim=(1, 2, 3, 4)) / hidden.sum(dim=(1, 2, 3, 4)).clamp_min(1)
        previews = {"input": images, "masked": images * visible, "reconstruction": recon, "target": images}
        return MethodOutput(per_sample.mean(), {k: v.detach() for k, v in previews.items()})


def smooth_volume(gen: torch.Generator, n: int, patch) -> torch.Tensor:
    """n smooth random (1, *patch) volumes (upsampled 4^3 noise), roughly z-scored."""
    low = torch.randn(n, 1, 4, 4, 4, generator=gen)
    return F.interpolate(low, size=tuple(patch), mode="trilinear", align_corners=True)


def make_batches(global_batch: int, patch, seed: int = 0):
    """A BatchFactory: global batch k is a pure function of (seed, k); rank r gets its rows."""

    def factory(start_batch: int, rank: int, world_size: int):
        rows = global_batch // world_size
        for k in itertools.count(start_batch):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
            images = smooth_volume(gen, global_batch, patch)
            yield {"image": images[rank * rows:(rank + 1) * rows]}

    return factory


def tiny_config(steps: int = 8, batch: int = 4, patch=(16, 16, 16), extra: list[str] | None = None) -> RunConfig:
    cfg = get_preset("s3d-b-tiny")
    return apply_overrides(cfg, [
        f"train.steps={steps}", f"data.batch_size={batch}", "data.patch_size=" + ",".join(map(str, patch)),
        "data.num_workers=0", "train.precision=fp32", "train.device=cpu", "train.log_every=1",
        "train.checkpoint_every=4", "train.preview_every=4", "optim.lr=0.01",
    ] + list(extra or []))


def write_tiny_dataset(root: Path, n_cases: int = 3, shape=(24, 24, 24), seed: int = 0) -> Path:
    """A preprocessed dataset (plan.json, manifest, images/*.b2nd) of smooth random volumes."""
    from volssl.data.manifest import CaseRecord, ManifestWriter
    from volssl.data.storage import save_array

    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"spacing": [1.0, 1.0, 1.0], "normalization": "zscore"}))
    gen = torch.Generator().manual_seed(seed)
    with ManifestWriter(root) as mw:
        for i in range(n_cases):
            vol = smooth_volume(gen, 1, shape)[0].numpy().astype(np.float32)
            cid = f"case_{i:03d}"
            save_array(root / "images" / f"{cid}.b2nd", vol)
            mw.append(CaseRecord(id=cid, shape=list(vol.shape), spacing=[1.0, 1.0, 1.0], channels=["0"]))
    return root


def main(argv=None) -> int:
    """Run the trainer with the stand-ins: ``OUT [--steps N] [--resume] [--delay S] [--set k=v ...]``."""
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--method", choices=["tiny", "s3d"], default="tiny", help="TinyMAE or the preset's real method")
    args = p.parse_args(argv)
    from volssl.training import distributed
    from volssl.training.trainer import pretrain

    cfg = tiny_config(args.steps, args.batch, extra=args.overrides)
    torch.manual_seed(cfg.train.seed)
    if args.method == "s3d":
        from volssl.methods import build_method

        method = build_method(cfg)
    else:
        method = TinyMAE(step_delay=args.delay)
    summary = pretrain(cfg, None, args.out, resume=args.resume, method=method,
                       batches=make_batches(cfg.data.batch_size, cfg.data.patch_size), progress=False)
    distributed.cleanup()
    print(json.dumps({k: summary[k] for k in ("status", "signal", "step")}))
    return 0



def fake_slurm(folder: Path) -> Path:
    """A bin folder with a stand-in ``sbatch`` (keeps the submitted script, answers job 4242) and ``srun``."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir

if __name__ == "__main__":
    sys.exit(main())
