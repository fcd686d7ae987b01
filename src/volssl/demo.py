"""The end-to-end demo on built-in phantoms (``volssl demo``, the README's ``make demo``).

Stages, each a public volssl function, each writing under ``out``:

1. ``phantoms/``      brain phantoms as an nnU-Net v2 raw dataset (:func:`generate_phantoms`);
2. ``preprocessed/``  quality filter + preprocessing with the S3D plan (:func:`preprocess`);
3. patch stream      a few batches of the tiny preset's patches through the multi-process loader;
4. ``pretrain/``      tiny S3D pre-training (:func:`pretrain`), with loss curve and preview PNGs.

``out/summary.json`` records what each stage did and where its files are. Rerunning resumes:
finished stages are not redone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from volssl.util.atomic import write_json_atomic


def _say(msg: str) -> None:
    print(f"[volssl demo] {msg}", flush=True)


def run_demo(out: str | Path = "volssl_demo", quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo into ``out`` and return its summary (also written to ``out/summary.json``).

    ``quick`` is the CI-sized variant (fewer, smaller phantoms and a few pre-training steps).
    """
    import torch

    from volssl.config import resolve
    from volssl.data.dataset import PreprocessedDataset
    from volssl.data.patches import PatchSampler, make_loader
    from volssl.data.phantoms import generate_phantoms
    from volssl.data.preprocess import preprocess
    from volssl.training.trainer import pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    n_cases, shape, steps = (6, 72, 12) if quick else (12, 80, 150)
    summary: dict[str, Any] = {"quick": quick, "seed": seed, "stages": {}}
    t0 = time.time()

    # 1. phantoms -------------------------------------------------------------------------
    raw = out / "phantoms"
    if not (raw / "dataset.json").exists():
        _say(f"generating {n_cases} brain phantoms ({shape}^3 voxels, T1/T2/FLAIR, lesion labels) -> {raw}")
        generate_phantoms(raw, "brain", n=n_cases, seed=seed, shape=(shape,) * 3, overwrite=True)
    summary["stages"]["phantoms"] = {"dir": str(raw)}

    # 2. preprocessing ----------------------------------------------------------------------
    pre = out / "preprocessed"
    _say(f"preprocessing with the S3D plan (RAS, 1 mm, z-score, crop) -> {pre}")
    ps = preprocess(raw, pre, plan="s3d", workers=2)
    print(ps.format())
    summary["stages"]["preprocess"] = {"dir": str(pre), "ok": ps.n_ok, "excluded": ps.n_excluded,
                                       "report": ps.report}

    # 3. patch stream -----------------------------------------------------------------------
    cfg = resolve("s3d-b-tiny", [f"train.steps={steps}", f"train.seed={seed}",
                                 f"train.preview_every={max(steps // 3, 1)}",
                                 f"train.checkpoint_every={max(steps // 3, 1)}"])
    ds = PreprocessedDataset(pre)
    sampler = PatchSampler(ds, cfg.data.patch_size, seed=seed, channel_mode=cfg.data.channel_mode)
    loader = make_loader(sampler, batch_size=cfg.data.batch_size, num_workers=2)
    n_batches, t = 8, time.perf_counter()
    for i, batch in enumerate(loader):
        if i + 1 == n_batches:
            break
    rate = n_batches * cfg.data.batch_size / (time.perf_counter() - t)
    shape_str = "x".join(map(str, batch["image"].shape))
    _say(f"patch stream: {n_batches} batches of {shape_str} from {len(ds)} volumes, {rate:.0f} patches/s "
         f"(2 workers, including start-up)")
    summary["stages"]["patches"] = {"batch_shape": list(batch["image"].shape), "patches_per_s": round(rate, 1)}

    # 4. S3D pre-training --------------------------------------------------------------------
    run = out / "pretrain"
    _say(f"pre-training S3D ({cfg.preset}: {cfg.model.arch}, {steps} steps) -> {run}")
    res = pretrain(cfg, pre, run, resume=True)
    summary["stages"]["pretrain"] = {k: res.get(k) for k in ("status", "step", "loss", "loss_ema")}
    summary["stages"]["pretrain"]["dir"] = str(run)
    previews = sorted((run / "previews").glob("*.png"))
    summary["stages"]["pretrain"]["preview"] = str(previews[-1]) if previews else None

    summary["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(out / "summary.json", summary)
    _say(f"done in {summary['seconds']} s. Summary: {out / 'summary.json'}")
    if previews:
        _say(f"reconstruction preview: {previews[-1]}")
    _say(f"checkpoints: {run / 'checkpoints'}; scalars: {run / 'scalars.csv'}; TensorBoard: {run / 'tb'}")
    return json.loads((out / "summary.json").read_text())
