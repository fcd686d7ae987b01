"""What a run writes for people to watch: scalars (CSV + TensorBoard) and preview PNGs.

* ``RUN/scalars.csv``: one row per logged step (header ``step,loss,loss_ema,lr,grad_norm,
  sec_per_step,samples_per_s,val_loss,probe_dice,probe_floor``; a cell stays empty where its value
  was not measured at that step). On resume from step ``s`` the rows after ``s`` are dropped, so
  the file never holds a step twice; a file written with fewer columns gets the current header.
* ``RUN/tb/``: the same scalars as TensorBoard events (purged after ``s`` on resume) and the previews.
* ``RUN/previews/step_000100.png``: for one or two samples, the middle slice (along the last axis)
  of the input, the masked input, the reconstruction and the target, one row per sample, all four
  shown with the same intensity window.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from volssl.util.atomic import atomic_path

COLUMNS = ["step", "loss", "loss_ema", "lr", "grad_norm", "sec_per_step", "samples_per_s", "val_loss", "probe_dice",
           "probe_floor"]
PREVIEW_KEYS = ("input", "masked", "reconstruction", "target")


def truncate_csv(path: str | os.PathLike, last_step: int) -> None:
    """Keep the header and the rows with ``step <= last_step`` (atomically); no-op if absent."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text()
    if not text.endswith("\n"):  # a torn last line of a killed run
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return
    kept = [rows[0]]
    for row in rows[1:]:
        try:
            if len(row) == len(rows[0]) and int(row[0]) <= last_step:
                kept.append(row)
        except ValueError:
            continue
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(kept)


def _upgrade_header(path: Path) -> None:
    """Rewrite a ``scalars.csv`` whose header is not :data:`COLUMNS` (an older run) with that header."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
        header = list(rows[0].keys()) if rows else None
    if header == COLUMNS:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_scalars(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``scalars.csv`` as dicts of floats (``step`` as int; empty cells omitted)."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rec = {k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v not in ("", None)}
            out.append(rec)
    return out


class ScalarLogger:
    """Append scalars to ``RUN/scalars.csv`` and (optionally) TensorBoard under ``RUN/tb``.

    ``resume_step``: the step of the checkpoint a run resumes from; later rows/events are dropped.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "scalars.csv"
        self.tb_dir = self.run_dir / "tb"
        if resume_step is not None:
            truncate_csv(self.csv_path, resume_step)
            _upgrade_header(self.csv_path)
        else:
            self.csv_path.unlink(missing_ok=True)
        new = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        self._fh = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._fh, fieldnames=COLUMNS)
        if new:
            self._csv.writeheader()
            self._fh.flush()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge events after the resumed step (a new run: all events of an earlier attempt)
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write one row (unknown keys are an error; missing ones stay empty)."""
        unknown = set(scalars) - set(COLUMNS)
        if unknown:
            raise ValueError(f"ScalarLogger.log: unknown scalar(s) {sorted(unknown)}; columns: {COLUMNS}")
        row = {"step": int(step)}
        row.update({k: (f"{float(v):.9g}" if v is not None else "") for k, v in scalars.items() if k != "step"})
        self._csv.writerow(row)
        self._fh.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(f"train/{k}", float(v), int(step))

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """Add an (H, W, 3) uint8 image to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(tag, rgb, int(step), dataformats="HWC")

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _mid_slice(volume: torch.Tensor) -> np.ndarray:
    """(1, X, Y, Z) or (X, Y, Z) -> the (Y, X)-oriented middle slice along Z as float32 numpy."""
    v = volume.detach().float().cpu()
    v = v[0] if v.ndim == 4 else v
    if v.ndim != 3:
        raise ValueError(f"preview volumes must be (1, X, Y, Z), got shape {tuple(volume.shape)}")
    return v[:, :, v.shape[2] // 2].numpy().T


def render_preview(previews: Mapping[str, torch.Tensor], n_samples: int = 2, title: str = "") -> np.ndarray:
    """Render previews (each (B, 1, X, Y, Z)) to an (H, W, 3) uint8 image: one row per sample,
    columns input / masked / reconstruction / target, one intensity window per row (the 1st-99th
    percentile of input and target together)."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    keys = [k for k in PREVIEW_KEYS if k in previews]
    if not keys:
        raise ValueError(f"render_preview: none of {PREVIEW_KEYS} in previews (got {sorted(previews)})")
    n = min(n_samples, int(previews[keys[0]].shape[0]))
    fig = Figure(figsize=(2.4 * len(keys), 2.4 * n + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, len(keys), squeeze=False)
    for i in range(n):
        slices = {k: _mid_slice(previews[k][i]) for k in keys}
        ref = np.concatenate([slices[k].ravel() for k in ("input", "target") if k in slices] or
                             [s.ravel() for s in slices.values()])
        lo, hi = np.percentile(ref, [1, 99]) if ref.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1e-6
        for j, k in enumerate(keys):
            ax = axes[i, j]
            ax.imshow(slices[k], cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(k, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def save_preview(path: str | os.PathLike, previews: Mapping[str, torch.Tensor], n_samples: int = 2,
                 title: str = "") -> np.ndarray:
    """Render :func:`render_preview` to the PNG ``path`` (atomically); returns the RGB array."""
    import matplotlib.image

    rgb = render_preview(previews, n_samples, title)
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, rgb, format="png")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buf.getvalue())
    return rgb
