"""nnssl -> volssl checkpoint import, tested with state dicts built to dynamic-network-architectures'
ResidualEncoderUNet layout (key names, aliases and shapes written out here from that layout)."""
import json
import pickle

import pytest
import torch

from volssl.cli import main
from volssl.config import ModelConfig
from volssl.models.checkpoint_import import convert_nnssl, map_dna_state_dict
from volssl.models.registry import build_model
from volssl.training.checkpoint import load_checkpoint

SMALL = dict(features=[8, 16, 32], blocks=[1, 2, 2], strides=[1, 2, 2])


def dna_state_dict(in_ch, out_ch, features, blocks, strides, device="cpu", seed=0):
    """A ResidualEncoderUNet state dict as DNA writes it: every ConvDropoutNormReLU has ``conv``/``norm``
    plus ``all_modules.0``/``all_modules.1`` aliases; the decoder holds the encoder again."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def t(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=gen)

    def cdnr(prefix, cin, cout, k, bias=True):
        w = t(cout, cin, k, k, k)
        parts = {"conv.weight": w, "norm.weight": t(cout), "norm.bias": t(cout)}
        if bias:
            parts["conv.bias"] = t(cout)
        for name, v in parts.items():
            sd[f"{prefix}.{name}"] = v
            sd[f"{prefix}.{name.replace('conv.', 'all_modules.0.').replace('norm.', 'all_modules.1.')}"] = v

    cdnr("encoder.stem.convs.0", in_ch, features[0], 3)
    cin = features[0]
    for s, (f, n, st) in enumerate(zip(features, blocks, strides)):
        for j in range(n):
            p = f"encoder.stages.{s}.blocks.{j}"
            c_in, stride = (cin, st) if j == 0 else (f, 1)
            cdnr(f"{p}.conv1", c_in, f, 3)
            cdnr(f"{p}.conv2", f, f, 3)
            if c_in != f:  # skip = [AvgPool (if strided), ConvDropoutNormReLU 1x1, no bias]
                cdnr(f"{p}.skip.{1 if stride != 1 else 0}", c_in, f, 1, bias=False)
        cin = f
    for k in [k for k in sd if k.startswith("encoder.")]:
        sd["decoder." + k] = sd[k]
    for s in range(1, len(features)):
        below, skip = features[-s], features[-(s + 1)]
        sd[f"decoder.transpconvs.{s - 1}.weight"] = t(below, skip, strides[-s], strides[-s], strides[-s])
        sd[f"decoder.transpconvs.{s - 1}.bias"] = t(skip)
        cdnr(f"decoder.stages.{s - 1}.convs.0", 2 * skip, skip, 3)
        sd[f"decoder.seg_layers.{s - 1}.weight"] = t(out_ch, skip, 1, 1, 1)
        sd[f"decoder.seg_layers.{s - 1}.bias"] = t(out_ch)
    return sd


def plan(features, blocks, strides, in_ch=1):
    n = len(features)
    return {
        "architecture_plans": {
            "arch_class_name": "ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n, "strides": [[s, s, s] for s in strides],
                "n_blocks_per_stage": blocks, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
        },
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "configurations": {"spacing": [1, 1, 1]}},
        "pretrain_num_input_channels": in_ch,
        "recommended_downstream_patchsize": [160, 160, 160],
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
    }


def write_nnssl(path, weights, adaptation_plan=None, **extra):
    ckpt = {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "current_epoch": 7, "init_args": {"fold": 0}, "trainer_name": "SparkTrainer",
            **extra}
    if adaptation_plan is not None:
        ckpt["nnssl_adaptation_plan"] = adaptation_plan
    torch.save(ckpt, path)
    return path


def test_resenc_l_layout_maps_one_to_one():
    """Full-size ResEncL key names and shapes (meta tensors: no memory) map onto ours."""
    spec = dict(features=[32, 64, 128, 256, 320, 320], blocks=[1, 3, 4, 6, 6, 6], strides=[1, 2, 2, 2, 2, 2])
    source = dna_state_dict(1, 1, **spec, device="meta")
    target = build_model(ModelConfig(arch="resenc-l"), device="meta").state_dict()
    mapped, report = map_dna_state_dict(source, target)
    heads = [k for k in target if k.startswith("decoder.seg_layers.")]
    assert report.mapped == len(target) - len(heads) == len(mapped)
    assert sorted(report.dropped) == sorted(heads) and report.missing == []
    assert report.aliases == len(source) - len(target)  # every all_modules.* and decoder.encoder.* copy


def test_cli_import_writes_a_checkpoint_that_loads_into_the_network(tmp_path, capsys):
    src = write_nnssl(tmp_path / "checkpoint_final.pth", dna_state_dict(1, 1, **SMALL), plan(**SMALL))
    dst = tmp_path / "imported.pt"
    assert main(["import-checkpoint", "--format", "nnssl", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    ckpt = load_checkpoint(dst)  # weights_only=True
    net = build_model(ModelConfig(**{k: v for k, v in ckpt["model"].items()}))
    n_heads = sum(k.startswith("decoder.seg_layers.") for k in net.state_dict())
    assert f"mapped {len(net.state_dict()) - n_heads} tensors, dropped {n_heads}" in out
    assert ckpt["kind"] == "import" and ckpt["optimizer"] is None and ckpt["encoder_keys"] == "encoder."
    assert tuple(ckpt["model"]["features"]) == (8, 16, 32) and ckpt["config"]["data"]["patch_size"] == [160] * 3
    missing, unexpected = net.load_state_dict(ckpt["network"], strict=False)
    assert unexpected == [] and all(k.startswith("decoder.seg_layers.") for k in missing)
    src_w = torch.load(src, weights_only=True)["network_weights"]
    assert torch.equal(net.encoder.stages[1].blocks[0].skip[1].conv.weight,
                       src_w["encoder.stages.1.blocks.0.skip.1.conv.weight"])


def test_shape_mismatch_is_refused_naming_key_and_shapes(tmp_path, capsys):
    weights = dna_state_dict(1, 1, **SMALL)
    bad = "encoder.stages.2.blocks.1.conv1.conv.weight"
    weights[bad] = torch.zeros(32, 32, 5, 5, 5)
    src = write_nnssl(tmp_path / "bad.pth", weights, plan(**SMALL))
    assert main(["import-checkpoint", "--format", "nnssl", str(src), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert bad in err and "(32, 32, 3, 3, 3)" in err and "(32, 32, 5, 5, 5)" in err
    assert not (tmp_path / "out.pt").exists()


def test_without_a_plan_the_arch_decides_and_wrong_arch_is_refused(tmp_path):
    src = write_nnssl(tmp_path / "noplan.pth", dna_state_dict(2, 1, **SMALL))
    with pytest.raises(ValueError, match="do not fit the target architecture"):
        convert_nnssl(src, arch="resenc-tiny")


def test_tiny_arch_without_plan_imports_with_in_channels_from_the_stem(tmp_path):
    spec = dict(features=[8, 16, 32, 64], blocks=[1, 1, 2, 2], strides=[1, 2, 2, 2])  # resenc-tiny's widths
    src = write_nnssl(tmp_path / "noplan.pth", dna_state_dict(2, 1, **spec))
    payload, report = convert_nnssl(src, arch="resenc-tiny")
    assert payload["model"]["arch"] == "resenc-tiny" and payload["model"]["in_channels"] == 2
    assert report.mapped == len(payload["network"]) > 0


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    src = tmp_path / "evil.pth"
    torch.save({"network_weights": dna_state_dict(1, 1, **SMALL), "init_args": Evil()}, src, pickle_protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_nnssl(src)
    assert not (tmp_path / "pwned").exists()


def test_numpy_values_in_the_plan_are_accepted_and_stored_plain(tmp_path):
    import numpy as np

    p = plan(**SMALL)
    p["pretrain_plan"]["configurations"]["spacing"] = np.array([1.0, 1.0, 1.0])
    src = write_nnssl(tmp_path / "np.pth", dna_state_dict(1, 1, **SMALL), p)
    payload, _ = convert_nnssl(src)
    assert payload["source"]["adaptation_plan"]["pretrain_plan"]["configurations"]["spacing"] == [1.0, 1.0, 1.0]
    pickle.dumps(payload["source"])  # plain Python
    json.dumps(payload["source"]["adaptation_plan"])


def test_not_a_resenc_state_dict_is_refused(tmp_path):
    src = tmp_path / "primus.pth"
    torch.save({"network_weights": {"eva.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, src)
    with pytest.raises(ValueError, match="not a ResidualEncoderUNet state dict"):
        convert_nnssl(src)
    p = plan(**SMALL)
    p["architecture_plans"] = {"arch_class_name": "PrimusM", "arch_kwargs": None}
    src = write_nnssl(tmp_path / "primus2.pth", dna_state_dict(1, 1, **SMALL), p)
    with pytest.raises(ValueError, match="'PrimusM' is not a ResEnc U-Net"):
        convert_nnssl(src)


@pytest.mark.parametrize("group, key, value, ours", [
    ("nonlin_kwargs", "negative_slope", 0.2, "0.01"),
    ("norm_op_kwargs", "eps", 1e-3, "1e-05"),
    ("norm_op_kwargs", "affine", False, "True"),
])
def test_plan_norm_eps_or_leaky_slope_other_than_ours_is_refused(tmp_path, group, key, value, ours):
    """Our ResEnc fixes InstanceNorm eps 1e-5 (affine) and LeakyReLU slope 0.01: another value in the
    plan is refused, naming the file, the key and both values (the weights would load but compute
    another function)."""
    p = plan(**SMALL)
    p["architecture_plans"]["arch_kwargs"][group] = {**(p["architecture_plans"]["arch_kwargs"][group] or {}),
                                                     key: value}
    src = write_nnssl(tmp_path / "other.pth", dna_state_dict(1, 1, **SMALL), p)
    with pytest.raises(ValueError) as e:
        convert_nnssl(src)
    msg = str(e.value)
    assert str(src) in msg and f"{group}.{key}" in msg and repr(value) in msg and ours in msg


def test_default_plan_values_and_absent_kwargs_are_imported(tmp_path):
    """The plan nnssl writes (eps 1e-05, affine, inplace LeakyReLU without a slope), explicit defaults,
    and plans without the kwargs all import (absent values are torch's defaults: ours)."""
    variants = [
        {},  # as nnssl writes it
        {"nonlin_kwargs": {"inplace": True, "negative_slope": 0.01}, "norm_op_kwargs": {"eps": 1e-5, "affine": True}},
        {"nonlin_kwargs": None, "norm_op_kwargs": None},
        {"nonlin_kwargs": {}, "norm_op_kwargs": {"affine": True}},
    ]
    for i, change in enumerate(variants):
        p = plan(**SMALL)
        p["architecture_plans"]["arch_kwargs"].update(change)
        src = write_nnssl(tmp_path / f"ok{i}.pth", dna_state_dict(1, 1, **SMALL), p)
        payload, report = convert_nnssl(src)
        assert tuple(payload["model"]["features"]) == (8, 16, 32) and report.mapped == len(payload["network"]) > 0
