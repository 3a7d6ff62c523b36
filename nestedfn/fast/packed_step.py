"""``compile_step(opt, packed=True)``: an elementwise optimizer stepped on flat buffers.

Why: on a tree of hundreds of small arrays (a LoRA adapter: 336 arrays) a compiled step still
launches one fused kernel per leaf and per operation group, and Python walks every leaf;
dispatch, not arithmetic, dominates.  Here the optimizer state lives in a few flat buffers
per dtype (``nestedfn.fast.packing``) and one step is

1. the param and gradient leaves concatenated into the buffers' layout (``nestedfn.fast.gather``:
   one kernel per buffer on CUDA);
2. ``opt.update`` once over the buffers: one fused kernel per buffer;
3. the new params returned as zero-copy views of the new param buffers, in the params' own
   tree layout (what the model needs); the state stays packed (``PackedState``).

The params are gathered afresh at every call, never taken from a cache of the last call's
buffers: an MLX array can be changed in place (``x[i] = v`` keeps the object), so nothing
short of reading it proves it unchanged.  A tree-layout ``opt_state`` (from
``nestedfn.init`` or a checkpoint) is accepted and packed on the way in; ``unpack_state``
gives the tree layout back.

Valid for optimizers that are elementwise over params (Adam, SGD, momentum, Lion, weight
decay without a mask, ...; global reductions such as ``clip_by_global_norm`` are fine).
Per-leaf shapes, labels, masks or tier maps are not: with ``verify`` (default) the first step
of every graph is also computed eagerly per leaf and a mismatch raises ``NotPackableError``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.fast.gather import gather
from nestedfn.fast.packing import (
    NotPackableError,
    PackLayout,
    StatePlan,
    pack_layout,
    pack_state,
    plan_state,
    unpack,
    unpack_state,
)
from nestedfn.optim.checks import grads_problems
from nestedfn.optim.core import (
    Grads,
    Optimizer,
    OptState,
    Params,
    TrainState,
    apply_gradients,
    apply_updates,
    static_step,
    tracing_step,
)
from nestedfn.tree.codegen import leaf_getter, tree_builder
from nestedfn.tree.structure import TreeDef, TreeMismatchError, flatten, unflatten

__all__ = ["PackedCompiledStep", "PackedState"]

_SHAPE = operator.attrgetter("shape")
_LOW = (mx.float16, mx.bfloat16)
_DTYPE = operator.attrgetter("dtype")


def first_mismatch(expected: Any, got: Any, low: bool, exact: Any = None) -> str | None:
    """The path of the first leaf of ``got`` that differs from ``expected`` (same structure)
    by more than a fused kernel's rounding, or ``None``.  A fused kernel rounds once where
    eager ops round each intermediate: a few ulps of float32 are allowed, or of a low
    precision where the leaf is low precision or ``low`` says the computation rounds in one
    elsewhere; a non-elementwise optimizer differs grossly.

    ``exact``: the same step in float32 (the low-precision state cast up), where the caller has
    it.  A low-precision leaf then passes when it is about as accurate as ``expected``:
    ``|got - exact| <= 2 |expected - exact| + 2^-8 |exact|`` in the L2 norm over the leaf.  Two
    graphs of bfloat16 arithmetic round their intermediates differently on a GPU: on an H100
    the resident and the eager steps differed by 0.015 on a leaf of scale 4 (elementwise far
    beyond bfloat16 rounding of the small entries), while both were within 4% of float32."""
    e_leaves, td = flatten(expected)
    g_leaves = flatten(got)[0]
    x_leaves = flatten(exact)[0] if exact is not None else [None] * len(e_leaves)
    for path, e, g, x in zip(td.paths(), e_leaves, g_leaves, x_leaves):
        if e.shape != g.shape:
            return path
        is_low = low or e.dtype in _LOW
        if x is not None and is_low and mx.all(mx.isfinite(e)).item():
            if not _as_accurate(g, e, x):
                return path
            continue
        rtol, atol = (3e-2, 1e-3) if is_low else (1e-4, 1e-6)
        a, b = e.astype(mx.float32), g.astype(mx.float32)
        if not mx.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True).item():
            return path
    return None


def _as_accurate(got: mx.array, expected: mx.array, exact: mx.array) -> bool:
    """``|got - exact| <= 2 |expected - exact| + 2^-8 |exact|`` (L2 norms, in float32)."""
    x = exact.astype(mx.float32)

    def dist(a: mx.array) -> mx.array:
        return mx.linalg.norm((a.astype(mx.float32) - x).reshape(-1))

    bound = 2 * dist(expected) + 2.0**-8 * mx.linalg.norm(x.reshape(-1))
    return bool((dist(got) <= bound).item())  # False for a NaN in got


class PackedState(NamedTuple):
    """The ``opt_state`` a packed step returns: the optimizer's state over flat buffers."""

    inner: OptState


