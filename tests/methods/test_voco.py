"""VoCo: overlap targets of hand-placed crops, the crops, the loss by hand, the momentum teacher (kept
out of the optimiser, in the checkpoint, updated by the trainer's after-step hook), data-parallel rows,
a tiny pre-training on brain phantoms whose loss decreases, and an encoder-only checkpoint that
fine-tuning accepts."""
import dataclasses

import numpy as np
import pytest
import torch

from volssl.config import ModelConfig, get_preset, resolve
from volssl.methods import MethodOutput, build_method
from volssl.methods.voco import VoCo, VoCoConfig, assign, overlap_targets, voco_loss
from volssl.models.registry import build_model
from baseline_helpers import phantom_pool, shown_appendix_a_preset  # tests/methods/ (see conftest.py)

PATCH = (48, 48, 16)  # 3 x 3 x 1 base crops of 16^3
SMALL = ModelConfig(arch="resenc-tiny", features=(8, 16, 32, 32), blocks=(1, 1, 1, 1), strides=(1, 2, 2, 2))
SMALL_SET = ["data.patch_size=48,48,16", "model.features=8,16,32,32", "model.blocks=1,1,1,1", "model.strides=1,2,2,2",
             "method.proj_hidden=128", "method.proj_dim=128"]


def make(**kw) -> VoCo:
    torch.manual_seed(0)
    kw.setdefault("proj_hidden", 64)
    kw.setdefault("proj_dim", 64)
    return VoCo(build_model(SMALL), VoCoConfig(**kw))


def images(batch=2, seed=1):
    return torch.randn(batch, 1, *PATCH, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the pretext task
def test_overlap_targets_of_hand_placed_crops():
    starts = torch.tensor([[[0, 0, 0], [16, 32, 0], [8, 0, 0], [8, 8, 0], [4, 28, 0]]])
    y = overlap_targets(starts, (16, 16, 16), (3, 3, 1))
    assert y.shape == (1, 5, 9)
    base = lambda i, j: i * 3 + j  # noqa: E731 (row-major base index of base crop (i, j, 0))
    want = torch.zeros(5, 9)
    want[0, base(0, 0)] = 1.0  # exactly on a base crop
    want[1, base(1, 2)] = 1.0
    want[2, base(0, 0)] = want[2, base(1, 0)] = 0.5  # half in x
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        want[3, base(i, j)] = 0.25  # a quarter each
    want[4, base(0, 1)] = 12 / 16 * 4 / 16  # x [4, 20) y [28, 44): 12 * 4, 12 * 12, 4 * 4, 4 * 12 of 16 * 16
    want[4, base(0, 2)] = 12 / 16 * 12 / 16
    want[4, base(1, 1)] = 4 / 16 * 4 / 16
    want[4, base(1, 2)] = 4 / 16 * 12 / 16
    torch.testing.assert_close(y[0], want)
    torch.testing.assert_close(y.sum(-1), torch.ones(1, 5))  # the base crops tile the patch


def test_random_crops_and_their_targets_match_the_image():
    vc = make()
    x = torch.arange(float(np.prod(PATCH))).view(1, 1, *PATCH)  # every voxel distinct
    torch.manual_seed(3)
    starts, flips, rots = vc.draw(1, PATCH)
    assert starts.shape == (1, 5, 3) and flips.shape == (1, 14, 3) and rots.shape == (1, 14)
    assert bool((starts >= 0).all()) and bool((starts + torch.tensor([16, 16, 16]) <= torch.tensor(PATCH)).all())
    crops = vc.make_crops(x, starts)
    assert crops.shape == (1, 14, 1, 16, 16, 16)
    assert torch.equal(crops[0, 3, 0], x[0, 0, 16:32, 0:16, 0:16])  # base (1, 0, 0)
    for r, (a, b, c) in enumerate(starts[0].tolist()):
        crop = x[0, 0, a:a + 16, b:b + 16, c:c + 16]
        assert torch.equal(crops[0, 9 + r, 0], crop)
        # the target of base k = the fraction of the random crop's voxels that lie in base crop k
        labels = overlap_targets(starts[:, r:r + 1], (16, 16, 16), (3, 3, 1))[0, 0]
        for k in range(9):
            inside = torch.isin(crop, crops[0, k, 0]).float().mean()
            assert labels[k].item() == pytest.approx(inside.item())
    aug = vc.make_crops(x, starts, torch.ones(1, 14, 3, dtype=torch.bool), torch.ones(1, 14, dtype=torch.long))
    torch.testing.assert_close(aug[0, 0], torch.rot90(crops[0, 0].flip((1, 2, 3)), 1, dims=(1, 2)))


def test_loss_by_hand():
    labels = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])
    bases = torch.eye(3).unsqueeze(0)  # orthogonal: no regulariser
    perfect = voco_loss(labels, labels, bases)
    assert perfect.item() == pytest.approx(0.0, abs=1e-5)
    logits = torch.tensor([[[0.5, 0.2, 0.0], [0.5, 0.0, 0.4]]])
    pos = -(1.0 * np.log(0.5 + 1e-6) + 0.5 * np.log(1 + 1e-6) + 0.5 * np.log(0.5 + 1e-6)) / 2.0
    neg = (0.2 ** 2 + 0.0 + 0.4 ** 2) / 3
    assert voco_loss(logits, labels, bases).item() == pytest.approx(pos + neg, rel=1e-5)
    same = torch.ones(1, 3, 4)  # identical base embeddings: cos = 1 for all 3 pairs
    assert voco_loss(labels, labels, same).item() == pytest.approx(1.0, abs=1e-5)
    assert voco_loss(labels, labels, same, reg_weight=0.0).item() == pytest.approx(0.0, abs=1e-5)
    a = assign(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]]))
    torch.testing.assert_close(a, torch.tensor([[[2 ** -0.5, 0.0]]]))  # relu(cos)


