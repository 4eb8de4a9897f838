"""LR schedules: values at chosen steps against the formulas, continuity, endpoints."""

from __future__ import annotations

import math

import pytest

from llmcl.schedules import lr_at, warmup_steps


def test_warmup_steps_integer_is_steps_float_is_fraction():
    assert warmup_steps(10, 100) == 10
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(0.0, 100) == 0
    assert warmup_steps(500, 100) == 100


def test_cosine_values_against_the_formula():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup=4, schedule="cosine")
    total = 24
    assert [lr_at(s, total, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, total, **kw) == pytest.approx(1.0)  # decay starts at max_lr
    assert lr_at(23, total, **kw) == pytest.approx(0.1)  # last step reaches min_lr
    s = 13  # progress (13-4)/(23-4)
    expected = 0.1 + 0.45 * (1 + math.cos(math.pi * 9 / 19))
    assert lr_at(s, total, **kw) == pytest.approx(expected)
    values = [lr_at(s, total, **kw) for s in range(4, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    assert lr_at(5, 11, max_lr=1.0, min_lr=0.0, warmup=0, schedule="linear") == pytest.approx(0.5)
    assert lr_at(10, 11, max_lr=1.0, min_lr=0.0, warmup=0, schedule="linear") == pytest.approx(0.0)
    assert lr_at(7, 11, max_lr=0.3, min_lr=0.0, warmup=2, schedule="constant") == 0.3


def test_no_jump_between_warmup_and_decay():
    kw = dict(max_lr=2e-4, min_lr=2e-5, warmup=10)
    a, b = lr_at(9, 100, **kw), lr_at(10, 100, **kw)
    assert a == pytest.approx(2e-4) and b == pytest.approx(2e-4)


def test_single_step_stage():
    assert lr_at(0, 1, max_lr=1.0, min_lr=0.1, warmup=0) == 1.0  # a one-step stage trains at the peak
    assert lr_at(0, 1, max_lr=1.0, min_lr=0.1, warmup=1) == 1.0
