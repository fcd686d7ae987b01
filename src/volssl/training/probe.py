"""A representation probe: how well a frozen pre-trained encoder's features segment, with a linear head.

The pre-training loss says how well a method solves its pretext task; it cannot say whether the
features help segmentation. The probe measures that directly, cheaply and the same way for every
method:

1. a few labelled cases of a preprocessed dataset (``n_train`` to fit, ``n_eval`` other ones to
   score; both drawn from the cases *outside* the dataset's test split, never the held-out test
   cases) give ``patches_per_case`` fixed patches each (foreground-centred with probability 0.5,
   a pure function of ``seed``);
2. the encoder (built as fine-tuning builds it, :func:`encoder_from_state`, with the checkpoint's
   ``encoder.*`` weights) runs once over every patch, without gradients; each input channel goes
   through it on its own when the encoder takes one channel and the data has several (the
   single-channel pre-training convention), and the features of every channel are concatenated;
3. the features are read at a regular sub-grid of voxels (stride chosen so that a patch yields at
   most ``max_voxels``; trilinear for the lower-resolution stages): every stage of a CNN encoder,
   the final tokens and the middle block's tokens of a ViT (UNETR's skip), each upsampled to the
   input grid; that is ``(voxels, features)`` per patch, cached;
4. a linear 1x1x1 head (features standardised on the training voxels, then one weight per feature
   and class) is fitted for ``steps`` Adam steps on cross-entropy + soft Dice, each over
   ``batch_voxels`` of the cached training voxels;
5. the score is the Dice of each foreground class on the ``n_eval`` cases' voxels (pooled per case,
   then the mean over cases and classes).

The same probe on the randomly initialised network (same architecture, ``seed``) is the floor:
pre-training has taught the encoder something useful for the task when its probe Dice rises above
that floor. ``volssl probe`` runs it on a checkpoint; ``train.probe_every`` / ``train.probe_dataset``
run it during pre-training (``RUN/probe.csv``, ``RUN/probe.png``, the ``probe_dice`` column of
``scalars.csv`` and TensorBoard).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBE_FIELDS = ("step", "probe_dice", "probe_floor", "seconds")


@dataclass
class ProbeConfig:
    """Sizes of a probe (all counts; ``lr`` is the head's Adam learning rate)."""

    # with 2 fitted and 4 scored cases the pre-trained - floor difference swung by +-8 Dice points between
    # case draws (docs/evidence.md); 4 + 8 halves the cases' share of that noise at twice the cost
    n_train: int = 4  # labelled cases the head is fitted on
    n_eval: int = 8  # other labelled cases it is scored on
    patches_per_case: int = 4
    patch_size: tuple[int, int, int] | None = None  # None: the pre-training patch
    max_voxels: int = 4_096  # voxels read per patch (a regular sub-grid)
    steps: int = 200  # Adam steps of the linear head
    batch_voxels: int = 8_192  # training voxels per head step (drawn with the seed)
    lr: float = 0.02
    seed: int = 0

    def validate(self) -> "ProbeConfig":
        for name in ("n_train", "n_eval", "patches_per_case", "max_voxels", "steps", "batch_voxels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"probe: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"probe: lr must be > 0, got {self.lr}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"probe: patch_size must be three positive integers, got {self.patch_size}")
        return self


# --------------------------------------------------------------------------- the encoder
def encoder_from_state(model_cfg: Any, state: Mapping[str, Tensor] | None, seed: int = 0) -> nn.Module:
    """The encoder of ``build_model(model_cfg)`` (the fine-tuning architecture, one output channel),
    initialised with ``torch.manual_seed(seed)`` (the global RNG is left as it was), then loaded with
    the ``encoder.*`` entries of ``state`` (a method's ``transfer_state_dict()`` or a checkpoint's
    ``"network"``); ``state=None``: the random-init floor.

    ValueError naming the keys when ``state`` lacks an encoder tensor or has one of another shape.
    """
    from volssl.models.registry import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        network = build_model(dataclasses.replace(model_cfg, out_channels=1))
    encoder = getattr(network, "encoder", None)
    if encoder is None:
        raise ValueError(f"probe: architecture {model_cfg.arch!r} has no encoder")
    if state is not None:
        own = encoder.state_dict()
        given = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        missing = sorted(set(own) - set(given))
        if missing:
            raise ValueError(f"probe: the weights lack {len(missing)} encoder tensor(s) of {model_cfg.arch!r}, e.g. "
                             f"encoder.{missing[0]}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(given[k].shape)]
        if bad:
            raise ValueError(f"probe: encoder.{bad[0]} has shape {tuple(given[bad[0]].shape)} in the weights but "
                             f"{tuple(own[bad[0]].shape)} in {model_cfg.arch!r}")
        encoder.load_state_dict({k: given[k] for k in own})
    return encoder.eval()


def encoder_in_channels(encoder: nn.Module) -> int:
    """The input channels of an encoder (CNN stem or ViT patch embedding)."""
    n = getattr(encoder, "in_channels", None)
    if n is None:
        raise ValueError(f"probe: cannot tell the input channels of {type(encoder).__name__}")
    return int(n)


def _feature_maps(encoder: nn.Module, x: Tensor) -> list[Tensor]:
    """The multi-scale feature maps ``[(B, C_i, X_i, Y_i, Z_i), ...]`` of ``encoder`` for input ``x``."""
    from volssl.models.vit import ViTEncoder3D

    if isinstance(encoder, ViTEncoder3D):
        mid = max(0, encoder.depth // 2 - 1)
        out = encoder(x, hidden=(mid,))
        b, grid = x.shape[0], out.grid
        as_map = [t.transpose(1, 2).reshape(b, t.shape[-1], *grid) for t in (out.tokens, *out.hidden_states)]
        return as_map
    out = encoder(x)
    if isinstance(out, Tensor):
        out = [out]
    if not isinstance(out, (list, tuple)) or not all(isinstance(t, Tensor) and t.ndim == 5 for t in out):
        raise ValueError(f"probe: {type(encoder).__name__} returns neither a list of feature maps nor ViT tokens")
    return list(out)


def sample_grid(shape: Sequence[int], max_voxels: int) -> tuple[int, ...]:
    """The per-axis stride of the regular sub-grid: the smallest equal stride giving <= ``max_voxels``."""
    stride = 1
    while math.prod(-(-int(s) // stride) for s in shape) > max_voxels:
        stride += 1
    return (stride,) * len(shape)


@torch.no_grad()
def patch_features(encoder: nn.Module, image: Tensor, stride: Sequence[int]) -> Tensor:
    """Features of one patch ``image`` (C, X, Y, Z) at the voxels ``[::sx, ::sy, ::sz]``: ``(V, F)``.

    Each feature map is resampled (trilinear, voxel centres) at those voxels. When the encoder takes
    one channel and ``image`` has ``C > 1``, each channel is encoded on its own (``F`` = C x features).
    """
    c_in = encoder_in_channels(encoder)
    if image.shape[0] != c_in and c_in != 1:
        raise ValueError(f"probe: the encoder takes {c_in} channels, the data has {image.shape[0]}")
    # one channel at a time through a single-channel encoder: the channels form the batch
    x = image[None] if image.shape[0] == c_in else image[:, None]
    size = image.shape[1:]
    # normalised coordinates of the sampled voxel centres (align_corners=False convention)
    axes = [(torch.arange(0, n, s, dtype=torch.float32) + 0.5) / n * 2 - 1 for n, s in zip(size, stride)]
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack((gz, gy, gx), dim=-1)[None].expand(x.shape[0], -1, -1, -1, -1)  # (x=last axis, y, z)
    feats = []
    for fmap in _feature_maps(encoder, x.float()):
        if tuple(fmap.shape[2:]) == tuple(size):
            f = fmap[:, :, ::stride[0], ::stride[1], ::stride[2]]
        else:
            f = F.grid_sample(fmap.float(), grid.to(fmap.device), mode="bilinear", align_corners=False)
        feats.append(f.reshape(f.shape[0] * f.shape[1], -1))  # (batch x features, voxels)
    return torch.cat(feats, 0).T.contiguous()


# --------------------------------------------------------------------------- the probe
def probe_cases(records: Sequence[Any], n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train, eval)`` case ids: labelled cases outside the test split, shuffled by ``seed``."""
    pool = sorted(r.id for r in records if r.has_label and r.split != "test")
    if len(pool) < 2:
        raise ValueError(f"probe: needs at least 2 labelled training cases, the dataset has {len(pool)}")
    order = [pool[i] for i in np.random.default_rng([int(seed), 7]).permutation(len(pool))]
    n_train = min(n_train, len(pool) - 1)
    return order[:n_train], order[n_train:n_train + n_eval]


class Probe:
    """A fixed probe task on a preprocessed labelled dataset; call :meth:`score` with encoder weights.

    Args:
        dataset: a preprocessed dataset (``plan.json``; labelled cases).
        model_cfg: the pre-training :class:`~volssl.config.ModelConfig` (the architecture fine-tuning builds).
        patch_size: the patch (the pre-training patch, unless ``cfg.patch_size``).
        cfg: the :class:`ProbeConfig`.
        device: where the encoder and the head run.
    """

    def __init__(self, dataset: str | os.PathLike, model_cfg: Any, patch_size: Sequence[int],
                 cfg: ProbeConfig | None = None, device: torch.device | str = "cpu") -> None:
        from volssl.data.dataset import PreprocessedDataset
        from volssl.data.patches import PatchSampler

        self.cfg = (cfg or ProbeConfig()).validate()
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.patch = tuple(int(p) for p in (self.cfg.patch_size or patch_size))
        data = PreprocessedDataset(dataset)
        self.dataset = str(Path(dataset))
        self.train_ids, self.eval_ids = probe_cases(data.cases, self.cfg.n_train, self.cfg.n_eval, self.cfg.seed)
        if not self.eval_ids:
            raise ValueError(f"probe: {dataset} has no labelled case left to score on")
        self.stride = sample_grid(self.patch, self.cfg.max_voxels)
        self.labels = sorted({int(v) for c in self.train_ids + self.eval_ids
                              for v in (data.props(c).get("label_values") or [])} | {0})
        self.n_classes = max(self.labels) + 1
        if self.n_classes < 2:
            raise ValueError(f"probe: {dataset}'s probe cases hold no foreground label")
        self._patches: dict[str, list[tuple[Tensor, Tensor]]] = {}
        k = self.cfg.patches_per_case
        for ids, what in ((self.train_ids, "train"), (self.eval_ids, "eval")):
            out = []
            for case in ids:
                sampler = PatchSampler(data, self.patch, foreground_prob=0.5, seed=self.cfg.seed, channel_mode="all",
                                       with_labels=True, cases=[case])
                for i in range(k):
                    item = sampler[i]
                    img = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
                    lab = torch.as_tensor(np.asarray(item["label"]))[0].long()
                    lab = lab[::self.stride[0], ::self.stride[1], ::self.stride[2]].reshape(-1).clamp_(0)
                    out.append((case, img, lab))
            self._patches[what] = out

    def features(self, encoder: nn.Module, what: str) -> tuple[Tensor, Tensor, list[str]]:
        """``(X (V, F), y (V,), case of each voxel)`` of the ``what`` ("train" / "eval") patches."""
        xs, ys, cases = [], [], []
        encoder = encoder.to(self.device)
        for case, img, lab in self._patches[what]:
            f = patch_features(encoder, img.to(self.device), self.stride)
            xs.append(f.cpu())
            ys.append(lab)
            cases += [case] * len(lab)
        return torch.cat(xs), torch.cat(ys), cases

    def fit_and_score(self, xtr: Tensor, ytr: Tensor, xev: Tensor, yev: Tensor, cases: Sequence[str]) -> float:
        """Fit the linear head on ``(xtr, ytr)``; the mean foreground Dice on ``(xev, yev)`` per case."""
        mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
        xtr, xev = (xtr - mean) / std, (xev - mean) / std
        gen = torch.Generator().manual_seed(int(self.cfg.seed))
        head = nn.Linear(xtr.shape[1], self.n_classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        opt = torch.optim.Adam(head.parameters(), lr=self.cfg.lr)
        n = xtr.shape[0]
        for _ in range(self.cfg.steps):
            idx = torch.randint(0, n, (min(n, self.cfg.batch_voxels),), generator=gen) if n > self.cfg.batch_voxels \
                else slice(None)
            x, y = xtr[idx], ytr[idx]
            logits = head(x)
            prob = logits.softmax(-1)
            onehot = F.one_hot(y, self.n_classes).float()
            inter = (prob * onehot)[:, 1:].sum(0)
            denom = (prob + onehot)[:, 1:].sum(0)
            dice = (2 * inter + 1e-5) / (denom + 1e-5)
            loss = F.cross_entropy(logits, y) + (1 - dice.mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = head(xev).argmax(-1)
        case_arr = np.asarray(cases)
        scores = []
        for case in dict.fromkeys(cases):
            sel = torch.as_tensor(case_arr == case)
            p, t = pred[sel], yev[sel]
            for c in range(1, self.n_classes):
                tp, ps, ts = int(((p == c) & (t == c)).sum()), int((p == c).sum()), int((t == c).sum())
                if ps + ts:
                    scores.append(2 * tp / (ps + ts))
        return float(np.mean(scores)) if scores else float("nan")

    @torch.no_grad()
    def _features_both(self, encoder: nn.Module):
        return self.features(encoder, "train"), self.features(encoder, "eval")

    def score(self, state: Mapping[str, Tensor] | None) -> float:
        """Probe Dice of the encoder with weights ``state`` (``encoder.*`` keys; None: random init).

        Leaves the global RNG state untouched (a probe inside pre-training keeps resume exact).
        """
        with torch.random.fork_rng(devices=[]):
            encoder = encoder_from_state(self.model_cfg, state, self.cfg.seed)
            (xtr, ytr, _), (xev, yev, cases) = self._features_both(encoder)
            with torch.enable_grad():
                return self.fit_and_score(xtr, ytr, xev, yev, cases)

    def floor(self) -> float:
        """The probe Dice of the randomly initialised encoder (computed once, then cached)."""
        if getattr(self, "_floor", None) is None:
            self._floor = self.score(None)
        return self._floor

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "train_cases": self.train_ids, "eval_cases": self.eval_ids,
                "patch": list(self.patch), "stride": list(self.stride), "classes": self.n_classes,
                **{k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "patch_size"}}


def run_probe(probe: Probe, state: Mapping[str, Tensor] | None, floor: bool = True) -> dict[str, Any]:
    """``{"probe_dice", "probe_floor" (None without ``floor``), "seconds"}`` of weights ``state``."""
    t = time.perf_counter()
    dice = probe.score(state)
    base = probe.floor() if floor else None
    return {"probe_dice": dice, "probe_floor": base, "seconds": time.perf_counter() - t}


# --------------------------------------------------------------------------- records and the plot
def append_probe_row(run_dir: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append ``row`` (:data:`PROBE_FIELDS`) to ``RUN/probe.csv``, dropping rows at or after its step."""
    import csv

    path = Path(run_dir) / "probe.csv"
    rows = [r for r in read_probe_csv(path) if int(r["step"]) < int(row["step"])] if path.is_file() else []
    rows.append({k: row.get(k) for k in PROBE_FIELDS})
    from volssl.util.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PROBE_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in PROBE_FIELDS})


def read_probe_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``probe.csv`` (empty cells omitted)."""
    import csv

    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]


def plot_probe(rows: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = "") -> None:
    """Probe Dice against the pre-training step, with the random-init floor, to the PNG ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volssl.util.atomic import atomic_path

    fig = Figure(figsize=(5.5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["step"] for r in rows if "probe_dice" in r]
    ax.plot(steps, [r["probe_dice"] for r in rows if "probe_dice" in r], "o-", label="pre-trained encoder")
    floors = [r["probe_floor"] for r in rows if "probe_floor" in r]
    if floors:
        ax.axhline(float(np.mean(floors)), color="grey", ls="--", label="random init (floor)")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("linear-probe Dice (held-out cases)")
    ax.set_title(title or "representation probe", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- data
def prepare_probe_data(dataset: str | os.PathLike, plan: Mapping[str, Any] | None, out: str | os.PathLike,
                       workers: int = 1, progress: bool = False) -> Path:
    """The preprocessed labelled dataset of a probe: ``dataset`` itself when it holds a ``plan.json``
    (its arrays must come from ``plan``'s spacing and normalisation), else the nnU-Net v2 raw dataset
    ``dataset`` preprocessed with ``plan`` into ``out`` (cases already there are kept)."""
    import json

    from volssl.data.preprocess import labelled_plan, plan_differences, preprocess
    from volssl.data.readers import is_nnunet_dataset
    from volssl.util.atomic import write_json_atomic

    src = Path(dataset).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"probe dataset not found: {src}")
    if (src / "plan.json").is_file():
        detail = plan_differences(json.loads((src / "plan.json").read_text()), dict(plan)) if plan is not None else ""
        if detail:
            raise ValueError(f"probe dataset {src} was preprocessed with another plan than the pre-training data "
                             f"({detail}); pass the raw nnU-Net dataset instead")
        return src.resolve()
    if not is_nnunet_dataset(src):
        raise ValueError(f"probe dataset {src} is neither an nnU-Net v2 raw dataset (dataset.json + imagesTr) nor a "
                         "preprocessed volssl dataset (plan.json)")
    if plan is None:
        raise ValueError(f"probe dataset {src} is raw and the pre-training data has no plan to preprocess it with")
    out = Path(out)
    summary = preprocess(src, out, plan=labelled_plan(dict(plan)), workers=workers, progress=progress)
    if summary.n_ok == 0:
        raise ValueError(f"probe dataset {src}: no case could be preprocessed (see {summary.report})")
    write_json_atomic(out / "dataset.json", json.loads((src / "dataset.json").read_text()))
    return out.resolve()
