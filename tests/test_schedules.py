"""LR schedules against their closed forms."""

import math

import pytest
import torch

from recipes.config import ScheduleConfig
from recipes.errors import ConfigError
from recipes.optim import build_scheduler, check_schedule, lr_factor


def test_warmup_is_linear_then_cosine_reaches_floor():
    f = lr_factor(ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    mid = 10 + (110 - 1 - 10) / 2
    assert f(int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 99)))
    assert f(109) == pytest.approx(0.1)


def test_warmup_fraction_used_when_steps_zero():
    f = lr_factor(ScheduleConfig(name="constant", warmup_fraction=0.25), max_steps=40)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(39) == 1.0


def test_wsd_is_flat_then_decays_linearly_to_floor():
    f = lr_factor(ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0), max_steps=100)
    assert all(f(s) == 1.0 for s in range(5, 80))
    assert f(80) == pytest.approx(1 - 1 / 20)
    assert f(89) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.0)


def test_linear_decays_to_floor():
    f = lr_factor(ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.2), max_steps=11)
    assert [f(s) for s in range(11)] == pytest.approx([1 - 0.8 * s / 10 for s in range(11)])


def test_scheduler_scales_every_group_by_the_same_factor():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.01}])
    sched = build_scheduler(opt, ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0), max_steps=5)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 - 3 / 4)  # the last of 5 steps is at the floor
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * (1 - 3 / 4))


@pytest.mark.parametrize(
    "bad",
    [
        dict(name="exp"),
        dict(warmup_steps=-1),
        dict(warmup_fraction=1.0),
        dict(min_lr_ratio=2.0),
        dict(decay_fraction=-0.1),
    ],
)
def test_invalid_schedules_are_rejected(bad):
    with pytest.raises(ConfigError, match="schedule"):
        check_schedule(ScheduleConfig(**bad))
