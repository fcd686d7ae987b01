"""Pre-training: ``pretrain(cfg, data_dir, out_dir, resume)``, and the run folder's life cycle (open, resume, overwrite).

``pretrain`` builds a :class:`~volssl.training.loop.StepJob` for a method and hands it to
:func:`~volssl.training.loop.run_loop` (resume, logging, checkpoints, signals), which
``volssl.finetuning.finetune`` also uses for a segmentation network and its loss.

One step: fetch this rank's rows of the next global batch, augment them spatially
(:mod:`volssl.training.augment`), run the method under autocast, back-propagate (through a gradient
scaler for fp16), clip the gradient norm, update, move the lr schedule. A run directory holds::

    RUN/config.json                   the resolved configuration
    RUN/checkpoints/{latest,best,final}.pt
    RUN/scalars.csv, RUN/tb/          scalars (see training/logging.py)
    RUN/previews/step_XXXXXX.png      input / masked / reconstruction / target slices
    RUN/summary.json                  status ("finished" / "stopped"), step, losses, paths
    RUN/STOPPED.json                  only while a run is stopped by a signal (step, signal)

Determinism and exact resume. Before step ``s`` the global torch RNG is reseeded with
``step_seed(train.seed, s)`` (the same on every rank; methods draw their masks for the whole global
batch and keep their rows, see docs/design.md "Methods") and the augmentation draws from a CPU
generator seeded with ``step_seed(train.seed, s, AUGMENT_STREAM)``. The data stream is a pure
function of ``(seed, batch index)``. A checkpoint stores the method, optimiser, schedule, scaler, step,
the loss EMA and every RNG state; resuming restarts the loader at ``start_batch = step``, so on the
CPU a resumed run produces bit-identical losses to an uninterrupted one.

Signals. SIGTERM and SIGUSR1 (what Slurm sends before a time limit) and a first Ctrl-C finish the
current step, save ``latest.pt``, write ``STOPPED.json`` and return (``summary["status"] ==
"stopped"``); ``volssl pretrain`` then exits 0 (SIGTERM / SIGUSR1) or 130 (Ctrl-C). Run the same
command with ``--resume`` to continue. A second Ctrl-C aborts at once without saving.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from volssl.config import RunConfig, TrainConfig, config_from_dict, config_to_dict
from volssl.training import distributed as D
from volssl.training.augment import spatial_augment
from volssl.training.checkpoint import TAGS, load_checkpoint
from volssl.training.loop import (  # noqa: F401  (run_loop, StepJob, EMA_DECAY: this module's API before loop.py)
    EMA_DECAY, BatchFactory, StepForward, StepJob, log as _log, run_loop, trainable_parameters,
)
from volssl.training.optim import StepSchedule, build_optimizer
from volssl.util.atomic import write_json_atomic

PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENT_STREAM = 1
VAL_STREAM = 2
VAL_BATCHES = 2
#: fields that may differ between a run and its resumption (they do not change the maths)
RESUME_MUTABLE = {
    "description", "train.steps", "train.log_every", "train.preview_every", "train.checkpoint_every",
    "train.val_every", "train.device", "train.compile", "data.num_workers", "train.probe_dataset",
    "train.probe_every",
}


# --------------------------------------------------------------------------- helpers
def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of ``(seed, step, stream)`` (NumPy SeedSequence hash)."""
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def resolve_device(name: str, info: D.DistInfo | None = None) -> torch.device:
    """``train.device`` -> a torch device; "auto" is CUDA (this rank's LOCAL_RANK) if available."""
    local = info.local_rank if info is not None else int(os.environ.get("LOCAL_RANK", 0) or 0)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device: cannot interpret {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available (this torch: {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", local)
    return device


def autocast_context(precision: str, device: torch.device):
    """The autocast context of ``train.precision`` (fp32: none). fp16 needs CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: unknown {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a CUDA device (a gradient scaler on the CPU is not "
                         "supported); use bf16 or fp32 on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (its state_dict is {} when disabled)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between the saved config ``a`` and the new one ``b``; a key the
    saved config lacks (a field added to volssl after the run was saved) is not a difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in a or not isinstance(b.get(k), (str, int, float, bool, type(None))):
                out += _config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def _default_batches(cfg: RunConfig, data_dir: str | os.PathLike, pin_memory: bool = False
                     ) -> tuple[BatchFactory, dict]:
    """The real patch stream of ``data_dir``, and its plan.

    A preprocessed dataset (``plan.json``) is read by ``PatchSampler`` (``data.symmetries`` and
    ``data.crop_zscore`` honoured); anything else (a folder of TIFF / Zarr volumes, or one volume) by
    ``VolumeCropSampler``: crops read straight from the files, always z-scored per crop, one
    channel; its plan is ``volume_crops.volume_plan`` (the "xnt" plan plus a ``"source"`` entry).
    """
    from volssl.data.patches import PatchSampler, make_loader

    if not (Path(data_dir) / "plan.json").is_file():
        from volssl.data.volume_crops import VolumeCropSampler, volume_plan

        if cfg.model.in_channels != 1:
            raise ValueError(f"{data_dir}: crops of TIFF / Zarr volumes have one channel, but model.in_channels = "
                             f"{cfg.model.in_channels}")
        sampler = VolumeCropSampler(data_dir, cfg.data.patch_size, seed=cfg.train.seed, sampling=cfg.data.sampling,
                                    symmetries=cfg.data.symmetries, zscore=True, crop_norm=cfg.data.crop_norm)
        plan = volume_plan(sampler)
    else:
        from volssl.data.dataset import PreprocessedDataset

        dataset = PreprocessedDataset(data_dir)
        sampler = PatchSampler(dataset, cfg.data.patch_size, foreground_prob=cfg.data.foreground_prob,
                               seed=cfg.train.seed, sampling=cfg.data.sampling, channel_mode=cfg.data.channel_mode,
                               with_labels=False, symmetries=cfg.data.symmetries, crop_zscore=cfg.data.crop_zscore)
        plan = dataset.plan

    def factory(start_batch: int, rank: int, world_size: int) -> Iterable[dict]:
        return make_loader(sampler, cfg.data.batch_size, cfg.data.num_workers, start_batch=start_batch,
                           rank=rank, world_size=world_size, pin_memory=pin_memory)

    return factory, plan


def check_train_config(tc: TrainConfig) -> None:
    """ValueError naming the field unless the loop settings of ``tc`` are usable."""
    if tc.steps <= 0:
        raise ValueError(f"train.steps must be > 0, got {tc.steps}")
    for name in ("log_every", "preview_every", "checkpoint_every"):
        if getattr(tc, name) <= 0:
            raise ValueError(f"train.{name} must be > 0, got {getattr(tc, name)}")
    if tc.val_every < 0:
        raise ValueError(f"train.val_every must be >= 0, got {tc.val_every}")


#: what a checkpoint must hold for a run to continue from it (with the module state, ``state_key``)
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "step")
#: a run's own outputs in its folder: what ``overwrite`` removes (caches such as ``preprocessed/`` stay)
RUN_OUTPUTS = ("checkpoints", "scalars.csv", "tb", "previews", "summary.json", "STOPPED.json", "probe.csv",
               "probe.png")


class NoIntactCheckpoint(ValueError):
    """``--resume`` on a folder that holds a run but no checkpoint it can continue from. A caller whose
    runs are disposable (a benchmark cell, a search trial, a demo run: killed before their first
    checkpoint) catches it and starts over with ``overwrite=True``; a user's run is refused."""


class RunStopped(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM, SIGUSR1, SIGINT) before its last step, its ``latest.pt`` saved.

    A caller that chains runs (benchmark, search, demo) must stop too rather than predict with a half-trained
    network; as a KeyboardInterrupt it passes every ``except Exception`` (a benchmark's failed-cell
    handler) and process pool, and the command ends as interrupted (exit 130) naming the run.
    """


def require_finished(summary: dict[str, Any], run: str | os.PathLike) -> dict[str, Any]:
    """``summary`` (of :func:`run_loop`) if the run finished, else :class:`RunStopped`."""
    if summary.get("status") != "finished":
        raise RunStopped(f"{run} stopped by {summary.get('signal') or 'a signal'} at step {summary.get('step')}; "
                         "rerun the same command to resume")
    return summary


def resume_or_start_over(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``run(*args, resume=True, **kwargs)`` for a run that must finish (:func:`require_finished`); if that
    finds a run with no intact checkpoint (:class:`NoIntactCheckpoint`, e.g. a run killed before its first
    checkpoint), start it over with ``overwrite=True``. For disposable runs only (benchmark cells, search
    trials, the demo's runs); ``args[2]`` is the run folder."""
    try:
        summary = run(*args, resume=True, **kwargs)
    except NoIntactCheckpoint as e:
        print(f"volssl: {e}; a disposable run: starting it over", file=sys.stderr, flush=True)
        summary = run(*args, resume=False, overwrite=True, **kwargs)
    return require_finished(summary, args[2] if len(args) > 2 else "the run")


def _checkpoint_entries(ckpt_dir: Path) -> list[Path]:
    """``latest.pt``, ``final.pt``, ``best.pt`` (those present, links and folders included), then the other
    ``*.pt`` entries of ``ckpt_dir`` by name; hidden files (an atomic write's temporaries) are left out."""
    if not ckpt_dir.is_dir():
        return []
    named = [ckpt_dir / f"{t}.pt" for t in ("latest", "final", "best")]
    found = [p for p in named if os.path.lexists(p)]
    others = sorted(p for p in ckpt_dir.iterdir() if p.name.endswith(".pt") and not p.name.startswith(".")
                    and p not in named)
    return found + others


def run_history(out: str | os.PathLike) -> list[str]:
    """What in ``out`` shows that a run was there: its checkpoint entries (``checkpoints/*.pt``, broken
    ones included), ``scalars.csv``, ``summary.json``, ``STOPPED.json``; [] for an empty or missing folder."""
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    items = []
    if os.path.lexists(ckpt_dir) and not ckpt_dir.is_dir():
        items.append(f"{ckpt_dir} (not a folder)")
    items += [str(p) for p in _checkpoint_entries(ckpt_dir)]
    items += [str(out / n) for n in ("scalars.csv", "summary.json", "STOPPED.json") if os.path.lexists(out / n)]
    return items


def _remove_run(out: Path) -> list[str]:
    """Delete the :data:`RUN_OUTPUTS` of ``out``; returns the names removed."""
    import shutil

    removed = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _resumable(path: Path, state_key: str | None) -> tuple[dict[str, Any] | None, str]:
    """``(checkpoint, "")`` when ``path`` loads, passes its checksum and holds what resuming needs, else
    ``(None, why not)`` (one phrase naming the file)."""
    try:
        state = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        return None, " ".join(str(e).split())
    except Exception as e:  # anything else torch.load may raise on a damaged file
        return None, f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})"
    missing = [k for k in RESUME_KEYS + ((state_key,) if state_key else ()) if state.get(k) is None]
    if missing:
        return None, (f"{path} lacks {', '.join(missing)}, which resuming needs (a run is not continued with a "
                      "fresh optimiser or RNG state)")
    try:
        int(state["step"])
    except (TypeError, ValueError):
        return None, f"{path}: bad step {state['step']!r}"
    return state, ""


def _set_aside(path: Path) -> Path:
    """Rename a broken ``path`` (file, link or folder) to ``NAME.broken`` (``NAME.broken-2``, ...): the run can
    write ``path`` again, and the bytes stay for inspection."""
    target = path.with_name(path.name + ".broken")
    k = 2
    while os.path.lexists(target):
        target = path.with_name(f"{path.name}.broken-{k}")
        k += 1
    os.replace(path, target)
    return target


def open_run(out: str | os.PathLike, config: dict[str, Any], resume: bool, info: D.DistInfo,
             name: str = "pretrain", mutable: Iterable[str] = RESUME_MUTABLE, overwrite: bool = False,
             state_key: str | None = None) -> dict[str, Any] | None:
    """The checkpoint a run in ``out`` continues from, or None for a new run. A run's history is never
    lost by accident:

    * ``resume``: continue from ``out/checkpoints/latest.pt``. When it is missing, a dangling link, a
      folder, truncated, fails its checksum or lacks what resuming needs (:data:`RESUME_KEYS` and
      ``state_key``), continue from the newest intact checkpoint of the run (by step, among
      ``latest``/``final``/``best`` and any other ``checkpoints/*.pt``) with a warning naming the problem
      and the file; broken ``latest``/``final``/``best`` entries are renamed ``NAME.broken``. When none is
      intact but the folder holds a run (:func:`run_history`): ValueError, nothing is changed. An empty
      or missing folder starts a new run. The checkpoint's ``"config"`` must equal ``config`` except for
      the ``mutable`` dotted keys.
    * no ``resume``: a folder that holds a run is an error unless ``overwrite``, which first removes the
      earlier run's outputs (:data:`RUN_OUTPUTS`).
    """
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest.pt"
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it; give one")
    if not resume:
        if overwrite:  # every rank reaches the barrier; rank 0 removes
            if info.is_main:
                removed = _remove_run(out)
                if removed:
                    _log(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}", info, name)
            D.barrier(info)
            return None
        history = run_history(out)
        if history:
            shown = ", ".join(history[:4]) + (f" and {len(history) - 4} more" if len(history) > 4 else "")
            raise ValueError(f"{out} already holds a run ({shown}); pass --resume to continue it, --overwrite to "
                             "replace it, or choose another output directory")
        return None

    history = run_history(out)
    if not history:
        _log(f"--resume: no run in {out} yet (no checkpoint, no scalars.csv); starting a new run", info, name)
        return None
    state, why = _resumable(latest, state_key) if os.path.lexists(latest) else (None, f"{latest} is missing")
    source, problems, broken = latest, [], []
    if state is None:
        problems.append(why)
        if os.path.lexists(latest):
            broken.append(latest)
        source = None
        for path in _checkpoint_entries(ckpt_dir):
            if path == latest:
                continue
            cand, why = _resumable(path, state_key)
            if cand is None:
                problems.append(why)
                if path.stem in TAGS:  # the loop writes these again
                    broken.append(path)
            elif state is None or int(cand["step"]) > int(state["step"]):
                state, source = cand, path
            del cand
        if state is None:
            raise NoIntactCheckpoint(f"{out}: --resume found no intact checkpoint to continue from ({'; '.join(problems)}), "
                             f"but the folder holds a run ({', '.join(history[:4])}); nothing was changed: restore a "
                             "checkpoint, start over with --overwrite (without --resume), or choose another output "
                             "directory")
    mutable = set(mutable)
    diff = [k for k in _config_diff(state.get("config"), config) if k not in mutable]
    if diff:
        raise ValueError(f"{source}: cannot resume with a different configuration; changed: {', '.join(diff)} "
                         f"(only {', '.join(sorted(mutable))} may change)")
    if source != latest:
        step = int(state["step"])
        moved = ""
        if broken:
            D.barrier(info)  # every rank has chosen before rank 0 renames
            if info.is_main:
                moved = "; set aside: " + ", ".join(f"{p.name} -> {_set_aside(p).name}" for p in broken)
            D.barrier(info)
        _log(f"warning: --resume: {'; '.join(problems)}; resuming from {source} (step {step}), the newest intact "
             f"checkpoint: the steps after {step} are redone and their scalars.csv rows dropped{moved}", info, name)
    return state


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed torch, NumPy and ``random`` (model initialisation); cuDNN autotuning on CUDA."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def pretrain(
    cfg: RunConfig,
    data_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    resume: bool = False,
    method: torch.nn.Module | None = None,
    batches: BatchFactory | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pre-train ``cfg.method`` on the preprocessed dataset ``data_dir``, writing the run to ``out_dir``.

    Args:
        cfg: the resolved configuration (saved to ``out_dir/config.json``).
        data_dir: a preprocessed dataset (``volssl preprocess`` output), or a folder of TIFF / Zarr
            volumes (or one volume) read by crop (see :func:`_default_batches`); may be None with ``batches``.
        out_dir: the run directory.
        resume: continue from ``out_dir/checkpoints/latest.pt``, else from the newest intact checkpoint
            of the run (see :func:`open_run`; a new run in an empty or missing folder). The
            configuration must equal the saved one except for :data:`RESUME_MUTABLE` fields.
        method: the method module (default ``volssl.methods.build_method(cfg)``).
        batches: a :data:`BatchFactory` (default: ``data/patches.make_loader`` over ``data_dir``).
        progress: show a tqdm progress bar on stderr (rank 0).
        overwrite: (without ``resume``) replace a run already in ``out_dir``; without it that is an error.

    Returns:
        A summary dict: ``status`` ("finished" or "stopped"), ``signal``, ``step``, ``loss``,
        ``loss_ema``, ``best``, ``seconds`` and the paths written (see :func:`run_loop`).

    Launch under ``torchrun`` for data parallelism: ``data.batch_size`` is the global batch.
    """
    tc = cfg.train
    check_train_config(tc)
    if data_dir is None and batches is None:
        raise ValueError("pretrain: give data_dir (a preprocessed dataset) or a batches factory")

    device = resolve_device(tc.device)
    autocast_context(tc.precision, device)  # validates precision / device early
    info = D.init_distributed(device)
    device = resolve_device(tc.device, info)
    state = open_run(out_dir, config_to_dict(cfg), resume, info, overwrite=overwrite, state_key="method_state")
    seed_everything(tc.seed, device)

    if method is None:
        from volssl.methods import build_method

        method = build_method(cfg)
    raw = method.to(device)
    plan = None
    if batches is None:
        batches, plan = _default_batches(cfg, data_dir, pin_memory=device.type == "cuda")
    elif data_dir is not None and (Path(data_dir) / "plan.json").is_file():
        plan = json.loads((Path(data_dir) / "plan.json").read_text())
    if plan is None and state is not None:
        plan = state.get("plan")

    n_params = sum(p.numel() for p in trainable_parameters(raw))
    _log(f"{cfg.method.name} on {device} x{info.world_size}, {n_params / 1e6:.2f}M trainable parameters, "
         f"global batch {cfg.data.batch_size}, patch {tuple(cfg.data.patch_size)}, {tc.precision}, "
         f"steps {int(state['step']) if state else 0}->{tc.steps}; run: {out_dir}", info)
    job = _pretrain_job(cfg, raw, batches, plan, info, device)
    if tc.probe_dataset:
        job.probe, job.probe_every = _probe_hook(cfg, plan, out_dir, raw, info, device)
    return run_loop(out_dir, tc, job, config=config_to_dict(cfg), global_batch=cfg.data.batch_size, info=info,
                    device=device, state=state, progress=progress)


def _pretrain_job(cfg: RunConfig, method: torch.nn.Module, batches: BatchFactory, plan: dict | None,
                  info: D.DistInfo, device: torch.device) -> StepJob:
    """The :class:`StepJob` of pre-training ``method`` (a :class:`~volssl.methods.PretrainMethod` on
    ``device``): its optimiser and schedule, the step's forward (this rank's rows of the global batch,
    spatially augmented, under autocast), its checkpoint payload and the fixed-batch validation loss."""
    tc = cfg.train
    offset, local_b = D.local_rows(cfg.data.batch_size, info)
    optimizer = build_optimizer(trainable_parameters(method), cfg.optim)
    schedule = StepSchedule(optimizer, tc.steps, cfg.optim)
    rows = {"sample_offset": offset, "global_batch": cfg.data.batch_size}

    def forward(model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        images = batch["image"].to(device, non_blocking=True).float()
        if images.ndim != 5 or images.shape[0] != local_b:
            raise ValueError(f"batch 'image' must be ({local_b}, C, X, Y, Z) per rank, got {tuple(images.shape)}")
        torch.manual_seed(step_seed(tc.seed, step))
        gen = torch.Generator().manual_seed(step_seed(tc.seed, step, AUGMENT_STREAM))
        with torch.no_grad():
            images = spatial_augment(images, cfg.augment, gen, offset, cfg.data.batch_size)
        with autocast_context(tc.precision, device):
            result = model(images, **rows)
        return result.loss, result.previews or {}

    def payload(tag: str) -> dict[str, Any]:
        return dict(kind="pretrain", config=config_to_dict(cfg), model=config_to_dict(cfg.model),
                    network=method.transfer_state_dict(), encoder_keys="encoder.", method_state=method.state_dict(),
                    plan=plan)

    val_data: list[torch.Tensor] = []
    if tc.val_every > 0:  # a fixed, low-noise loss estimate: the first batches of the stream, no augmentation
        it0 = iter(batches(0, info.rank, info.world_size))
        val_data = [next(it0)["image"] for _ in range(VAL_BATCHES)]
        del it0

    def val_loss() -> float:
        losses = []
        with torch.no_grad(), autocast_context(tc.precision, device):
            for i, images in enumerate(val_data):
                torch.manual_seed(step_seed(tc.seed, i, VAL_STREAM))
                losses.append(method(images.to(device).float(), **rows).loss.detach().float())
        torch.manual_seed(step_seed(tc.seed, 0))  # the training steps reseed anyway
        return float(D.all_reduce_mean(torch.stack(losses).mean(), info).item())

    return StepJob(module=method, optimizer=optimizer, schedule=schedule, scaler=make_scaler(tc.precision, device),
                   batches=batches, forward=forward, payload=payload, state_key="method_state",
                   grad_clip=cfg.optim.grad_clip, validate=val_loss if tc.val_every > 0 else None,
                   after_step=method.after_step, name="pretrain", title=cfg.method.name)


def _probe_hook(cfg: RunConfig, plan: dict | None, out_dir: str | os.PathLike, method: torch.nn.Module,
                info: D.DistInfo, device: torch.device) -> tuple[Callable[[int], dict[str, float | None]] | None, int]:
    """The representation probe of ``train.probe_dataset`` (training/probe.py) as a ``run_loop`` hook:
    it scores ``method.transfer_state_dict()``, appends ``RUN/probe.csv`` and redraws ``RUN/probe.png``.
    Built on rank 0 only; ``train.probe_every`` 0 means ``train.steps // 10``."""
    tc = cfg.train
    if tc.probe_every < 0:
        raise ValueError(f"train.probe_every must be >= 0, got {tc.probe_every}")
    every = int(tc.probe_every) if tc.probe_every > 0 else max(1, tc.steps // 10)
    if not info.is_main:
        return None, every
    from volssl.training.probe import Probe, append_probe_row, plot_probe, prepare_probe_data, read_probe_csv

    out = Path(out_dir)
    root = prepare_probe_data(tc.probe_dataset, plan, out / "probe_data")
    probe = Probe(root, cfg.model, cfg.data.patch_size, device=device)
    _log(f"probe every {every} steps on {root}: {len(probe.train_ids)} training / {len(probe.eval_ids)} scored "
         f"cases, linear head on frozen {cfg.model.arch} features (RUN/probe.csv, RUN/probe.png)", info)

    def hook(step: int) -> dict[str, float | None]:
        from volssl.training.probe import run_probe

        was_training = method.training
        row = run_probe(probe, {k: v.detach() for k, v in method.transfer_state_dict().items()})
        method.train(was_training)
        append_probe_row(out, {"step": step, **row})
        plot_probe(read_probe_csv(out / "probe.csv"), out / "probe.png", title=f"{cfg.method.name} probe")
        return {"probe_dice": row["probe_dice"], "probe_floor": row["probe_floor"]}

    return hook, every


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The configuration saved in a run directory (``RUN/config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a volssl run (no config.json)")
    return config_from_dict(json.loads(path.read_text()))
