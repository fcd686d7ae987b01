"""Configuration as data: presets hold the papers' values, overrides are typed, JSON round-trips."""
import json

import pytest

from volssl.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
    load_config,
    resolve,
    save_config,
)


def test_every_real_preset_has_a_tiny_sibling():
    names = set(list_presets())
    real = {n for n in names if not n.endswith("-tiny")}
    assert {"s3d-b", "s3d-l"} <= real
    for n in real:
        assert f"{n}-tiny" in names, f"preset {n} lacks a -tiny CPU sibling"
        assert get_preset(f"{n}-tiny").method.name == get_preset(n).method.name


def test_s3d_presets_hold_the_paper_values():
    b = get_preset("s3d-b")
    assert b.data.patch_size == (160, 160, 160) and b.data.batch_size == 6
    assert b.train.steps == 250_000 and b.model.arch == "resenc-l"
    assert b.optim.name == "sgd" and b.optim.lr == 1e-2 and b.optim.momentum == 0.99 and b.optim.nesterov
    assert b.optim.weight_decay == 3e-5 and b.optim.schedule == "poly" and b.optim.poly_exponent == 0.9
    assert b.method.mask_ratio_range == (0.6, 0.9)
    assert b.method.loss_masked_only and b.method.mask_input and b.method.densify
    l = get_preset("s3d-l")
    assert (l.data.batch_size, l.optim.lr, l.train.steps) == (48, 3e-2, 1_000_000)
    assert l.model.arch == b.model.arch


def test_json_round_trip_of_every_preset(tmp_path):
    for name in list_presets():
        cfg = get_preset(name)
        d = config_to_dict(cfg)
        json.dumps(d)  # JSON-able
        assert config_from_dict(d) == cfg
        save_config(cfg, tmp_path / f"{name}.json")
        assert load_config(tmp_path / f"{name}.json") == cfg


def test_overrides_are_typed():
    cfg = resolve("s3d-b", ["optim.lr=3e-3", "data.patch_size=96,96,96", "method.mask_ratio_range=none",
                            "train.compile=true", "train.steps=1e3", "optim.grad_clip=none"])
    assert cfg.optim.lr == 3e-3 and cfg.data.patch_size == (96, 96, 96)
    assert cfg.method.mask_ratio_range is None and cfg.train.compile is True and cfg.train.steps == 1000
    assert cfg.optim.grad_clip is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "no such field"),
        ("nope.lr=1", "no field"),
        ("train.steps=abc", "expected an integer"),
        ("data.patch_size=1,2", "expected 3 values"),
        ("train.compile=maybe", "true/false"),
        ("optim", "key=value"),
        ("optim=1", "is a group"),
        ("method.name=unknown-method", "unknown method"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        resolve("s3d-b-tiny", [override])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="s3d-b"):
        get_preset("s3d-xxl")


def test_unknown_field_in_saved_config_is_rejected():
    d = config_to_dict(get_preset("s3d-b"))
    d["optim"]["lr_typo"] = 1
    with pytest.raises(ValueError, match="lr_typo"):
        config_from_dict(d)


def test_method_swap_by_override_resets_method_fields():
    cfg = apply_overrides(get_preset("s3d-b"), ["method.name=none"])
    assert cfg.method.name == "none"
