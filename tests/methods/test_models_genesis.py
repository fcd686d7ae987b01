"""Models Genesis: each deformation on hand-made inputs (data/genesis_transforms.py), the official
probabilities, the restoration pair and loss, data-parallel rows, a tiny pre-training on brain phantoms
whose loss decreases, and a checkpoint that fine-tuning accepts."""

import numpy as np
import pytest
import torch

from volssl.config import ModelConfig, get_preset, resolve
from volssl.data import genesis_transforms as G
from volssl.methods import MethodOutput, build_method
from volssl.methods.models_genesis import ModelsGenesis, ModelsGenesisConfig, restoration_loss
from volssl.models.registry import build_model
from baseline_helpers import phantom_batches, shown_appendix_a_preset  # tests/methods/ (see conftest.py)

PATCH = (32, 32, 32)


def make(**kw) -> ModelsGenesis:
    torch.manual_seed(0)
    return ModelsGenesis(build_model(ModelConfig(arch="resenc-tiny")), ModelsGenesisConfig(**kw))


def ramp(shape=(1, 12, 10, 8)) -> torch.Tensor:
    """Distinct values 0, 1, 2, ... in row-major order (a permutation is visible as such)."""
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).view(shape)


# --------------------------------------------------------------------------- the deformations
def test_minmax_rescale_per_sample_and_channel():
    x = torch.stack([torch.stack([torch.linspace(-3, 5, 64).view(4, 4, 4), torch.full((4, 4, 4), 7.0)]),
                     torch.stack([torch.linspace(10, 11, 64).view(4, 4, 4), torch.linspace(0, 2, 64).view(4, 4, 4)])])
    y = G.minmax_rescale(x)
    torch.testing.assert_close(y[0, 0], torch.linspace(0, 1, 64).view(4, 4, 4))
    torch.testing.assert_close(y[1, 0], torch.linspace(0, 1, 64).view(4, 4, 4))
    assert torch.equal(y[0, 1], torch.zeros(4, 4, 4))  # a constant channel maps to 0


def test_pixel_shuffling_permutes_each_window_and_leaves_the_rest():
    x = torch.stack([ramp()[0], -ramp()[0]])  # two channels: the same permutation for both
    starts, sizes = torch.tensor([[2, 3, 1]]), torch.tensor([[4, 3, 5]])
    y = G.local_pixel_shuffle(x, starts, sizes, torch.Generator().manual_seed(0))
    win = (slice(None), slice(2, 6), slice(3, 6), slice(1, 6))
    assert torch.equal(y[win].flatten(1).sort(1).values, x[win].flatten(1).sort(1).values)  # same multiset
    assert not torch.equal(y[win], x[win])  # 60 values: not left in order
    assert torch.equal(y[1], -y[0])
    outside = torch.ones_like(x, dtype=torch.bool)
    outside[win] = False
    assert torch.equal(y[outside], x[outside])


def test_pixel_shuffling_later_windows_overwrite_earlier_ones_across_chunks():
    x = ramp()
    first, second = (slice(0, 6), slice(0, 6), slice(0, 4)), (slice(3, 9), slice(2, 8), slice(2, 6))
    starts, sizes = torch.tensor([[0, 0, 0], [3, 2, 2]]), torch.tensor([[6, 6, 4], [6, 6, 4]])
    for chunk in (1, 1024):  # the second window in the same chunk, or in a later one
        y = G.local_pixel_shuffle(x, starts, sizes, torch.Generator().manual_seed(1), chunk=chunk)
        w2 = (slice(None),) + second
        assert torch.equal(y[w2].flatten().sort().values, x[w2].flatten().sort().values)  # the later window wins
        only_first = torch.zeros_like(x, dtype=torch.bool)
        only_first[(slice(None),) + first] = True
        only_first[w2] = False
        assert set(y[only_first].tolist()) <= set(x[(slice(None),) + first].flatten().tolist())
    # the permutation keys are drawn in the same order whatever the chunking: identical results
    a = G.local_pixel_shuffle(x, *G.draw_shuffle_windows(x.shape[1:], 300, 0.3, torch.Generator().manual_seed(2)),
                              torch.Generator().manual_seed(3), chunk=7)
    b = G.local_pixel_shuffle(x, *G.draw_shuffle_windows(x.shape[1:], 300, 0.3, torch.Generator().manual_seed(2)),
                              torch.Generator().manual_seed(3), chunk=1024)
    assert torch.equal(a, b)


