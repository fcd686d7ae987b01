"""Data-parallel training through ``torchrun`` (one process per GPU, any number of nodes).

``torchrun --nproc_per_node G [--nnodes N --rdzv_endpoint HOST:PORT] -m volssl pretrain ...`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them and joins the process group (NCCL on CUDA, gloo on the CPU). Without them it returns a
single-process :class:`DistInfo` and touches nothing.

The global batch ``B`` (``data.batch_size``) is split into ``B / W`` rows per rank (see
``data/patches.make_loader``); gradients are averaged by ``DistributedDataParallel``. Only rank 0
writes logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the data-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device | str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables (idempotent).

    ``device`` picks the backend: NCCL for CUDA devices, gloo otherwise. Returns the single-process
    :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistInfo()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside [0, WORLD_SIZE={world})")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {name} is unset: launch with torchrun")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", local) if cuda else None)
    return DistInfo(rank, world, local)


def cleanup() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; ``tensor`` itself when single-process)."""
    if not info.enabled:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is True on at least one (a collective: call it on all ranks)."""
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def local_rows(global_batch: int, info: DistInfo) -> tuple[int, int]:
    """``(offset, rows)`` of this rank's share of a global batch; ValueError unless W divides B."""
    if global_batch % info.world_size:
        raise ValueError(f"data.batch_size={global_batch} is not divisible by the {info.world_size} "
                         "data-parallel processes; choose a multiple of WORLD_SIZE")
    rows = global_batch // info.world_size
    return info.rank * rows, rows


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` (unchanged when single-process).

    ``static_graph=True``: the set of parameters that get gradients is the same every step (true for
    every method here), which also tolerates pre-training-only parameters without gradients.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, static_graph=True)
