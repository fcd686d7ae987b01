"""Optimisers from OptimConfig and the lr schedules (values, warm-up, stateless resume)."""
import math

import pytest
import torch

from volssl.config import OptimConfig
from volssl.training.optim import StepSchedule, build_optimizer, clip_gradients, lr_at


def test_poly_schedule_matches_the_nnunet_formula():
    cfg = OptimConfig(lr=1e-2, schedule="poly", poly_exponent=0.9)
    for step in (0, 1, 500, 999):
        assert lr_at(step, 1000, cfg) == pytest.approx(1e-2 * (1 - step / 1000) ** 0.9, rel=1e-12)
    assert lr_at(0, 1000, cfg) == 1e-2
    assert lr_at(1000, 1000, cfg) == 0.0 and lr_at(5000, 1000, cfg) == 0.0


def test_cosine_with_linear_warmup():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr=1e-5)
    assert lr_at(0, 110, cfg) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(4, 110, cfg) == pytest.approx(5e-4)
    assert lr_at(9, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, 110, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(110, 110, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_composes_with_poly_and_constant():
    poly = OptimConfig(lr=2.0, schedule="poly", warmup_steps=4)
    assert [lr_at(s, 14, poly) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lr_at(9, 14, poly) == pytest.approx(2.0 * 0.5 ** 0.9)
    const = OptimConfig(lr=2.0, schedule="constant", warmup_steps=2)
    assert [lr_at(s, 10, const) for s in (0, 1, 2, 9)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert lr_at(3, 10, const, peak=0.5) == 0.5


def test_bad_schedule_and_steps_are_clear_errors():
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(0, 10, OptimConfig(schedule="step"))
    with pytest.raises(ValueError, match="total"):
        lr_at(0, 0, OptimConfig())
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name="lamb"))
    with pytest.raises(ValueError, match="min_lr"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(lr=1e-3, min_lr=1e-2))


def test_optimisers_take_their_settings_from_the_config():
    p = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(p, OptimConfig())  # the S3D defaults
    g = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD)
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    adam = build_optimizer(p, OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.95), eps=1e-8, amsgrad=True,
                                          weight_decay=0.05))
    g = adam.param_groups[0]
    assert isinstance(adam, torch.optim.AdamW)
    assert (g["lr"], g["betas"], g["amsgrad"], g["weight_decay"]) == (1e-4, (0.9, 0.95), True, 0.05)


def test_schedule_sets_group_lrs_with_scales_and_resumes_from_its_step():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(lr=1.0, schedule="poly")
    opt = build_optimizer([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
    sched = StepSchedule(opt, 10, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    expected = (1 - 5 / 10) ** 0.9
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, 0.1 * expected])
    state = sched.state_dict()
    assert state == {"step": 5}
    opt2 = build_optimizer([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], cfg)
    sched2 = StepSchedule(opt2, 10, cfg)
    sched2.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_clip_gradients_returns_the_norm_before_clipping():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    assert float(clip_gradients([p], None)) == pytest.approx(6.0)
    assert torch.equal(p.grad, torch.full((4,), 3.0))
    assert float(clip_gradients([p], 1.5)) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.5, rel=1e-5)
    assert math.isfinite(float(clip_gradients([torch.nn.Parameter(torch.zeros(1))], 1.0)))
