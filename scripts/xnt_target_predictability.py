"""How much of MAE-XNT's pre-training target can any model predict on the nuclei (or axons) phantoms?

MAE-XNT's loss is the MSE to each masked 4^3 token's own normalised voxels (norm_pix_loss): predicting
the token's mean scores 1.0. This script generates nuclei phantoms twice from the same random state,
with and without the acquisition noise, z-scores them as the ``xnt`` plan does, and scores oracles
against the noisy target:

* the clean volume (knows every structure exactly; only the noise is unpredictable);
* the clean volume smoothed by a Gaussian of sigma 1, 2 and 4 voxels, with the best scalar gain (knows
  only the structure coarser than sigma; at a 0.9 mask ratio a masked token's neighbours are mostly
  masked, so what a model can infer from context is the coarse structure);
* the structures alone: the same phantom rendered with its random band-pass textures (neuropil,
  chromatin) set to zero, acquired without noise, with the best scalar gain (knows every object, its
  shape and its grey value exactly, but nothing of the random texture that no context can predict).

Usage: ``python scripts/xnt_target_predictability.py [N_VOLUMES] [nuclei|axons]`` (64^3 volumes, a few
seconds each; default 3 nuclei).
Results are in docs/evidence.md (MAE-XNT).
"""
from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

from volssl.data.phantoms import axons, nuclei  # each module calls its own imported _xnt_acquisition

CASES = {"nuclei": (nuclei, nuclei.nuclei_case), "axons": (axons, axons.axons_case)}


def _tokens(a: np.ndarray, p: int = 4) -> np.ndarray:
    n = [s // p for s in a.shape]
    a = a[: n[0] * p, : n[1] * p, : n[2] * p]
    return a.reshape(n[0], p, n[1], p, n[2], p).transpose(0, 2, 4, 1, 3, 5).reshape(-1, p ** 3)


def clean_and_noisy(seed: int, shape=(64, 64, 64), kind: str = "nuclei") -> tuple[np.ndarray, np.ndarray]:
    """One ``kind`` phantom with and without acquisition noise (same structures, same rings)."""
    P, case = CASES[kind]
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
        case(np.random.default_rng(seed), shape)
    finally:
        P._xnt_acquisition = acquisition
    return out["clean"], out["noisy"]


def structures_only(seed: int, shape=(64, 64, 64), kind: str = "nuclei") -> np.ndarray:
    """The phantom of :func:`clean_and_noisy` with every ``_texture`` field multiplied by 0 (drawn all the
    same, so the random state and every structure stay identical), acquired without noise."""
    P, case = CASES[kind]
    acquisition, texture, out = P._xnt_acquisition, P._texture, {}

    def clean(rng, img, blur, rings, noise):
        out["structures"] = acquisition(rng, img, blur, rings, (0.0, 0.0)).astype(np.float64)
        return out["structures"]

    P._xnt_acquisition, P._texture = clean, lambda *a: texture(*a) * np.float32(0.0)
    try:
        case(np.random.default_rng(seed), shape)
    finally:
        P._xnt_acquisition, P._texture = acquisition, texture
    return out["structures"]


def _fit(pred: np.ndarray, target: np.ndarray) -> float:
    """MSE of ``pred`` to ``target`` after the best scalar gain (least squares)."""
    gain = (pred * target).sum() / max((pred * pred).sum(), 1e-12)
    return float(((gain * pred - target) ** 2).mean())


def oracle_losses(clean: np.ndarray, noisy: np.ndarray, sigmas=(1.0, 2.0, 4.0),
                  structures: np.ndarray | None = None, target: str = "voxels") -> dict[str, float]:
    """Oracle losses against the masked-token target of one volume (z-scored on its own statistics).

    ``target="voxels"``: MAE-XNT's (``norm_pix_loss`` off, the public code's): the z-scored voxels
    themselves, so predicting 0 (the crop mean) scores 1.0. ``target="norm-pix"``: MAE's option, each
    token normalised by its own mean and std, so predicting each token's mean scores 1.0."""
    mu, sd = noisy.mean(), noisy.std()  # the xnt plan: per-volume z-score
    tc, tn = _tokens((clean - mu) / sd), _tokens((noisy - mu) / sd)
    if target == "norm-pix":
        m, s = tn.mean(1, keepdims=True), tn.std(1, keepdims=True) + 1e-6

        def norm(t: np.ndarray) -> np.ndarray:  # a prediction in the target's space: own mean out, target's std
            return (t - t.mean(1, keepdims=True)) / s
        tgt = (tn - m) / s
        losses = {"each token's mean (norm-pix: 0)": float((tgt ** 2).mean())}
    elif target == "voxels":
        def norm(t: np.ndarray) -> np.ndarray:
            return t
        tgt = tn
        losses = {"the crop mean (0)": float((tgt ** 2).mean()),
                  "each token's true mean": float(((tgt - tgt.mean(1, keepdims=True)) ** 2).mean())}
    else:
        raise ValueError(f"target must be 'voxels' or 'norm-pix', got {target!r}")
    losses["clean volume"] = float(((norm(tc) - tgt) ** 2).mean())
    for sigma in sigmas:
        losses[f"clean, smoothed sigma {sigma:g}"] = _fit(norm(_tokens(ndimage.gaussian_filter((clean - mu) / sd, sigma))),
                                                          tgt)
    if structures is not None:
        losses["structures only"] = _fit(norm(_tokens((structures - mu) / sd)), tgt)
    return losses


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=3, help="volumes (seeds 0..n-1)")
    ap.add_argument("kind", nargs="?", default="nuclei", choices=sorted(CASES))
    ap.add_argument("--target", default="voxels", choices=("voxels", "norm-pix"))
    ap.add_argument("--zoom", type=float, default=1.0,
                    help="resample the 64^3 volumes by this factor first (0.5: the evidence scale's 2 mm grid)")
    a = ap.parse_args(argv)
    rows = []
    for seed in range(a.n):
        vols = [*clean_and_noisy(seed, kind=a.kind), structures_only(seed, kind=a.kind)]
        if a.zoom != 1.0:
            vols = [ndimage.zoom(v, a.zoom, order=1) for v in vols]
        rows.append(oracle_losses(vols[0], vols[1], structures=vols[2], target=a.target))
    print(f"{a.kind}, target {a.target}, zoom {a.zoom:g}: loss (mean of {a.n} volumes; each)")
    for key in rows[0]:
        vals = [r[key] for r in rows]
        print(f"  {key:<34} {np.mean(vals):.3f}  ({', '.join(f'{v:.3f}' for v in vals)})")


if __name__ == "__main__":
    main()
