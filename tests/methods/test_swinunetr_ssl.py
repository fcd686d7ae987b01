"""SwinUNETR SSL (Tang et al. 2022): rotations and their labels, cut-outs, NT-Xent, per-sample loss and the
global-batch contract, transfer into the fine-tuning network, presets, recipe, and a tiny run whose loss falls."""
import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss

from volssl.cli import main
from volssl.config import ModelConfig, get_preset, resolve
from volssl.finetuning.recipes import get_recipe
from volssl.finetuning.transfer import transfer_weights
from volssl.methods import MethodOutput, build_method
from volssl.methods.swinunetr_ssl import (
    SwinUNETRSSL,
    SwinUNETRSSLConfig,
    cutout_boxes,
    noise_fill,
    nt_xent_per_sample,
    rotate_views,
)
from volssl.models.registry import build_model

PATCH = (64, 32, 32)  # the cheapest patch with two bottleneck tokens (2 x 1 x 1) and a square rotation plane


def make(**kw) -> SwinUNETRSSL:
    torch.manual_seed(0)
    return SwinUNETRSSL(build_model(ModelConfig(arch="swinunetr-tiny")), SwinUNETRSSLConfig(**kw))


def smooth(n, seed=1, patch=PATCH):
    low = torch.randn(n, 1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=patch, mode="trilinear", align_corners=True)


# ----------------------------------------------------------------------------- rotations
def test_rotation_moves_a_marker_where_rot90_in_the_y_z_plane_puts_it():
    x = torch.zeros(4, 1, 4, 8, 8)
    x[:, 0, 3, 1, 5] = 1.0  # marker at (x=3, y=1, z=5)
    out = rotate_views(x, [0, 1, 2, 3])
    # k quarter turns from y towards z: (y, z) -> (7 - z, y) per turn (side 8)
    expected = [(3, 1, 5), (3, 2, 1), (3, 6, 2), (3, 5, 6)]
    for k, pos in enumerate(expected):
        assert out[k, 0].nonzero().tolist() == [list(pos)], k
    with pytest.raises(ValueError, match="equal sides"):
        rotate_views(torch.zeros(1, 1, 8, 8, 4), [1])


def test_each_views_rotation_label_is_the_rotation_applied_to_it():
    method = make(max_drop=0.0)  # no cut-outs: the views are the rotated inputs
    x = torch.zeros(4, 1, *PATCH)
    x[:, 0, 40, 3, 20] = 5.0
    torch.manual_seed(7)
    draws = method.draw(global_batch=4, sample_offset=0, batch=4)
    views, cuts = method.make_views(x, draws, group=4)
    assert torch.equal(views, cuts)
    turns = {0: (3, 20), 1: (31 - 20, 3), 2: (31 - 3, 31 - 20), 3: (20, 31 - 3)}
    for v in range(2):
        for i in range(4):
            k = int(draws["rot"][i, v])
            assert views[v, i, 0].nonzero().tolist() == [[40, *turns[k]]], (v, i, k)
    assert set(draws["rot"].flatten().tolist()) <= {0, 1, 2, 3}


# ----------------------------------------------------------------------------- cut-outs
def test_cutout_boxes_lie_inside_the_patch_and_follow_the_authors_sizes():
    shape = (64, 32, 32)
    drops = []
    for seed in range(40):
        boxes = cutout_boxes(shape, torch.Generator().manual_seed(seed), max_drop=0.3, max_block=0.25, min_block=0.05)
        covered = torch.zeros(shape, dtype=torch.bool)
        for box in boxes:
            for s, side in zip(box, shape):
                assert 0 <= s.start < s.stop <= side
                assert s.stop - s.start < int(0.25 * side)  # side < max_block * patch side
                assert s.start < side - int(0.05 * side)
            covered[box] = True
        drops.append(covered.float().mean().item())
    assert max(drops) <= 0.3 + (16 * 8 * 8) / (64 * 32 * 32)  # the target plus at most one more box
    assert min(drops) < 0.1 < max(drops)  # U(0, 0.3) of the patch


def test_noise_cutouts_stay_in_the_views_range_and_leave_the_rest_alone():
    method = make(mix_from_batch=False)
    x = smooth(2)
    torch.manual_seed(3)
    views, cuts = method.make_views(x, method.draw(2, 0, 2), group=2)
    for v in range(2):
        for i in range(2):
            view, cut = views[v, i], cuts[v, i]
            changed = cut != view
            assert changed.any()
            assert cut.min() >= view.min() - 1e-6 and cut.max() <= view.max() + 1e-6
    # the fill itself: min-max scaled noise in [0, 1] exactly where the boxes are
    gen = torch.Generator().manual_seed(0)
    boxes = cutout_boxes(PATCH, gen, 0.3)
    assert boxes
    fill, where = noise_fill(1, PATCH, boxes, gen)
    assert fill.min() >= 0 and fill.max() <= 1 and torch.all(fill[~where] == 0)
    last = fill[(slice(None), *boxes[-1])]  # the last box is never overwritten: its noise spans [0, 1]
    assert last.min() == 0 and last.max() == 1


