"""How fast can the tiny MAE-XNT fit anything? AdamW steps on ONE fixed batch of crops, a fresh mask each step.

A model that can learn the pretext task at all drives this loss far below 1.0 (the z-scored crop's mean
prediction) on a batch it sees every step. How many steps that takes measures how far the CPU budget
(a few hundred steps over varied crops) is from the point where a ViT MAE starts to use its context.

Usage::

    python scripts/xnt_fixed_batch.py PREPROCESSED_POOL [--ratio 0.9] [--lr 1e-3] [--steps 300] [--batch 4]

``PREPROCESSED_POOL``: a folder written by ``volssl preprocess`` with the ``xnt`` plan (for example a
benchmark's ``draw*/pool/xnt/xnt``). Results are in docs/evidence.md (MAE-XNT).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from volssl.config import resolve
from volssl.data.dataset import PreprocessedDataset
from volssl.data.patches import PatchSampler
from volssl.methods import build_method


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pool", help="preprocessed pool (xnt plan)")
    ap.add_argument("--preset", default="mae-xnt-tiny")
    ap.add_argument("--ratio", type=float, default=0.9, help="mask ratio")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (constant; the preset's betas)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    cfg = resolve(a.preset, [f"method.mask_ratio={a.ratio}"])
    method = build_method(cfg)
    sampler = PatchSampler(PreprocessedDataset(a.pool), (a.patch,) * 3, seed=a.seed, channel_mode="single",
                           crop_zscore=True)
    x = torch.stack([torch.as_tensor(np.asarray(sampler[i]["image"]), dtype=torch.float32) for i in range(a.batch)])
    opt = torch.optim.AdamW(method.parameters(), lr=a.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    print(f"{a.preset}: mask ratio {a.ratio}, lr {a.lr:g}, one fixed batch {tuple(x.shape)}")
    for step in range(a.steps + 1):
        loss = method(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"  step {step:5d}  loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
