"""``resident_step(opt, loss_fn, params)``: a training step whose parameters stay packed.

Why: a step that takes a params tree and hands back a fresh one pays MLX's per-array cost for
every leaf, however few kernels it launches.  On a GPU the LoRA tree's 336 params and 336
gradients read into flat buffers, and 336 views handed back, cost about 1 ms (the "gather +
hand-back floor" of ``benchmarks/step_latency.py``), more than the whole of torch's fused
Adam.  Here nothing of 336 leaves ever crosses a graph boundary: the parameters *live* as
the flat buffers of a ``PackLayout`` (``nestedfn.fast.packing``), and one compiled graph per
batch structure and optimizer phase does the whole step::

    views          = unpack(layout, buffers)                # inside the graph
    loss, g_views  = value_and_grad(loss_fn)(tree(views), *batch)
    g_bufs         = gather(layout, g_views)                # still inside the graph
    updates, state = opt.update(g_bufs, state, buffers, step)   # over the buffers
    buffers        = buffers + updates

``g_bufs`` is the gradient with respect to the buffers (a buffer's gradient is its leaves'
gradients laid out as the leaves are).  It is taken through the views, not through ``split``:
``split``'s VJP builds each leaf's cotangent as a zero-padded copy of the whole buffer, and a
custom VJP (``mx.custom_function``) puts a primitive with 336 inputs and outputs into the
graph (on the loaded 2-core CPU the LoRA tree's forward + backward took about 5x and 1.5x as
long those ways as through the views).  ``gather`` is one kernel per
buffer on CUDA (``nestedfn.fast.gather``), ``concatenate`` elsewhere.  The graph's inputs and
outputs are the buffers, the packed optimizer state, the batch and the loss: a few dozen
arrays on the CPU (buffers of ``default_chunk()`` elements), a handful on a GPU.

The numbers are those of ``apply_gradients(opt, state, grads)`` with ``grads`` from
``mx.value_and_grad(loss_fn)`` on the tree (up to the rounding of fused kernels), for the
optimizers ``compile_step(opt, packed=True)`` takes: elementwise ones (Adam, AdamW, SGD,
momentum, Lion, global-norm clipping) and nested ones (``nested``, ``nested_adam``, through
``Optimizer.pack_groups``: each tier gets buffers of its own).  With ``verify`` (default) the
first step of every graph is also computed the usual way on the tree, and any difference
raises ``NotPackableError`` naming the path.

What it costs: the model must read its weights from the tree ``loss_fn`` is given (a
functional loss, or ``model.update(params)`` inside ``loss_fn``); the params are the state's
buffers, so an edit of a params tree outside the step is only seen through ``pack_state``;
the forward and backward run on one stream (``threads`` splits only the gather and the
optimizer over CPU streams, each its own buffers, as ``compile_step(packed=True)`` does).

The layout, the optimizer rebound to the buffers (a nested optimizer's tiers) and the plan
between the tree and the packed optimizer state are the packed step's own
(``PackedCompiledStep``), so both steps read and write the same packed states.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.fast.gather import gather
from nestedfn.fast.packed_step import PackedCompiledStep, PackedState, _Layout, first_mismatch
from nestedfn.fast.packing import NotPackableError, PackLayout, pack, unpack
from nestedfn.optim.core import (
    Optimizer,
    OptState,
    Params,
    TrainState,
    apply_gradients,
    apply_updates,
    tracing_step,
)
from nestedfn.tree.structure import (
    TreeDef,
    TreeMismatchError,
    _structure_diff,
    flatten,
    tree_map,
    unflatten,
)

__all__ = ["ResidentState", "ResidentStep", "resident_step"]

_LOW = (mx.float16, mx.bfloat16)
_SIG = operator.attrgetter("shape", "dtype")


class ResidentState(NamedTuple):
    """Everything a resident step changes: the params as the layout's flat buffers, the
    optimizer state over those buffers (``opt.init(buffers)``'s structure) and the step
    count.  ``ResidentStep.params`` gives the params tree, ``unpack_state`` the whole
    ``TrainState`` in tree layout."""

    buffers: tuple[mx.array, ...]
    opt_state: OptState
    step: int


def _diff(expected: TreeDef, got: TreeDef, what: str) -> list[tuple[str, str]]:
    return [
        (path, why.replace("the first tree", "the params").replace("the second tree", what))
        for path, why in _structure_diff(expected, got)
    ]


class ResidentStep:
    """``(state, *batch) -> (loss, state)``: ``mx.value_and_grad(loss_fn)`` and
    ``apply_gradients(opt, ·)`` in one compiled graph over the packed params.

    ``loss_fn(params, *batch)`` returns a scalar loss, or a tuple whose first element is the
    scalar loss and whose others are returned alongside it (``mx.value_and_grad``'s rule);
    ``batch`` is any number of trees of arrays.  ``graphs_built`` counts the graphs (one per
    batch structure and ``opt.phase(step)``; ``mx.compile`` retraces a graph by itself for
    new batch shapes).
    """

    def __init__(
        self,
        opt: Optimizer,
        loss_fn: Callable[..., Any],
        params: Params,
        chunk_size: int | None = None,
        verify: bool = True,
        threads: int | None = None,
    ):
        if not callable(loss_fn):
            raise TypeError(f"resident_step: loss_fn must be callable, got {loss_fn!r}")
        # the packed step's layout machinery: buffers per dtype/trailing shape (and tier),
        # the optimizer rebound to them, and the plan between tree and packed states
        # (and, with threads, which CPU stream gathers and updates each buffer)
        self._packer = PackedCompiledStep(opt, chunk_size=chunk_size, verify=False, threads=threads)
        self.threads = self._packer.threads
        leaves, td = flatten(params)
        for path, x in zip(td.paths(), leaves):
            if not isinstance(x, mx.array):
                raise NotPackableError(
                    f"resident_step: params leaf {path!r} is a {type(x).__name__}, not an "
                    "mx.array; every parameter lives in a packed buffer"
                )
        self.opt = opt
        self.loss_fn = loss_fn
        self.verify = verify
        self._entry: _Layout = self._packer._entry(params)[0]
        if not self._entry.layout.shapes:
            raise NotPackableError(
                f"resident_step: params has no array leaves ({self._entry.params_def!r}); "
                "there is nothing to train"
            )
        self._params = params
        layout = self._entry.layout
        self._buffer_sig = tuple(
            (shape, self._entry.layout.dtypes[idx[0]])
            for shape, idx in zip(layout.buffer_shapes, layout.buffers)
        )
        self._graphs: dict[Any, tuple[Callable[..., Any], list[TreeDef]]] = {}
        self._verified: set[Any] = set()

    @property
    def layout(self) -> PackLayout:
        """How the params tree maps onto the buffers."""
        return self._entry.layout

    @property
    def graphs_built(self) -> int:
        """How many compiled graphs this step has traced."""
        return len(self._graphs)

    # -- states ----------------------------------------------------------------------------

    def init(self) -> ResidentState:
        """The params given at construction, packed, with ``opt.init`` of them (packed)."""
        params = self._params
        return self.pack_state(TrainState(params, self.opt.init(params), 0))

    def pack_state(self, state: TrainState) -> ResidentState:
        """A tree-layout ``TrainState`` (from ``nestedfn.init``, ``apply_gradients``, a
        checkpoint, or ``unpack_state``) as a ``ResidentState``.  Its params must have the
        structure, shapes and dtypes of the params the step was built for (else
        ``TreeMismatchError`` naming the paths), its opt_state ``opt.init(params)``'s."""
        leaves = self._params_leaves(state.params, "pack_state")
        tree_def = flatten(state.opt_state)[1]
        if tree_def != self._entry.tree_def:
            raise TreeMismatchError(
                [("opt_state", f"{tree_def!r} vs opt.init(params) {self._entry.tree_def!r}")],
                "resident_step.pack_state: opt_state shaped unlike opt.init(params)",
            )
        packed = self._packer._pack_tree_state(self._entry, state.opt_state)
        step = state.step if isinstance(state.step, int) else int(state.step.item())
        return ResidentState(tuple(pack(self.layout, leaves)), packed, step)

    def params(self, state: ResidentState) -> Params:
        """The params tree of ``state``: zero-copy views of its buffers (for evaluation,
        checkpoints, ``model.update``).  Assigning into a view does not change the state."""
        self._check_state(state)
        return self._entry.build_params(unpack(self.layout, list(state.buffers)))

    def unpack_state(self, state: ResidentState) -> TrainState:
        """``state`` as the ``TrainState`` ``apply_gradients`` keeps: the params tree and the
        tree-layout optimizer state (``opt.init(params)``'s structure; params-shaped parts as
        views), e.g. for a checkpoint or ``tier_stats``."""
        params = self.params(state)
        tree = self._packer.unpack_state(TrainState(params, PackedState(state.opt_state), 0))
        return TrainState(params, tree.opt_state, state.step)

    def _params_leaves(self, params: Params, who: str) -> list[mx.array]:
        entry = self._entry
        leaves, td = flatten(params)
        if td != entry.params_def:
            raise TreeMismatchError(
                _diff(entry.params_def, td, "these params"),
                f"resident_step.{who}: params shaped unlike the params the step was built for",
            )
        problems = [
            (
                path,
                f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')} vs "
                f"{dt} {shape}",
            )
            for path, x, shape, dt in zip(
                td.paths(), leaves, entry.layout.shapes, entry.layout.dtypes
            )
            if not isinstance(x, mx.array) or tuple(x.shape) != shape or x.dtype != dt
        ]
        if problems:
            raise TreeMismatchError(
                problems, f"resident_step.{who}: params leaves unlike the step's params"
            )
        return leaves

    def _check_state(self, state: Any) -> tuple[list[mx.array], list[Any]]:
        """The buffers and packed-state leaves of ``state``, refused (naming what) unless it
        is a ``ResidentState`` of this step's layout and optimizer."""
        if not isinstance(state, ResidentState):
            raise TypeError(
                f"resident_step: expected a ResidentState, got {type(state).__name__} (a "
                "TrainState becomes one through pack_state)"
            )
        bufs = list(state.buffers)
        got = [_SIG(b) if isinstance(b, mx.array) else type(b).__name__ for b in bufs]
        if got != list(self._buffer_sig):
            raise TreeMismatchError(
                [("buffers", f"{got} vs the layout's {list(self._buffer_sig)}")],
                "resident_step: the state's buffers do not fit this step's layout",
            )
        entry = self._entry
        ps = entry.get_packed(state.opt_state)
        if ps is None or entry.packed_sig != tuple(
            _SIG(x) if isinstance(x, mx.array) else x for x in ps
        ):
            raise TreeMismatchError(
                [
                    (
                        "opt_state",
                        f"{state.opt_state!r:.200} vs opt.init(buffers) {entry.packed_def!r}",
                    )
                ],
                "resident_step: the state's opt_state was made for another layout or optimizer",
            )
        if not isinstance(state.step, int):
            raise TypeError(f"resident_step: state.step must be an int, got {state.step!r}")
        return bufs, ps

    # -- the step --------------------------------------------------------------------------

    def _build(self, batch_def: TreeDef, trace_step: int) -> tuple[Callable[..., Any], list]:
        entry, loss_fn, layout = self._entry, self.loss_fn, self._entry.layout
        opt, packed_def = entry.opt, entry.packed_def
        out_def: list[TreeDef] = []

        def loss_of_views(views: list[mx.array], batch_leaves: list[mx.array]) -> Any:
            out = loss_fn(entry.build_params(views), *unflatten(batch_def, batch_leaves))
            loss = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(loss, mx.array) or loss.ndim != 0:
                raise ValueError(
                    "resident_step: loss_fn must return a scalar mx.array (or a tuple whose "
                    f"first element is one), got {type(loss).__name__} "
                    f"{getattr(loss, 'shape', '')}"
                )
            return out

        value_and_grad = mx.value_and_grad(loss_of_views)
        # one CPU stream per thread (see compile_step(packed=True)); one thread: the default
        buffer_streams = self._packer._buffer_streams(entry)
        if buffer_streams is None:
            groups: list[tuple[Any, list[int]]] = [
                (None, list(range(len(layout.buffers) + len(entry.packed_sig))))
            ]
        else:
            streams = self._packer._thread_streams()
            groups = [(streams[t], pos) for t, pos in self._packer._groups(entry)]

        def pure_step(step: mx.array, buffers: list, ps_leaves: list, batch_leaves: list) -> list:
            value, g_views = value_and_grad(unpack(layout, buffers), batch_leaves)
            opt_state = unflatten(packed_def, ps_leaves)
            # a leaf's gradient has its shape and dtype (that of its buffer)
            g_bufs = gather(layout, g_views, dtypes_checked=True, streams=buffer_streams)
            outs: list[Any] = [None] * (len(buffers) + len(entry.packed_sig))
            for thread, positions in groups:
                # each thread's stream traces the whole update and keeps its own outputs:
                # what no output needs is never computed, and a shared reduction (a global
                # norm) is computed by each, so any optimizer gets eager's numbers
                with mx.stream(thread) if thread is not None else contextlib.nullcontext():
                    with tracing_step(trace_step):
                        updates, new_state = opt.update(g_bufs, opt_state, list(buffers), step)
                    new_bufs = apply_updates(list(buffers), updates)
                    leaves, td = flatten(new_state)
                if td != packed_def:
                    raise NotPackableError(
                        "resident_step: the optimizer's state changed structure from "
                        f"{packed_def!r} to {td!r} in one step"
                    )
                every = list(new_bufs) + leaves
                for i in positions:
                    outs[i] = every[i]
            v_leaves, v_def = flatten(value)
            bad = [p for p, x in zip(v_def.paths(), v_leaves) if not isinstance(x, mx.array)]
            if bad:
                raise TypeError(f"resident_step: loss_fn returned a non-array at {bad[0]!r}")
            out_def[:] = [v_def]
            return v_leaves + outs

        return mx.compile(pure_step), out_def

    def __call__(self, state: ResidentState, *batch: Any) -> tuple[Any, ResidentState]:
        bufs, ps_leaves = self._check_state(state)
        batch_leaves, batch_def = flatten(batch)
        for path, x in zip(batch_def.paths(), batch_leaves):
            if not isinstance(x, mx.array):
                raise TypeError(
                    f"resident_step: batch leaf {path!r} is a {type(x).__name__}, not an "
                    "mx.array (a compiled step would freeze it into the graph)"
                )
        step = state.step
        key = (batch_def, self.opt.phase(step))
        hit = self._graphs.get(key)
        if hit is None:
            hit = self._graphs[key] = self._build(batch_def, step)
        fn, out_def = hit
        out = fn(mx.array(step, dtype=mx.int32), bufs, ps_leaves, batch_leaves)
        n_value = out_def[0].num_leaves
        nb = len(bufs)
        value = unflatten(out_def[0], out[:n_value])
        new = ResidentState(
            tuple(out[n_value : n_value + nb]),
            unflatten(self._entry.packed_def, out[n_value + nb :]),
            step + 1,
        )
        if self.verify and key not in self._verified:
            self._check(state, batch, value, new)
            self._verified.add(key)
        return value, new

    def _check(self, state: ResidentState, batch: tuple, value: Any, got: ResidentState) -> None:
        """Raise ``NotPackableError`` naming the first leaf where this step differs from
        ``mx.value_and_grad`` on the tree and ``apply_gradients`` (with low-precision params,
        judged against the same step in float32: ``first_mismatch``)."""
        before = self.unpack_state(state)
        td = self._entry.params_def

        def loss_of_leaves(leaves: list[mx.array]) -> Any:
            return self.loss_fn(unflatten(td, leaves), *batch)

        def tree_step(start: TrainState) -> dict:
            loss, grads = mx.value_and_grad(loss_of_leaves)(flatten(start.params)[0])
            new = apply_gradients(self.opt, start, unflatten(td, grads))
            return {"loss": loss, "params": new.params, "opt_state": new.opt_state}

        after = self.unpack_state(got)
        low = any(dt in _LOW for dt in self.layout.dtypes)  # gradients and loss round there
        path = first_mismatch(
            tree_step(before),
            {"loss": value, "params": after.params, "opt_state": after.opt_state},
            low,
            tree_step(_upcast(before)) if low else None,  # the same step in float32
        )
        if path is not None:
            raise NotPackableError(
                "resident_step: the resident step differs from value_and_grad + "
                f"apply_gradients on the tree at {path!r}; the optimizer is not "
                "elementwise over params (per-leaf shapes, labels, masks or tiers), use "
                "compile_step(opt) instead"
            )


def _upcast(state: TrainState) -> TrainState:
    """``state`` with its low-precision arrays cast to float32."""

    def up(x: Any) -> Any:
        return x.astype(mx.float32) if isinstance(x, mx.array) and x.dtype in _LOW else x

    return TrainState(tree_map(up, state.params), tree_map(up, state.opt_state), state.step)


def resident_step(
    opt: Optimizer,
    loss_fn: Callable[..., Any],
    params: Params,
    chunk_size: int | None = None,
    verify: bool = True,
    threads: int | None = None,
) -> ResidentStep:
    """A training step ``(state, *batch) -> (loss, state)`` over params kept as flat buffers
    (``ResidentStep``; start with ``.init()`` or ``.pack_state(train_state)``).

    ``loss_fn(params, *batch)`` is differentiated with respect to the buffers inside one
    compiled graph that also runs ``opt``: the same numbers as ``mx.value_and_grad(loss_fn)``
    and ``apply_gradients(opt, ·)`` on the tree, without gathering or handing back a leaf.
    ``chunk_size``: elements per buffer (``default_chunk()`` of the device when ``None``).
    ``verify`` checks the first step of every graph against the tree computation.
    ``threads``: CPU streams that gather and update the buffers, each its own share, inside
    the one graph (default: 2 where the CPU is the default device and there are 2 cores,
    else 1, as in ``compile_step(packed=True)``); the forward and backward run on the
    default stream.
    """
    return ResidentStep(opt, loss_fn, params, chunk_size=chunk_size, verify=verify, threads=threads)