def test_donor_cutouts_copy_another_sample_of_the_group():
    method = make(max_drop=0.3, mix_from_batch=True)
    x = torch.stack([torch.full((1, *PATCH), float(i)) for i in range(4)])  # samples of values ~0, 1, 2, 3
    x = x + 0.01 * smooth(4)
    torch.manual_seed(11)
    draws = method.draw(4, 0, 4)
    _, cuts = method.make_views(x, draws, group=2)
    copied = 0
    for v in range(2):
        for i in range(4):
            partner = i ^ 1  # groups {0, 1} and {2, 3}
            values = set(cuts[v, i].round().unique().tolist())
            assert values <= {float(i), float(partner)}, (v, i, values)  # noise stays in range; donors in-group
            donor = 2 * (i // 2) + int(float(draws["donors"][i, v]) * 2)
            assert (float(partner) in values) == (donor != i)  # the authors' rule: no second pass from itself
            copied += donor != i
    assert copied > 0


# ----------------------------------------------------------------------------- NT-Xent
def test_nt_xent_matches_monai_and_prefers_identical_views():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    per = nt_xent_per_sample(z1, z2, 0.5)
    torch.testing.assert_close(per.mean(), ContrastiveLoss(temperature=0.5)(z1, z2))
    grouped = nt_xent_per_sample(z1, z2, 0.5, group_size=3)
    for g in range(2):
        rows = slice(3 * g, 3 * g + 3)
        torch.testing.assert_close(grouped[rows].mean(), ContrastiveLoss(temperature=0.5)(z1[rows], z2[rows]))
    same = nt_xent_per_sample(z1, z1.clone(), 0.5)
    assert same.mean() < per.mean()
    assert torch.all(same < nt_xent_per_sample(z1, torch.randn(6, 16, generator=gen), 0.5))
    with pytest.raises(ValueError, match="groups of 4"):
        nt_xent_per_sample(z1, z2, 0.5, group_size=4)


# ----------------------------------------------------------------------------- the step
def test_forward_returns_loss_previews_and_trains_encoder_and_heads_only():
    method = make()
    out = method(smooth(2))
    assert isinstance(out, MethodOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.previews) == {"input", "masked", "reconstruction", "target"}
    assert all(p.shape == (2, 1, *PATCH) and not p.requires_grad for p in out.previews.values())
    out.loss.backward()
    assert not any(p.requires_grad for p in method.network.decoder.parameters())
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert method.network.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_loss_is_the_mean_of_per_sample_parts():
    method = make()
    x = smooth(4)
    torch.manual_seed(5)
    draws = method.draw(4, 0, 4)
    with torch.no_grad():
        views, cuts = method.make_views(x, draws, group=4)
        out = method.forward_views(views, cuts, draws["rot"], x, group=4)
        feats = method.network.encoder(cuts.flatten(0, 1), True)[-1]
        tokens = feats.flatten(2).transpose(1, 2)
        rot = F.cross_entropy(method.rotation_head(tokens[:, 0]), draws["rot"].t().reshape(-1))
        emb = method.contrastive_head(tokens[:, 1])
        con = ContrastiveLoss(temperature=0.5)(emb[:4], emb[4:])
        rec = F.l1_loss(method.recon_head(feats), views.flatten(0, 1))
    torch.testing.assert_close(out.loss, rot + con + rec)  # the authors' 1/1/1 sum
    heavy = dataclasses.replace(method.cfg, rot_weight=2.0)
    method.cfg = heavy
    with torch.no_grad():
        out2 = method.forward_views(views, cuts, draws["rot"], x, group=4)
    torch.testing.assert_close(out2.loss - out.loss, rot)


def test_two_ranks_compute_what_one_process_computes_with_groups():
    method = make(group_size=2)
    x = smooth(4)
    torch.manual_seed(9)
    with torch.no_grad():
        full = method(x)
        torch.manual_seed(9)
        a = method(x[:2], sample_offset=0, global_batch=4)
        torch.manual_seed(9)
        b = method(x[2:], sample_offset=2, global_batch=4)
    torch.testing.assert_close((a.loss + b.loss) / 2, full.loss)
    for name in full.previews:
        torch.testing.assert_close(torch.cat([a.previews[name], b.previews[name]]), full.previews[name])
    with pytest.raises(ValueError, match="group_size 2 must divide"):
        method(x[:3], sample_offset=0, global_batch=4)


def test_bad_patches_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match="one bottleneck token"):
        make().check_patch((32, 32, 32))
    with pytest.raises(ValueError, match="rotation plane"):
        make().check_patch((64, 64, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        make().check_patch((64, 48, 48))
    with pytest.raises(ValueError, match="head_tokens"):
        make(head_tokens="cls")
    with pytest.raises(ValueError, match="recon_head"):
        make(recon_head="linear")
    with pytest.raises(ValueError, match="at least 2 samples"):
        make()(smooth(1))
    cfg = get_preset("swinunetr-ssl-tiny")
    cfg.model = ModelConfig(arch="resenc-tiny")
    with pytest.raises(ValueError, match="SwinUNETR backbone"):
        build_method(cfg)


@pytest.mark.parametrize("recon_head, head_tokens", [("deconv", "first"), ("vae", "mean")])
def test_head_variants_run(recon_head, head_tokens):
    method = make(recon_head=recon_head, head_tokens=head_tokens)
    out = method(smooth(2))
    assert torch.isfinite(out.loss) and out.previews["reconstruction"].shape == (2, 1, *PATCH)


# ----------------------------------------------------------------------------- transfer
def test_transfer_moves_every_swin_encoder_key_into_the_fine_tuning_network():
    method = make()
    method(smooth(2)).loss.backward()
    sd = method.transfer_state_dict()
    encoder_keys = {k for k in method.network.state_dict() if k.startswith("encoder.")}
    assert set(sd) == encoder_keys and not any("head" in k for k in sd)
    target = build_model(ModelConfig(arch="swinunetr-tiny", in_channels=2, out_channels=3))
    report = transfer_weights(target, sd, transfer="encoder")
    assert set(report.moved) | set(report.replicated) == encoder_keys
    assert report.replicated == ["encoder.patch_embed.proj.weight"]
    assert all(k.startswith("decoder.") for k in report.new)
    got = target.state_dict()
    for k in encoder_keys - {"encoder.patch_embed.proj.weight"}:
        assert torch.equal(got[k], sd[k]), k
    torch.testing.assert_close(got["encoder.patch_embed.proj.weight"],
                               sd["encoder.patch_embed.proj.weight"].repeat(1, 2, 1, 1, 1) / 2)


def test_fine_tuning_recipes_use_the_authors_settings():
    r = get_recipe("swinunetr")
    assert r.transfer == "encoder" and not r.deep_supervision and r.patch_size == (96, 96, 96) and r.batch_size == 4
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.schedule) == ("adamw", 1e-4, 1e-5, "cosine")
    assert [(s.steps, s.lr) for s in r.stages] == [(1_200, "warmup"), (118_800, "decay")]
    s = get_recipe("scratch-swinunetr")
    assert s.transfer == "none" and s.arch == "swinunetr" and not s.deep_supervision
    assert get_recipe("scratch-swinunetr-tiny").arch == "swinunetr-tiny"


# ----------------------------------------------------------------------------- presets
def test_presets_print_the_authors_values(capsys):
    assert main(["config", "show", "swinunetr-ssl", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"]["patch_size"] == [96, 96, 96] and cfg["data"]["batch_size"] == 4
    assert cfg["model"]["arch"] == "swinunetr" and cfg["train"]["steps"] == 100_000
    o = cfg["optim"]
    assert (o["name"], o["lr"], o["weight_decay"]) == ("adamw", 4e-4, 0.1)
    assert (o["schedule"], o["warmup_steps"], o["grad_clip"]) == ("cosine", 500, None)
    m = cfg["method"]
    assert m["name"] == "swinunetr-ssl"
    assert (m["rot_weight"], m["contrast_weight"], m["recon_weight"]) == (1.0, 1.0, 1.0)
    assert m["temperature"] == 0.5 and (m["max_drop"], m["max_block"], m["min_block"]) == (0.3, 0.25, 0.05)
    assert cfg["augment"]["enabled"] is False
    tiny = get_preset("swinunetr-ssl-tiny")
    assert tiny.model.arch == "swinunetr-tiny" and tiny.data.patch_size == (64, 64, 64)
    assert tiny.method == get_preset("swinunetr-ssl").method and tiny.optim.lr == 4e-4
    assert isinstance(build_method(tiny), SwinUNETRSSL)


# ----------------------------------------------------------------------------- a tiny run
def batches(global_batch, patch):
    def factory(start, rank, world):
        rows = global_batch // world
        for k in itertools.count(start):
            x = smooth(global_batch, seed=k, patch=patch)
            yield {"image": x[rank * rows:(rank + 1) * rows]}
    return factory


@pytest.mark.slow
def test_a_tiny_pretraining_lowers_the_loss(tmp_path):
    from volssl.training.logging import read_scalars
    from volssl.training.trainer import pretrain

    steps = 20
    cfg = resolve("swinunetr-ssl-tiny", [
        f"train.steps={steps}", "data.batch_size=4", "data.patch_size=64,32,32", "data.num_workers=0",
        "train.device=cpu", "train.log_every=1", f"train.checkpoint_every={steps}", f"train.preview_every={steps}",
        "optim.lr=1e-3", "optim.warmup_steps=3"])
    summary = pretrain(cfg, None, tmp_path, batches=batches(4, (64, 32, 32)), progress=False)
    assert summary["status"] == "finished"
    losses = [r["loss"] for r in read_scalars(tmp_path / "scalars.csv")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    ckpt = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert set(ckpt["network"]) == {k for k in ckpt["network"] if k.startswith("encoder.")}
    assert ckpt["model"]["arch"] == "swinunetr-tiny"
