"""Synthetic 3D data (``volssl phantoms``): MRI-like heads with lesions, X-ray-nanotomography-like
cell nuclei and myelinated axons, written as nnU-Net v2 raw datasets.

They are the demo's, the tests' and the benchmarks' data, so they are built to be worth learning
from: the target cannot be found by thresholding intensities, a network needs context, and the
images carry structure (anatomy, texture) that self-supervised pre-training can learn.

``brain``
    Heads built from deformed ellipsoids: scalp, skull (with marrow), CSF, folded cortex (sulci are
    the zero sheets of a band-limited random field), white matter, deep grey nuclei, lateral and
    third ventricles, cerebellum, brainstem, eyes, face/neck soft tissue. Channels T1, T2, FLAIR
    (different intensity tables of the same subject), a smooth multiplicative bias field per
    channel, partial-volume blur and Rician noise. The label is "lesion": MS-like ovoid lesions
    placed in white matter (often periventricular), bright in T2/FLAIR, dark in T1. Lesion-like
    *mimics* with the same intensities are placed in grey matter and labelled background, and CSF
    and the eyes are as bright as lesions in T2, so intensity alone is not enough: the network must
    know where white matter is. Geometry varies per case: axis permutations/flips in the affine
    (about one case in four is stored RAS), in-plane spacing 0.8-1 mm (default size) or 1.5-2 mm
    (``shape`` given) and one thick axis of 1-3x the in-plane spacing.
``nuclei``
    Dense textured neuropil, cell somata, and nuclei (label 1): large ellipsoids only slightly
    brighter than the background, with chromatin clumps, a dark nucleolus and a thin dark envelope;
    nucleus-sized bright mimics without chromatin or envelope, blood vessels, tomographic ring
    artifacts and noise. One channel ("XNT"), isotropic 1 mm spacing (a stand-in unit, chosen so
    that 64+ voxel volumes pass the S3D field-of-view filter), RAS affine.
``axons``
    Bundles of roughly aligned, smoothly wandering tubes of varying radius that cross the volume,
    each with a dark myelin sheath; the inside of an axon has the background's mean intensity, so
    the sheaths are what separates instances. The label is an instance map (uint16, one id per
    axon, the intracellular space only; sheaths and background are 0). One channel ("XNT"),
    isotropic 1 mm spacing, RAS affine.

``organs``
    CT-like upper abdomens in Hounsfield units (one channel, "CT"): air, subcutaneous and visceral
    fat, abdominal wall muscle, ribs and a vertebra, bowel loops with gas and fluid, stomach, aorta
    and vena cava, and the labelled organs liver (1, with vessels), kidneys (2, cortex and medulla
    around a fatty sinus) and spleen (3). Each case is either a native or a portal-venous scan (the
    organs' HU change together, vessels get brighter), so liver and spleen overlap in intensity and
    only shape and position separate them. Random axis order and flips (half the cases RAS); in-plane
    spacing 2.6-3 mm and 2-2.6 mm slices at the default 128 x 128 x 96 (~1 s to make), 5-6 mm and 3-4 mm at
    64^3 (an FOV of 330-390 x 330-390 x 190-250 mm whatever the shape), int16 HU in [-1024, 3071].

Brain variants (:class:`BrainVariant`) change the acquisition ("centre"): the contrast table of each
channel (:data:`BRAIN_CONTRASTS`: a T1/T2/FLAIR weighting profile), which channels are written,
noise and bias-field strength, blur, in-plane spacing and slice thickness; and the lesion type:
``"wm-lesions"`` (the default above), ``"tumour"`` (one large mass: a core (label 2) of enhancing
rim and necrosis inside white-matter edema (label 1)) or ``"lacunes"`` (many small CSF-filled
cavities in deep grey and white matter, label 1, among CSF spaces that look the same). The default
variant is exactly the ``brain`` kind (same random draws, same bytes).

Phantom tasks (:data:`PHANTOM_TASKS`, ``volssl phantoms --task NAME``) are named datasets with
their own seed, variant and labels, for the benchmark table: ``brain-lesions``, ``brain-tumour``,
``brain-lacunes``, ``ct-organs``, and ``brain-lesions-centre-b`` (the lesions of
``brain-lesions`` seen by another "centre": other contrast, more noise and bias, coarser in-plane
spacing and thick slices; the target of a fine-tune-on-A, predict-on-B generalisation test, as
D2 -> D13 in the S3D paper's Table 7).

Images are stored as int16 NIfTI (``.nii.gz``), labels as uint8 (uint16 for axons). Every case is a
pure function of ``(seed, kind, case index)`` (and the variant, for non-default variants): the same
seed gives byte-identical files (gzip with a zero timestamp), a different seed a different
dataset, and case ``i`` does not depend on ``n``. The per-case functions (:func:`brain_case`,
:func:`nuclei_case`, :func:`axons_case`, :func:`organs_case`) return a :class:`PhantomCase` in memory.

Sizes and the S3D quality filter (FOV >= 50 mm, spacing <= 6.5 mm, file >= 200 kB), measured with
this writer (int16, gzip level 1): a default brain case (``shape=None``: FOV 160-190 mm, 0.8-1 mm
in-plane) has 60-240 voxels per axis and 3-11 MB per channel file, 0.3-1 GB of memory and a few
seconds to make; ``shape=(64, 64, 64)`` brains have a FOV of ~100-130 mm and ~220-350 kB per
channel, except thick-slice cases whose thick axis has 32 voxels (2x spacing, ~170 kB: below the
200 kB rule), and every brain under ~56^3 voxels is below 200 kB (48^3: 120-140 kB). Nuclei/axons files are
~380 kB at 64^3, ~255 kB at 56^3 and ~160 kB at 48^3; under 50 voxels their FOV is also < 50 mm.
A 96^3 brain takes ~0.3 s, a 128^3 nuclei/axons volume ~1.5-2.5 s on one core.

Modules (each imports only from the ones above it)::

    case.py      PhantomCase, the in-memory result of every generator
    fields.py    shared helpers: smooth random fields, rotations, boxes, textures and noise,
                 orientation and affines, quantisation, the X-ray nanotomography acquisition
    brain.py     the brain kind: tissue and contrast tables, BrainVariant, brain_case
    nuclei.py    the nuclei kind: nuclei_case
    axons.py     the axons kind: axons_case
    organs.py    the organs kind: organs_case
    tasks.py     the registries: KINDS, PHANTOM_KINDS, make_case (the seeds), PHANTOM_TASKS
    io.py        write_nifti, generate_phantoms, generate_task (nnU-Net v2 raw datasets)
    preview.py   render_phantom_preview (matplotlib, imported when drawn)
"""
from __future__ import annotations

