"""Compiled training steps: ``compile_step(opt)`` is ``apply_gradients`` under ``mx.compile``.

``mx.compile`` traces a pure function of arrays.  A ``TrainState`` is a tree, so the step
flattens ``(params, opt_state)`` and ``grads`` with ``nestedfn.tree.flatten``, hands the
compiled function the leaf lists, and rebuilds the trees inside it with ``unflatten``.

The step count stays a Python int outside (``TrainState.step``), but the graph receives it as
an ``mx.array`` input so that a schedule ``lr(step)`` does not force a retrace every step.
Optimizers whose *control flow* depends on the step (nested tiers, gradient accumulation)
declare ``Optimizer.period`` and branch on ``static_step(step)``; each graph is traced under
``tracing_step(s)`` for a concrete ``s``, so there is one graph per phase ``step % period``
(at most ``lcm(frequencies)`` for a nested optimizer), built once and reused.

Graphs are cached per ``(state structure, grads structure, leaf shapes and dtypes, phase)``:
a change of any of these builds a new graph (counted in ``graphs_built``) instead of
silently reusing a graph traced for another tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.core import (
    Grads,
    Optimizer,
    TrainState,
    apply_gradients,
    apply_updates,
    static_step,
    tracing_step,
)
from nestedfn.packing import (
    NotPackableError,
    PackLayout,
    StatePlan,
    pack,
    pack_layout,
    pack_state,
    plan_state,
    unpack,
    unpack_state,
)
from nestedfn.tree import TreeDef, TreeMismatchError, flatten, unflatten

__all__ = ["CompiledStep", "PackedCompiledStep", "compile_step"]


def _check_arrays(leaves: list[Any], treedef: TreeDef, what: str) -> None:
    """``mx.compile`` only passes arrays through a graph: anything else would be frozen into
    the graph as a constant and silently go stale, so refuse it naming the path."""
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, mx.array):
            path = treedef.paths()[i]
            raise TypeError(
                f"compile_step: {what} leaf {path!r} is a {type(leaf).__name__}, not an "
                "mx.array; a compiled step can only carry arrays (keep counters as mx.array)"
            )


def _signature(leaves: list[mx.array]) -> tuple[Any, ...]:
    return tuple((tuple(x.shape), x.dtype) for x in leaves)


class CompiledStep:
    """``(state, grads) -> state`` equal to ``apply_gradients(opt, state, grads)``, compiled.

    ``graphs_built`` counts the graphs traced so far (1 for a ``period == 1`` optimizer on a
    fixed tree; ``period`` for one whose control flow repeats every ``period`` steps).
    """

    def __init__(self, opt: Optimizer, shapeless: bool = False):
        if not isinstance(opt.period, int) or opt.period < 1:
            raise ValueError(
                f"compile_step: Optimizer.period must be a positive int, got {opt.period!r}"
            )
        self.opt = opt
        self.shapeless = shapeless
        self._graphs: dict[Any, tuple[Callable[..., Any], list[TreeDef]]] = {}

    @property
    def graphs_built(self) -> int:
        """How many compiled graphs this step function has traced."""
        return len(self._graphs)

    def _build(self, state_td: TreeDef, grads_td: TreeDef, trace_step: int) -> Any:
        opt = self.opt
        out_td: list[TreeDef] = []

        def pure_step(step: mx.array, state_leaves: list[mx.array], grad_leaves: list[mx.array]):
            st = unflatten(state_td, state_leaves)
            params, opt_state = st["params"], st["opt_state"]
            grads = unflatten(grads_td, grad_leaves)
            with tracing_step(trace_step):
                updates, new_opt_state = opt.update(grads, opt_state, params, step)
            new_params = apply_updates(params, updates)
            leaves, td = flatten({"params": new_params, "opt_state": new_opt_state})
            _check_arrays(leaves, td, "new state")
            out_td.append(td)
            return leaves

        return mx.compile(pure_step, shapeless=self.shapeless), out_td

    def __call__(self, state: TrainState, grads: Grads) -> TrainState:
        step = state.step
        concrete = step if isinstance(step, int) else static_step(step)
        state_leaves, state_td = flatten({"params": state.params, "opt_state": state.opt_state})
        grad_leaves, grads_td = flatten(grads)
        _check_arrays(state_leaves, state_td, "state")
        _check_arrays(grad_leaves, grads_td, "grads")
        key = (
            state_td,
            grads_td,
            concrete % self.opt.period,
            None if self.shapeless else _signature(state_leaves),
            None if self.shapeless else _signature(grad_leaves),
        )
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._build(state_td, grads_td, concrete)
        fn, out_td = entry
        out = fn(mx.array(concrete, dtype=mx.int32), state_leaves, grad_leaves)
        new = unflatten(out_td[0], out)
        return TrainState(new["params"], new["opt_state"], step + 1)


def compile_step(
    opt: Optimizer,
    shapeless: bool = False,
    packed: bool = False,
    chunk_size: int | None = None,
    verify: bool = True,
) -> CompiledStep | PackedCompiledStep:
    """A compiled ``(state, grads) -> state`` giving the same results as
    ``apply_gradients(opt, state, grads)`` (up to float rounding of a schedule evaluated on
    an ``mx.array`` step instead of a Python int).

    One graph is traced per ``(tree structure, leaf shapes/dtypes, step % opt.period)`` and
    reused; ``shapeless=True`` lets one graph serve changing leaf shapes (only valid for
    optimizers whose graph does not depend on shapes).

    ``packed=True`` runs an elementwise optimizer on flat buffers of about ``chunk_size``
    elements per dtype (``nestedfn.packing.default_chunk()`` for the device when ``None``) (``PackedCompiledStep``): same inputs, outputs and tree layout, far
    fewer kernel dispatches on trees of many small arrays.  ``verify`` checks its first step
    of every graph against the eager per-leaf step.
    """
    if packed:
        if shapeless:
            raise ValueError("compile_step: packed=True and shapeless=True cannot be combined")
        return PackedCompiledStep(opt, chunk_size=chunk_size, verify=verify)
    return CompiledStep(opt, shapeless=shapeless)


def _buffers_def(n: int) -> TreeDef:
    return flatten([mx.array(0)] * n)[1]


class _PackedEntry(NamedTuple):
    layout: PackLayout
    plan: StatePlan
    fn: Callable[..., Any]
    verified: list[bool]


class PackedCompiledStep:
    """``compile_step(opt, packed=True)``: the same ``(state, grads) -> state`` as
    ``apply_gradients``, computed on a few flat buffers (``nestedfn.packing``).

    Per step: the gradient leaves are concatenated once into buffers, the optimizer runs once
    over the buffers (one fused kernel per buffer instead of one per leaf), and the new params
    and params-shaped state come back as zero-copy views of the new buffers, in the usual tree
    layout.  When the next call receives exactly those views (the usual training loop), their
    buffers are reused instead of concatenating params and state again; any other state
    (edited, restored from a checkpoint, ...) is packed afresh, so results never depend on it.

    Only valid for optimizers that are elementwise over params (global reductions such as
    ``clip_by_global_norm`` are fine; per-leaf shapes, labels or masks are not).  With
    ``verify`` (default) the first step of every new graph is also computed eagerly per leaf
    and a mismatch raises ``NotPackableError`` naming the path.
    """

    def __init__(self, opt: Optimizer, chunk_size: int | None = None, verify: bool = True):
        if not isinstance(opt.period, int) or opt.period < 1:
            raise ValueError(
                f"compile_step: Optimizer.period must be a positive int, got {opt.period!r}"
            )
        self.opt = opt
        self.chunk_size = chunk_size
        self.verify = verify
        self._layouts: dict[Any, tuple[PackLayout, StatePlan]] = {}
        self._graphs: dict[Any, _PackedEntry] = {}
        self._last: tuple[tuple[Any, ...], list[mx.array], list[mx.array]] | None = None

    @property
    def graphs_built(self) -> int:
        """How many compiled graphs this step function has traced."""
        return len(self._graphs)

    def _layout(self, p_leaves, p_td, s_td) -> tuple[PackLayout, StatePlan]:
        key = (p_td, _signature(p_leaves), s_td)
        found = self._layouts.get(key)
        if found is None:
            layout = pack_layout(p_leaves, p_td, self.chunk_size)
            zeros = [
                mx.zeros((n,), dtype=p_leaves[idx[0]].dtype)
                for n, idx in zip(layout.sizes, layout.buffers)
            ]
            try:
                packed_td = flatten(self.opt.init(zeros))[1]
            except (ValueError, TypeError, LookupError) as e:
                raise NotPackableError(
                    f"compile_step(packed=True): the optimizer cannot be initialised on packed "
                    f"buffers ({type(e).__name__}: {e}); it is not elementwise over params, use "
                    "compile_step(opt) instead"
                ) from e
            plan = plan_state(s_td, packed_td, p_td, _buffers_def(len(zeros)))
            found = self._layouts[key] = (layout, plan)
        return found

    def _build(self, layout: PackLayout, plan: StatePlan, trace_step: int) -> Callable[..., Any]:
        opt = self.opt

        def pure_step(step: mx.array, p_bufs: list, ps_leaves: list, g_leaves: list) -> list:
            g_bufs = pack(layout, g_leaves)
            opt_state = unflatten(plan.packed_treedef, ps_leaves)
            with tracing_step(trace_step):
                updates, new_state = opt.update(g_bufs, opt_state, list(p_bufs), step)
            new_p = apply_updates(list(p_bufs), updates)
            leaves, td = flatten(new_state)
            if td != plan.packed_treedef:
                raise NotPackableError(
                    f"compile_step(packed=True): the optimizer's state changed structure from "
                    f"{plan.packed_treedef!r} to {td!r} in one step"
                )
            _check_arrays(leaves, td, "new packed state")
            return list(new_p) + leaves

        return mx.compile(pure_step)

    def __call__(self, state: TrainState, grads: Grads) -> TrainState:
        step = state.step
        concrete = step if isinstance(step, int) else static_step(step)
        p_leaves, p_td = flatten(state.params)
        s_leaves, s_td = flatten(state.opt_state)
        g_leaves, g_td = flatten(grads)
        _check_arrays(p_leaves, p_td, "params")
        _check_arrays(s_leaves, s_td, "opt_state")
        _check_arrays(g_leaves, g_td, "grads")
        if g_td != p_td or any(g.shape != p.shape for g, p in zip(g_leaves, p_leaves)):
            bad = [
                (path, f"grads {tuple(g.shape)} vs params {tuple(p.shape)}")
                for path, g, p in zip(p_td.paths(), g_leaves, p_leaves)
                if g.shape != p.shape
            ]
            raise TreeMismatchError(
                bad or [("", f"grads {g_td!r} vs params {p_td!r}")],
                "compile_step(packed=True): grads shaped unlike params",
            )
        layout, plan = self._layout(p_leaves, p_td, s_td)
        key = (layout, plan, _signature(g_leaves), _signature(s_leaves), concrete % self.opt.period)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = _PackedEntry(
                layout, plan, self._build(layout, plan, concrete), [False]
            )
        last = self._last
        inputs = p_leaves + s_leaves
        if (
            last is not None
            and len(last[0]) == len(inputs)
            and all(a is b for a, b in zip(last[0], inputs))
        ):
            p_bufs, ps_leaves = last[1], last[2]
        else:
            p_bufs = pack(layout, p_leaves)
            ps_leaves = pack_state(plan, layout, s_leaves)
        nb = len(layout.buffers)
        out = entry.fn(mx.array(concrete, dtype=mx.int32), p_bufs, ps_leaves, g_leaves)
        new_p_bufs, new_ps = out[:nb], out[nb:]
        new_p_leaves = unpack(layout, new_p_bufs)
        new_s_leaves = unpack_state(plan, layout, new_ps)
        new = TrainState(unflatten(p_td, new_p_leaves), unflatten(s_td, new_s_leaves), step + 1)
        if self.verify and not entry.verified[0]:
            _verify(apply_gradients(self.opt, state, grads), new)
            entry.verified[0] = True
        self._last = (tuple(new_p_leaves + new_s_leaves), new_p_bufs, new_ps)
        return new


def _verify(expected: TrainState, got: TrainState, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Raise ``NotPackableError`` naming the first leaf where the packed step differs from
    the eager per-leaf step."""
    tree = {"params": expected.params, "opt_state": expected.opt_state}
    e_leaves, td = flatten(tree)
    g_leaves = flatten({"params": got.params, "opt_state": got.opt_state})[0]
    for path, e, g in zip(td.paths(), e_leaves, g_leaves):
        if e.shape != g.shape or not mx.allclose(e, g, rtol=rtol, atol=atol, equal_nan=True).item():
            raise NotPackableError(
                f"compile_step(packed=True): the packed step differs from apply_gradients at "
                f"{path!r}; the optimizer is not elementwise over params (per-leaf shapes, "
                "labels or masks), use compile_step(opt) instead"
            )