def test_shuffle_windows_follow_the_official_ranges():
    starts, sizes = G.draw_shuffle_windows((64, 40, 20), 5000, 0.1, torch.Generator().manual_seed(0))
    assert sizes.min() == 1 and sizes.max(0).values.tolist() == [6, 4, 2]  # 1 .. side // 10
    assert bool((starts >= 0).all()) and bool((starts + sizes <= torch.tensor([64, 40, 20])).all())
    with pytest.raises(ValueError, match="inside the patch"):
        G.local_pixel_shuffle(ramp(), torch.tensor([[10, 0, 0]]), torch.tensor([[3, 1, 1]]))


@pytest.mark.parametrize("inverted", [False, True])
def test_bezier_map_is_monotone_with_the_official_endpoints(inverted):
    v = torch.linspace(0, 1, 2001)
    for seed in range(20):
        inner = torch.rand(2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        points = torch.cat([torch.zeros(1, 2, dtype=torch.float64), inner, torch.ones(1, 2, dtype=torch.float64)])
        f = G.nonlinear_map(v, points, inverted, n_times=20_000)
        steps = f.diff()
        if inverted:  # the official "flip" branch: f(0) = 1, f(1) = 0, decreasing
            assert f[0].item() == pytest.approx(1.0) and f[-1].item() == pytest.approx(0.0, abs=1e-12)
            assert bool((steps <= 1e-6).all())
        else:
            assert f[0].item() == pytest.approx(0.0, abs=1e-12) and f[-1].item() == pytest.approx(1.0)
            assert bool((steps >= -1e-6).all())
        assert bool(((f >= 0) & (f <= 1)).all())
    # the identity control points (straight line) give the identity map
    line = torch.tensor([[0.0, 0.0], [1 / 3, 1 / 3], [2 / 3, 2 / 3], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(G.nonlinear_map(v, line, False), v, atol=1e-5, rtol=0)


def test_bezier_curve_runs_from_the_last_to_the_first_control_point_and_interp_is_numpys():
    points = torch.tensor([[0.0, 0.0], [0.9, 0.2], [0.1, 0.7], [1.0, 1.0]], dtype=torch.float64)
    xs, ys = G.bezier_curve(points, 11)
    assert (xs[0].item(), ys[0].item()) == (1.0, 1.0) and (xs[-1].item(), ys[-1].item()) == (0.0, 0.0)
    t = 0.3  # the Bernstein weights of the official code: point i gets C(3, i) t^(3-i) (1-t)^i
    want = 3 * t ** 2 * (1 - t) * 0.9 + 3 * t * (1 - t) ** 2 * 0.1 + (1 - t) ** 3
    assert xs[3].item() == pytest.approx(want)
    rng = np.random.default_rng(0)
    xp = np.sort(rng.random(50))
    xp[10] = xp[11]  # a repeated knot
    fp = rng.random(50)
    q = rng.random(1000) * 1.4 - 0.2  # also beyond the knots (constant there)
    got = G.interp(torch.from_numpy(q), torch.from_numpy(xp), torch.from_numpy(fp)).numpy()
    np.testing.assert_allclose(got[np.abs(q - xp[10]) > 1e-9], np.interp(q, xp, fp)[np.abs(q - xp[10]) > 1e-9],
                               atol=1e-12)


def test_out_painting_keeps_only_the_inner_boxes():
    x = torch.full((2, 20, 20, 20), 5.0)  # outside [0, 1]: noise is told apart from the original
    boxes = [((3, 4, 5), (10, 9, 8)), ((8, 8, 8), (9, 9, 9))]
    y = G.out_paint(x, boxes, torch.Generator().manual_seed(0))
    kept = torch.zeros(20, 20, 20, dtype=torch.bool)
    for (a, s) in boxes:
        kept[a[0]:a[0] + s[0], a[1]:a[1] + s[1], a[2]:a[2] + s[2]] = True
    assert bool((y[:, kept] == 5.0).all())
    noise = y[:, ~kept]
    assert bool(((noise >= 0) & (noise < 1)).all()) and noise.std() > 0.2  # U[0, 1] elsewhere


def test_in_painting_fills_boxes_with_noise_and_keeps_the_rest():
    x = torch.full((1, 20, 20, 20), 5.0)
    box = ((3, 4, 5), (6, 5, 4))
    y = G.in_paint(x, [box], torch.Generator().manual_seed(0))
    inside = (slice(None), slice(3, 9), slice(4, 9), slice(5, 9))
    assert bool(((y[inside] >= 0) & (y[inside] < 1)).all())
    y[inside] = 5.0
    assert torch.equal(y, x)


def test_painting_boxes_follow_the_official_ranges():
    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(200):
        inb = G.draw_inpaint_boxes((64, 64, 32), gen)
        counts.append(len(inb))
        for start, size in inb:
            assert all(s // 6 <= z <= s // 3 and 3 <= a <= s - z - 3 for a, z, s in zip(start, size, (64, 64, 32)))
        for start, size in G.draw_outpaint_boxes((64, 64, 32), gen):
            assert all(s - 4 * s // 7 <= z <= s - 3 * s // 7 and 3 <= a <= s - z - 3
                       for a, z, s in zip(start, size, (64, 64, 32)))
    assert max(counts) == 5 and np.mean(counts) > 3.5  # while U < 0.95, at most 5


def test_draw_genesis_uses_the_official_probabilities():
    gen = torch.Generator().manual_seed(0)
    draws = [G.draw_genesis((32, 32, 32), gen, shuffle_blocks=4) for _ in range(3000)]
    frac = {k: np.mean([f(d) for d in draws]) for k, f in {
        "no_flip": lambda d: not any(d.flips), "shuffle": lambda d: d.shuffle, "nonlinear": lambda d: d.nonlinear,
        "inverted": lambda d: d.nonlinear and d.inverted, "in": lambda d: d.paint == "in",
        "out": lambda d: d.paint == "out"}.items()}
    # no flip: 0.6 (first U >= 0.4) plus the draws whose flips cancel
    assert 0.6 <= frac["no_flip"] <= 0.7
    for key, p in (("shuffle", 0.5), ("nonlinear", 0.9), ("inverted", 0.45), ("in", 0.18), ("out", 0.72)):
        assert frac[key] == pytest.approx(p, abs=0.03), key


def test_apply_genesis_flips_input_and_target_and_deforms_only_the_input():
    x = torch.rand(1, *PATCH, generator=torch.Generator().manual_seed(0))
    nothing = G.draw_genesis(PATCH, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0, 0.0)
    inp, tgt = G.apply_genesis(x, nothing)
    assert torch.equal(inp, x) and torch.equal(tgt, x)
    flips = G.GenesisDraw(flips=(True, False, True))
    inp, tgt = G.apply_genesis(x, flips)
    assert torch.equal(tgt, x.flip((1, 3))) and torch.equal(inp, tgt)
    everything = G.draw_genesis(PATCH, torch.Generator().manual_seed(3), 1.0, 1.0, 1.0, 1.0, 0.0,
                                shuffle_blocks=500)
    inp, tgt = G.apply_genesis(x, everything, torch.Generator().manual_seed(4), n_times=1000)
    assert everything.paint == "out" and not torch.equal(inp, tgt)
    assert bool(((inp >= 0) & (inp <= 1)).all())


# --------------------------------------------------------------------------- the method
def test_pair_targets_are_the_rescaled_originals_and_the_loss_is_their_mse():
    mg = make(flip_rate=0.0)  # no flips: the target is the rescaled original itself
    x = 3.0 * torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1)) + 1.0
    torch.manual_seed(5)
    inputs, targets = mg.make_pair(x)
    torch.testing.assert_close(targets, G.minmax_rescale(x))
    assert inputs.shape == x.shape and not torch.equal(inputs, targets)
    torch.manual_seed(5)
    out = mg(x)
    assert isinstance(out, MethodOutput) and set(out.previews) == {"input", "masked", "reconstruction", "target"}
    torch.testing.assert_close(out.previews["masked"], inputs)
    torch.testing.assert_close(out.loss.detach(), (out.previews["reconstruction"] - targets).square().mean())
    out.loss.backward()
    unused = [n for n, p in mg.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert restoration_loss(targets, targets).item() == 0.0


def test_data_parallel_rows_deform_exactly_as_one_process():
    mg = make()
    x = torch.randn(4, 1, *PATCH, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    whole = mg.make_pair(x)
    for o in (0, 2):
        torch.manual_seed(11)  # every rank is reseeded with the same step seed
        part = mg.make_pair(x[o:o + 2], sample_offset=o, global_batch=4)
        assert torch.equal(part[0], whole[0][o:o + 2]) and torch.equal(part[1], whole[1][o:o + 2])
    with pytest.raises(ValueError, match="do not fit a global batch of 4"):
        mg.make_pair(x[:2], sample_offset=3, global_batch=4)


def test_config_checks_and_transfer_state_dict():
    with pytest.raises(ValueError, match="flip_rate must lie in"):
        make(flip_rate=1.5)
    with pytest.raises(ValueError, match="restore its input"):
        ModelsGenesis(build_model(ModelConfig(arch="resenc-tiny", out_channels=2)), ModelsGenesisConfig())
    mg = make()
    with pytest.raises(ValueError, match="divisible by the encoder's total stride 8"):
        mg(torch.zeros(1, 1, 32, 32, 36))
    sd = mg.transfer_state_dict()
    assert set(sd) == {k for k in mg.network.state_dict() if not k.startswith("decoder.seg_layers.")}
    assert any(k.startswith("decoder.stages.") for k in sd)  # the decoder is transferred too


def test_preset_values_on_the_command_line(capsys):
    cfg = shown_appendix_a_preset(capsys, "models-genesis", (160, 160, 160), 6)
    m = cfg["method"]
    assert (m["name"], m["flip_rate"], m["local_rate"], m["nonlinear_rate"], m["paint_rate"], m["inpaint_rate"],
            m["shuffle_blocks"]) == ("models-genesis", 0.4, 0.5, 0.9, 0.9, 0.2, 10_000)
    tiny = get_preset("models-genesis-tiny")
    assert tiny.model.arch == "resenc-tiny" and isinstance(build_method(tiny), ModelsGenesis)


# --------------------------------------------------------------------------- training and fine-tuning
def test_tiny_pretraining_loss_decreases_and_the_checkpoint_fine_tunes(tmp_path):
    from volssl.finetuning.finetune import load_source
    from volssl.finetuning.recipes import resolve_recipe
    from volssl.finetuning.transfer import transfer_weights
    from volssl.training.logging import read_scalars
    from volssl.training.trainer import pretrain

    cfg = resolve("models-genesis-tiny", ["train.steps=30", "data.patch_size=32,32,32", "train.device=cpu",
                                          "data.num_workers=0", "train.log_every=1", "train.checkpoint_every=30",
                                          "train.preview_every=30", "method.shuffle_blocks=2000"])
    summary = pretrain(cfg, None, tmp_path / "run", batches=phantom_batches(2, (32, 32, 32)), progress=False)
    assert summary["status"] == "finished"
    loss = [r["loss"] for r in read_scalars(tmp_path / "run" / "scalars.csv")]
    assert len(loss) == 30 and np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5])
    source = load_source(tmp_path / "run")
    assert source.method == "models-genesis"
    recipe = resolve_recipe("s3d-tiny")
    assert recipe.transfer == "all"
    net = build_model(ModelConfig(arch=source.model.arch, in_channels=3, out_channels=2))
    report = transfer_weights(net, source.network, recipe.transfer)
    assert any(k.startswith("decoder.stages.") for k in report.moved)  # encoder AND decoder move
    assert "encoder.stem.convs.0.conv.weight" in report.replicated
    assert all(k.startswith("decoder.seg_layers.") for k in report.new)
    k = "decoder.stages.0.convs.0.conv.weight"
    assert torch.equal(net.state_dict()[k], source.network[k])
