"""Recipes: the paper's rows as data, -tiny siblings, overrides, the lr of every step over the stages."""
import dataclasses

import pytest

from volssl.finetuning.recipes import (
    RECIPES, TINY_MAX_LR, Stage, get_recipe, list_recipes, lr_at_step, resolve_recipe, stage_at, tiny_optim,
)


def test_the_s3d_recipe_is_table_2s_best_row():
    r = get_recipe("s3d")
    assert r.transfer == "all" and r.optim.lr == 1e-3 and r.optim.schedule == "poly"
    assert [(s.steps, s.trainable, s.lr) for s in r.stages] == [
        (12_500, "decoder", "warmup"), (12_500, "all", "warmup"), (250_000, "all", "decay")]
    assert r.total_steps == r.train.steps == 275_000  # Table 8's longest schedule
    assert r.stem_init == "replicate" and not r.train_stem_with_decoder  # Table 6
    assert r.optim.name == "sgd" and r.optim.momentum == 0.99 and r.optim.weight_decay == 3e-5
    assert not r.intensity.enabled and r.augment.enabled and r.foreground_prob == 0.33


def test_every_recipe_has_a_tiny_sibling_with_the_same_stage_structure():
    names = list_recipes()
    assert {"s3d", "s3d-lr1e-2", "s3d-lr1e-4", "s3d-no-warmup", "s3d-frozen-encoder", "s3d-encoder",
            "scratch"} <= set(names)
    regime = {"amaes", "scratch-amaes-schedule"}  # trained with cpu_regime (docs/evidence.md, AMAES)
    for name in (n for n in names if not n.endswith("-tiny") and n not in regime):
        big, tiny = get_recipe(name), get_recipe(f"{name}-tiny")
        assert [(s.name, s.trainable, s.lr) for s in big.stages] == [(s.name, s.trainable, s.lr) for s in tiny.stages]
        assert 100 <= tiny.total_steps <= 500 and tiny.train.precision == "fp32"
        assert (tiny.transfer, tiny.deep_supervision) == (big.transfer, big.deep_supervision)
        # the CPU optimiser: AdamW, lr rescaled for the shorter run, schedule and clipping kept
        assert tiny.optim == tiny_optim(big, tiny.total_steps)
        assert tiny.optim.name == "adamw" and 0 < tiny.optim.lr <= TINY_MAX_LR
        assert (tiny.optim.schedule, tiny.optim.warmup_steps, tiny.optim.grad_clip) == (
            big.optim.schedule, big.optim.warmup_steps, big.optim.grad_clip)
    # tiny_optim's documented examples: SGD rows 2e-3 * lr / 1e-3 (capped), AdamW rows lr x step compression
    assert [get_recipe(f"{n}-tiny").optim.lr for n in ("s3d", "s3d-lr1e-4", "scratch", "mae-xnt")] == \
        pytest.approx([2e-3, 2e-4, 2e-3, 1e-3], rel=1e-12)
    assert get_recipe("s3d-tiny").optim.weight_decay == 1e-2  # SGD rows; AdamW rows keep theirs
    assert get_recipe("mae-xnt-tiny").optim.weight_decay == get_recipe("mae-xnt").optim.weight_decay


def test_the_amaes_tiny_siblings_train_with_the_s3d_tiny_regime():
    # the AMAES -tiny recipe as such did not learn on CPU (tuning draw: 4.8 / 0.0 Dice from scratch);
    # its siblings share the S3D -tiny training regime and keep what the method transfers, plan and network
    ref = get_recipe("scratch-s3d-schedule-tiny")
    for name in ("amaes", "scratch-amaes-schedule"):
        big, tiny = get_recipe(name), get_recipe(f"{name}-tiny")
        assert tiny.optim == dataclasses.replace(ref.optim, eps=big.optim.eps, betas=big.optim.betas)
        assert tiny.total_steps == ref.total_steps == 300 and tiny.deep_supervision
        assert (tiny.augment.p_mirror, tiny.augment.scale_range, tiny.augment.p_elastic) == (
            ref.augment.p_mirror, ref.augment.scale_range, 0.0)
        assert (tiny.transfer, tiny.plan, tiny.intensity.enabled, tiny.augment.p_rotation) == (
            big.transfer, big.plan, big.intensity.enabled, big.augment.p_rotation)
    # the papers' recipes are untouched
    assert get_recipe("amaes").optim.amsgrad and not get_recipe("amaes").deep_supervision


