"""The demo's S3D - scratch gain over several phantom draws, with bootstrap 95% CIs.

Run the demo once per draw (``volssl demo --seed S --out DIR_S``), then::

    python scripts/demo_draws.py DIR_0 DIR_1 ...

Prints each draw's per-seed Dice, the mean gain over draws with the benchmark report's percentile bootstrap
CI (:func:`volssl.reports.paired.bootstrap_ci`, 10,000 resamples, seed 0) over draws, the same over all
pairs, the runs at the floor (the report's :data:`~volssl.reports.paired.FLOOR_DICE`) per seed, and the
mean difference over the pairs in which both arms learned. docs/evidence.md ("Demo") has the numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from volssl.reports.paired import FLOOR_DICE, bootstrap_ci

FLOOR = 100 * FLOOR_DICE  # Dice x100 below which a run never left the floor
N_BOOT = 10_000


def load_draw(folder: Path) -> tuple[int, dict[int, tuple[float, float]]]:
    """A demo folder's draw seed and ``{fine-tuning seed: (S3D Dice, scratch Dice)}`` (x100)."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"demo_draws: {path} not found (run `volssl demo --out {folder}` first)")
    res = json.loads(path.read_text())
    dice = {(r["init"], int(r["seed"])): 100.0 * float(r["dice"]) for r in res["runs"]}
    seeds = sorted({s for _, s in dice})
    return int(res.get("seed", -1)), {s: (dice[("s3d", s)], dice[("scratch", s)]) for s in seeds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="demo output folders, one per draw")
    a = ap.parse_args(argv)
    draws = sorted((load_draw(f) for f in a.folders), key=lambda d: d[0])
    for draw, pairs in draws:
        s3d = [p[0] for p in pairs.values()]
        scratch = [p[1] for p in pairs.values()]
        print(f"draw {draw}: S3D {', '.join(f'{v:.1f}' for v in s3d)} ({np.mean(s3d):.1f}) | scratch "
              f"{', '.join(f'{v:.1f}' for v in scratch)} ({np.mean(scratch):.1f}) | "
              f"gain {np.mean(s3d) - np.mean(scratch):+.1f}")
    gains = np.array([np.mean([x - y for x, y in pairs.values()]) for _, pairs in draws])
    lo, hi = bootstrap_ci(gains, n_boot=N_BOOT)
    print(f"{len(gains)} draws: mean gain {gains.mean():+.1f}, 95% CI over draws [{lo:+.1f}, {hi:+.1f}]; "
          f"negative draws: {int((gains < 0).sum())}")
    diffs = np.array([x - y for _, pairs in draws for x, y in pairs.values()])
    lo, hi = bootstrap_ci(diffs, n_boot=N_BOOT)
    print(f"{len(diffs)} pairs: mean {diffs.mean():+.1f}, 95% CI over pairs [{lo:+.1f}, {hi:+.1f}]")
    for seed in sorted({s for _, pairs in draws for s in pairs}):
        runs = [pairs[seed] for _, pairs in draws if seed in pairs]
        print(f"seed {seed}: at the floor S3D {sum(x < FLOOR for x, _ in runs)}/{len(runs)}, "
              f"scratch {sum(y < FLOOR for _, y in runs)}/{len(runs)}")
    both = [x - y for _, pairs in draws for x, y in pairs.values() if x >= FLOOR and y >= FLOOR]
    if both:
        print(f"both arms learned: {len(both)} pairs, mean difference {np.mean(both):+.1f}")


if __name__ == "__main__":
    main()
