"""LR schedules: values at chosen steps against the formulas, continuity at phase boundaries, stage chaining."""

from __future__ import annotations

import math

import pytest

from llmcl.errors import LlmclError
from llmcl.recipe import TrainConfig
from llmcl.schedules import Schedule, for_stage, lr_at, to_steps


def trace(s: Schedule) -> list[float]:
    return [lr_at(t, s) for t in range(s.total)]


def assert_continuous(values: list[float], max_jump: float) -> None:
    jumps = [abs(b - a) for a, b in zip(values, values[1:])]
    assert max(jumps) <= max_jump + 1e-12, f"largest jump {max(jumps)} > {max_jump}"


def test_to_steps_integer_is_steps_float_is_fraction():
    assert to_steps(10, 100) == 10 and to_steps(0.1, 100) == 10 and to_steps(0.0, 100) == 0
    assert to_steps(500, 100) == 100


def test_cosine_values_against_the_formula():
    s = Schedule("cosine", total=24, max_lr=1.0, min_lr=0.1, warmup=4)
    assert trace(s)[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, s) == pytest.approx(1.0) and lr_at(23, s) == pytest.approx(0.1)
    assert lr_at(13, s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 9 / 19)))
    values = trace(s)[4:]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_rewarming_starts_from_the_previous_final_lr():
    s = Schedule("cosine", total=20, max_lr=1.0, min_lr=0.1, warmup=5, start_lr=0.1)
    assert lr_at(0, s) == pytest.approx(0.1 + 0.9 / 5)  # the first step moves off the previous stage's min
    assert lr_at(4, s) == pytest.approx(1.0)
    assert_continuous([0.1] + trace(s), 0.9 / 5)


def test_linear_and_constant():
    assert lr_at(5, Schedule("linear", 11, 1.0, 0.0)) == pytest.approx(0.5)
    assert lr_at(10, Schedule("linear", 11, 1.0, 0.0)) == pytest.approx(0.0)
    assert lr_at(7, Schedule("constant", 11, 0.3, 0.0, warmup=2)) == 0.3
    assert lr_at(0, Schedule("cosine", 1, 1.0, 0.1)) == 1.0  # a one-step stage trains at the peak


def test_wsd_warmup_stable_decay():
    s = Schedule("wsd", total=100, max_lr=1.0, min_lr=0.0, warmup=10, decay=20, decay_shape="linear")
    v = trace(s)
    assert v[9] == 1.0 and all(x == 1.0 for x in v[10:80])
    assert v[99] == pytest.approx(0.0) and v[89] == pytest.approx(1 - 10 / 20)
    assert_continuous(v, 1 / 10)
    sq = Schedule("wsd", total=100, max_lr=1.0, min_lr=0.0, warmup=0, decay=20, decay_shape="sqrt")
    assert lr_at(84, sq) == pytest.approx(1 - math.sqrt(5 / 20))
    cos = Schedule("wsd", total=100, max_lr=1.0, min_lr=0.0, warmup=0, decay=20, decay_shape="cosine")
    assert lr_at(89, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 20)))


@pytest.mark.parametrize("shape", ["cosine", "inv_sqrt"])
def test_infinite_first_stage_phases(shape):
    s = Schedule("infinite", total=200, max_lr=1.0, min_lr=0.01, warmup=10, const_lr=0.4, cooldown=40,
                 cooldown_shape=shape, alpha=10.0, anneal=30, anneal_shape="exp")
    v = trace(s)
    assert v[9] == 1.0  # end of warmup
    assert v[50] == 0.4 and all(x == 0.4 for x in v[50:170])  # constant phase
    assert v[199] == pytest.approx(0.01)  # anneal reaches min_lr on the last step
    assert v[184] == pytest.approx(0.4 * (0.01 / 0.4) ** (15 / 30))  # exponential anneal
    x = (29 - 9) / (50 - 9)  # cooldown progress: 0 at the last warmup step, 1 at the first constant step
    if shape == "inv_sqrt":
        h = lambda x: 1 / math.sqrt(1 + 10 * x) - 1  # noqa: E731
        assert v[29] == pytest.approx(1.0 + (0.4 - 1.0) * h(x) / h(1.0))
    else:
        assert v[29] == pytest.approx(0.4 + 0.3 * (1 + math.cos(math.pi * x)))
    cooldown = v[9:51]
    assert all(a >= b for a, b in zip(cooldown, cooldown[1:]))
    assert_continuous(v, 0.1)


def test_infinite_later_stage_continues_at_const_lr_without_rewarming():
    first = Schedule("infinite", 100, 1.0, 0.01, warmup=10, const_lr=0.4, cooldown=20)
    later = Schedule("infinite", 100, 1.0, 0.01, warmup=10, const_lr=0.4, cooldown=20, continuing=True)
    assert lr_at(99, first) == 0.4
    assert all(x == 0.4 for x in trace(later))
    annealed = Schedule("infinite", 100, 1.0, 0.01, const_lr=0.4, anneal=10, anneal_shape="linear", continuing=True)
    assert lr_at(89, annealed) == 0.4 and lr_at(94, annealed) == pytest.approx(0.4 - 0.39 * 5 / 10)


def test_for_stage_resolves_recipe_settings():
    cfg = TrainConfig(lr=1e-3, schedule="infinite", warmup=0.1, cooldown=0.2, anneal=0.1, const_lr_ratio=0.5,
                      min_lr_ratio=0.1)
    s0, s1 = for_stage(cfg, 100, 0), for_stage(cfg, 100, 1)
    assert (s0.warmup, s0.cooldown, s0.anneal, s0.const_lr) == (10, 20, 10, 5e-4)
    assert (s1.warmup, s1.cooldown, s1.continuing) == (0, 0, True)
    rewarm = for_stage(TrainConfig(lr=1e-3, warmup_start="previous"), 50, 1, previous_final_lr=2e-4)
    assert rewarm.start_lr == 2e-4
    assert for_stage(TrainConfig(lr=1e-3), 50, 1, previous_final_lr=2e-4).start_lr == 0.0
    with pytest.raises(LlmclError, match="'train.warmup' \\(60\\) \\+ 'train.decay' \\(60\\) = 120 steps, more than the stage's 100"):
        for_stage(TrainConfig(schedule="wsd", warmup=60, decay=60), 100, 0)
    # each phase as the recipe gives it (a phase alone is capped at the stage's steps; the sum said 5, not 11)
    with pytest.raises(LlmclError, match=r"'train.warmup' \(10\) \+ 'train.cooldown' \(1\) \+ 'train.anneal' \(0\) = 11 steps, more than the stage's 4"):
        for_stage(TrainConfig(schedule="infinite", warmup=10, cooldown=1, anneal=0), 4, 0)
