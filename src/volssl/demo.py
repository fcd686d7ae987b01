"""The end-to-end demo on built-in phantoms (``volssl demo``, the README's ``make demo``).

The use case in miniature: many unlabeled scans, a few labeled ones.

1. ``unlabeled/``, ``labeled/``  brain phantoms (nnU-Net v2 raw datasets): an unlabeled pool for
   pre-training and a labeled dataset (training cases + held-out test cases) of other subjects;
2. ``unlabeled_pre/``           quality filter + preprocessing with the S3D plan;
3. patch stream                 a few batches through the multi-process loader;
4. ``pretrain/``                tiny S3D pre-training (loss curve, preview PNGs, checkpoints, and the
                                representation probe on the labeled training cases: probe.png);
5. ``finetune/INIT_nN_sS/``     fine-tuning with 2 labeled cases of fold 0, from the S3D checkpoint (recipe ``s3d-tiny``) and from scratch with the same schedule
   (``scratch-s3d-schedule-tiny``, same stages, optimiser, network and patch), both recipes as they
   are (no demo-only setting), for 3 seeds, two runs at a time; each run then predicts the held-out
   cases in their original geometry and is evaluated (Dice, NSD);
6. ``report/``                  tables, ranks, the paired S3D - scratch difference with its bootstrap
                                interval and the probe curve (``volssl report``);
7. ``results.json``             ``runs``: [{init, n_train, seed, dice, nsd}], and the comparison.

Rerunning resumes: finished stages and runs are not redone.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volssl.benchmark import cell_name, run_cell
from volssl.util.atomic import write_json_atomic
from volssl.util.workers import watched_pool


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo variant (all counts are phantom cases or optimisation steps)."""

    n_unlabeled: int
    n_labeled: int
    n_test: int
    shape: int  # phantom voxels per axis
    patch: int  # training patch side (pre-training and fine-tuning)
    pretrain_steps: int
    stage_steps: tuple[int, int, int] | None  # decoder warm-up, whole-network warm-up, training (None: the recipe's)
    seeds: tuple[int, ...]
    n_trains: tuple[int | None, ...]  # None: every training case of the fold


#: 3 seeds at 2 labelled cases: the low-data comparison the demo is about, in about 12 minutes on 2 cores
#: (each fine-tuning run encodes the 3 channels separately: ~150 s; `n_trains=(2, None)` adds the full fold)
FULL = DemoScale(n_unlabeled=48, n_labeled=16, n_test=4, shape=64, patch=32, pretrain_steps=400,
                 stage_steps=None, seeds=(0, 1, 2), n_trains=(2,))
QUICK = DemoScale(n_unlabeled=5, n_labeled=6, n_test=2, shape=56, patch=32, pretrain_steps=6,
                  stage_steps=(2, 2, 4), seeds=(0,), n_trains=(2, None))
#: The demo works at 2 mm (the S3D plan otherwise): 8x fewer voxels than 1 mm, so that pre-training,
#: 12 fine-tuning runs and their predictions fit a 2-core CPU in about 15 minutes.
DEMO_SPACING = (2.0, 2.0, 2.0)


def _say(msg: str) -> None:
    print(f"[volssl demo] {msg}", flush=True)


def run_demo(out: str | Path = "volssl_demo", quick: bool = False, seed: int = 0, workers: int = 2) -> dict[str, Any]:
    """Run the demo into ``out`` and return ``results.json``'s content.

    ``quick`` is the CI-sized variant (few small phantoms, a handful of steps, one seed); its numbers
    mean nothing. ``workers`` fine-tuning runs go in parallel (one CPU thread each).
    """
    import torch

    from volssl.reports.report import make_report

    scale = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    summary: dict[str, Any] = {"quick": quick, "seed": seed, "scale": scale.__dict__, "stages": {}}

    labeled = _phantoms(out, scale, seed)  # 1.
    pre = _preprocess_pool(out, summary)  # 2.
    cfg = _pretrain_config(scale, seed, labeled)
    _patch_stream(pre, cfg, seed, summary)  # 3.
    run = _pretrain_s3d(cfg, pre, out, scale, summary)  # 4.
    runs = _finetune_runs(out, run / "checkpoints" / "final.pt", labeled, scale, cfg, workers)  # 5.

    # 6. report ---------------------------------------------------------------------------------
    make_report([out / "finetune"], out / "report", twins={"s3d": "scratch"}, probe_dirs=[run])
    comparison = _compare(runs)
    results = {"runs": [{k: r[k] for k in ("init", "n_train", "seed", "dice", "nsd")} for r in runs],
               "comparison": comparison, "report": str(out / "report" / "report.md"),
               "seconds": round(time.time() - t0, 1), **summary}
    write_json_atomic(out / "results.json", results)
    for row in comparison:
        _say(f"n_train={row['n_train']}: S3D {row['s3d_dice']:.3f} vs scratch {row['scratch_dice']:.3f} mean Dice "
             f"over seeds {row['seeds']}: {100 * row['delta_dice']:+.1f} points")
    _say(f"done in {results['seconds']} s. Results: {out / 'results.json'}; report: {results['report']}")
    return results


