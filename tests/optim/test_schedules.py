"""Schedules: values at known steps, ``join`` boundaries, and the same values for Python-int
steps, ``mx.array`` steps and steps traced under ``mx.compile``."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from nestedfn.optim import schedules as S


def _all_forms(schedule, steps):
    """The schedule's values at ``steps`` as int, as array, and compiled with array steps."""
    compiled = mx.compile(lambda k: mx.array(schedule(k), dtype=mx.float32))
    ints = [float(schedule(k)) for k in steps]
    arrays = [float(schedule(mx.array(k))) for k in steps]
    traced = [float(compiled(mx.array(k))) for k in steps]
    return ints, arrays, traced


def _check(schedule, expected: dict[int, float]):
    steps = list(expected)
    ints, arrays, traced = _all_forms(schedule, steps)
    for k, a, b, c in zip(steps, ints, arrays, traced):
        assert a == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k
        assert b == pytest.approx(expected[k], rel=1e-5, abs=1e-7), k
        assert c == pytest.approx(expected[k], rel=1e-5, abs=1e-7), k


def test_constant():
    _check(S.constant(0.3), {0: 0.3, 5: 0.3, 10**6: 0.3})
    assert isinstance(S.constant(0.3)(4), float)
    assert isinstance(S.constant(0.3)(mx.array(4)), mx.array)


def test_linear_warmup():
    _check(S.linear_warmup(1.0, 4), {0: 0.0, 1: 0.25, 2: 0.5, 4: 1.0, 9: 1.0})
    _check(S.linear_warmup(2.0, 10, init_value=1.0), {0: 1.0, 5: 1.5, 10: 2.0, 11: 2.0})
    _check(S.linear_warmup(2.0, 0), {0: 2.0, 3: 2.0})


def test_cosine_decay():
    _check(
        S.cosine_decay(1.0, 10),
        {0: 1.0, 5: 0.5, 10: 0.0, 20: 0.0, 2: 0.5 * (1 + math.cos(math.pi * 0.2))},
    )
    _check(S.cosine_decay(1.0, 4, end_value=0.2), {0: 1.0, 2: 0.6, 4: 0.2, 100: 0.2})


def test_warmup_cosine():
    sch = S.warmup_cosine(1e-3, warmup_steps=10, decay_steps=110, init_value=0.0, end_value=1e-5)
    mid = 1e-5 + (1e-3 - 1e-5) * 0.5
    _check(sch, {0: 0.0, 5: 5e-4, 10: 1e-3, 60: mid, 110: 1e-5, 500: 1e-5})


def test_join_switches_at_boundaries_and_restarts_the_clock():
    sch = S.join([S.constant(1.0), S.linear_warmup(2.0, 4), S.constant(-1.0)], [3, 7])
    # steps 0-2: 1.0; steps 3-6: warmup restarted at 3 (0, .5, 1, 1.5); from 7: -1
    _check(sch, {0: 1.0, 2: 1.0, 3: 0.0, 4: 0.5, 6: 1.5, 7: -1.0, 50: -1.0})


def test_join_takes_the_step_unclamped_before_its_boundary():
    # a piece not active yet may see a negative shifted step: it is clamped, not an error
    sch = S.join([S.constant(1.0), S.cosine_decay(1.0, 2)], [5])
    _check(sch, {0: 1.0, 4: 1.0, 5: 1.0, 6: 0.5, 7: 0.0})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: S.join([S.constant(1.0)], [3]), "one boundary fewer"),
        (lambda: S.join([S.constant(1.0)] * 3, [5, 5]), "strictly increasing"),
        (lambda: S.join([S.constant(1.0)] * 2, [-1]), "boundary"),
        (lambda: S.linear_warmup(1.0, -1), "warmup_steps"),
        (lambda: S.cosine_decay(1.0, 0), "decay_steps"),
        (lambda: S.warmup_cosine(1.0, 10, 10), "must exceed"),
        (lambda: S.linear_warmup(1.0, 2.5), "warmup_steps"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
