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
for nested tiers; ``every`` for gradient accumulation).  ``phase_key`` refines it: steps with
equal ``opt.phase(s)`` take the same branches (default ``s % period``; nested tiers key on
the set of active tiers, so frequencies (1, 2, 4) have 3 phases in a period of 4).
``compile_step`` builds one compiled graph per phase; inside it ``static_step(step)`` gives
such an optimizer the Python-int step to branch on while ``step`` itself stays a traced array
for schedules.  Inside ``branch_free()`` there is no concrete step to branch on (one graph
serves every step); optimizers check ``branching_on(step)`` and select with ``mx.where``.

``no_update(p)`` is the update that leaves ``p`` as it is (``-0.0`` everywhere, so adding it
is exact for any consumer); ``apply_updates`` recognises it and returns ``p`` itself without
computing anything, so parameters that a step does not touch are not rewritten.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.checks import check_grads
from nestedfn.tree import TreeMismatchError, flatten, tree_map

__all__ = [
    "Grads",
    "OptState",
    "Optimizer",
    "PackGroups",
    "Params",
    "Schedule",
    "Step",
    "TrainState",
    "Updates",
    "apply_gradients",
    "apply_updates",
    "branch_free",
    "branching_on",
    "chain",
    "identity",
    "init",
    "is_no_update",
    "learning_rate_of",
    "no_update",
    "static_step",
    "tracing_step",
    "with_learning_rate",
]

Params = Any
Grads = Any
Updates = Any
OptState = Any
Step = int | mx.array
Schedule = Callable[[Step], float | mx.array]


class PackGroups(NamedTuple):
    """How an optimizer that treats groups of leaves differently (``nested``: tiers) runs on
    packed buffers (``compile_step(packed=True)``), each buffer holding one group's leaves.

    labels: per params leaf (``flatten`` order), its group ``0..G-1``.
    subdefs: per group, the structure of the params sub-tree the optimizer's state keeps for
    that group.  rebind(buffer_labels): the same optimizer over a list of buffers labelled
    ``buffer_labels``, and per group the structure its state keeps for that group's buffers.
    """

    labels: tuple[int, ...]
    subdefs: tuple[Any, ...]
    rebind: Callable[[list[int]], tuple[Any, tuple[Any, ...]]]


