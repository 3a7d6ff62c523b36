"""``from_mlx(mlx_optimizer)``: any ``mlx.optimizers.Optimizer`` as a functional ``Optimizer``.

An ``mlx.optimizers.Optimizer`` is a per-leaf rule (``init_single(p, slots)`` fills a dict of
slots, ``apply_single(g, p, slots)`` returns the new parameter and rewrites the slots) around
a stateful object that keeps the slots and the step in ``optimizer.state``.  ``from_mlx``
keeps the rule and moves the state into nestedfn's state tree::

    state        = FromMlxState(slots)       # per params leaf (flatten order), its slot dict
    u, state     = update(g, state, p, step)
    u            = apply_single(g, p, slots) - p

The MLX object is never mutated: each update runs the rule on a shallow copy of it whose
``state`` holds only the hyperparameters, ``step = step + 1`` (MLX counts the update being
taken from 1; nestedfn's ``step`` is the number taken before) and every scheduled value at
``schedule(step)`` (MLX reads its schedules before incrementing).  ``MultiOptimizer`` becomes a
``partition`` of its optimizers by its path filters.

Updates are differences ``new - p``, so ``p + u`` equals MLX's ``new`` exactly whenever the
subtraction is exact (Sterbenz: ``new`` within a factor 2 of ``p``), and to an ulp otherwise.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.optimizers

from nestedfn.optim.combinators import partition
from nestedfn.optim.core import Optimizer, OptState, Params, Step
from nestedfn.tree import flatten, unflatten

__all__ = ["MLX_OPTIMIZERS", "FromMlxState", "from_mlx"]

# the MLX optimizers nestedfn has no recipe of its own for, by the name the CLI takes
MLX_OPTIMIZERS = {
    "adafactor": "Adafactor",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adadelta": "AdaDelta",
    "adamax": "Adamax",
}


class FromMlxState(NamedTuple):
    """``slots``: per params leaf (``flatten`` order) the dict the MLX rule keeps for it."""

    slots: tuple


def _hyperparameters(opt: mlx.optimizers.Optimizer) -> dict[str, Any]:
    """The non-per-parameter entries of ``opt.state`` (learning rate, scheduled values)."""
    return {k: v for k, v in opt.state.items() if isinstance(v, mx.array) and k != "step"}


def from_mlx(mlx_optimizer: mlx.optimizers.Optimizer) -> Optimizer:
    """A functional ``Optimizer`` running ``mlx_optimizer``'s per-leaf rule on state held in
    nestedfn's state tree (``FromMlxState``), at the explicit step; its schedules are read at
    that step.  Nestable anywhere (``nested``, ``partition``, ``chain``, ``accumulate``): the
    rule sees only the leaves it is given and the step it is given (inside ``nested``, the
    tier's own clock).  ``mlx_optimizer`` is not changed, and its hyperparameters are those it
    has when ``from_mlx`` is called."""
    if isinstance(mlx_optimizer, mlx.optimizers.MultiOptimizer):
        return _from_multi(mlx_optimizer)
    if not isinstance(mlx_optimizer, mlx.optimizers.Optimizer):
        raise TypeError(
            f"from_mlx: expected an mlx.optimizers.Optimizer, got {type(mlx_optimizer).__name__}"
        )
    name = type(mlx_optimizer).__name__
    hyper = _hyperparameters(mlx_optimizer)
    schedules = dict(mlx_optimizer._schedulers)

    def rule(step: Step) -> mlx.optimizers.Optimizer:
        """A copy of the MLX object set to take update number ``step + 1``."""
        clone = copy.copy(mlx_optimizer)
        t = step if isinstance(step, mx.array) else mx.array(step)
        t = t.astype(mx.uint64)
        state = dict(hyper)
        for key, schedule in schedules.items():
            state[key] = schedule(t)
        state["step"] = t + 1
        clone._state = state
        clone._schedulers = {}
        return clone

    def init_fn(params: Params) -> OptState:
        slots = []
        for p in flatten(params)[0]:
            s: dict = {}
            mlx_optimizer.init_single(p, s)  # writes only into s
            slots.append(s)
        return FromMlxState(tuple(slots))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        g_leaves, gtd = flatten(grads)
        p_leaves, ptd = flatten(params)
        if gtd != ptd:
            raise ValueError(f"from_mlx({name}): grads shaped unlike params: {gtd} vs {ptd}")
        if not isinstance(state, FromMlxState) or len(state.slots) != len(p_leaves):
            raise ValueError(
                f"from_mlx({name}): the state holds slots for "
                f"{len(getattr(state, 'slots', ()))} leaves, params have {len(p_leaves)}"
            )
        clone = rule(step)
        updates, slots = [], []
        for g, p, s in zip(g_leaves, p_leaves, state.slots):
            s = dict(s)  # apply_single rewrites its slots: keep the caller's state intact
            new = clone.apply_single(g, p, s)
            u = new - p
            updates.append(u if u.dtype == p.dtype else u.astype(p.dtype))
            slots.append(s)
        return unflatten(ptd, updates), FromMlxState(tuple(slots))

    return Optimizer(init_fn, update_fn)


def _from_multi(multi: mlx.optimizers.MultiOptimizer) -> Optimizer:
    """``MultiOptimizer``: a leaf goes to the first optimizer whose filter accepts its dotted
    path (the last takes the rest), as MLX splits them; optimizers given no leaf drop out."""
    parts = [from_mlx(o) for o in multi.optimizers]
    filters = list(multi.filters)

    def label(path: str, leaf: Any) -> str:
        for i, accept in enumerate(filters):
            if accept(path, leaf):
                return str(i)
        return str(len(filters) - 1)

    built: dict[Any, Optimizer] = {}

    def for_params(params: Params) -> Optimizer:
        lv, td = flatten(params)
        opt = built.get(td)
        if opt is None:
            used = sorted({label(p, x) for p, x in zip(td.paths(), lv)}, key=int)
            opt = built[td] = partition({k: parts[int(k)] for k in used}, label)
        return opt

    def init_fn(params: Params) -> OptState:
        return for_params(params).init(params)

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        return for_params(params).update(grads, state, params, step)

    return Optimizer(init_fn, update_fn)