def _phantoms(out: Path, scale: DemoScale, seed: int) -> Path:
    """1. The unlabeled pool ``out/unlabeled`` and the labeled dataset ``out/labeled`` (returned)."""
    from volssl.data.phantoms import generate_phantoms

    shape = (scale.shape,) * 3
    unlabeled, labeled = out / "unlabeled", out / "labeled"
    for path, n, n_test, s, what in ((unlabeled, scale.n_unlabeled, 0, seed + 1000, "unlabeled pool"),
                                     (labeled, scale.n_labeled, scale.n_test, seed, "labeled dataset")):
        if not (path / "dataset.json").exists():
            _say(f"generating the {what}: {n + n_test} brain phantoms ({scale.shape}^3, T1/T2/FLAIR) -> {path}")
            generate_phantoms(path, "brain", n=n, n_test=n_test, seed=s, shape=shape, overwrite=True)
    return labeled


def _preprocess_pool(out: Path, summary: dict[str, Any]) -> Path:
    """2. ``out/unlabeled`` preprocessed with the S3D plan at :data:`DEMO_SPACING` into ``out/unlabeled_pre``."""
    from volssl.data.preprocess import get_plan, preprocess

    pre = out / "unlabeled_pre"
    _say(f"preprocessing the unlabeled pool with the S3D plan at 2 mm (RAS, z-score, crop) -> {pre}")
    plan = get_plan("s3d")
    plan.target_spacing = DEMO_SPACING
    plan.rules.min_file_bytes = None  # small phantoms compress below the 200 kB rule meant for real scans
    ps = preprocess(out / "unlabeled", pre, plan=plan, workers=2)
    print(ps.format(), flush=True)
    summary["stages"]["preprocess"] = {"dir": str(pre), "ok": ps.n_ok, "excluded": ps.n_excluded}
    return pre


def _pretrain_config(scale: DemoScale, seed: int, labeled: Path):
    """The tiny S3D pre-training configuration (the probe scored on the labeled training cases)."""
    from volssl.config import resolve

    p = scale.patch
    return resolve("s3d-b-tiny", [f"train.steps={scale.pretrain_steps}", f"train.seed={seed}",
                                  f"data.patch_size={p},{p},{p}",
                                  f"train.preview_every={max(scale.pretrain_steps // 3, 1)}",
                                  f"train.checkpoint_every={max(scale.pretrain_steps // 3, 1)}",
                                  f"train.probe_dataset={labeled}",
                                  f"train.probe_every={max(scale.pretrain_steps // 4, 3)}"])


def _patch_stream(pre: Path, cfg: Any, seed: int, summary: dict[str, Any]) -> None:
    """3. A few batches through the multi-process patch loader (their shape and rate)."""
    from volssl.data.dataset import PreprocessedDataset
    from volssl.data.patches import PatchSampler, make_loader

    sampler = PatchSampler(PreprocessedDataset(pre), cfg.data.patch_size, seed=seed,
                           channel_mode=cfg.data.channel_mode)
    n_batches, t = 8, time.perf_counter()
    for i, batch in enumerate(make_loader(sampler, batch_size=cfg.data.batch_size, num_workers=2)):
        if i + 1 == n_batches:
            break
    rate = n_batches * cfg.data.batch_size / (time.perf_counter() - t)
    _say(f"patch stream: {n_batches} batches of {'x'.join(map(str, batch['image'].shape))}, {rate:.0f} patches/s "
         "(2 workers, start-up included)")
    summary["stages"]["patches"] = {"batch_shape": list(batch["image"].shape), "patches_per_s": round(rate, 1)}