from volssl.data.phantoms.axons import AXON_TISSUES, axons_case
from volssl.data.phantoms.brain import (
    BRAIN_CHANNELS,
    BRAIN_CONTRASTS,
    BRAIN_LESION_TYPES,
    BRAIN_TISSUES,
    BrainVariant,
    brain_case,
)
from volssl.data.phantoms.case import PhantomCase
from volssl.data.phantoms.io import FILE_ENDING, FORMAT_VERSION, generate_phantoms, generate_task, write_nifti
from volssl.data.phantoms.nuclei import NUCLEI_TISSUES, nuclei_case
from volssl.data.phantoms.organs import ORGAN_TISSUES, organs_case
from volssl.data.phantoms.preview import render_phantom_preview
from volssl.data.phantoms.tasks import (
    CENTRE_B,
    KINDS,
    PHANTOM_KINDS,
    PHANTOM_TASKS,
    PhantomTask,
    get_task,
    make_case,
)

__all__ = [
    "AXON_TISSUES",
    "BRAIN_CHANNELS",
    "BRAIN_CONTRASTS",
    "BRAIN_LESION_TYPES",
    "BRAIN_TISSUES",
    "CENTRE_B",
    "FILE_ENDING",
    "FORMAT_VERSION",
    "KINDS",
    "NUCLEI_TISSUES",
    "ORGAN_TISSUES",
    "PHANTOM_KINDS",
    "PHANTOM_TASKS",
    "BrainVariant",
    "PhantomCase",
    "PhantomTask",
    "axons_case",
    "brain_case",
    "generate_phantoms",
    "generate_task",
    "get_task",
    "make_case",
    "nuclei_case",
    "organs_case",
    "render_phantom_preview",
    "write_nifti",
]
