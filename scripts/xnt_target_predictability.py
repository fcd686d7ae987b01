"""How much of MAE-XNT's pre-training target can any model predict on the nuclei phantoms?

MAE-XNT's loss is the MSE to each masked 4^3 token's own normalised voxels (norm_pix_loss): predicting
the token's mean scores 1.0. This script generates nuclei phantoms twice from the same random state,
with and without the acquisition noise, z-scores them as the ``xnt`` plan does, and scores oracles
against the noisy target:

* the clean volume (knows every structure exactly; only the noise is unpredictable);
* the clean volume smoothed by a Gaussian of sigma 1, 2 and 4 voxels, with the best scalar gain (knows
  only the structure coarser than sigma; at a 0.9 mask ratio a masked token's neighbours are mostly
  masked, so what a model can infer from context is the coarse structure).

Usage: ``python scripts/xnt_target_predictability.py [N_VOLUMES]`` (64^3 volumes, a few seconds each).
Results are in docs/evidence.md (MAE-XNT).
"""
from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

from volssl.data.phantoms import nuclei as P  # nuclei_case and the _xnt_acquisition it calls


def _tokens(a: np.ndarray, p: int = 4) -> np.ndarray:
    n = [s // p for s in a.shape]
    a = a[: n[0] * p, : n[1] * p, : n[2] * p]
    return a.reshape(n[0], p, n[1], p, n[2], p).transpose(0, 2, 4, 1, 3, 5).reshape(-1, p ** 3)


def clean_and_noisy(seed: int, shape=(64, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """One nuclei phantom with and without acquisition noise (same structures, same rings)."""
    acquisition, out = P._xnt_acquisition, {}

    def both(rng, img, blur, rings, noise):
        state = rng.bit_generator.state
        out["clean"] = acquisition(rng, img.copy(), blur, rings, (0.0, 0.0)).astype(np.float64)
        rng.bit_generator.state = state
        noisy = acquisition(rng, img, blur, rings, noise)
        out["noisy"] = noisy.astype(np.float64)
        return noisy

    P._xnt_acquisition = both
    try:
        P.nuclei_case(np.random.default_rng(seed), shape)
    finally:
        P._xnt_acquisition = acquisition
    return out["clean"], out["noisy"]


def oracle_losses(clean: np.ndarray, noisy: np.ndarray, sigmas=(1.0, 2.0, 4.0)) -> dict[str, float]:
    mu, sd = noisy.mean(), noisy.std()  # the xnt plan: per-volume z-score
    tc, tn = _tokens((clean - mu) / sd), _tokens((noisy - mu) / sd)
    m, s = tn.mean(1, keepdims=True), tn.std(1, keepdims=True) + 1e-6
    target = (tn - m) / s
    losses = {"mean prediction": float((target ** 2).mean())}
    pred = (tc - tc.mean(1, keepdims=True)) / s
    losses["clean volume"] = float(((pred - target) ** 2).mean())
    for sigma in sigmas:
        ts = _tokens(ndimage.gaussian_filter((clean - mu) / sd, sigma))
        pred = (ts - ts.mean(1, keepdims=True)) / s
        gain = (pred * target).sum() / max((pred * pred).sum(), 1e-12)
        losses[f"clean, smoothed sigma {sigma:g}"] = float(((gain * pred - target) ** 2).mean())
    return losses


def main(n: int = 3) -> None:
    rows = [oracle_losses(*clean_and_noisy(seed)) for seed in range(n)]
    for key in rows[0]:
        vals = [r[key] for r in rows]
        print(f"{key:<28} {np.mean(vals):.3f}  ({', '.join(f'{v:.3f}' for v in vals)})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