def test_forward_previews_and_gradients_reach_student_not_teacher():
    vc = make()
    out = vc(images())
    assert isinstance(out, MethodOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.previews) == {"input", "masked"} and out.previews["masked"].shape == (2, 1, *PATCH)
    out.loss.backward()
    trainable = [n for n, p in vc.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("network.encoder.", "projector.")) for n in trainable)
    assert [n for n in trainable if dict(vc.named_parameters())[n].grad is None] == []
    assert all(p.grad is None for p in vc.teacher.parameters())
    assert any(k.startswith("teacher.encoder.") for k in vc.state_dict())  # in the checkpoint's method_state


def test_teacher_is_an_ema_of_the_student_updated_after_each_step():
    vc = make(momentum=0.9)
    t0 = [p.detach().clone() for p in vc.teacher.parameters()]
    student = list(vc.network.encoder.parameters()) + list(vc.projector.parameters())
    assert all(torch.equal(a, b) for a, b in zip(t0, student))  # starts as a copy
    with torch.no_grad():
        for p in student:
            p.add_(1.0)
    vc.after_step(1)
    for a, s, t in zip(t0, student, vc.teacher.parameters()):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * s)
    plain = make(teacher=False)
    assert plain.teacher is None and not any(k.startswith("teacher.") for k in plain.state_dict())
    plain.after_step(1)  # a no-op
    out = plain(images())
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_data_parallel_rows_draw_and_lose_exactly_as_one_process():
    vc = make()
    x = images(batch=4, seed=2)
    torch.manual_seed(7)
    whole_draw = vc.draw(4, PATCH)
    torch.manual_seed(7)
    whole = vc(x).loss
    halves = []
    for o in (0, 2):
        torch.manual_seed(7)
        part = vc.draw(2, PATCH, o, 4)
        assert all(torch.equal(p, w[o:o + 2]) for p, w in zip(part, whole_draw))
        torch.manual_seed(7)
        halves.append(vc(x[o:o + 2], sample_offset=o, global_batch=4).loss)
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)  # per-sample norms: exact
    with pytest.raises(ValueError, match="do not fit a global batch of 4"):
        vc(x[:2], sample_offset=3, global_batch=4)


def test_config_checks_and_transfer_state_dict():
    with pytest.raises(ValueError, match="divisible by the base-crop grid"):
        make()(torch.zeros(1, 1, 48, 50, 16))
    with pytest.raises(ValueError, match="divisible by the encoder's total stride 8"):
        make(grid=(4, 3, 1))(torch.zeros(1, 1, 48, 48, 16))  # 12^3 crops
    with pytest.raises(ValueError, match="single bottleneck voxel"):
        make()(torch.zeros(1, 1, 24, 24, 8))  # 8^3 crops at total stride 8
    with pytest.raises(ValueError, match="pool must be one of"):
        make(pool="max")
    vc = make(pool="bottleneck")
    assert vc.projector.fc1.in_features == 32 and make().projector.fc1.in_features == 8 + 16 + 32 + 32
    sd = vc.transfer_state_dict()
    assert sd and all(k.startswith("encoder.") for k in sd)
    assert set(sd) == {k for k in vc.network.state_dict() if k.startswith("encoder.")}
    assert not any(p.requires_grad for p in vc.network.decoder.parameters())  # the decoder never trains


