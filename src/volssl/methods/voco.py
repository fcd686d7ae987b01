"""VoCo (Wu et al., 2024, "Volume Contrast") on the Residual Encoder encoder: predict where random crops lie.

The S3D paper's baseline "VoCo" (Appendix A.3): each patch is cut into a grid of non-overlapping base
crops (the paper: 3 x 3 x 1 crops of 64^3 in a 192 x 192 x 64 patch) and ``random_crops`` random crops
of the same size (the paper: 5) are taken anywhere in the patch. Every crop is encoded by the ResEnc
encoder; the global average pools of every stage are concatenated and projected (3-layer MLP, 2048
wide, as in the official code and nnssl). The prediction for (random crop r, base crop k) is the
ReLU'd cosine similarity of their embeddings; its target is the fraction of r's volume that lies in k.
Loss per sample (official ``voco_head.py``): ``pos + neg + reg`` with

* ``pos = sum(-y * log(1 - |y - p| + 1e-6)) / sum(y)`` over the pairs,
* ``neg = sum_{y = 0} p^2 / #{y = 0}``,
* ``reg`` = the mean over base-crop pairs ``i < j`` of ``relu(cos(b_i, stopgrad(b_j)))^2`` (keeps the
  base embeddings of one volume apart).

Momentum teacher (the official code; nnssl issue #22: without it the loss does not decrease): a copy
of the encoder and projector updated as ``t = m t + (1 - m) s`` (m = 0.9, every step) after each
optimiser step (the trainer calls :meth:`VoCo.after_step`); the prediction is the mean of
``assign(student random, teacher base)`` and ``assign(teacher random, student base)``. With
``teacher=False`` student embeddings are compared with student embeddings.

Differences to the official code, all for the data-parallel contract (docs/design.md, "Methods"):
the projector's normalisation (BatchNorm1d without affine or running statistics in the official
code) takes its statistics over each sample's own crops rather than over the whole batch; the teacher
starts as a copy of the student (the official one starts from another random initialisation). Crops
are augmented independently (flips, and in-plane rot90 when the crop is square in x-y), as the
official pipeline does; whole-patch spatial augmentation is left to the trainer's ``augment`` config.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.methods import MethodOutput
from volssl.methods.backbone import method_on_backbone
from volssl.methods.masking import _rows
from volssl.models.resenc_unet import ResEncUNet
from volssl.methods import register_method
from volssl.methods.base import MethodBase

POOLS = ("all", "bottleneck")


@dataclass
class VoCoConfig(MethodConfig):
    """VoCo settings (S3D paper, Appendix A.3; official Luffy03/VoCo ``voco_head.py``)."""

    name: str = "voco"
    grid: tuple[int, int, int] = (3, 3, 1)  # base crops per axis; crop size = patch // grid
    random_crops: int = 5  # random crops per sample (S3D paper: 5; official: 4)
    teacher: bool = True  # momentum teacher (official); False: student-only (does not train, nnssl #22)
    momentum: float = 0.9  # teacher EMA per step (official: 0.9, no schedule)
    pool: str = "all"  # "all": every stage's global average pool concatenated (official, nnssl); "bottleneck"
    proj_hidden: int = 2048
    proj_dim: int = 2048
    crop_augment: bool = True  # independent flips (and in-plane rot90) of every crop
    reg_weight: float = 1.0


def crop_norm(h: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise ``h`` (B, n, D) over each sample's n crops per feature (zero mean, unit variance), in float32."""
    h = h.float()
    mean = h.mean(1, keepdim=True)
    var = h.var(1, unbiased=False, keepdim=True)
    return (h - mean) * torch.rsqrt(var + eps)


class VoCoProjector(nn.Module):
    """Linear -> norm -> ReLU -> Linear -> norm -> ReLU -> Linear: ``(B, n, in_dim) -> (B, n, out_dim)``.

    The norm (:func:`crop_norm`, no affine) takes statistics over each sample's crops.
    """

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 2048):
        super().__init__()
        if min(in_dim, hidden, out_dim) < 1:
            raise ValueError(f"VoCoProjector: dimensions must be >= 1, got {in_dim}, {hidden}, {out_dim}")
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        h = F.relu(crop_norm(self.fc1(h)))
        h = F.relu(crop_norm(self.fc2(h)))
        return self.fc3(h)


