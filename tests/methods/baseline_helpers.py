"""Shared helpers of the S3D-paper baselines' tests (Models Genesis, VolumeFusion, VoCo): brain-phantom
BatchFactories for their tiny ``pretrain`` runs, and the Appendix A recipe as ``volssl config show`` prints it."""
from __future__ import annotations

import itertools
import json
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

BatchFactory = Callable[[int, int, int], Iterator[dict]]


def brain_volumes(patch: Sequence[int], seed: int = 0, n_cases: int = 3) -> list[torch.Tensor]:
    """The z-scored T1, T2 and FLAIR volumes (48^3 each) of ``n_cases`` brain phantoms that hold ``patch``."""
    from volssl.data.phantoms import make_case

    vols = []
    for i in range(n_cases):
        for c in make_case("brain", seed, i, shape=(48, 48, 48)).images.astype(np.float32):
            if all(d >= p for d, p in zip(c.shape, patch)):
                vols.append(torch.from_numpy((c - c.mean()) / (c.std() + 1e-6)))
    return vols


def random_batch(vols: list[torch.Tensor], batch: int, patch: Sequence[int], g: torch.Generator) -> torch.Tensor:
    """``(batch, 1, *patch)``: for each row a volume and a patch start drawn from ``g``, in that order."""
    out = []
    for _ in range(batch):
        v = vols[int(torch.randint(len(vols), (1,), generator=g))]
        s = [int(torch.randint(0, d - p + 1, (1,), generator=g)) for d, p in zip(v.shape, patch)]
        out.append(v[s[0]:s[0] + patch[0], s[1]:s[1] + patch[1], s[2]:s[2] + patch[2]][None])
    return torch.stack(out)


def phantom_batches(batch: int, patch: Sequence[int], seed: int = 0, n_cases: int = 3) -> BatchFactory:
    """A BatchFactory of z-scored single-channel patches of brain phantoms (T1, T2, FLAIR as volumes):
    step ``k``'s global batch is drawn from a generator seeded with ``(seed, k)``; rank ``r`` of ``world``
    gets its rows."""
    vols = brain_volumes(patch, seed, n_cases)

    def factory(start, rank, world):
        rows = batch // world
        for k in itertools.count(start):
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            yield {"image": random_batch(vols, batch, patch, g)[rank * rows:(rank + 1) * rows]}

    return factory


def phantom_pool(batch: int, patch: Sequence[int], n_batches: int, seed: int = 0) -> BatchFactory:
    """``n_batches`` fixed batches of z-scored single-channel brain-phantom patches, and a BatchFactory
    cycling through them (a method's own random draws are still fresh at every step)."""
    vols = brain_volumes(patch, seed)
    g = torch.Generator().manual_seed(seed)
    pool = [random_batch(vols, batch, patch, g) for _ in range(n_batches)]

    def factory(start, rank, world):
        rows = batch // world
        for k in itertools.count(start):
            yield {"image": pool[k % n_batches][rank * rows:(rank + 1) * rows]}

    return factory


def shown_appendix_a_preset(capsys, name: str, patch_size: Sequence[int], batch_size: int) -> dict:
    """``volssl config show NAME --json`` as a dict, after asserting Appendix A's shared recipe: ResEncL,
    250k steps, SGD lr 1e-2 poly, momentum 0.99, weight decay 3e-5; and the given patch and batch size."""
    from volssl.cli import main

    assert main(["config", "show", name, "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["arch"] == "resenc-l" and cfg["data"]["patch_size"] == list(patch_size)
    assert cfg["data"]["batch_size"] == batch_size and cfg["train"]["steps"] == 250_000
    assert (cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"]["schedule"], cfg["optim"]["momentum"],
            cfg["optim"]["weight_decay"]) == ("sgd", 1e-2, "poly", 0.99, 3e-5)
    return cfg
