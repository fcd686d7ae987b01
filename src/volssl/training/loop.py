"""The step loop shared by pre-training and fine-tuning: :class:`StepJob` in, a finished (or stopped) run out.

A caller (``training/trainer.pretrain`` for a method, ``finetuning/finetune`` for a segmentation
network) builds one :class:`StepJob` — the module, its optimiser, schedule and scaler, the batch
stream, the step's forward, the checkpoint payload and the optional hooks — and hands it to
:func:`run_loop`, which owns everything the two have in common: resume, the steps, the loss EMA,
logs (CSV, TensorBoard, previews, progress bar), checkpoints (``latest``, ``best``, ``final``),
validation, the probe, and signals (SIGTERM / SIGUSR1 / first Ctrl-C: save ``latest.pt``, write
``STOPPED.json``, return ``status == "stopped"``).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from volssl.config import TrainConfig
from volssl.training import distributed as D
from volssl.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from volssl.training.logging import ScalarLogger, save_preview
from volssl.training.optim import StepSchedule, clip_gradients
from volssl.util.atomic import write_json_atomic

#: ``batches(start_batch, rank, world_size)`` -> iterator over this rank's rows of global batches
#: ``start_batch, start_batch + 1, ...`` (dicts with "image" (B/W, C, *patch)); see data/patches.py.
BatchFactory = Callable[[int, int, int], Iterable[dict]]
#: ``forward(model, batch, step) -> (loss, previews)``: one training step's loss (a scalar) for this
#: rank's ``batch`` of global batch ``step``, run by the loop's ``model`` (DDP / compiled wrapper);
#: ``previews`` maps names to ``(B, 1, *patch)`` tensors (see logging.py; {} for none).
StepForward = Callable[[torch.nn.Module, dict, int], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]

EMA_DECAY = 0.98  # smoothing of the logged loss_ema and of the 'best' criterion


@dataclass
class StepJob:
    """What one run hands :func:`run_loop`.

    Attributes:
        module: the (unwrapped) module on the run's device whose trainable parameters ``optimizer``
            steps; the loop wraps it for DDP (and ``torch.compile`` with ``train.compile``).
        optimizer, schedule, scaler: the optimiser over ``module``'s parameters, its per-step schedule
            and the gradient scaler (``trainer.make_scaler``).
        batches: the :data:`BatchFactory`; resuming restarts it at ``start_batch = step``.
        forward: see :data:`StepForward`; it seeds its own randomness (``trainer.step_seed``), applies
            augmentation and autocast.
        payload: ``payload(tag)`` -> the caller's checkpoint fields (kind, network, config, ...); the
            loop adds ``tag``, ``optimizer``, ``scheduler``, ``scaler``, ``step``, ``data_position``,
            ``world_size``, ``rng`` and ``metrics``.
        state_key: the checkpoint field holding ``module``'s state (restored on resume).
        grad_clip: max global gradient norm (None: none).
        validate: returns a validation loss (lower is better) every ``train.val_every`` steps; it drives
            ``best.pt`` (else the smoothed training loss does).
        on_step: called with the step index before every step; returns True when it changed which
            parameters require gradients (the module is then re-wrapped and clipping sees the new set).
        after_step: called with the number of steps done after every optimiser update (a momentum
            teacher's EMA update: methods' ``after_step``), outside autograd and validation.
        probe, probe_every: ``probe(steps_done)`` every ``probe_every`` steps and at the end (rank 0;
            training/probe.py); its scalars join that step's log row.
        name: the command, for messages and the progress bar; ``title``: the preview title prefix.
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: StepSchedule
    scaler: torch.amp.GradScaler
    batches: BatchFactory
    forward: StepForward
    payload: Callable[[str], dict[str, Any]]
    state_key: str = "method_state"
    grad_clip: float | None = None
    validate: Callable[[], float] | None = None
    on_step: Callable[[int], bool] | None = None
    after_step: Callable[[int], None] | None = None
    probe: Callable[[int], dict[str, float | None]] | None = None
    probe_every: int = 0
    name: str = "pretrain"
    title: str = ""


