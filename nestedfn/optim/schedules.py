"""Learning-rate schedules: callables ``step -> value``.

``step`` is the number of updates applied so far (0 for the first update).  Each schedule
accepts a Python int, giving a Python float, or an ``mx.array`` step, giving a float32
``mx.array`` computed with mx ops, so that the same schedule traces under ``mx.compile``
(where ``compile_step`` passes the step as an array) and gives the same values.  Values are
declared finite (decay rates >= 0) and step counts ints, checked at construction
(``optim.checks``): a ``ValueError``/``TypeError`` naming the argument and the value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from nestedfn.optim.checks import FINITE, NONNEGATIVE, declare
from nestedfn.optim.core import Step

__all__ = [
    "constant",
    "cosine_decay",
    "exponential_decay",
    "join",
    "linear_warmup",
    "step_decay",
    "warmup_cosine",
]

Schedule = Callable[[Step], Any]


def _is_array(step: Step) -> bool:
    return isinstance(step, mx.array)


def _check_steps(name: str, what: str, n: Any, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"{name}: {what} must be an int >= {minimum}, got {n!r}")
    return int(n)


@declare(value=FINITE)
def constant(value: float) -> Schedule:
    """``value`` at every step."""

    def schedule(step: Step) -> Any:
        return mx.array(value, dtype=mx.float32) if _is_array(step) else float(value)

    return schedule


@declare(peak_value=FINITE, init_value=FINITE)
def linear_warmup(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """From ``init_value`` at step 0 linearly to ``peak_value`` at ``warmup_steps``, then
    ``peak_value``: ``init + (peak - init) * min(step, W) / W``."""
    w = _check_steps("linear_warmup", "warmup_steps", warmup_steps, 0)

    def schedule(step: Step) -> Any:
        if w == 0:
            return constant(peak_value)(step)
        if _is_array(step):
            frac = mx.minimum(step.astype(mx.float32), float(w)) / float(w)
            return init_value + (peak_value - init_value) * frac
        return init_value + (peak_value - init_value) * min(int(step), w) / w

    return schedule


@declare(init_value=FINITE, end_value=FINITE)
def cosine_decay(init_value: float, decay_steps: int, end_value: float = 0.0) -> Schedule:
    """Half a cosine from ``init_value`` at step 0 to ``end_value`` at ``decay_steps``, then
    ``end_value``: ``end + (init - end) * (1 + cos(pi * min(step, D) / D)) / 2``."""
    d = _check_steps("cosine_decay", "decay_steps", decay_steps, 1)

    def schedule(step: Step) -> Any:
        if _is_array(step):
            frac = mx.minimum(step.astype(mx.float32), float(d)) / float(d)
            return end_value + (init_value - end_value) * 0.5 * (1.0 + mx.cos(math.pi * frac))
        frac = min(int(step), d) / d
        return end_value + (init_value - end_value) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return schedule


@declare(init_value=FINITE, decay_rate=NONNEGATIVE)
def exponential_decay(init_value: float, decay_rate: float) -> Schedule:
    """``init_value * decay_rate ** step``."""

    def schedule(step: Step) -> Any:
        if _is_array(step):
            return init_value * mx.power(mx.array(decay_rate, mx.float32), step.astype(mx.float32))
        return init_value * decay_rate ** int(step)

    return schedule


@declare(init_value=FINITE, decay_rate=NONNEGATIVE)
def step_decay(init_value: float, decay_rate: float, step_size: int) -> Schedule:
    """``init_value * decay_rate ** (step // step_size)``: a drop every ``step_size`` steps."""
    n = _check_steps("step_decay", "step_size", step_size, 1)

    def schedule(step: Step) -> Any:
        if _is_array(step):
            k = (step // n).astype(mx.float32)
            return init_value * mx.power(mx.array(decay_rate, mx.float32), k)
        return init_value * decay_rate ** (int(step) // n)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` (restarted: it sees
    ``step - boundaries[0]``) until ``boundaries[1]``, and so on (as optax's
    ``join_schedules``).  ``boundaries`` are increasing ints, one fewer than the schedules."""
    schedules = list(schedules)
    bounds = [_check_steps("join", "a boundary", b, 0) for b in boundaries]
    if not schedules or len(bounds) != len(schedules) - 1:
        raise ValueError(
            f"join: need one boundary fewer than schedules, got {len(schedules)} schedules "
            f"and {len(bounds)} boundaries"
        )
    if any(b1 >= b2 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"join: boundaries must be strictly increasing, got {bounds}")
    starts = [0, *bounds]

    def schedule(step: Step) -> Any:
        if _is_array(step):
            # every piece on its own clock (clamped at 0), then pick the active one
            value = mx.array(schedules[0](step), dtype=mx.float32)
            for s, b in zip(schedules[1:], bounds):
                piece = mx.array(s(mx.maximum(step - b, 0)), dtype=mx.float32)
                value = mx.where(step >= b, piece, value)
            return value
        k = int(step)
        i = sum(1 for b in bounds if k >= b)
        return schedules[i](k - starts[i])

    return schedule


@declare(peak_value=FINITE, init_value=FINITE, end_value=FINITE)
def warmup_cosine(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` at ``decay_steps`` (counted from step 0, warmup included, as optax's
    ``warmup_cosine_decay_schedule``), then ``end_value``."""
    w = _check_steps("warmup_cosine", "warmup_steps", warmup_steps, 0)
    d = _check_steps("warmup_cosine", "decay_steps", decay_steps, 1)
    if d <= w:
        raise ValueError(
            f"warmup_cosine: decay_steps ({d}) must exceed warmup_steps ({w}); it counts the warmup"
        )
    return join(
        [linear_warmup(peak_value, w, init_value), cosine_decay(peak_value, d - w, end_value)],
        [w],
    )