def test_preset_values_on_the_command_line(capsys):
    cfg = shown_appendix_a_preset(capsys, "voco", (192, 192, 64), 12)
    m = cfg["method"]
    assert (m["name"], m["grid"], m["random_crops"], m["teacher"], m["momentum"]) == ("voco", [3, 3, 1], 5, True, 0.9)
    assert [p // g for p, g in zip(cfg["data"]["patch_size"], m["grid"])] == [64, 64, 64]  # 64^3 crops
    tiny = get_preset("voco-tiny")
    method = build_method(tiny)
    assert isinstance(method, VoCo) and method.crop_size(tiny.data.patch_size) == (32, 32, 32)


# --------------------------------------------------------------------------- training and fine-tuning
def test_the_trainer_calls_after_step_once_per_update(tmp_path):
    from volssl.training.trainer import pretrain

    cfg = resolve("voco-tiny", SMALL_SET + ["train.steps=3", "train.device=cpu", "data.num_workers=0",
                                            "train.checkpoint_every=3", "train.preview_every=3"])
    torch.manual_seed(0)
    method = build_method(cfg)
    calls = []
    real = method.after_step
    method.after_step = lambda step: (calls.append(step), real(step))
    teacher0 = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    pretrain(cfg, None, tmp_path / "run", method=method, batches=phantom_pool(2, PATCH, 1), progress=False)
    assert calls == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    saved = {k[len("teacher."):]: v for k, v in state["method_state"].items() if k.startswith("teacher.")}
    assert saved.keys() == teacher0.keys()
    assert any(not torch.equal(saved[k], teacher0[k]) for k in saved)  # the EMA moved it
    assert all(k.startswith("encoder.") for k in state["network"])
    n_opt = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_opt == sum(1 for p in method.parameters() if p.requires_grad)  # the teacher is not optimised


def test_tiny_pretraining_with_the_teacher_loss_decreases(tmp_path):
    from volssl.training.logging import read_scalars
    from volssl.training.trainer import pretrain

    cfg = resolve("voco-tiny", SMALL_SET + ["train.steps=60", "train.device=cpu", "data.num_workers=0",
                                            "train.log_every=1", "train.checkpoint_every=60",
                                            "train.preview_every=60", "optim.lr=5e-4", "method.crop_augment=false"])
    assert cfg.method.teacher
    pretrain(cfg, None, tmp_path / "run", batches=phantom_pool(2, PATCH, 2), progress=False)
    loss = [r["loss"] for r in read_scalars(tmp_path / "run" / "scalars.csv")]
    assert len(loss) == 60 and np.mean(loss[-10:]) < 0.8 * np.mean(loss[:10])


def test_an_encoder_only_checkpoint_fine_tunes(tmp_path):
    """finetune with the encoder-transfer recipe; transfer="all" moves only what the checkpoint holds."""
    from volssl.data.phantoms import generate_phantoms
    from volssl.finetuning.finetune import finetune, load_source
    from volssl.finetuning.transfer import transfer_weights
    from volssl.training.checkpoint import load_checkpoint
    from volssl.training.trainer import pretrain

    cfg = resolve("voco-tiny", SMALL_SET + ["train.steps=2", "train.device=cpu", "data.num_workers=0",
                                            "train.checkpoint_every=2", "train.preview_every=2"])
    pretrain(cfg, None, tmp_path / "pre", batches=phantom_pool(2, PATCH, 1), progress=False)
    source = load_source(tmp_path / "pre")
    assert source.method == "voco" and all(k.startswith("encoder.") for k in source.network)
    net = build_model(dataclasses.replace(source.model, in_channels=3, out_channels=2))
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    report = transfer_weights(net, source.network, "all")  # nothing to refuse: the decoder stays fresh
    assert set(report.moved) | set(report.replicated) == set(source.network)
    assert all(k.startswith("decoder.") for k in report.new)
    assert all(torch.equal(net.state_dict()[k], fresh[k]) for k in report.new)

    raw = generate_phantoms(tmp_path / "raw" / "Dataset001_Phantoms", "brain", n=5, n_test=1, seed=0,
                            shape=(40, 40, 40), progress=False)
    summary = finetune(tmp_path / "pre", raw, tmp_path / "ft", recipe="s3d-encoder-tiny", stage_steps=[1, 1, 1],
                       progress=False, overrides=["patch_size=32,32,32", "num_workers=0", "train.device=cpu",
                                                  "train.val_every=0"])
    assert summary["status"] == "finished" and summary["method"] == "voco+encoder"
    moved = set(summary["transfer"]["moved"]) | set(summary["transfer"]["replicated"])
    assert moved == set(source.network)
    ft = load_checkpoint(tmp_path / "ft" / "checkpoints" / "final.pt")
    assert ft["kind"] == "finetune"