class _Signals:
    """SIGTERM / SIGUSR1 / SIGINT -> a flag checked between steps (second SIGINT: KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def log(msg: str, info: D.DistInfo, name: str = "pretrain") -> None:
    """``volssl NAME: msg`` on stderr (rank 0), without breaking a progress bar."""
    if info.is_main:
        from tqdm import tqdm

        tqdm.write(f"volssl {name}: {msg}", file=sys.stderr)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` with ``requires_grad`` (what the optimiser steps and clipping sees)."""
    return [p for p in module.parameters() if p.requires_grad]


class _Run:
    """The mutable state of one :func:`run_loop` call: position, loss EMA, best criterion, the wrapped model."""

    def __init__(self, out: Path, tc: TrainConfig, job: StepJob, info: D.DistInfo, device: torch.device,
                 global_batch: int) -> None:
        self.out, self.tc, self.job, self.info, self.device = out, tc, job, info, device
        self.global_batch = global_batch
        self.ckpt_dir = out / "checkpoints"
        self.latest = self.ckpt_dir / "latest.pt"
        self.start = 0
        self.ema: torch.Tensor | None = None
        self.best = math.inf
        self.done = 0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.model: torch.nn.Module = job.module
        self.params: list[torch.nn.Parameter] = []
        self.logger: ScalarLogger | None = None
        self.t_window, self.n_window = time.perf_counter(), 0

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from ``state`` (a checkpoint of this run): module, optimiser, schedule, scaler, RNG, EMA, best."""
        if state is None:
            return
        job = self.job
        job.module.load_state_dict(state[job.state_key])
        job.optimizer.load_state_dict(state["optimizer"])
        job.schedule.load_state_dict(state["scheduler"])
        job.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start = self.done = int(state["step"])
        if self.start > self.tc.steps:
            raise ValueError(f"{self.latest} is at step {self.start}, beyond train.steps={self.tc.steps}")
        m = state.get("metrics") or {}
        if m.get("loss_ema") is not None:
            self.ema = torch.tensor(float(m["loss_ema"]), device=self.device)
        self.best = float(m.get("best", math.inf))
        log(f"resuming {self.out} at step {self.start}", self.info, job.name)

    def rewrap(self) -> None:
        """Wrap the module for DDP (and compile it); clipping sees the current trainable set."""
        model = D.wrap_ddp(self.job.module, self.info, self.device)
        self.model = torch.compile(model) if self.tc.compile else model
        self.params = trainable_parameters(self.job.module)

    def checkpoint(self, tags: list[str]) -> None:
        job = self.job
        if self.info.is_main:
            for tag in tags:
                save_checkpoint(self.ckpt_dir / f"{tag}.pt", **job.payload(tag), tag=tag,
                                optimizer=job.optimizer.state_dict(), scheduler=job.schedule.state_dict(),
                                scaler=job.scaler.state_dict(), step=self.done, data_position=self.done,
                                world_size=self.info.world_size, rng=rng_state(),
                                metrics={"loss": self.last_loss,
                                         "loss_ema": None if self.ema is None else float(self.ema.item()),
                                         "best": self.best})
        D.barrier(self.info)

    def update(self, step: int, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, float]:
        """One optimiser step on ``batch``: ``(loss, previews, global loss, grad norm, lr)``."""
        job = self.job
        job.schedule.set_step(step)
        lr = job.schedule.last_lr
        loss, previews = job.forward(self.model, batch, step)
        if loss.ndim != 0:
            raise ValueError(f"{type(job.module).__name__}: the step loss must be a scalar, got shape "
                             f"{tuple(loss.shape)}")
        job.optimizer.zero_grad(set_to_none=True)
        job.scaler.scale(loss).backward()
        job.scaler.unscale_(job.optimizer)
        grad_norm = clip_gradients(self.params, job.grad_clip)
        job.scaler.step(job.optimizer)
        job.scaler.update()
        self.done = step + 1
        if job.after_step is not None:  # e.g. a momentum teacher's EMA (methods/voco.py)
            job.after_step(self.done)
        job.schedule.set_step(self.done)
        gloss = D.all_reduce_mean(loss.detach().float(), self.info)
        self.ema = gloss.clone() if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * gloss
        self.n_window += 1
        return loss, previews, gloss, grad_norm, lr

    def hooks(self, last: bool, bar: Any) -> tuple[float | None, dict[str, float | None]]:
        """Validation and probe of the step just done (when due): ``(val, probe scalars)``."""
        job, tc, done = self.job, self.tc, self.done
        val = None
        if job.validate is not None and tc.val_every > 0 and (done % tc.val_every == 0 or last):
            val = self.last_val = job.validate()
        probed: dict[str, float | None] = {}
        if job.probe is not None and job.probe_every > 0 and (done % job.probe_every == 0 or last):
            if self.info.is_main:
                probed = dict(job.probe(done))
                bar.set_postfix(probe=f"{probed.get('probe_dice', float('nan')):.3f}", refresh=False)
            D.barrier(self.info)
        return val, probed

    def log_row(self, gloss: torch.Tensor, grad_norm: torch.Tensor, lr: float, val: float | None,
                probed: dict[str, float | None], bar: Any) -> None:
        """The scalars of the step just done (CSV, TensorBoard, the progress bar)."""
        self.last_loss = float(gloss.item())
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"loss is {self.last_loss} at step {self.done}; the last good checkpoint "
                                     f"is {self.latest if self.latest.is_file() else 'none'}")
        dt = (time.perf_counter() - self.t_window) / max(self.n_window, 1)
        self.t_window, self.n_window = time.perf_counter(), 0
        ema = float(self.ema.item())
        if self.logger is not None:
            self.logger.log(self.done, {"loss": self.last_loss, "loss_ema": ema, "lr": lr,
                                        "grad_norm": float(grad_norm.item()), "sec_per_step": dt,
                                        "samples_per_s": self.global_batch / dt if dt > 0 else None,
                                        "val_loss": val, **probed})
        bar.set_postfix(loss=f"{self.last_loss:.4f}", ema=f"{ema:.4f}", lr=f"{lr:.2e}", refresh=False)

    def preview(self, previews: dict[str, torch.Tensor], last: bool) -> None:
        if self.info.is_main and previews and (self.done % self.tc.preview_every == 0 or last):
            shown = {k: v[:2].detach().float().cpu() for k, v in previews.items()}
            rgb = save_preview(self.out / "previews" / f"step_{self.done:06d}.png", shown,
                               title=f"{self.job.title} step {self.done}")
            if self.logger is not None:
                self.logger.image("previews", rgb, self.done)

    def maybe_checkpoint(self, last: bool) -> None:
        if self.done % self.tc.checkpoint_every == 0 or last:
            uses_val = self.job.validate is not None and self.tc.val_every > 0
            criterion = self.last_val if uses_val else float(self.ema.item())
            tags = ["latest"]
            if criterion is not None and criterion < self.best:
                self.best = criterion
                tags.append("best")
            if last:
                tags.append("final")
            self.checkpoint(tags)

    def stop(self, summary: dict[str, Any], received: str | None) -> None:
        """The loop ended before ``train.steps`` (a signal): save ``latest.pt`` and ``STOPPED.json``."""
        summary.update(status="stopped", signal=received or "SIGTERM")
        self.checkpoint(["latest"])
        if self.info.is_main:
            write_json_atomic(self.out / "STOPPED.json", {"step": self.done, "signal": summary["signal"],
                                                          "checkpoint": str(self.latest)})
        log(f"{summary['signal']}: saved step {self.done} to {self.latest}; run the same command with --resume "
            "to continue", self.info, self.job.name)

    def steps(self, sig: _Signals, bar: Any) -> None:
        """Steps ``start .. train.steps`` until the end or a signal (checked between steps on every rank)."""
        job, tc = self.job, self.tc
        it: Iterator[dict] | None = iter(job.batches(self.start, self.info.rank, self.info.world_size))
        for step in range(self.start, tc.steps):
            if job.on_step is not None and step > self.start and job.on_step(step):
                self.rewrap()
                self.model.train()
            try:
                batch = next(it)
            except (RuntimeError, StopIteration):
                if sig.received:  # a loader worker killed by the same signal
                    break
                raise
            loss, previews, gloss, grad_norm, lr = self.update(step, batch)
            bar.update(1)
            last = self.done == tc.steps
            val, probed = self.hooks(last, bar)
            if self.done % tc.log_every == 0 or last or probed:
                self.log_row(gloss, grad_norm, lr, val, probed, bar)
            self.preview(previews, last)
            del loss, previews
            self.maybe_checkpoint(last)
            if D.any_rank(sig.received is not None, self.info, self.device):
                break
        it = None  # shut loader workers down before saving / exiting


def run_loop(out: str | Path, tc: TrainConfig, job: StepJob, *, config: dict[str, Any], global_batch: int,
             info: D.DistInfo, device: torch.device, state: dict[str, Any] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run ``job`` for ``tc.steps`` steps (from ``state``'s step when resuming) into the run folder ``out``.

    Args:
        out: the run directory (``config.json``, ``checkpoints/``, ``scalars.csv``, ``tb/``,
            ``previews/``, ``summary.json``, ``STOPPED.json``).
        tc: steps, precision, seed and the logging / checkpoint / validation intervals.
        job: the :class:`StepJob`.
        config: the run's configuration as a dict, written to ``out/config.json``.
        global_batch: samples per step over all ranks (for ``samples_per_s``).
        info, device: the data-parallel placement and this rank's device.
        state: the checkpoint to resume from (``trainer.open_run``).
        progress: show a tqdm progress bar on stderr (rank 0).

    Returns:
        the summary (also written to ``out/summary.json``): ``status`` ("finished" / "stopped"),
        ``signal``, ``step``, ``loss``, ``loss_ema``, ``best``, ``seconds`` and the paths written.
    """
    out = Path(out)
    run = _Run(out, tc, job, info, device, global_batch)
    run.restore(state)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", config)
        (out / "STOPPED.json").unlink(missing_ok=True)
    if job.on_step is not None and run.start < tc.steps:
        job.on_step(run.start)
    run.rewrap()
    run.logger = ScalarLogger(out, resume_step=run.start if run.start else None) if info.is_main else None
    from tqdm import tqdm

    bar = tqdm(total=tc.steps, initial=run.start, desc=job.name, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not (progress and info.is_main), smoothing=0.05)
    summary: dict[str, Any] = {"status": "finished", "signal": None}
    t0 = time.perf_counter()
    run.t_window = time.perf_counter()  # the first window's seconds per step start here, as every later one
    run.model.train()
    try:
        with _Signals() as sig:
            run.steps(sig, bar)
            if run.done < tc.steps:
                run.stop(summary, sig.received)
    finally:
        bar.close()
        if run.logger is not None:
            run.logger.close()
    summary.update(
        step=run.done, loss=run.last_loss, loss_ema=None if run.ema is None else float(run.ema.item()),
        best=None if math.isinf(run.best) else run.best, seconds=time.perf_counter() - t0, run=str(out),
        checkpoints=str(run.ckpt_dir), csv=str(out / "scalars.csv"), tensorboard=str(out / "tb"),
        previews=str(out / "previews"), config=str(out / "config.json"),
    )
    if info.is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary
