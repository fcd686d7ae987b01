"""volssl.data.dynamic_plan: nnU-Net's target spacing rule, patch and depth from the median shape under
a memory budget, normalisation by modality, and plans of real phantom datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from volssl.config import ModelConfig
from volssl.data.dynamic_plan import (
    REFERENCE_ELEMENTS_PER_GB,
    TINY_MAX_PATCH,
    TINY_MEMORY_GB,
    ArchWidths,
    DynamicPlan,
    dynamic_plan,
    feature_map_elements,
    poolings_for,
    target_spacing,
)
from volssl.models.registry import build_model, resolve_widths

L = ArchWidths("resenc-l", *resolve_widths(ModelConfig(arch="resenc-l")))
TINY = ArchWidths("resenc-tiny", *resolve_widths(ModelConfig(arch="resenc-tiny")))


def _fp(spacings, shapes, modalities=("non-CT",), relative=0.9, labels=2, n_cases=None):
    props = {"n_samples": 100, "mean": 40.0, "std": 20.0, "percentile_00_5": -50.0, "percentile_99_5": 150.0}
    return {
        "spacings": spacings, "shapes_after_crop": shapes, "channel_names": [f"c{i}" for i in range(len(modalities))],
        "modalities": list(modalities), "foreground_intensity_properties_per_channel": [props] * len(modalities),
        "median_relative_size_after_cropping": relative, "labels": {f"l{i}": i for i in range(labels)},
        "n_cases": n_cases or len(spacings),
    }


def test_target_spacing_median_and_anisotropy_rule():
    iso = np.array([[1.0, 1.0, 1.0], [0.8, 0.9, 1.2], [1.2, 1.1, 1.0]])
    spacing, axis = target_spacing(iso, np.full((3, 3), 100))
    np.testing.assert_allclose(spacing, [1.0, 1.0, 1.0])
    assert axis is None
    # ACDC-like: thick slices (median 10 mm) and few of them: the 10th percentile of that axis
    sp = np.array([[1.5, 1.5, 10.0]] * 8 + [[1.5, 1.5, 5.0]] * 2)
    sizes = np.array([[200, 200, 10]] * 10)
    spacing, axis = target_spacing(sp, sizes)
    assert axis == 2 and spacing[2] == pytest.approx(np.percentile(sp[:, 2], 10)) and spacing[2] < 10.0
    # anisotropic spacing but not few voxels along it: the median is kept
    spacing, axis = target_spacing(sp, np.array([[200, 200, 150]] * 10))
    assert axis is None and spacing[2] == 10.0
    # the low-resolution axis never gets finer than the other axes
    spacing, _ = target_spacing(np.array([[1.0, 1.0, 10.0]] * 7 + [[1.0, 1.0, 0.5]] * 3), sizes)
    assert spacing[2] == pytest.approx(1.0 + 1e-5)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        target_spacing(np.zeros((0, 3)), np.zeros((0, 3)))


def test_feature_map_count_matches_the_network():
    """The estimate counts the output of every conv of our ResEnc U-Net (hooks on the real network)."""
    import torch

    patch, n = (32, 24, 16), 2
    widths = dict(features=L.features[: n + 1], blocks=L.blocks[: n + 1], strides=L.strides[: n + 1])
    net = build_model(ModelConfig(arch="resenc-l", in_channels=1, out_channels=3, **widths), device="meta")
    net.deep_supervision = True
    counted = []
    hooks = [m.register_forward_hook(lambda m, i, o: counted.append(o.numel()))
             for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    net(torch.zeros(1, 1, *patch, device="meta"))
    for h in hooks:
        h.remove()
    assert feature_map_elements(patch, out_channels=3, **widths) == sum(counted)


def test_patch_depth_and_budget():
    brain = _fp([[1.0, 1.0, 1.0]] * 4, [[170, 200, 170]] * 4)
    small, big = dynamic_plan(brain, L, 8.0), dynamic_plan(brain, L, 24.0)
    for d in (small, big):
        assert d.info["fits_budget"] and d.info["feature_map_elements"] <= d.info["budget_elements"]
        assert d.info["poolings"] == 5 and all(p % 32 == 0 for p in d.patch_size)  # full ResEncL depth
        assert d.model == {"features": L.features, "blocks": L.blocks, "strides": L.strides}
        assert all(p <= m + 31 for p, m in zip(d.patch_size, (170, 200, 170)))  # the median shape, padded up
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    assert big.info["budget_elements"] == pytest.approx(REFERENCE_ELEMENTS_PER_GB * 24)
    # the largest axis relative to the median shape (y: 200) keeps the largest size
    assert big.patch_size[1] == max(big.patch_size)
    # small images: the patch is the (padded) median shape and the network as deep as it allows
    tiny_imgs = _fp([[1.0, 1.0, 1.0]] * 3, [[40, 40, 20]] * 3)
    d = dynamic_plan(tiny_imgs, L, 24.0)
    assert d.patch_size == (40, 40, 20) and d.info["poolings"] == 2 and d.info["bottleneck"] == [10, 10, 5]
    assert d.model["features"] == (32, 64, 128) and d.model["strides"] == (1, 2, 2)
    assert poolings_for((40, 40, 20), 5) == 2 and poolings_for((512, 512, 512), 5) == 5
    assert poolings_for((6, 6, 6), 5) == 1  # at least one pooling (two stages)


def test_tiny_limits_and_anisotropic_target():
    big = _fp([[0.8, 0.8, 2.5]] * 3, [[512, 512, 150]] * 3, modalities=("CT",))
    d = dynamic_plan(big, TINY, TINY_MEMORY_GB, TINY_MAX_PATCH)
    assert max(d.patch_size) <= 64 and d.info["fits_budget"]
    assert d.model["features"] == TINY.features[: d.info["stages"]]
    assert json.loads(json.dumps(d.to_dict())) == d.to_dict()
    again = DynamicPlan.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again.patch_size == d.patch_size and again.model == d.model and again.plan == d.plan
    with pytest.raises(ValueError, match="max_patch"):
        dynamic_plan(big, TINY, 1.0, 4)
    with pytest.raises(ValueError, match="memory_budget_gb"):
        dynamic_plan(big, TINY, 0.0)
    with pytest.raises(ValueError, match="strides"):
        ArchWidths("x", (8, 16), (1, 1), (2, 2))


def test_normalisation_by_modality():
    ct = dynamic_plan(_fp([[1.0] * 3] * 2, [[64] * 3] * 2, modalities=("CT", "non-CT")), TINY, 1.0)
    assert ct.plan.normalization == "ct" and ct.plan.ct_intensities[1] is None
    assert ct.plan.ct_intensities[0] == {"mean": 40.0, "std": 20.0, "percentile_00_5": -50.0, "percentile_99_5": 150.0}
    mr = dynamic_plan(_fp([[1.0] * 3] * 2, [[64] * 3] * 2), TINY, 1.0)
    assert mr.plan.normalization == "zscore" and mr.plan.ct_intensities is None
    skull_stripped = dynamic_plan(_fp([[1.0] * 3] * 2, [[64] * 3] * 2, relative=0.5), TINY, 1.0)
    assert skull_stripped.plan.normalization == "zscore_nonzero"
    assert mr.plan.name == "dynamic" and mr.plan.label_interpolation == "linear"
    assert mr.plan.rules.min_fov_mm is None and mr.plan.rules.min_file_bytes is None
    no_fg = _fp([[1.0] * 3] * 2, [[64] * 3] * 2, modalities=("CT",))
    no_fg["foreground_intensity_properties_per_channel"] = [{"n_samples": 0}]
    with pytest.raises(ValueError, match="no foreground intensities"):
        dynamic_plan(no_fg, TINY, 1.0)


def test_plans_of_phantom_tasks(tmp_path):
    """Different phantom tasks get different plans: CT normalisation with the organs' HU statistics, the
    coarser, thick-sliced centre B a coarser target spacing and a shallower network."""
    from volssl.data.fingerprint import dataset_fingerprint
    from volssl.data.phantoms import generate_task

    plans = {}
    for task in ("brain-lesions", "brain-lesions-centre-b", "ct-organs"):
        raw = generate_task(tmp_path / task, task, 3, n_test=0, shape=(40, 40, 40), progress=False)
        plans[task] = dynamic_plan(dataset_fingerprint(raw, progress=False), TINY, TINY_MEMORY_GB, TINY_MAX_PATCH)
    a, b, ct = plans["brain-lesions"], plans["brain-lesions-centre-b"], plans["ct-organs"]
    assert a.plan.normalization == b.plan.normalization == "zscore"
    assert ct.plan.normalization == "ct"
    hu = ct.plan.ct_intensities[0]
    assert 20 < hu["mean"] < 180 and hu["percentile_00_5"] > -300 and hu["percentile_99_5"] < 400  # soft-tissue HU
    assert max(b.plan.target_spacing) > 1.5 * max(a.plan.target_spacing)
    assert b.info["poolings"] <= a.info["poolings"]
    for d in plans.values():
        assert all(p % 2 ** d.info["poolings"] == 0 for p in d.patch_size) and max(d.patch_size) <= 64
