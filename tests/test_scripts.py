"""The measurement scripts that docs/evidence.md cites (scripts/ is not a package: loaded by path)."""
from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def oracle(load_script):
    return load_script("xnt_target_predictability")


@pytest.mark.parametrize("kind", ["nuclei", "axons"])
def test_the_oracles_score_mae_xnts_own_target(oracle, kind):
    """MAE-XNT regresses the z-scored voxels (norm_pix_loss off): predicting 0 scores exactly 1, knowing each
    token's mean scores less, and the noise-free volume less still. The norm-pix target (MAE's option,
    which the first version of the script used by mistake) is a different number."""
    clean, noisy = oracle.clean_and_noisy(0, shape=(32, 32, 32), kind=kind)
    structures = oracle.structures_only(0, shape=(32, 32, 32), kind=kind)
    voxels = oracle.oracle_losses(clean, noisy, structures=structures, target="voxels")
    assert voxels["the crop mean (0)"] == pytest.approx(1.0, abs=1e-9)
    assert voxels["clean volume"] < voxels["each token's true mean"] < 1.0
    assert voxels["structures only"] < 1.0
    norm_pix = oracle.oracle_losses(clean, noisy, structures=structures, target="norm-pix")
    assert norm_pix["each token's mean (norm-pix: 0)"] == pytest.approx(1.0, abs=1e-4)  # std + 1e-6
    assert norm_pix["structures only"] != pytest.approx(voxels["structures only"], abs=1e-3)
    with pytest.raises(ValueError, match="target"):
        oracle.oracle_losses(clean, noisy, target="pixels")


def test_the_structures_keep_the_random_state(oracle):
    """Zeroing the textures must not change which objects are drawn: the structures-only volume differs
    from the clean one only by the texture, so it explains a large share of it."""
    clean, _ = oracle.clean_and_noisy(1, shape=(32, 32, 32), kind="axons")
    structures = oracle.structures_only(1, shape=(32, 32, 32), kind="axons")
    assert structures.shape == clean.shape
    assert not np.allclose(structures, clean)
    assert np.corrcoef(structures.ravel(), clean.ravel())[0, 1] > 0.5
    # a texture-free volume of the same seed drawn twice is identical
    np.testing.assert_array_equal(structures, oracle.structures_only(1, shape=(32, 32, 32), kind="axons"))


def test_demo_draws_summarises_gain_floors_and_intervals(tmp_path, capsys, load_script):
    """Two synthetic demo folders: the per-draw gains, their mean, the floor counts per seed and the
    both-learned mean come out as computed by hand."""
    demo_draws = load_script("demo_draws")
    runs = {3: [(50.0, 40.0), (30.0, 0.0), (60.0, 58.0)], 4: [(40.0, 44.0), (0.0, 0.0), (52.0, 50.0)]}
    for draw, pairs in runs.items():
        folder = tmp_path / f"d{draw}"
        folder.mkdir()
        rows = [{"init": init, "seed": s, "dice": d / 100, "nsd": 0.0}
                for s, (a, b) in enumerate(pairs) for init, d in (("s3d", a), ("scratch", b))]
        (folder / "results.json").write_text(json.dumps({"seed": draw, "runs": rows}))
    demo_draws.main([str(tmp_path / "d4"), str(tmp_path / "d3")])
    out = capsys.readouterr().out
    assert out.index("draw 3:") < out.index("draw 4:")
    assert "gain +14.0" in out and "gain -0.7" in out  # (10 + 30 + 2) / 3 and (-4 + 0 + 2) / 3
    assert "2 draws: mean gain +6.7" in out
    assert "seed 1: at the floor S3D 1/2, scratch 2/2" in out
    assert "both arms learned: 4 pairs, mean difference +2.5" in out  # 10, 2, -4, 2
    with pytest.raises(SystemExit, match="results.json not found"):
        demo_draws.main([str(tmp_path / "missing")])


def test_visible_context_predictors_use_only_the_visible_tokens(load_script):
    """The visible-context predictors never read a removed token: changing the removed voxels leaves every
    prediction unchanged. On a smooth crop (structure far coarser than a token) interpolation beats the
    crop mean by a wide margin; on white noise nothing does."""
    vc = load_script("xnt_visible_context")
    rng = np.random.default_rng(0)
    removed = vc.token_masks(1, 8, 0.75)[0]
    assert removed.sum() == 512 - int(512 * 0.25)
    smooth = ndimage_smooth(rng.standard_normal((32, 32, 32)), 4.0)
    vox_removed = vc.voxel_mask(removed)
    assert vox_removed.shape == (32, 32, 32) and vox_removed.sum() == 64 * removed.sum()
    changed = smooth.copy()
    changed[vox_removed] = 7.0
    a, b = vc.predictions(smooth, removed), vc.predictions(changed, removed)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], err_msg=name)
    smooth_scores = vc.score([smooth], [removed])
    assert smooth_scores["voxel interpolation, sigma 4 voxels"] < 0.5 * smooth_scores["crop mean (0)"]
    noise = rng.standard_normal((32, 32, 32))
    noise = (noise - noise.mean()) / noise.std()
    noise_scores = vc.score([noise], [removed])
    assert min(noise_scores.values()) > 0.97


def ndimage_smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    s = ndimage.gaussian_filter(a, sigma)
    return (s - s.mean()) / s.std()


def test_floor_runs_scores_tell_an_under_confident_run_from_one_behind_its_input(load_script):
    fr = load_script("floor_runs")
    target = np.zeros((8, 8, 8), bool)
    target[2:4, 2:4, 2:4] = True
    ranked = np.where(target, 0.4, 0.1)  # ranks the target first, never crosses 0.5
    assert fr.auc(ranked, target) == 1.0 and fr.auc(1 - ranked, target) == 0.0
    assert fr.auc(np.full(target.shape, 0.3), target) == 0.5  # ties count 1/2
    assert np.isnan(fr.auc(ranked, np.zeros_like(target)))
    s = fr.case_scores(ranked, target)
    assert s == {"auc": 1.0, "p_fg": pytest.approx(0.4), "p_max": pytest.approx(0.4)}
    assert fr.reading(0.0, s["auc"], 0.99) == "under-confident"
    assert fr.reading(0.0, 0.95, 0.99) == "behind its input"  # a raw channel ranks the target better
    assert fr.reading(30.0, 0.6, 0.99) == "learns"
    with pytest.raises(ValueError, match="differ in shape"):
        fr.case_scores(ranked, target[:4])