def _check_arrays(leaves: list[Any], treedef: TreeDef, what: str) -> None:
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, mx.array):
            raise TypeError(
                f"compile_step(packed=True): {what} leaf {treedef.paths()[i]!r} is a "
                f"{type(leaf).__name__}, not an mx.array"
            )


def _check_float_grads(entry: Any, g_leaves: list[mx.array]) -> None:
    """Packed buffers hold floating-point gradients: name the first leaf that is not."""
    for path, g in zip(entry.params_def.paths(), g_leaves):
        if not mx.issubdtype(g.dtype, mx.floating):
            raise NotPackableError(
                f"compile_step(packed=True): grads leaf {path!r} has dtype "
                f"{str(g.dtype).rsplit('.', 1)[-1]}; the "
                "packed step takes floating-point gradients (cast them, or use "
                "compile_step(opt))"
            )


class _Layout(NamedTuple):
    """Everything fixed by one params structure (shapes and dtypes included)."""

    opt: Optimizer  # what runs on the buffers: the step's optimizer, rebound to its groups
    layout: PackLayout
    params_def: TreeDef
    packed_def: TreeDef  # structure of opt.init(buffers)
    tree_def: TreeDef  # structure of opt.init(params)
    plan: StatePlan
    packed_sig: tuple  # (shape, dtype) of every packed-state leaf
    owners: list  # per buffer, the thread (of ``threads``) that gathers and updates it
    get_leaves: Callable[[Any], list | None]  # treecode.leaf_getter(params_def, False)
    build_params: Callable[[list], Any]  # treecode.tree_builder(params_def)
    get_packed: Callable[[Any], list | None]  # treecode.leaf_getter(packed_def)


def _arrays_shaped(leaves: list | None, entry: _Layout) -> bool:
    """Whether ``leaves`` are MLX arrays with the shapes of ``entry``'s params."""
    if leaves is None or set(map(type, leaves)) - {mx.array}:
        return False
    return tuple(map(_SHAPE, leaves)) == entry.layout.shapes