def _pretrain_s3d(cfg: Any, pre: Path, out: Path, scale: DemoScale, summary: dict[str, Any]) -> Path:
    """4. S3D pre-training into ``out/pretrain`` (resumed); returns the run folder."""
    from volssl.training.trainer import pretrain, resume_or_start_over

    run = out / "pretrain"
    p = scale.patch
    _say(f"pre-training S3D ({cfg.preset}: {cfg.model.arch}, {p}^3, {scale.pretrain_steps} steps) -> {run}")
    res = resume_or_start_over(pretrain, cfg, pre, run)
    previews = sorted((run / "previews").glob("*.png"))
    summary["stages"]["pretrain"] = {"dir": str(run), "status": res.get("status"), "step": res.get("step"),
                                     "loss_ema": res.get("loss_ema"),
                                     "preview": str(previews[-1]) if previews else None}
    return run


def _finetune_runs(out: Path, checkpoint: Path, labeled: Path, scale: DemoScale, cfg: Any,
                   workers: int) -> list[dict[str, Any]]:
    """5. S3D-initialised and from-scratch fine-tuning runs (benchmark cells: fine-tune, predict the
    held-out cases, evaluate), ``workers`` at a time; their scores."""
    from volssl.finetuning.finetune import prepare_dataset
    from volssl.training.checkpoint import load_checkpoint

    plan = load_checkpoint(checkpoint)["plan"]
    _say("preprocessing the labeled dataset with the checkpoint's plan (the paper's fixed setting)")
    labeled_pre = prepare_dataset(labeled, plan, out, out / "labeled_pre", workers=2, progress=True, check=True)
    common = {"dataset": str(labeled_pre), "dataset_name": "brain", "threads": 1,
              "stage_steps": list(scale.stage_steps) if scale.stage_steps else None,
              "test_images": str(labeled / "imagesTs"), "test_labels": str(labeled / "labelsTs")}
    p = scale.patch
    jobs = []
    for n_train in scale.n_trains:
        for s in scale.seeds:
            jobs.append({**common, "method": "s3d", "checkpoint": str(checkpoint), "recipe": "s3d-tiny",
                         "overrides": [], "n_train": n_train, "seed": s,
                         "run": str(out / "finetune" / cell_name("s3d", n_train, s))})
            jobs.append({**common, "method": "scratch", "checkpoint": None, "recipe": "scratch-s3d-schedule-tiny",
                         "overrides": [f"patch_size={p},{p},{p}", f"arch={cfg.model.arch}"],
                         "n_train": n_train,
                         "seed": s, "run": str(out / "finetune" / cell_name("scratch", n_train, s))})
    steps = "+".join(map(str, scale.stage_steps)) if scale.stage_steps else "the recipes' own"
    _say(f"fine-tuning {len(jobs)} runs ({workers} at a time: S3D init (recipe s3d-tiny) vs scratch "
         f"(scratch-s3d-schedule-tiny, same network and patch), n_train {['all' if n is None else n for n in scale.n_trains]}, "
         f"seeds {list(scale.seeds)}; stages {steps} steps), then predicting and evaluating the held-out cases")
    runs: list[dict[str, Any]] = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with watched_pool(max(1, workers), ctx) as pool:  # its workers exit if this process is killed
        for r in pool.map(run_cell, jobs):
            r["init"] = r["method"]
            runs.append(r)
            _say(f"  {Path(r['run']).name:<22} Dice {r['dice']:.3f}  NSD {r['nsd']:.3f}  ({r['seconds']} s)")
    return runs


def _compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean Dice/NSD per (n_train, init) over seeds, and the S3D - scratch difference."""
    import numpy as np

    rows = []
    for n in sorted({r["n_train"] for r in runs}):
        cell = {init: [r for r in runs if r["n_train"] == n and r["init"] == init] for init in ("s3d", "scratch")}
        if not all(cell.values()):
            continue
        mean = {init: (float(np.nanmean([r["dice"] for r in rs])), float(np.nanmean([r["nsd"] for r in rs])))
                for init, rs in cell.items()}
        rows.append({"n_train": n, "seeds": sorted(r["seed"] for r in cell["s3d"]),
                     "s3d_dice": mean["s3d"][0], "scratch_dice": mean["scratch"][0],
                     "s3d_nsd": mean["s3d"][1], "scratch_nsd": mean["scratch"][1],
                     "delta_dice": mean["s3d"][0] - mean["scratch"][0]})
    return rows