def overlap_targets(starts: Tensor, crop: tuple[int, int, int], grid: tuple[int, int, int]) -> Tensor:
    """Fraction of each random crop's volume inside each base crop: ``(B, R, prod(grid))`` float32.

    ``starts`` (B, R, 3): the random crops' first voxel; every crop (random or base) is ``crop``
    voxels per axis; base crop ``(i, j, k)`` (index ``(i * gy + j) * gz + k``) starts at
    ``(i cx, j cy, k cz)``. Rows sum to 1 when the random crops lie inside the grid.
    """
    if starts.ndim != 3 or starts.shape[2] != 3:
        raise ValueError(f"overlap_targets: starts must be (B, R, 3), got {tuple(starts.shape)}")
    per_axis = []
    for d in range(3):
        c = int(crop[d])
        lo = torch.arange(int(grid[d]), device=starts.device) * c  # (g,)
        s = starts[..., d:d + 1].to(torch.long)  # (B, R, 1)
        inter = (torch.minimum(s + c, lo + c) - torch.maximum(s, lo)).clamp_min(0)  # (B, R, g)
        per_axis.append(inter.to(torch.float32) / c)
    ox, oy, oz = per_axis
    out = ox[..., :, None, None] * oy[..., None, :, None] * oz[..., None, None, :]
    return out.reshape(*starts.shape[:2], -1)


def assign(feats: Tensor, bases: Tensor) -> Tensor:
    """``relu(cos(feats_r, bases_k))``: ``(B, R, D), (B, K, D) -> (B, R, K)`` (official ``online_assign``)."""
    return F.cosine_similarity(feats.float()[:, :, None, :], bases.float()[:, None, :, :], dim=-1).relu()


def voco_loss(logits: Tensor, labels: Tensor, bases: Tensor, reg_weight: float = 1.0) -> Tensor:
    """The VoCo loss: mean over samples of ``pos + neg + reg_weight * reg`` (see the module docstring).

    ``logits``, ``labels`` (B, R, K): predicted and true overlaps; ``bases`` (B, K, D): the student's
    base-crop embeddings (for the regulariser).
    """
    if logits.shape != labels.shape or bases.shape[:2] != (labels.shape[0], labels.shape[2]):
        raise ValueError(f"voco_loss: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and bases "
                         f"{tuple(bases.shape)} do not match")
    logits, labels = logits.float(), labels.float()
    dist = (labels - logits).abs()
    pos = (-labels * torch.log(1 - dist + 1e-6)).sum((1, 2)) / (labels.sum((1, 2)) + 1e-6)
    neg_lab = (labels == 0).to(logits.dtype)
    neg = (neg_lab * logits.square()).sum((1, 2)) / (neg_lab.sum((1, 2)) + 1e-6)
    k = bases.shape[1]
    reg = torch.zeros_like(pos)
    if k > 1:
        b = bases.float()
        sim = F.cosine_similarity(b[:, :, None, :], b.detach()[:, None, :, :], dim=-1).relu().square()  # (B, K, K)
        upper = torch.ones(k, k, dtype=torch.bool, device=b.device).triu(1)
        reg = (sim * upper).sum((1, 2)) / upper.sum()
    return (pos + neg + reg_weight * reg).mean()