class PackedCompiledStep:
    """``(state, grads) -> state``: ``apply_gradients`` on flat buffers, compiled.

    ``state.params`` is the usual tree; ``state.opt_state`` is a ``PackedState`` (or, on the
    way in, the tree layout ``opt.init(params)`` makes).  ``graphs_built`` counts compiled
    graphs (one per params layout and ``opt.phase(step)``).
    """

    def __init__(
        self,
        opt: Optimizer,
        chunk_size: int | None = None,
        verify: bool = True,
        threads: int | None = None,
    ):
        if not isinstance(opt.period, int) or opt.period < 1:
            raise ValueError(
                f"compile_step: Optimizer.period must be a positive int, got {opt.period!r}"
            )
        self.opt = opt
        self.chunk_size = chunk_size
        self.verify = verify
        if threads is None:
            threads = min(2, os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1
        if threads < 1:
            raise ValueError(f"compile_step: threads must be >= 1, got {threads}")
        self.threads = threads
        self._streams: list[Any] = []
        self._layouts: dict[Any, _Layout] = {}
        self._graphs: dict[Any, Callable[..., Any]] = {}
        self._verified: set[Any] = set()
        self._last: _Layout | None = None  # the layout of the last call's params

    @property
    def graphs_built(self) -> int:
        """How many compiled graphs this step function has traced."""
        return len(self._graphs)

    # -- layouts ---------------------------------------------------------------------------

    def _entry(self, params: Params) -> tuple[_Layout, list[mx.array]]:
        """The layout for ``params`` (cached per structure, shapes and dtypes) and its leaves."""
        leaves, td = flatten(params)
        _check_arrays(leaves, td, "params")
        key = (td, tuple((tuple(x.shape), x.dtype) for x in leaves))
        entry = self._layouts.get(key)
        if entry is None:
            entry = self._layouts[key] = self._make_layout(params, leaves, td)
        return entry, leaves

    def _make_layout(self, params: Params, leaves: list[mx.array], td: TreeDef) -> _Layout:
        groups = None if self.opt.pack_groups is None else self.opt.pack_groups(params)
        layout = pack_layout(
            leaves, td, self.chunk_size, groups=None if groups is None else groups.labels
        )
        zeros = [
            mx.zeros(shape, dtype=leaves[idx[0]].dtype)
            for shape, idx in zip(layout.buffer_shapes, layout.buffers)
        ]
        opt, subsets = self.opt, ()
        if groups is not None:  # one optimizer over the buffers, each labelled with its group
            opt, buffer_subdefs = groups.rebind(list(layout.groups))
            subsets = tuple(
                (sub, bsub, tuple(i for i, g in enumerate(groups.labels) if g == k))
                for k, (sub, bsub) in enumerate(zip(groups.subdefs, buffer_subdefs))
            )
        try:
            packed_leaves, packed_def = flatten(opt.init(zeros))
        except (ValueError, TypeError, LookupError) as e:
            raise NotPackableError(
                "compile_step(packed=True): the optimizer cannot be initialised on packed "
                f"buffers ({type(e).__name__}: {e}); it is not elementwise over params, use "
                "compile_step(opt) instead"
            ) from e
        _check_arrays(packed_leaves, packed_def, "packed opt_state")
        tree_def = flatten(self.opt.init(params))[1]
        plan = plan_state(tree_def, packed_def, td, flatten(zeros)[1], subsets)
        sig = tuple((tuple(x.shape), x.dtype) for x in packed_leaves)
        return _Layout(
            opt,
            layout,
            td,
            packed_def,
            tree_def,
            plan,
            sig,
            self._thread_owners(layout),
            leaf_getter(td, check_leaves=False),  # every leaf's type and shape are checked
            tree_builder(td),
            leaf_getter(packed_def),
        )

    # -- state conversions -----------------------------------------------------------------

    def pack_state(self, state: TrainState) -> TrainState:
        """``state`` with a tree-layout ``opt_state`` converted to a ``PackedState``."""
        if isinstance(state.opt_state, PackedState):
            return state
        entry, _ = self._entry(state.params)
        return state._replace(opt_state=PackedState(self._pack_tree_state(entry, state.opt_state)))

    def unpack_state(self, state: TrainState) -> TrainState:
        """``state`` with its ``PackedState`` as the tree layout ``opt.init(params)`` makes
        (params-shaped parts as views of the buffers): for checkpoints, inspection, or
        ``apply_gradients``."""
        if not isinstance(state.opt_state, PackedState):
            return state
        entry, _ = self._entry(state.params)
        leaves = self._packed_leaves(entry, state.opt_state)
        tree = unflatten(entry.tree_def, unpack_state(entry.plan, entry.layout, leaves))
        return state._replace(opt_state=tree)

    def init(self, params: Params) -> TrainState:
        """``nestedfn.init(opt, params)`` with the state packed."""
        return self.pack_state(TrainState(params, self.opt.init(params), 0))

    def _pack_tree_state(self, entry: _Layout, opt_state: OptState) -> OptState:
        leaves, td = flatten(opt_state)
        if td != entry.tree_def:
            raise TreeMismatchError(
                [("opt_state", f"{td!r} vs opt.init(params) {entry.tree_def!r}")],
                "compile_step(packed=True): opt_state is shaped unlike opt.init(params)",
            )
        _check_arrays(leaves, td, "opt_state")
        return unflatten(entry.packed_def, pack_state(entry.plan, entry.layout, leaves))

    def _packed_leaves(self, entry: _Layout, packed: PackedState) -> list[mx.array]:
        leaves = entry.get_packed(packed.inner)
        if leaves is None or entry.packed_sig != tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, mx.array) else x for x in leaves
        ):
            raise TreeMismatchError(
                [("opt_state", "a PackedState made for another params layout or optimizer")],
                "compile_step(packed=True): opt_state does not fit these params",
            )
        return leaves

    # -- the step --------------------------------------------------------------------------

    def _thread_owners(self, layout: PackLayout) -> list[int]:
        """The thread of every buffer: whole buffers, about equal work per thread."""
        k, total = self.threads, sum(layout.sizes) or 1
        owners, cum = [], 0
        for size in layout.sizes:
            owners.append(min(k - 1, (2 * cum + size) * k // (2 * total)))
            cum += size
        return owners

    def _buffer_streams(self, entry: _Layout) -> list[Any] | None:
        """Per buffer, the CPU stream of its thread: its gather, its arithmetic and its
        outputs all run there.  None with one thread, or when the default device is not the
        CPU (a CUDA gather kernel must run on the GPU's stream; the threads' graphs still run
        on CPU streams, as asked)."""
        if self.threads == 1 or mx.default_device() != mx.cpu:
            return None
        return [self._thread_streams()[t] for t in entry.owners]

    def _thread_streams(self) -> list[Any]:
        if not self._streams:
            self._streams = [mx.new_stream(mx.cpu) for _ in range(self.threads)]
        return self._streams

    def _groups(self, entry: _Layout) -> list[tuple[int, list[int]]]:
        """Per thread with work: the thread and its output positions (new buffers, then
        packed-state leaves; scalars go to thread 0)."""
        layout, owner = entry.layout, entry.owners
        state_owner: list[int] = []
        for kind, n, j in entry.plan.segments:
            if kind == "copy":
                state_owner.extend([0] * n)
            else:  # the subset's buffers, in buffer order
                sub = entry.plan.subsets[j][0] if j >= 0 else None
                state_owner.extend(
                    owner[b] for b, idx in enumerate(layout.buffers) if sub is None or idx[0] in sub
                )
        per_pos = owner + state_owner
        groups: list[list[int]] = [[] for _ in range(self.threads)]
        for pos, g in enumerate(per_pos):
            groups[g].append(pos)
        assert len(per_pos) == len(layout.buffers) + len(entry.packed_sig)
        return [(t, g) for t, g in enumerate(groups) if g]

    def _build(
        self, entry: _Layout, trace_step: int
    ) -> list[tuple[Callable[..., Any], list[int], int]]:
        """The compiled graphs of one step: per thread with work, the graph, its output
        positions and the thread."""
        opt, packed_def = entry.opt, entry.packed_def

        def pure_step(step: mx.array, p_bufs: list, ps_leaves: list, g_bufs: list) -> list:
            opt_state = unflatten(packed_def, ps_leaves)
            with tracing_step(trace_step):
                try:
                    updates, new_state = opt.update(g_bufs, opt_state, list(p_bufs), step)
                except TreeMismatchError as e:
                    raise NotPackableError(
                        "compile_step(packed=True): the optimizer needs a tree shaped like the "
                        "params (a mask, labels or a tier map inside it) and gets the packed "
                        f"buffers, a list ({' '.join(str(e).split())}); use compile_step(opt)"
                    ) from e
            new_p = apply_updates(list(p_bufs), updates)
            leaves, td = flatten(new_state)
            if td != packed_def:
                raise NotPackableError(
                    "compile_step(packed=True): the optimizer's state changed structure from "
                    f"{packed_def!r} to {td!r} in one step"
                )
            _check_arrays(leaves, td, "new packed opt_state")
            # the views are made outside the graph (``unpack``: one split per buffer):
            # replaying a compiled graph costs per output, and there are hundreds of views
            return list(new_p) + leaves

        groups = self._groups(entry)
        if len(groups) == 1:
            return [(mx.compile(pure_step), groups[0][1], groups[0][0])]

        # one graph per thread: each traces the whole update but returns only its outputs, so
        # mx.compile keeps only the work those outputs need (anything shared, such as a global
        # norm, is computed by each graph: correct for any optimizer, elementwise or not)
        def part(pos: list[int]) -> Callable[..., Any]:
            def fn(*args: Any) -> list:
                out = pure_step(*args)
                return [out[i] for i in pos]

            return mx.compile(fn)

        return [(part(pos), pos, t) for t, pos in groups]

    def __call__(self, state: TrainState, grads: Grads) -> TrainState:
        step = state.step
        concrete = step if isinstance(step, int) else static_step(step)
        # the usual loop passes params shaped as last time: their layout without a TreeDef
        last = self._last
        p_leaves = None if last is None else last.get_leaves(state.params)
        if _arrays_shaped(p_leaves, last) and tuple(map(_DTYPE, p_leaves)) == last.layout.dtypes:
            entry = last
        else:
            entry, p_leaves = self._entry(state.params)
        # the params' own shapes and dtypes (checked above or by _entry): one dtype per buffer
        streams = self._buffer_streams(entry)
        p_bufs = gather(entry.layout, p_leaves, dtypes_checked=True, streams=streams)
        g_leaves = entry.get_leaves(grads)
        if not _arrays_shaped(g_leaves, entry):
            g_leaves, g_def = flatten(grads)
            problems = grads_problems(p_leaves, entry.params_def, g_leaves, g_def)
            if not problems:  # same shapes, but a leaf that is not an array
                problems = [
                    (path, f"grads {type(g).__name__}, not an mx.array")
                    for path, g in zip(entry.params_def.paths(), g_leaves)
                    if not isinstance(g, mx.array)
                ]
            raise TreeMismatchError(
                problems, "compile_step(packed=True): grads shaped unlike params"
            )
        opt_state = state.opt_state
        if isinstance(opt_state, PackedState):
            ps_leaves = self._packed_leaves(entry, opt_state)
        else:
            ps_leaves = flatten(self._pack_tree_state(entry, opt_state))[0]
        g_dtypes = tuple(map(_DTYPE, g_leaves))
        dkey = "params" if g_dtypes == entry.layout.dtypes else g_dtypes
        gkey = (id(entry), dkey, self.opt.phase(concrete))
        fn = self._graphs.get(gkey)
        if fn is None:
            if dkey != "params":
                _check_float_grads(entry, g_leaves)
            fn = self._graphs[gkey] = self._build(entry, concrete)
        # grads with the params' dtypes: each buffer is one dtype (the layout groups by it)
        g_bufs = gather(entry.layout, g_leaves, dtypes_checked=dkey == "params", streams=streams)
        args = (mx.array(concrete, dtype=mx.int32), p_bufs, ps_leaves, g_bufs)
        if len(fn) == 1:  # one graph: the default stream (on a GPU, the GPU's)
            out = fn[0][0](*args)
        else:
            out = [None] * sum(len(pos) for _, pos, _ in fn)
            thread_streams = self._thread_streams()
            for part, pos, t in fn:
                with mx.stream(thread_streams[t]):
                    for i, x in zip(pos, part(*args)):
                        out[i] = x
        nb = len(entry.layout.buffers)
        views = unpack(entry.layout, out[:nb])
        new_ps = out[nb:]
        new = TrainState(
            entry.build_params(views),
            PackedState(unflatten(entry.packed_def, new_ps)),
            step + 1,
        )
        if self.verify and gkey not in self._verified:
            self._check(state, grads, new)
            self._verified.add(gkey)
        self._last = entry
        return new

    def _check(self, state: TrainState, grads: Grads, got: TrainState) -> None:
        """Raise ``NotPackableError`` naming the first leaf where this step differs from the
        eager per-leaf ``apply_gradients``."""
        expected = apply_gradients(self.opt, self.unpack_state(state), grads)
        got = self.unpack_state(got)
        low_grads = any(g.dtype in _LOW for g in flatten(grads)[0])
        path = first_mismatch(
            {"params": expected.params, "opt_state": expected.opt_state},
            {"params": got.params, "opt_state": got.opt_state},
            low_grads,  # the gradients' intermediates round in their precision
        )
        if path is not None:
            raise NotPackableError(
                "compile_step(packed=True): the packed step differs from apply_gradients at "
                f"{path!r}; the optimizer is not elementwise over params (per-leaf shapes, "
                "labels, masks or tiers), use compile_step(opt) instead"
            )
