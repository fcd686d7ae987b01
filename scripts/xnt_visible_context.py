"""How much of MAE-XNT's target can be predicted from the VISIBLE tokens alone, with no learning?

``scripts/xnt_target_predictability.py`` scores oracles that see the masked voxels' clean structure;
they bound what any model could reach, not what the visible 10% of a crop supports. This script scores
predictors that use only what the MAE's encoder sees, on the crops the trainer samples (the pool's
``xnt`` plan, ``crop_zscore``, 4^3 tokens, a fresh uniform mask per crop as in ``MAEXNT.random_masking``):

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

from volssl.data.dataset import PreprocessedDataset
from volssl.data.patches import PatchSampler

SIGMAS = (0.25, 0.5, 1.0, 2.0, 4.0)


def token_mask(grid: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``(grid, grid, grid)`` bool, True where a token is removed: ``N - int(N (1 - ratio))`` of them."""
    n = grid ** 3
    keep = max(1, int(n * (1 - ratio)))
    removed = np.ones(n, dtype=bool)
    removed[rng.permutation(n)[:keep]] = False
    return removed.reshape(grid, grid, grid)


def predictions(crop: np.ndarray, removed: np.ndarray, p: int = 4,
                sigmas: tuple[float, ...] = SIGMAS) -> dict[str, np.ndarray]:
    """Each predictor's voxel map for one crop ``(X, Y, Z)`` given the token mask ``removed`` (grid^3)."""
    vox_removed = np.kron(removed, np.ones((p, p, p), dtype=bool))
    visible = ~vox_removed
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
    sums: dict[str, list[float]] = {}
    per: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]] = []
    for crop, removed in zip(crops, masks):
        vox_removed = np.kron(removed, np.ones((p, p, p), dtype=bool))
        per.append((predictions(crop, removed, p), crop[vox_removed], vox_removed))
    for name in per[0][0]:
        xy = sum(float((pred[m] * t).sum()) for pred, t, m in ((d[name], t, m) for d, t, m in per))
        xx = sum(float((pred[m] ** 2).sum()) for pred, t, m in ((d[name], t, m) for d, t, m in per))
        gain = xy / xx if xx > 1e-12 else 0.0
        sums[name] = [float(((gain * d[name][m] - t) ** 2).mean()) for d, t, m in per]
    return {k: float(np.mean(v)) for k, v in sums.items()}


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
    rng = np.random.default_rng(a.seed)
    crops = [np.asarray(sampler[i]["image"], dtype=np.float64)[0] for i in range(a.crops)]
    masks = [token_mask(a.patch // 4, a.ratio, rng) for _ in crops]
    res = score(crops, masks)
    print(f"{a.pool}: {a.crops} crops of {a.patch}^3, mask ratio {a.ratio}; loss on the removed tokens "
          f"(best scalar gain)")
    for name, v in res.items():
        print(f"  {name:<38} {v:.4f}")


if __name__ == "__main__":
    main()
