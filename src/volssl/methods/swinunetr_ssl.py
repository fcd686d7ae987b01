"""SwinUNETR self-supervised pre-training (the AMAES paper's SwinUNETR baseline).

Paper: Tang et al. 2022, "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image
Analysis" (CVPR); the recipe as the authors' code runs it (MONAI research-contributions,
``SwinUNETR/Pretrain``: ``main.py``, ``models/ssl_head.py``, ``utils/ops.py``, ``losses/loss.py``).
Per step and sample:

* two views, each rotated by ``k * 90`` degrees in one plane (spatial axes 1 and 2: the authors'
  ``rot90(k, (2, 3))`` of a ``(C, X, Y, Z)`` sample), ``k`` uniform in {0, 1, 2, 3}: the rotation label;
* each view gets the authors' ``aug_rand`` cut-outs: boxes (sides from ``min_block`` to
  ``max_block`` of the patch side, clipped at the border) until the boxes' voxel count reaches
  ``U(0, max_drop)`` of the patch, filled with Gaussian noise min-max scaled to the view's intensity
  range (the authors' [0, 1], the whole range of their min-max scaled CT); then, unless the donor
  drawn uniformly from the sample's group is the sample itself, a second set of boxes filled with
  the donor's (cut-out) view;
* the Swin ViT encodes both views; on its bottleneck (stride 32, width 16F) a linear rotation head
  (4 classes) reads token 0, a linear contrastive head (512-d) token 1 (``head_tokens="first"``, the
  authors' code; ``"mean"``: both read the average token) and a reconstruction head (the authors'
  default ``"vae"``: five conv-instance norm-LeakyReLU-trilinear x2 stages and a 1^3 conv;
  ``"deconv"``: five 2^3 transposed convs) maps it back to the patch;
* loss = ``rot_weight`` * cross-entropy of the rotation + ``contrast_weight`` * NT-Xent (temperature
  0.5) between the two views' embeddings + ``recon_weight`` * L1 between the reconstruction and the
  rotated, un-cut view (whole patch); weights 1/1/1.

Contract (docs/design.md, "Methods"). Every random quantity (rotations, a cut-out seed per view,
donor draws) is drawn for the ``global_batch`` samples from the global torch RNG, then rows
``[sample_offset, sample_offset + B)`` are kept; the boxes and noise of a view come from a CPU
generator seeded with its drawn seed, so they do not depend on B or on the device. Rotation and L1
terms are per sample. NT-Xent and the donor draw couple samples: they work within *groups* of
``group_size`` consecutive samples of the global batch (each group's NT-Xent equals
:class:`monai.losses.ContrastiveLoss` on that group; a sample's part is the mean of its two views'
terms, so the loss is the mean over samples of per-sample losses). With ``group_size`` set (dividing
the per-rank batch) W data-parallel processes compute exactly what one process computes; with
``group_size=None`` (default) a group is the rank's local batch: the authors' behaviour (each GPU
contrasts its own batch), exact on one process and an approximation under DDP, where the negatives
and donors of a sample depend on how the global batch is split.

``network`` is a :class:`~volssl.models.swinunetr.SwinUNETRNet`; only its ``encoder`` (the Swin ViT)
is pre-trained (its conv decoder is frozen: the authors transfer the Swin ViT alone), and
:meth:`SwinUNETRSSL.transfer_state_dict` returns exactly the ``encoder.*`` weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volssl.config import MethodConfig, RunConfig
from volssl.methods import MethodOutput
from volssl.methods.backbone import method_on_backbone
from volssl.models.swinunetr import SwinUNETRNet
from volssl.methods import register_method
from volssl.methods.base import MethodBase

HEAD_TOKENS = ("first", "mean")
RECON_HEADS = ("vae", "deconv")
N_ROTATIONS = 4


@dataclass
class SwinUNETRSSLConfig(MethodConfig):
    """SwinUNETR SSL settings (Tang et al. 2022; defaults: the authors' code)."""

    name: str = "swinunetr-ssl"
    rot_weight: float = 1.0  # loss weights (the authors' alpha1..3)
    contrast_weight: float = 1.0
    recon_weight: float = 1.0
    temperature: float = 0.5  # NT-Xent temperature
    contrast_dim: int = 512  # output size of the contrastive head
    rotation_axes: tuple[int, int] = (1, 2)  # spatial axes of the rotation plane (authors: dims 2, 3 of (C,X,Y,Z))
    max_drop: float = 0.3  # cut-out voxels per view: U(0, max_drop) of the patch
    max_block: float = 0.25  # box side < max_block * patch side
    min_block: float = 0.05  # box side >= min_block * patch side (the authors' "tolr"); corners < side - this
    mix_from_batch: bool = True  # second cut-out pass filled from a donor sample of the group (authors' aug_rand)
    group_size: int | None = None  # NT-Xent negatives / donors: groups of consecutive samples; None: the local batch
    head_tokens: str = "first"  # "first": rotation <- bottleneck token 0, contrast <- token 1; "mean": average token
    recon_head: str = "vae"  # "vae" (the authors' default) or "deconv"


# --------------------------------------------------------------------------- stateless parts
def rotate_views(x: Tensor, k: Sequence[int] | Tensor, axes: tuple[int, int] = (1, 2)) -> Tensor:
    """Rotate sample ``i`` of ``x`` (B, C, *s) by ``k[i] * 90`` degrees in the plane of spatial ``axes``
    (``torch.rot90`` direction: from the first axis towards the second)."""
    a, b = (int(v) for v in axes)
    if x.ndim < 3 or sorted((a, b)) != sorted(set((a, b))) or not (0 <= a < x.ndim - 2 and 0 <= b < x.ndim - 2):
        raise ValueError(f"rotate_views: axes must be two different spatial axes of {tuple(x.shape)}, got {axes}")
    k = [int(v) for v in (k.tolist() if isinstance(k, Tensor) else k)]
    if len(k) != x.shape[0]:
        raise ValueError(f"rotate_views: one rotation per sample needed, got {len(k)} for {x.shape[0]} samples")
    if any(v % 2 for v in k) and x.shape[2 + a] != x.shape[2 + b]:
        raise ValueError(f"rotate_views: a 90-degree rotation needs equal sides on axes {axes}, "
                         f"got {tuple(x.shape[2:])}")
    return torch.stack([torch.rot90(x[i], k[i] % N_ROTATIONS, dims=(1 + a, 1 + b)) for i in range(x.shape[0])])


def cutout_boxes(shape: Sequence[int], generator: torch.Generator, max_drop: float = 0.3, max_block: float = 0.25,
                 min_block: float = 0.05) -> list[tuple[slice, ...]]:
    """The boxes of one cut-out pass over a patch of spatial ``shape`` (the authors' ``patch_rand_drop``).

    The pass drops ``U(0, max_drop) * prod(shape)`` voxels (overlaps counted twice): box corners are
    uniform in ``[0, side - int(min_block * side))``, box sides uniform in
    ``[max(int(min_block * side), 1), int(max_block * side))``, clipped at the border.
    All draws come from ``generator``. Returns a list of slice tuples (one slice per spatial axis).
    """
    sides = [int(s) for s in shape]
    if not 0.0 <= max_drop <= 1.0:
        raise ValueError(f"cutout_boxes: max_drop must lie in [0, 1], got {max_drop}")
    tol = [int(min_block * s) for s in sides]
    low = [max(t, 1) for t in tol]
    high = [int(max_block * s) for s in sides]
    if any(h <= lo for h, lo in zip(high, low)) or any(s - t < 1 for s, t in zip(sides, tol)):
        raise ValueError(f"cutout_boxes: patch {tuple(sides)} too small for boxes of {min_block}..{max_block} of "
                         "its sides (min_block < max_block, and max_block * side >= 2 needed)")
    target = float(torch.rand((), generator=generator)) * max_drop * math.prod(sides)
    boxes: list[tuple[slice, ...]] = []
    total = 0
    while total < target:
        start = [int(torch.randint(0, s - t, (), generator=generator)) for s, t in zip(sides, tol)]
        size = [int(torch.randint(lo, h, (), generator=generator)) for lo, h in zip(low, high)]
        stop = [min(a + n, s) for a, n, s in zip(start, size, sides)]
        boxes.append(tuple(slice(a, e) for a, e in zip(start, stop)))
        total += math.prod(e - a for a, e in zip(start, stop))
    return boxes


def noise_fill(channels: int, shape: Sequence[int], boxes: Sequence[tuple[slice, ...]],
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(fill (C, *shape) in [0, 1], where (1, *shape) bool)``: each box's Gaussian noise min-max scaled
    to [0, 1] (later boxes overwrite earlier ones), on the CPU."""
    fill = torch.zeros((channels, *shape))
    where = torch.zeros((1, *shape), dtype=torch.bool)
    for box in boxes:
        size = [s.stop - s.start for s in box]
        noise = torch.randn((channels, *size), generator=generator)
        lo, hi = noise.min(), noise.max()
        fill[(slice(None), *box)] = (noise - lo) / (hi - lo).clamp_min(1e-12)
        where[(slice(None), *box)] = True
    return fill, where


def box_mask(shape: Sequence[int], boxes: Sequence[tuple[slice, ...]]) -> Tensor:
    """``(1, *shape)`` bool mask of the union of ``boxes``."""
    where = torch.zeros((1, *shape), dtype=torch.bool)
    for box in boxes:
        where[(slice(None), *box)] = True
    return where


def nt_xent_per_sample(z1: Tensor, z2: Tensor, temperature: float = 0.5, group_size: int | None = None) -> Tensor:
    """NT-Xent (SimCLR) per sample: ``(N,)`` for embeddings ``z1``, ``z2`` (N, D) of two views.

    Within each group of ``group_size`` consecutive samples (None: all N), row ``i`` of
    ``[z1; z2]`` has the other view of its sample as positive and every other row of the group as a
    negative (cosine similarities / ``temperature``); a sample's value is the mean of its two rows'
    terms. The mean over a group equals :class:`monai.losses.ContrastiveLoss` (and the authors'
    ``Contrast``) on that group.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent_per_sample: z1, z2 must be (N, D) of equal shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"nt_xent_per_sample: temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    g = n if group_size is None else int(group_size)
    if g < 2 or n % g:
        raise ValueError(f"nt_xent_per_sample: groups of {g} samples must number at least 2 and divide the "
                         f"{n} samples")
    k = n // g
    z = F.normalize(torch.stack([z1.float().view(k, g, -1), z2.float().view(k, g, -1)], 1).view(k, 2 * g, -1), dim=-1)
    logits = z @ z.transpose(1, 2) / temperature  # (k, 2g, 2g)
    eye = torch.eye(2 * g, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = torch.arange(2 * g, device=z.device).add(g).remainder(2 * g)
    rows = torch.logsumexp(logits, dim=-1) - logits[:, torch.arange(2 * g, device=z.device), pos]  # (k, 2g)
    return ((rows[:, :g] + rows[:, g:]) / 2).reshape(n)


# --------------------------------------------------------------------------- heads
def reconstruction_head(kind: str, dim: int, out_channels: int) -> nn.Sequential:
    """The authors' reconstruction heads from the bottleneck (``dim`` channels, stride 32) to the patch.

    ``"vae"``: five stages conv 3^3 -> instance norm -> LeakyReLU -> trilinear x2 (widths dim/2, /4, /8,
    /16, /16), then a 1^3 conv; ``"deconv"``: five 2^3 stride-2 transposed convs (dim/2 .. /16, then
    ``out_channels``).
    """
    if kind not in RECON_HEADS:
        raise ValueError(f"recon_head must be one of {RECON_HEADS}, got {kind!r}")
    if dim % 16:
        raise ValueError(f"reconstruction_head: the bottleneck width {dim} must be divisible by 16")
    if kind == "deconv":
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, out_channels]
        return nn.Sequential(*[nn.ConvTranspose3d(a, b, kernel_size=2, stride=2) for a, b in zip(widths, widths[1:])])
    widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv3d(a, b, kernel_size=3, padding=1), nn.InstanceNorm3d(b), nn.LeakyReLU(),
                   nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
    layers.append(nn.Conv3d(widths[-1], out_channels, kernel_size=1))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- the method
@register_method(SwinUNETRSSLConfig)
class SwinUNETRSSL(MethodBase):
    """Rotation + contrastive + inpainting pre-training of the SwinUNETR encoder (see the module docstring).

    Args:
        network: a :class:`~volssl.models.swinunetr.SwinUNETRNet`; its encoder is trained, its decoder frozen.
        cfg: the :class:`SwinUNETRSSLConfig`.
    """

    def __init__(self, network: SwinUNETRNet, cfg: SwinUNETRSSLConfig):
        super().__init__()
        if not isinstance(network, SwinUNETRNet):
            raise ValueError(f"SwinUNETRSSL needs a SwinUNETR network, got {type(network).__name__}")
        for field in ("rot_weight", "contrast_weight", "recon_weight"):
            if getattr(cfg, field) < 0:
                raise ValueError(f"SwinUNETRSSL: {field} must be >= 0, got {getattr(cfg, field)}")
        if not cfg.temperature > 0:
            raise ValueError(f"SwinUNETRSSL: temperature must be > 0, got {cfg.temperature}")
        if cfg.head_tokens not in HEAD_TOKENS:
            raise ValueError(f"SwinUNETRSSL: head_tokens must be one of {HEAD_TOKENS}, got {cfg.head_tokens!r}")
        if cfg.group_size is not None and cfg.group_size < 2:
            raise ValueError(f"SwinUNETRSSL: group_size must be >= 2 (NT-Xent needs negatives) or None, "
                             f"got {cfg.group_size}")
        if len(cfg.rotation_axes) != 2 or len(set(cfg.rotation_axes)) != 2 or not set(cfg.rotation_axes) <= {0, 1, 2}:
            raise ValueError(f"SwinUNETRSSL: rotation_axes must be two different spatial axes (0..2), "
                             f"got {cfg.rotation_axes}")
        if cfg.contrast_dim < 1:
            raise ValueError(f"SwinUNETRSSL: contrast_dim must be >= 1, got {cfg.contrast_dim}")
        self.network = network
        self.cfg = cfg
        network.decoder.requires_grad_(False)  # not pre-trained (no parameter without a gradient for DDP)
        enc = network.encoder
        dim = enc.output_channels[-1]
        self.rotation_head = nn.Linear(dim, N_ROTATIONS)
        self.contrastive_head = nn.Linear(dim, cfg.contrast_dim)
        self.recon_head = reconstruction_head(cfg.recon_head, dim, enc.in_channels)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "SwinUNETRSSL":
        """Build from a RunConfig: ``cfg.model`` (a swinunetr architecture), ``cfg.method``; checks the patch."""
        return method_on_backbone(cls, cfg, SwinUNETRSSLConfig, SwinUNETRNet, needs="a SwinUNETR backbone")

    def check_patch(self, patch_size: Sequence[int]) -> None:
        """ValueError unless ``patch_size`` fits: multiples of 32, equal sides in the rotation plane, at
        least two bottleneck tokens (``head_tokens="first"``), room for the cut-out boxes."""
        patch = tuple(int(p) for p in patch_size)
        self.network.check_input(patch)
        a, b = self.cfg.rotation_axes
        if patch[a] != patch[b]:
            raise ValueError(f"swinunetr-ssl: the rotation plane (axes {a}, {b}) needs equal sides, got patch {patch}")
        if self.cfg.head_tokens == "first" and math.prod(p // 32 for p in patch) < 2:
            raise ValueError(f"swinunetr-ssl: patch {patch} gives one bottleneck token; the rotation and contrastive "
                             "heads read tokens 0 and 1 (use a side >= 64 or head_tokens=mean)")
        if self.cfg.recon_head == "vae" and math.prod(p // 32 for p in patch) < 2:
            raise ValueError(f"swinunetr-ssl: patch {patch} gives a 1^3 bottleneck, which the 'vae' head's instance "
                             "norm cannot normalise (use a side >= 64)")
        cutout_boxes(patch, torch.Generator().manual_seed(0), 0.0, self.cfg.max_block, self.cfg.min_block)

    # ---- the two views ----------------------------------------------------------------
    def draw(self, global_batch: int, sample_offset: int, batch: int) -> dict[str, Tensor]:
        """The step's random quantities for rows ``[sample_offset, sample_offset + batch)``, drawn for
        ``global_batch`` samples from the global torch RNG (CPU): rotations (B, 2), cut-out seeds (B, 2),
        donor draws in [0, 1) (B, 2)."""
        rows = slice(sample_offset, sample_offset + batch)
        rot = torch.randint(0, N_ROTATIONS, (global_batch, 2), device="cpu")[rows]
        seeds = torch.randint(0, 2 ** 62, (global_batch, 2), device="cpu")[rows]
        donors = torch.rand(global_batch, 2, device="cpu")[rows]
        return {"rot": rot, "seeds": seeds, "donors": donors}

    def make_views(self, images: Tensor, draws: dict[str, Tensor], group: int) -> tuple[Tensor, Tensor]:
        """``(views, cut)``: the rotated views (2, B, C, *s) and their cut-out versions (2, B, C, *s)."""
        cfg = self.cfg
        b, c = images.shape[:2]
        shape = tuple(images.shape[2:])
        views, cuts = [], []
        for v in range(2):
            view = rotate_views(images, draws["rot"][:, v], cfg.rotation_axes)
            gens = [torch.Generator().manual_seed(int(s)) for s in draws["seeds"][:, v]]
            fills, wheres = [], []
            for i in range(b):
                boxes = cutout_boxes(shape, gens[i], cfg.max_drop, cfg.max_block, cfg.min_block)
                fill, where = noise_fill(c, shape, boxes, gens[i])
                fills.append(fill)
                wheres.append(where)
            fill = torch.stack(fills).to(view.device, view.dtype)
            where = torch.stack(wheres).to(view.device)
            dims = tuple(range(1, view.ndim))
            lo, hi = view.amin(dims, keepdim=True), view.amax(dims, keepdim=True)
            cut = torch.where(where, lo + (hi - lo) * fill, view)
            if cfg.mix_from_batch:
                donor = [(i // group) * group + min(int(float(u) * group), group - 1)
                         for i, u in enumerate(draws["donors"][:, v])]
                masks = [box_mask(shape, cutout_boxes(shape, gens[i], cfg.max_drop, cfg.max_block, cfg.min_block))
                         if donor[i] != i else torch.zeros((1, *shape), dtype=torch.bool) for i in range(b)]
                where2 = torch.stack(masks).to(view.device)
                cut = torch.where(where2, cut[donor], cut)
            views.append(view)
            cuts.append(cut)
        return torch.stack(views), torch.stack(cuts)

    # ---- the step ---------------------------------------------------------------------
    def forward(self, images: Tensor, sample_offset: int = 0, global_batch: int | None = None) -> MethodOutput:
        """``images`` (B, C, *patch), rows ``[sample_offset, sample_offset + B)`` of a global batch of
        ``global_batch`` (default B) -> loss (mean over samples of rot + contrast + recon parts) and previews."""
        enc = self.network.encoder
        if images.ndim != 5 or images.shape[1] != enc.in_channels:
            raise ValueError(f"swinunetr-ssl: expected images (B, {enc.in_channels}, X, Y, Z), "
                             f"got {tuple(images.shape)}")
        b = images.shape[0]
        g_batch = b if global_batch is None else int(global_batch)
        if sample_offset < 0 or sample_offset + b > g_batch:
            raise ValueError(f"swinunetr-ssl: rows [{sample_offset}, {sample_offset + b}) do not lie in a global batch "
                             f"of {g_batch}")
        group = self.group_for(b, sample_offset, g_batch)
        self.check_patch(images.shape[2:])
        draws = self.draw(g_batch, sample_offset, b)
        with torch.no_grad():
            views, cuts = self.make_views(images, draws, group)
        return self.forward_views(views, cuts, draws["rot"].to(images.device), images, group)

    def group_for(self, batch: int, sample_offset: int, global_batch: int) -> int:
        """The NT-Xent / donor group size for a rank holding ``batch`` rows from ``sample_offset``."""
        g = self.cfg.group_size or batch
        if g < 2:
            raise ValueError(f"swinunetr-ssl: NT-Xent needs at least 2 samples per group; this rank holds {batch} "
                             "(raise data.batch_size)")
        if batch % g or sample_offset % g or global_batch % g:
            raise ValueError(f"swinunetr-ssl: group_size {g} must divide the per-rank batch {batch}, the row offset "
                             f"{sample_offset} and the global batch {global_batch}")
        return g

    def forward_views(self, views: Tensor, cuts: Tensor, rot: Tensor, images: Tensor, group: int) -> MethodOutput:
        """The step for given views (2, B, C, *s), cut-out views (2, B, C, *s) and rotations (B, 2)."""
        cfg = self.cfg
        b = views.shape[1]
        inputs = cuts.flatten(0, 1)  # view 0 of every sample, then view 1
        target = views.flatten(0, 1)
        feats = self.network.encoder(inputs.contiguous(), self.network.normalize)[-1]  # (2B, 16F, *s/32)
        tokens = feats.flatten(2).transpose(1, 2)  # (2B, N, 16F)
        if cfg.head_tokens == "first":
            rot_in, con_in = tokens[:, 0], tokens[:, 1]
        else:
            rot_in = con_in = tokens.mean(1)
        rot_logits = self.rotation_head(rot_in).float()
        emb = self.contrastive_head(con_in).float()
        recon = self.recon_head(feats)
        labels = rot.transpose(0, 1).reshape(-1)  # (2B,) in the order of ``inputs``
        rot_part = F.cross_entropy(rot_logits, labels, reduction="none").view(2, b).mean(0)
        rec_part = (recon.float() - target.float()).abs().flatten(1).mean(1).view(2, b).mean(0)
        con_part = nt_xent_per_sample(emb[:b], emb[b:], cfg.temperature, group)
        per_sample = cfg.rot_weight * rot_part + cfg.contrast_weight * con_part + cfg.recon_weight * rec_part
        with torch.no_grad():
            previews = {
                "input": images[:, :1].detach(),
                "masked": cuts[0, :, :1].detach(),
                "reconstruction": recon[:b, :1].detach().to(images.dtype),
                "target": views[0, :, :1].detach(),
            }
        return MethodOutput(per_sample.mean(), previews)

    def transfer_state_dict(self) -> dict[str, Tensor]:
        """The Swin ViT's weights (``encoder.*``): what fine-tuning's ``transfer="encoder"`` moves into
        ``build_model(ModelConfig(arch="swinunetr"))``; the heads and the untrained conv decoder stay out."""
        return {k: v for k, v in self.network.state_dict().items() if k.startswith("encoder.")}