@register_method(VoCoConfig)
class VoCo(MethodBase):
    """VoCo pre-training of the ResEnc encoder (the U-Net's decoder is kept, frozen and unused).

    Randomness, drawn for the ``global_batch`` samples from the global torch RNG, rows ``[o, o + B)``
    kept: the random crops' starts ``(G, R, 3)`` (uniform over the positions inside the patch), then
    the crop augmentation: flips ``(G, K + R, 3)`` and rot90 counts ``(G, K + R)``.

    Args:
        network: a :class:`~volssl.models.resenc_unet.ResEncUNet`; its encoder is pre-trained.
        cfg: the :class:`VoCoConfig`.
    """

    def __init__(self, network: ResEncUNet, cfg: VoCoConfig):
        super().__init__()
        if len(cfg.grid) != 3 or min(cfg.grid) < 1:
            raise ValueError(f"VoCo: grid must be 3 positive integers, got {cfg.grid}")
        if math.prod(cfg.grid) < 2:
            raise ValueError(f"VoCo: the grid needs at least 2 base crops, got {cfg.grid}")
        if cfg.random_crops < 1:
            raise ValueError(f"VoCo: random_crops must be >= 1, got {cfg.random_crops}")
        if not 0.0 <= cfg.momentum < 1.0:
            raise ValueError(f"VoCo: momentum must lie in [0, 1), got {cfg.momentum}")
        if cfg.pool not in POOLS:
            raise ValueError(f"VoCo: pool must be one of {POOLS}, got {cfg.pool!r}")
        if cfg.reg_weight < 0:
            raise ValueError(f"VoCo: reg_weight must be >= 0, got {cfg.reg_weight}")
        self.network = network
        self.cfg = cfg
        network.decoder.requires_grad_(False)  # VoCo trains the encoder only
        enc = network.encoder
        in_dim = sum(enc.output_channels) if cfg.pool == "all" else enc.output_channels[-1]
        self.projector = VoCoProjector(in_dim, cfg.proj_hidden, cfg.proj_dim)
        self.teacher: nn.ModuleDict | None = None
        if cfg.teacher:
            self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(enc), "projector": copy.deepcopy(self.projector)})
            self.teacher.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "VoCo":
        """Build from a RunConfig: ``cfg.model`` (``out_channels = in_channels``, the decoder is unused)."""
        return method_on_backbone(cls, cfg, VoCoConfig, ResEncUNet, check="crop_size")

    @property
    def n_base(self) -> int:
        return math.prod(self.cfg.grid)

    def crop_size(self, patch_size) -> tuple[int, int, int]:
        """``patch // grid`` per axis; ValueError unless the grid tiles the patch exactly, every crop side
        is divisible by the encoder's total stride and a crop's bottleneck has more than one voxel."""
        patch = tuple(int(p) for p in patch_size)
        grid = tuple(int(g) for g in self.cfg.grid)
        stride = self.network.encoder.total_stride
        if len(patch) != 3 or any(p % g for p, g in zip(patch, grid)):
            raise ValueError(f"VoCo: patch size {patch} must be divisible by the base-crop grid {grid}")
        crop = tuple(p // g for p, g in zip(patch, grid))
        if any(c % stride for c in crop):
            raise ValueError(f"VoCo: crop size {crop} (patch {patch} / grid {grid}) must be divisible by the "
                             f"encoder's total stride {stride}")
        if math.prod(c // stride for c in crop) < 2:
            raise ValueError(f"VoCo: crop size {crop} gives a single bottleneck voxel at total stride {stride} "
                             "(instance norm needs more than one); use larger crops")
        return crop  # type: ignore[return-value]

    def draw(self, batch: int, patch_size, sample_offset: int = 0, global_batch: int | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Random crop starts ``(B, R, 3)`` int64, flips ``(B, K + R, 3)`` bool and rot90 counts ``(B, K + R)``
        int64 (CPU) for rows ``[sample_offset, sample_offset + B)`` of the global batch."""
        patch = torch.tensor([int(p) for p in patch_size])
        crop = torch.tensor(self.crop_size(patch_size))
        g, o = _rows(batch, sample_offset, global_batch)
        r, n = self.cfg.random_crops, self.n_base + self.cfg.random_crops
        starts = (torch.rand(g, r, 3, dtype=torch.float64) * (patch - crop + 1)).floor().long()[o:o + batch]
        flips = (torch.rand(g, n, 3) < 0.5)[o:o + batch]
        rots = torch.randint(0, 4, (g, n))[o:o + batch]
        return starts, flips, rots

    def make_crops(self, images: Tensor, starts: Tensor, flips: Tensor | None = None, rots: Tensor | None = None
                   ) -> Tensor:
        """``images`` (B, C, *patch) -> crops ``(B, K + R, C, *crop)``: the K base crops of the grid (row-major),
        then the R random crops at ``starts``; with ``flips`` / ``rots`` each crop is flipped along the
        marked axes, then rotated ``rots`` quarter turns in the x-y plane (when the crop is square there)."""
        b, c = images.shape[:2]
        cx, cy, cz = self.crop_size(images.shape[2:])
        gx, gy, gz = (int(g) for g in self.cfg.grid)
        base = images.reshape(b, c, gx, cx, gy, cy, gz, cz).permute(0, 2, 4, 6, 1, 3, 5, 7)
        base = base.reshape(b, gx * gy * gz, c, cx, cy, cz)
        rand = torch.stack([torch.stack([images[i, :, x:x + cx, y:y + cy, z:z + cz] for x, y, z in row])
                            for i, row in enumerate(starts.tolist())])
        crops = torch.cat([base, rand], 1)
        if flips is None and rots is None:
            return crops
        fl = flips.tolist() if flips is not None else [[[False] * 3] * crops.shape[1]] * b
        rt = rots.tolist() if rots is not None else [[0] * crops.shape[1]] * b
        out = []
        for i in range(b):
            for n in range(crops.shape[1]):
                x = crops[i, n]
                dims = [d + 1 for d in range(3) if fl[i][n][d]]
                if dims:
                    x = x.flip(dims)
                if cx == cy and rt[i][n] % 4:
                    x = torch.rot90(x, rt[i][n], dims=(1, 2))
                out.append(x)
        return torch.stack(out).view_as(crops)

    def embed(self, encoder: nn.Module, projector: nn.Module, crops: Tensor) -> Tensor:
        """``crops`` (B, n, C, *crop) -> embeddings (B, n, proj_dim): encoder, global average pools, projector."""
        b, n = crops.shape[:2]
        feats = encoder(crops.reshape(b * n, *crops.shape[2:]))
        used = feats if self.cfg.pool == "all" else feats[-1:]
        pooled = torch.cat([f.mean((2, 3, 4)) for f in used], 1)
        return projector(pooled.view(b, n, -1))

    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch) -> the VoCo loss and previews (input; masked: the random crops'
        footprint, the rest dimmed)."""
        enc = self.network.encoder
        if images.ndim != 5 or images.shape[1] != enc.in_channels:
            raise ValueError(f"VoCo: expected images (B, {enc.in_channels}, X, Y, Z), got {tuple(images.shape)}")
        starts, flips, rots = self.draw(images.shape[0], images.shape[2:], sample_offset, global_batch)
        crop = self.crop_size(images.shape[2:])
        labels = overlap_targets(starts, crop, tuple(self.cfg.grid)).to(images.device)
        with torch.no_grad():
            crops = self.make_crops(images, starts, *((flips, rots) if self.cfg.crop_augment else (None, None)))
        k = self.n_base
        student = self.embed(enc, self.projector, crops)
        s_base, s_rand = student[:, :k], student[:, k:]
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.embed(self.teacher["encoder"], self.teacher["projector"], crops).detach()
            logits = 0.5 * (assign(s_rand, teacher[:, :k]) + assign(teacher[:, k:], s_base))
        else:
            logits = assign(s_rand, s_base)
        loss = voco_loss(logits, labels, s_base, self.cfg.reg_weight)
        with torch.no_grad():
            footprint = torch.zeros_like(images[:, :1])
            for i, row in enumerate(starts.tolist()):
                for x, y, z in row:
                    footprint[i, :, x:x + crop[0], y:y + crop[1], z:z + crop[2]] = 1.0
            previews = {"input": images[:, :1].detach(), "masked": (images[:, :1] * (0.25 + 0.75 * footprint)).detach()}
        return MethodOutput(loss, previews)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimiser step ``step``: ``teacher = m * teacher + (1 - m) * student`` (no-op without teacher)."""
        if self.teacher is None:
            return
        student = list(self.network.encoder.parameters()) + list(self.projector.parameters())
        teacher = list(self.teacher["encoder"].parameters()) + list(self.teacher["projector"].parameters())
        for t, s in zip(teacher, student):
            t.lerp_(s.detach().to(t.dtype), 1.0 - self.cfg.momentum)

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The encoder only (``encoder.*``): the decoder never trains, projector and teacher are pre-training parts."""
        return {k: v for k, v in self.network.state_dict().items() if k.startswith("encoder.")}
