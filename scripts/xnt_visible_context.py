"""How much of MAE-XNT's target can be predicted from the VISIBLE tokens alone, with no learning?

``scripts/xnt_target_predictability.py`` scores oracles that see the masked voxels' clean structure;
they bound what any model could reach, not what the visible 10% of a crop supports. This script scores
predictors that use only what the MAE's encoder sees, on the crops the trainer samples (the pool's
``xnt`` plan, ``crop_zscore``, 4^3 tokens, a fresh uniform mask per crop keeping ``MAEXNT.n_kept`` tokens):

* ``crop mean`` (0): the mean-prediction plateau, about 1.0;
* ``visible mean``: every masked voxel predicted by the mean of the crop's visible voxels;
* ``token interpolation, sigma s``: each masked token predicted by a constant, the Gaussian-weighted
  (distance between token centres, in tokens) mean of the visible tokens' means;
* ``voxel interpolation, sigma s``: each masked voxel predicted by normalised convolution of the
  visible voxels (Gaussian of sigma s voxels over the visible mask, divided by the blurred mask).

Every predictor gets the best scalar gain (fitted on the crops themselves; a network could learn it),
so each number is an upper bound on what that fixed rule gives and a lower bound on what a model that
reads its visible context could reach. The loss is MAE-XNT's: squared error on the masked tokens' voxels.

Usage::

    python scripts/xnt_visible_context.py PREPROCESSED_POOL [--crops 64] [--ratio 0.9] [--patch 32]

Results are in docs/evidence.md (MAE-XNT).
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from volssl.config import resolve
from volssl.data.dataset import PreprocessedDataset
from volssl.data.patches import PatchSampler
from volssl.methods import build_method

SIGMAS = (0.25, 0.5, 1.0, 2.0, 4.0)


def token_masks(n: int, grid: int, ratio: float, seed: int = 0) -> list[np.ndarray]:
    """``n`` token masks ``(grid, grid, grid)`` bool, True where a token is removed: uniform over the
    tokens (numpy RNG seeded with ``seed``), as many kept as MAE-XNT keeps (``MAEXNT.n_kept`` of the tiny
    preset at mask ratio ``ratio``)."""
    keep = build_method(resolve("mae-xnt-tiny", [f"method.mask_ratio={ratio}"])).n_kept(grid ** 3)
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        removed = np.ones(grid ** 3, dtype=bool)
        removed[rng.permutation(grid ** 3)[:keep]] = False
        masks.append(removed.reshape(grid, grid, grid))
    return masks


def voxel_mask(removed: np.ndarray, p: int = 4) -> np.ndarray:
    """The token mask ``removed`` (grid^3) expanded to the crop's voxels (each token a ``p^3`` block)."""
    return np.kron(removed, np.ones((p, p, p), dtype=bool))


def predictions(crop: np.ndarray, removed: np.ndarray, p: int = 4,
                sigmas: tuple[float, ...] = SIGMAS) -> dict[str, np.ndarray]:
    """Each predictor's voxel map for one crop ``(X, Y, Z)`` given the token mask ``removed`` (grid^3)."""
    visible = ~voxel_mask(removed, p)
    out = {"crop mean (0)": np.zeros_like(crop),
           "visible mean": np.full_like(crop, crop[visible].mean())}
    g = removed.shape[0]
    tok_mean = crop.reshape(g, p, g, p, g, p).mean(axis=(1, 3, 5))
    vis_tok = (~removed).astype(np.float64)
    for s in sigmas:
        num = ndimage.gaussian_filter(tok_mean * vis_tok, s, mode="constant")
        den = ndimage.gaussian_filter(vis_tok, s, mode="constant")
        tok_pred = np.where(den > 1e-8, num / np.maximum(den, 1e-8), 0.0)
        out[f"token interpolation, sigma {s:g} tokens"] = np.kron(tok_pred, np.ones((p, p, p)))
    for s in (x * p for x in sigmas):
        num = ndimage.gaussian_filter(crop * visible, s, mode="constant")
        den = ndimage.gaussian_filter(visible.astype(np.float64), s, mode="constant")
        out[f"voxel interpolation, sigma {s:g} voxels"] = np.where(den > 1e-8, num / np.maximum(den, 1e-8), 0.0)
    return out


def score(crops: list[np.ndarray], masks: list[np.ndarray], p: int = 4) -> dict[str, float]:
    """MAE-XNT's loss (mean squared error on the removed tokens' voxels, per crop, then over crops) of
    each predictor after its best scalar gain over all crops."""
    per = []  # (predictions, target voxels, removed voxels) of each crop
    for crop, removed in zip(crops, masks):
        m = voxel_mask(removed, p)
        per.append((predictions(crop, removed, p), crop[m], m))
    out = {}
    for name in per[0][0]:
        xy = sum(float((d[name][m] * t).sum()) for d, t, m in per)
        xx = sum(float((d[name][m] ** 2).sum()) for d, t, m in per)
        gain = xy / xx if xx > 1e-12 else 0.0
        out[name] = float(np.mean([((gain * d[name][m] - t) ** 2).mean() for d, t, m in per]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pool", help="preprocessed pool (xnt plan), e.g. a benchmark's draw*/pool/xnt/xnt")
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.9, help="mask ratio")
    ap.add_argument("--patch", type=int, default=32, help="crop edge (voxels); a multiple of 4")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.patch % 4:
        ap.error(f"--patch must be a multiple of the 4-voxel token, got {a.patch}")
    sampler = PatchSampler(PreprocessedDataset(a.pool), (a.patch,) * 3, seed=a.seed, channel_mode="single",
                           crop_zscore=True)
    crops = [np.asarray(sampler[i]["image"], dtype=np.float64)[0] for i in range(a.crops)]
    masks = token_masks(a.crops, a.patch // 4, a.ratio, a.seed)
    res = score(crops, masks)
    print(f"{a.pool}: {a.crops} crops of {a.patch}^3, mask ratio {a.ratio}; loss on the removed tokens "
          f"(best scalar gain)")
    for name, v in res.items():
        print(f"  {name:<38} {v:.4f}")


if __name__ == "__main__":
    main()
