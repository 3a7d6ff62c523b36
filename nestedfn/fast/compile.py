"""Compiled training steps: ``compile_step(opt)`` is ``apply_gradients`` under ``mx.compile``.

``mx.compile`` traces a pure function of arrays, so the step flattens ``(params, opt_state)``
and ``grads``, hands the compiled function the leaf lists and rebuilds the trees inside it.
The step count reaches the graph as an ``mx.array`` (a schedule ``lr(step)`` does not force a
retrace); an optimizer whose control flow depends on the step (nested tiers, accumulation)
declares ``Optimizer.period``/``phase_key`` and branches on ``static_step(step)``: one graph
per phase ``opt.phase(s)``, traced at the first step of that phase.  Graphs are cached per
``(state structure, grads structure, leaf shapes and dtypes, phase)`` and counted in
``graphs_built``.

On the CPU, optimizers with a native spec (Adam, AdamW, Lion, momentum and ``nested`` tiers
of them) take the native step instead (``nestedfn.fast.native``: one multi-tensor C++
primitive, bit-identical to ``apply_gradients``, same state layout); every call it cannot
serve exactly runs the MLX graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from nestedfn.fast.native import NativeStep
from nestedfn.fast.packed_step import PackedCompiledStep
from nestedfn.optim.checks import check_grads
from nestedfn.optim.core import (
    Grads,
    Optimizer,
    TrainState,
    apply_updates,
    static_step,
    tracing_step,
)
from nestedfn.optim.fused import describe
from nestedfn.tree import TreeDef, flatten, unflatten

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


def _dtypes(leaves: list[mx.array]) -> tuple[Any, ...]:
    """A shapeless graph's part of the signature: the leaves' dtypes (``mx.compile`` traces a
    shapeless function again for new dtypes, so they are a new graph here too)."""
    return tuple(x.dtype for x in leaves)


class CompiledStep:
    """``(state, grads) -> state`` equal to ``apply_gradients(opt, state, grads)``, compiled.

    ``graphs_built`` counts the graphs traced so far (1 for a ``period == 1`` optimizer on a
    fixed tree; one per distinct ``opt.phase(step)``, at most ``period``, for one whose
    control flow repeats every ``period`` steps).
    """

    def __init__(self, opt: Optimizer, shapeless: bool = False, native: bool = True):
        if not isinstance(opt.period, int) or opt.period < 1:
            raise ValueError(
                f"compile_step: Optimizer.period must be a positive int, got {opt.period!r}"
            )
        if opt.phase_key is not None and not callable(opt.phase_key):
            raise ValueError(
                "compile_step: Optimizer.phase_key must be None or a function step -> "
                f"hashable, got {opt.phase_key!r}"
            )
        self.opt = opt
        self.shapeless = shapeless
        self._graphs: dict[Any, tuple[Callable[..., Any], list[TreeDef]]] = {}
        spec = describe(opt)
        fused = NativeStep(opt, spec) if native and spec is not None else None
        self._native = fused if fused is not None and fused.supported() else None

    @property
    def graphs_built(self) -> int:
        """How many compiled graphs this step function has traced (a native step counts one
        per params structure, shapes, dtypes and phase it served, as a graph would)."""
        return len(self._graphs) + (len(self._native.keys) if self._native is not None else 0)

    @property
    def native_steps(self) -> int:
        """How many distinct (structure, phase) keys the native step has served (0: the MLX
        graph ran every step)."""
        return len(self._native.keys) if self._native is not None else 0

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
        if self._native is not None and not self.shapeless:
            new = self._native(state, grads)
            if new is not None:
                return new
        step = state.step
        concrete = step if isinstance(step, int) else static_step(step)
        state_leaves, state_td = flatten({"params": state.params, "opt_state": state.opt_state})
        grad_leaves, grads_td = flatten(grads)
        _check_arrays(state_leaves, state_td, "state")
        _check_arrays(grad_leaves, grads_td, "grads")
        sig = _dtypes if self.shapeless else _signature
        key = (state_td, grads_td, self.opt.phase(concrete), sig(state_leaves), sig(grad_leaves))
        entry = self._graphs.get(key)
        if entry is None or self.shapeless:
            # a new signature: the grads must fit the params (the graph would broadcast them,
            # or drop a complex gradient's imaginary part).  A shapeless graph serves new
            # shapes without a new key, so it checks every call (check_grads compares a
            # signature it has seen in one pass over the leaves)
            check_grads(state.params, grads, "compile_step")
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
    threads: int | None = None,
    native: bool = True,
) -> CompiledStep | PackedCompiledStep:
    """A compiled ``(state, grads) -> state`` giving the same results as
    ``apply_gradients(opt, state, grads)`` (up to float rounding of a schedule evaluated on
    an ``mx.array`` step instead of a Python int).

    One graph is traced per ``(tree structure, leaf shapes/dtypes, opt.phase(step))`` and
    reused; ``shapeless=True`` lets one graph serve changing leaf shapes (only valid for
    optimizers whose graph does not depend on shapes; one graph per leaf dtypes still, and
    the gradients are checked against the params at every call).

    ``packed=True`` runs an elementwise optimizer on flat buffers of about ``chunk_size``
    elements per dtype (``nestedfn.fast.packing.default_chunk()`` for the device when ``None``)
    (``PackedCompiledStep``): same inputs, outputs and tree layout, far fewer kernel
    dispatches on trees of many small arrays.  ``verify`` checks its first step
    of every graph against the eager per-leaf step.  ``threads`` splits the buffers over that
    many CPU streams, each gathering and updating its own buffers at once (default: 2 where
    the CPU is the default device and there are 2 cores, else 1); on a GPU, ``threads > 1``
    runs the graphs on CPU streams, so the arithmetic moves to the CPU.

    ``native=False`` always runs the MLX graph (the native step computes as eager
    ``apply_gradients`` does, bit for bit; an MLX graph reads the step as an ``mx.array``, so
    its bias corrections and schedules round in float32: compare graphs with graphs).
    ``NESTEDFN_NATIVE=0`` in the environment does the same for every step (a kill switch).
    """
    # the one place that picks how a step runs
    if native and not packed and mx.default_device() == mx.gpu:
        # the GPU's multi-tensor kernels; multitensor builds on CompiledStep (an import cycle)
        from nestedfn.fast import multitensor

        if multitensor.supports(opt):
            return multitensor.compile_step(opt, shapeless=shapeless)
    if packed:
        if shapeless:
            raise ValueError("compile_step: packed=True and shapeless=True cannot be combined")
        return PackedCompiledStep(opt, chunk_size=chunk_size, verify=verify, threads=threads)
    return CompiledStep(opt, shapeless=shapeless, native=native)
