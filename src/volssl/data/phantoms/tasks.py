"""The registries: the phantom kinds (:data:`KINDS`, :data:`PHANTOM_KINDS`, :func:`make_case`, the
random stream of every case) and the named phantom tasks (:data:`PHANTOM_TASKS`, :func:`get_task`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from volssl.data.phantoms.axons import axons_case
from volssl.data.phantoms.brain import BrainVariant, brain_case
from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.nuclei import nuclei_case
from volssl.data.phantoms.organs import organs_case

#: the phantom kinds; a kind's position is part of every case's seed
KINDS = ("brain", "nuclei", "axons", "organs")


@dataclass(frozen=True)
class _Kind:
    """A phantom kind: its case function ``make(rng, shape)``, dataset.json labels and channel names,
    the label files' dtype, whether labels are instance ids, and a one-line description."""

    make: Callable[[np.random.Generator, tuple[int, int, int] | None], PhantomCase]
    labels: dict[str, int]
    channel_names: tuple[str, ...]
    label_dtype: type
    instance: bool
    description: str


PHANTOM_KINDS: dict[str, _Kind] = {
    "brain": _Kind(brain_case, {"background": 0, "lesion": 1}, ("T1", "T2", "FLAIR"), np.uint8, False,
                   "MRI-like heads (T1, T2, FLAIR) with MS-like white-matter lesions and grey-matter mimics"),
    "nuclei": _Kind(nuclei_case, {"background": 0, "nucleus": 1}, ("XNT",), np.uint8, False,
                    "X-ray nanotomography-like neuropil with cell nuclei (semantic)"),
    "axons": _Kind(axons_case, {"background": 0, "axon": 1}, ("XNT",), np.uint16, True,
                   "X-ray nanotomography-like myelinated axons (instance ids: every id >= 1 is an axon)"),
    "organs": _Kind(organs_case, {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}, ("CT",), np.uint8, False,
                    "CT-like upper abdomens (HU, native or portal-venous) with liver, kidneys and spleen"),
}


def _variant_tag(variant: BrainVariant) -> int:
    """A stable 32-bit number for a non-default variant's random stream (crc32 of its name)."""
    import zlib

    return zlib.crc32(variant.name.encode("utf-8"))


def make_case(kind: str, seed: int, index: int, shape: tuple[int, int, int] | None = None,
              variant: BrainVariant | None = None) -> PhantomCase:
    """Case ``index`` of the phantom dataset ``(kind, seed)`` (brain: and ``variant``): what
    :func:`generate_phantoms` / :func:`generate_task` write. A default (or no) variant gives the
    ``brain`` kind's case; any other variant draws from its own stream (its name is in the seed)."""
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    if variant is not None and kind != "brain":
        raise ValueError(f"phantom variants are brain variants; kind {kind!r} takes none")
    key = [int(seed), KINDS.index(kind), int(index)]
    if variant is None or variant.is_default:
        return PHANTOM_KINDS[kind].make(np.random.default_rng(key), shape)
    return brain_case(np.random.default_rng(key + [_variant_tag(variant)]), shape, variant)


@dataclass(frozen=True)
class PhantomTask:
    """A named phantom dataset: a kind, a brain variant (None: the kind as is), a default seed."""

    name: str
    kind: str
    seed: int
    description: str
    variant: BrainVariant | None = None

    @property
    def labels(self) -> dict[str, int]:
        return self.variant.labels if self.variant is not None else dict(PHANTOM_KINDS[self.kind].labels)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(self.variant.channels) if self.variant is not None else PHANTOM_KINDS[self.kind].channel_names


#: centre B of the generalisation test: brain-lesions' lesions under another protocol and scanner
CENTRE_B = BrainVariant(name="centre-b", contrast="centre-b", noise=(0.04, 0.06), bias=(0.3, 0.45), blur=0.8,
                        spacing_factor=1.25, thick_factors=(1.5, 2.0, 2.5))

PHANTOM_TASKS: dict[str, PhantomTask] = {
    t.name: t
    for t in (
        PhantomTask("brain-lesions", "brain", 0, "MS-like white-matter lesions in T1/T2/FLAIR heads with grey-matter "
                    "mimics (centre A; the brain kind itself)", BrainVariant()),
        PhantomTask("brain-lesions-centre-b", "brain", 100, "brain-lesions seen by another centre: other T1/T2/FLAIR "
                    "contrast (spin-echo-like T1, FLAIR with incomplete CSF suppression), about twice the noise, "
                    "stronger "
                    "bias, blurrier, 1.25x coarser in-plane and 1.5-2.5x thick slices: the generalisation target",
                    CENTRE_B),
        PhantomTask("brain-tumour", "brain", 1, "one glioma-like mass per head: edema (1) around a core (2) of "
                    "enhancing rim and necrosis; T1/T2/FLAIR; grey-matter mimics",
                    BrainVariant(name="tumour", lesions="tumour")),
        PhantomTask("brain-lacunes", "brain", 2, "many small CSF-filled lacunes (1) in deep grey and white matter "
                    "among CSF spaces and CSF-like grey-matter dots; T1 and FLAIR only",
                    BrainVariant(name="lacunes", lesions="lacunes", channels=("T1", "FLAIR"))),
        PhantomTask("ct-organs", "organs", 3, "CT-like upper abdomens in HU (native or portal-venous): liver (1), "
                    "kidneys (2), spleen (3)"),
    )
}


def get_task(name: str) -> PhantomTask:
    """The phantom task ``name`` (ValueError listing the known ones)."""
    if name not in PHANTOM_TASKS:
        raise ValueError(f"unknown phantom task {name!r}; choose one of {', '.join(PHANTOM_TASKS)}")
    return PHANTOM_TASKS[name]