class Optimizer(NamedTuple):
    """A gradient transformation: ``init(params) -> state`` and
    ``update(grads, state, params, step) -> (updates, state)``; both pure.

    ``period``: the update's control flow (its branches on ``static_step``) is the same at
    steps ``s`` and ``s + period``.  ``phase_key``: ``step -> hashable`` with
    ``phase_key(s) == phase_key(s + period)``; two steps with equal keys must take the same
    branches (so a graph traced at one serves the other).  ``None`` means ``s % period``.
    Read it through ``opt.phase(step)``.  ``pack_groups``: ``params -> PackGroups`` for an
    optimizer whose leaves fall into groups that packed buffers must not mix (``None``: the
    optimizer is the same for every leaf).  ``learning_rate``: the rate (a float or a
    schedule of the global step) its updates are scaled by, when known (``learning_rate_of``).
    ``fused``: what the native step needs to run it as one kernel
    (``nestedfn.optim.fused``), when it can.
    """

    init: Callable[[Params], OptState]
    update: Callable[[Grads, OptState, Params, Step], tuple[Updates, OptState]]
    period: int = 1
    phase_key: Callable[[int], Hashable] | None = None
    pack_groups: Callable[[Params], PackGroups] | None = None
    learning_rate: float | Schedule | None = None
    fused: Any = None

    def phase(self, step: int) -> Hashable:
        """The phase of the Python-int ``step``: what a compiled graph is cached by."""
        if self.phase_key is None:
            return step % self.period
        return self.phase_key(step)


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
    for (only its ``Optimizer.phase`` is meaningful then: the graph is reused at every step of
    that phase), or its value when not tracing.
    """
    if isinstance(step, int):
        return step
    if _BRANCH_FREE.get():
        raise RuntimeError(
            "static_step: an optimizer branches on an array step inside branch_free() (e.g. "
            "under as_mlx_optimizer or skip_nonfinite); only optimizers with a branch-free "
            "form (nested, accumulate; check core.branching_on(step)) can run there"
        )
    traced = _STATIC_STEP.get()
    if traced is not None:
        return traced
    return int(step.item())


_BRANCH_FREE: ContextVar[bool] = ContextVar("nestedfn_branch_free", default=False)


@contextlib.contextmanager
def branch_free() -> Iterator[None]:
    """Ask every optimizer updated inside to take no Python branch on a traced step: one graph
    then serves every step (``mx.compile`` of a whole training step with the step a captured
    array, as ``mlx.optimizers`` keeps it).  Optimizers with ``period > 1`` (``nested``,
    ``accumulate``) compute every branch and select with ``mx.where`` on the step instead."""
    token = _BRANCH_FREE.set(True)
    try:
        yield
    finally:
        _BRANCH_FREE.reset(token)


def branching_on(step: Step) -> bool:
    """Whether an optimizer may branch on ``static_step(step)`` here: always for a Python-int
    step, and for an array step unless inside ``branch_free()``."""
    return isinstance(step, int) or not _BRANCH_FREE.get()


def with_learning_rate(opt: Optimizer, learning_rate: float | Schedule | None) -> Optimizer:
    """``opt`` with its ``learning_rate`` field set (a float or a schedule of the step), for
    ``learning_rate_of``; ``None`` leaves ``opt`` as it is."""
    return opt if learning_rate is None else opt._replace(learning_rate=learning_rate)


def learning_rate_of(opt: Optimizer) -> float | Schedule | None:
    """The learning rate ``opt`` applies (a float or a schedule of the global step), as
    recorded by the optimizers that scale by one (``scale_by_learning_rate`` and the recipes,
    ``chain`` as the product of its members', ``nested``, ``accumulate``, ...); ``None`` when
    unknown."""
    return getattr(opt, "learning_rate", None)


def _product(rates: list[Any]) -> Any:
    """The learning rate of a chain: the product of its members' (constants stay floats)."""
    if not rates:
        return None
    if len(rates) == 1:
        return rates[0]
    if not any(callable(r) for r in rates):
        return math.prod(rates)

    def rate(step: Step) -> Any:
        out: Any = 1.0
        for r in rates:
            out = out * (r(step) if callable(r) else r)
        return out

    return rate


def init(opt: Optimizer, params: Params) -> TrainState:
    """``TrainState(params, opt.init(params), 0)``."""
    return TrainState(params, opt.init(params), 0)


# arrays made by ``no_update``, by id; weak, so an entry dies with its array and an id reused by
# another array is never mistaken for one
_NO_UPDATE: weakref.WeakValueDictionary[int, mx.array] = weakref.WeakValueDictionary()


def no_update(p: Any) -> Any:
    """The update that leaves ``p`` as it is: ``-0.0`` in ``p``'s shape and dtype (``x + -0.0``
    is ``x``: signed zeros kept, NaN stays NaN, though a GPU may change a NaN's payload;
    ``+0.0`` would turn ``-0.0`` into ``+0.0``), marked so that ``apply_updates`` returns
    ``p`` itself, bit for bit.  The array is lazy: when
    only ``apply_updates`` sees it, it is never computed, and under ``mx.compile`` the
    parameter goes through the graph untouched.  A transform that rewrites the update gets an
    ordinary array (still exact after ``u * c`` with ``c >= 0``); one that passes the array on
    keeps the mark.
    """
    if isinstance(p, mx.array):
        # mx.full, not a broadcast scalar: mx.compile inlines scalar constants and loses the
        # sign of -0.0 (seen with MLX 0.32 on the CPU)
        u = mx.full(p.shape, -0.0, dtype=p.dtype)
        _NO_UPDATE[id(u)] = u
        return u
    return -0.0


def is_no_update(u: Any) -> bool:
    """Whether ``u`` is an array made by ``no_update``."""
    return isinstance(u, mx.array) and _NO_UPDATE.get(id(u)) is u


class _ShapeChanged(Exception):
    """Raised by ``_add`` on the first update shaped unlike its parameter; ``apply_updates``
    turns it into a ``TreeMismatchError`` naming every such path."""


def _add(p: Any, u: Any) -> Any:
    if isinstance(p, mx.array):
        if isinstance(u, mx.array) and u.shape != p.shape:
            raise _ShapeChanged
        if is_no_update(u):
            return p
        out = p + u
        return out if out.dtype == p.dtype else out.astype(p.dtype)
    return p + u


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf by leaf; each parameter keeps its dtype and its shape: an
    array update shaped unlike its parameter (which ``+`` would broadcast into a new shape, or
    accept where it should not) is a ``TreeMismatchError`` naming each path and both shapes.
    Shapes are static, so the check is a comparison per leaf eagerly and costs nothing
    inside a compiled graph (it runs when the graph is traced).  A ``no_update`` leaf gives
    the parameter itself back (the same array, nothing computed)."""
    try:
        return tree_map(_add, params, updates)
    except _ShapeChanged:
        p_leaves, p_td = flatten(params)
        u_leaves = flatten(updates)[0]
        problems = [
            (path, f"update shape {tuple(u.shape)} vs param shape {tuple(p.shape)}")
            for path, p, u in zip(p_td.paths(), p_leaves, u_leaves)
            if isinstance(p, mx.array) and isinstance(u, mx.array) and u.shape != p.shape
        ]
        raise TreeMismatchError(problems, "apply_updates: updates shaped unlike params") from None


def apply_gradients(opt: Optimizer, state: TrainState, grads: Grads) -> TrainState:
    """One optimizer step: a new ``TrainState``; ``state`` and ``grads`` are left untouched.

    ``grads`` must have the structure and leaf shapes of ``state.params``
    (``TreeMismatchError`` naming the path and both shapes; checked once per signature,
    ``nestedfn.optim.checks``); dtypes may differ."""
    check_grads(state.params, grads)
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
    out = Optimizer(init_fn, update_fn, period, combined_phase_key(opts), _chain_groups(opts))
    rates = [r for r in (learning_rate_of(o) for o in opts) if r is not None]
    return with_learning_rate(out, _product(rates))


def _chain_groups(opts: Sequence[Optimizer]) -> Callable[[Params], PackGroups] | None:
    """``pack_groups`` of a chain with exactly one grouped member: that member's groups, the
    chain rebuilt around its rebound self.  (Two grouped members could disagree: none.)"""
    grouped = [i for i, o in enumerate(opts) if o.pack_groups is not None]
    if len(grouped) != 1:
        return None
    at = grouped[0]

    def pack_groups(params: Params) -> PackGroups:
        inner = opts[at].pack_groups(params)

        def rebind(buffer_labels: list[int]) -> tuple[Optimizer, tuple[Any, ...]]:
            member, subdefs = inner.rebind(buffer_labels)
            return chain(*opts[:at], member, *opts[at + 1 :]), subdefs

        return PackGroups(inner.labels, inner.subdefs, rebind)

    return pack_groups


def combined_phase_key(opts: Sequence[Optimizer]) -> Callable[[int], Hashable] | None:
    """The phase key of an optimizer that runs every one of ``opts`` at the same step: the
    tuple of their phases (``None``, i.e. ``step % period``, when all have period 1)."""
    opts = tuple(opts)
    if all(o.period == 1 for o in opts):
        return None
    return lambda step: tuple(o.phase(step) for o in opts)
