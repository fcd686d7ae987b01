"""MAE-XNT presets hold the paper's values (Sec. 3, supplement Tables 4 and 7) and have CPU siblings."""
import pytest

from volssl.config import config_from_dict, config_to_dict, get_preset, list_presets
from volssl.methods.mae_xnt import MAEXNTConfig


def test_mae_xnt_holds_the_papers_values():
    c = get_preset("mae-xnt")
    assert c.model.arch == "vit-b-unetr" and c.data.patch_size == (64, 64, 64) and c.data.batch_size == 320
    assert isinstance(c.method, MAEXNTConfig) and c.method.mask_ratio == 0.9 and c.method.decoder_depth == 2
    assert not c.method.norm_pix_loss
    o = c.optim
    assert o.name == "adamw" and o.lr == pytest.approx(1.5e-4 * 320 / 256) and o.weight_decay == 0.05
    assert o.betas == (0.9, 0.95) and o.schedule == "cosine" and o.min_lr == pytest.approx(o.lr / 10)
    assert o.warmup_steps == 10 * 3_000 and c.train.steps == 300 * 3_000  # 10 + 290 epochs of 960k crops
    assert c.train.precision == "bf16"
    assert c.data.sampling == "size" and c.data.symmetries and c.data.crop_zscore
    assert not c.augment.enabled  # the cube symmetries are the only augmentation


@pytest.mark.parametrize("name, ratio, arch, batch", [
    ("mae-xnt-r75", 0.75, "vit-b-unetr", 224), ("mae-xnt-r80", 0.80, "vit-b-unetr", 256),
    ("mae-xnt-r85", 0.85, "vit-b-unetr", 280), ("mae-xnt-r90", 0.90, "vit-b-unetr", 320),
    ("mae-xnt-p8", 0.90, "vit-b-unetr-p8", 1792),
])
def test_table_4_rows(name, ratio, arch, batch):
    c = get_preset(name)
    assert (c.method.mask_ratio, c.model.arch, c.data.batch_size) == (ratio, arch, batch)
    assert c.optim.lr == pytest.approx(1.5e-4 * batch / 256)
    assert c.train.steps == 300 * (960_000 // batch) and c.optim.warmup_steps == 10 * (960_000 // batch)
    tiny = get_preset(f"{name}-tiny")
    assert tiny.method.mask_ratio == ratio and tiny.model.arch.endswith("-tiny")
    assert ("-p8" in tiny.model.arch) == ("-p8" in arch)


def test_tiny_siblings_run_on_the_cpu_and_round_trip():
    names = [n for n in list_presets() if n.startswith("mae-xnt")]
    assert len(names) == 12
    for name in names:
        c = get_preset(name)
        assert config_from_dict(config_to_dict(c)) == c
    t = get_preset("mae-xnt-tiny")
    assert t.model.arch == "vit-unetr-tiny" and t.data.patch_size == (32, 32, 32) and t.train.precision == "fp32"
    assert t.optim.name == "adamw" and t.optim.betas == (0.9, 0.95) and t.optim.lr == 1e-3
    assert t.method.decoder_dim % 6 == 0 and t.method.decoder_dim % t.method.decoder_heads == 0
