"""AMAES presets: `volssl config show` prints the paper's values (Appendix A/B); tiny siblings."""
import json

import pytest

from volssl.cli import main
from volssl.config import get_preset
from volssl.presets.amaes import BRAINS_45K_VOLUMES, epoch_steps


def shown(capsys, name):
    assert main(["config", "show", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_show_amaes_unet_b_prints_the_papers_values(capsys):
    cfg = shown(capsys, "amaes-unet-b")
    assert cfg["model"]["arch"] == "unet-b"
    assert cfg["data"]["patch_size"] == [128, 128, 128] and cfg["data"]["batch_size"] == 16
    o = cfg["optim"]
    assert (o["name"], o["lr"], o["weight_decay"], o["eps"], o["amsgrad"]) == ("adamw", 1e-4, 3e-5, 1e-8, True)
    assert o["schedule"] == "cosine" and o["min_lr"] == 0.0 and o["grad_clip"] is None
    steps_per_epoch = 44_756 // 16  # one patch per BRAINS-45K volume
    assert o["warmup_steps"] == 5 * steps_per_epoch == 13_985  # 5 warm-up epochs
    assert cfg["train"]["steps"] == 100 * steps_per_epoch == 279_700  # 100 epochs
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["compile"] is True
    m = cfg["method"]
    assert (m["name"], m["token_size"], m["mask_ratio"], m["loss_masked_only"]) == ("amaes", 4, 0.6, False)
    assert (m["decoder_convs"], m["decoder_skips"]) == (1, False)  # light-weight decoder, no skips
    i = m["intensity"]
    assert i["enabled"] and i["p_noise"] == 0.2 and i["p_ghosting"] == 0.2 and i["ghosting_alpha"] == [0.85, 0.95]
    assert i["p_bias"] == 0.33 and i["p_gamma"] == 0.2 and i["gamma_range"] == [0.5, 2.0]
    assert i["low_res_zoom"] == [0.5, 1.0]
    a = cfg["augment"]
    assert a["enabled"] and a["p_elastic"] == 0.33 and a["elastic_alpha"] == [200.0, 600.0]
    assert a["elastic_sigma"] == [20.0, 30.0]
    assert (a["p_rotation"], a["rotation_deg"], a["p_scale"], a["scale_range"]) == (0.2, 30.0, 0.2, [0.9, 1.1])
    assert a["p_mirror"] == 0.0


@pytest.mark.parametrize("name,arch,batch,lr", [
    ("amaes-unet-xl", "unet-xl", 16, 1e-4), ("amaes-mednext-m", "mednext-m", 8, 5e-4),
    ("amaes-mednext-l", "mednext-l", 8, 1e-4)])
def test_batch_size_and_learning_rate_per_backbone(capsys, name, arch, batch, lr):
    cfg = shown(capsys, name)
    assert (cfg["model"]["arch"], cfg["data"]["batch_size"], cfg["optim"]["lr"]) == (arch, batch, lr)
    assert cfg["train"]["steps"] == 100 * (44_756 // batch) and cfg["optim"]["warmup_steps"] == 5 * (44_756 // batch)
    assert cfg["optim"]["amsgrad"] and cfg["method"]["name"] == "amaes"


def test_no_intensity_ablation_differs_only_in_the_intensity_switch():
    base, ablation = get_preset("amaes-unet-b"), get_preset("amaes-unet-b-no-intensity")
    assert ablation.method.intensity.enabled is False and base.method.intensity.enabled is True
    ablation.method.intensity.enabled = True
    ablation.preset, ablation.description = base.preset, base.description
    assert ablation == base


def test_skips_ablation_differs_only_in_the_decoder_skips():
    """Sec. 3's decoder ablation (skips during pre-training) is a preset and a benchmark arm with the same twin."""
    from volssl.presets.arms import get_arms

    base, ablation = get_preset("amaes-unet-b"), get_preset("amaes-unet-b-skips")
    assert ablation.method.decoder_skips is True and base.method.decoder_skips is False
    ablation.method.decoder_skips = False
    ablation.preset, ablation.description = base.preset, base.description
    assert ablation == base
    arm = get_arms()["amaes-unet-skips"]
    assert (arm.preset, arm.plan, arm.twin) == ("amaes-unet-b-skips", "amaes", "scratch-unet")
    both = get_preset("amaes-unet-b-no-intensity-skips")
    assert both.method.decoder_skips is True and both.method.intensity.enabled is False
    both.method.decoder_skips, both.method.intensity.enabled = False, True
    both.preset, both.description = base.preset, base.description
    assert both == base
    assert get_arms()["amaes-unet-no-intensity-skips"].twin == "scratch-unet"


@pytest.mark.parametrize("name,arch", [("amaes-unet-b", "unet-tiny"), ("amaes-unet-xl", "unet-tiny"),
                                       ("amaes-mednext-m", "mednext-tiny"), ("amaes-mednext-l", "mednext-tiny"),
                                       ("amaes-unet-b-no-intensity", "unet-tiny"), ("amaes-unet-b-skips", "unet-tiny"),
                                       ("amaes-unet-b-no-intensity-skips", "unet-tiny")])
def test_tiny_siblings_run_the_same_method_on_cpu_sizes(name, arch):
    real, tiny = get_preset(name), get_preset(f"{name}-tiny")
    assert tiny.model.arch == arch and tiny.data.patch_size == (64, 64, 64) and tiny.train.steps == 300
    assert tiny.method == real.method and tiny.augment == real.augment
    assert tiny.optim.name == "adamw" and tiny.optim.amsgrad and tiny.train.compile is False
    assert tiny.train.precision == "fp32"


def test_epoch_steps():
    assert epoch_steps(16) == 2797 and epoch_steps(8) == 5594 and BRAINS_45K_VOLUMES == 44_756
    assert epoch_steps(4, n_volumes=10) == 2
    with pytest.raises(ValueError, match="batch_size"):
        epoch_steps(0)