def test_scratch_recipes_train_everything_with_random_init():
    scratch = get_recipe("scratch")
    assert scratch.transfer == "none" and scratch.optim.lr == 1e-2 and scratch.intensity.enabled
    assert [(s.trainable, s.lr) for s in scratch.stages] == [("all", "decay")]
    assert scratch.arch == "resenc-l" and scratch.patch_size == (160, 160, 160)
    matched = get_recipe("scratch-s3d-schedule")
    assert [s.steps for s in matched.stages] == [s.steps for s in get_recipe("s3d").stages]
    assert all(s.trainable == "all" for s in matched.stages) and matched.optim.lr == 1e-3
    assert get_recipe("scratch-tiny").arch == "resenc-tiny"
    assert get_recipe("s3d-tiny").arch is None and get_recipe("s3d-tiny").patch_size is None  # the checkpoint's


def test_frozen_encoder_and_encoder_only_rows():
    assert [s.trainable for s in get_recipe("s3d-frozen-encoder").stages] == ["decoder", "decoder"]
    assert get_recipe("s3d-encoder").transfer == "encoder"
    assert [len(get_recipe(n).stages) for n in ("s3d-no-warmup", "s3d-one-warmup")] == [1, 2]


def test_lr_per_step_warms_up_linearly_in_each_warmup_stage_then_decays_poly():
    r = resolve_recipe("s3d", stage_steps=[4, 2, 5])
    lrs = [lr_at_step(r, s) for s in range(11)]
    peak = 1e-3
    expected = [peak * k / 4 for k in (1, 2, 3, 4)] + [peak / 2, peak] + \
               [peak * (1 - k / 5) ** 0.9 for k in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lr_at_step(r, 11) == 0.0  # the schedule's position after the last update
    assert [stage_at(r, s) for s in (0, 3, 4, 5, 6, 10, 11)] == [(0, 0), (0, 3), (1, 0), (1, 1), (2, 0), (2, 4), (2, 5)]


def test_overrides_of_fields_and_stages():
    r = resolve_recipe("s3d-tiny", ["optim.lr=1e-2", "stages.2.steps=7", "stages.0.trainable=all", "batch_size=3",
                                    "patch_size=32,32,32"], seed=5)
    assert r.optim.lr == 1e-2 and r.batch_size == 3 and r.patch_size == (32, 32, 32) and r.train.seed == 5
    assert [s.steps for s in r.stages] == [25, 25, 7] and r.train.steps == 57 and r.stages[0].trainable == "all"
    assert get_recipe("s3d-tiny").stages[2].steps == 250  # the registry is untouched
    assert resolve_recipe("s3d", stage_steps=[1, 2, 3]).train.steps == 6


@pytest.mark.parametrize("overrides, match", [
    (["train.steps=10"], "sum of the stage lengths"),
    (["stages=[]"], "stage field"),
    (["stages.3.steps=1"], "has 3 stages"),
    (["stages.0.trainable=encoder"], "stages.0.trainable"),
    (["stages.1.lr=cosine"], "stages.1.lr"),
    (["stages.1.steps=0"], "stages.1.steps"),
    (["transfer=some"], "transfer"),
    (["optim.warmup_steps=5"], "warm-ups are stages"),
    (["foreground_prob=2"], "foreground_prob"),
    (["no_such=1"], "no such field"),
])
def test_bad_overrides_are_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_recipe("s3d", overrides)


def test_unknown_recipes_and_stage_step_counts():
    with pytest.raises(KeyError, match="known: "):
        get_recipe("nope")
    with pytest.raises(ValueError, match="has 3 stages"):
        resolve_recipe("s3d", stage_steps=[1, 2])
    assert all(isinstance(s, Stage) for name in RECIPES for s in get_recipe(name).stages)
