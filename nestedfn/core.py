"""The functional optimizer core: ``Optimizer``, ``TrainState`` and how they compose.

An optimizer is a pair of pure functions (optax's ``GradientTransformation``)::

    opt_state          = opt.init(params)
    updates, opt_state = opt.update(grads, opt_state, params, step)
    params             = apply_updates(params, updates)        # params + updates

``step`` (0 before the first update) is explicit in every call: schedules and tier phases
read it and no transformation keeps a clock of its own.  Updates are *added* to the
parameters, so descent transforms end with a negative scale.

``period`` says how an optimizer's control flow depends on the step: its update takes the same
branches at steps ``s`` and ``s + period`` (1 for ordinary optimizers; ``lcm(frequencies)``
for nested tiers; ``every`` for gradient accumulation).  ``compile_step`` builds one compiled
graph per ``step % period``; inside it ``static_step(step)`` gives such an optimizer the
Python-int step to branch on while ``step`` itself stays a traced array for schedules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.tree import tree_map

__all__ = [
    "Grads",
    "OptState",
    "Optimizer",
    "Params",
    "Schedule",
    "Step",
    "TrainState",
    "Updates",
    "apply_gradients",
    "apply_updates",
    "chain",
    "identity",
    "init",
    "static_step",
    "tracing_step",
]

Params = Any
Grads = Any
Updates = Any
OptState = Any
Step = int | mx.array
Schedule = Callable[[Step], float | mx.array]


class Optimizer(NamedTuple):
    """A gradient transformation: ``init(params) -> state`` and
    ``update(grads, state, params, step) -> (updates, state)``; both pure."""

    init: Callable[[Params], OptState]
    update: Callable[[Grads, OptState, Params, Step], tuple[Updates, OptState]]
    period: int = 1


class TrainState(NamedTuple):
    """Everything a training step changes: parameters, optimizer state and the step count
    (the number of updates applied so far, 0 at the start)."""

    params: Params
    opt_state: OptState
    step: Step


_STATIC_STEP: ContextVar[int | None] = ContextVar("nestedfn_static_step", default=None)


@contextlib.contextmanager
def tracing_step(step: int) -> Iterator[None]:
    """Tell ``static_step`` which concrete step a compiled graph is being traced for."""
    token = _STATIC_STEP.set(int(step))
    try:
        yield
    finally:
        _STATIC_STEP.reset(token)


def static_step(step: Step) -> int:
    """The step as a Python int, for control flow that repeats every ``Optimizer.period``.

    A Python int is returned as is; an ``mx.array`` gives the step ``compile_step`` is tracing
    for (only ``step % period`` is meaningful then), or its value when not tracing.
    """
    if isinstance(step, int):
        return step
    traced = _STATIC_STEP.get()
    if traced is not None:
        return traced
    return int(step.item())


def init(opt: Optimizer, params: Params) -> TrainState:
    """``TrainState(params, opt.init(params), 0)``."""
    return TrainState(params, opt.init(params), 0)


def _add(p: Any, u: Any) -> Any:
    if isinstance(p, mx.array):
        out = p + u
        return out if out.dtype == p.dtype else out.astype(p.dtype)
    return p + u


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf by leaf; each parameter keeps its dtype."""
    return tree_map(_add, params, updates)


def apply_gradients(opt: Optimizer, state: TrainState, grads: Grads) -> TrainState:
    """One optimizer step: a new ``TrainState``; ``state`` and ``grads`` are left untouched."""
    updates, opt_state = opt.update(grads, state.opt_state, state.params, state.step)
    return TrainState(apply_updates(state.params, updates), opt_state, state.step + 1)


def identity() -> Optimizer:
    """The transformation that passes gradients through unchanged (state ``()``)."""

    def init_fn(params: Params) -> OptState:
        return ()

    def update_fn(grads: Grads, state: OptState, params: Params, step: Step) -> Any:
        return grads, state

    return Optimizer(init_fn, update_fn)


def chain(*opts: Optimizer) -> Optimizer:
    """Apply ``opts`` in order, each to the previous one's output; state is a tuple of states."""

    def init_fn(params: Params) -> OptState:
        return tuple(o.init(params) for o in opts)

    def update_fn(grads: Grads, state: OptState, params: Params, step: Step) -> Any:
        if len(state) != len(opts):
            raise ValueError(f"chain: state holds {len(state)} states for {len(opts)} transforms")
        new_states = []
        for o, s in zip(opts, state):
            grads, s = o.update(grads, s, params, step)
            new_states.append(s)
        return grads, tuple(new_states)

    period = math.lcm(*(o.period for o in opts)) if opts else 1
    return Optimizer(init_fn, update_fn, period)
