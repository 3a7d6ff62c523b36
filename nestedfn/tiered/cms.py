"""Nested Learning: multi-frequency tiers with the Continuum Memory System (CMS) rule.

``nested(inner, tiers, frequencies)`` splits the parameters into tiers ``k = 0..K-1``; tier
``k`` updates every ``C_k = frequencies[k]`` steps.  With the 0-based ``step`` ``i``::

    A_k     <- A_k + g_i                                   every step (tiers with C_k > 1)
    if (i + 1) % C_k == 0:
        u_k, s_k = inner_k.update(A_k / C_k, s_k, θ_k, n_k)  (reduce="mean"; A_k for "sum")
        A_k <- 0,  n_k <- n_k + 1
    else:
        u_k = no_update(θ_k)                               θ_k comes back as it is

so a slow tier does not throw away the gradients of the steps it skips: it applies the whole
chunk at once.  ``n_k = i // C_k`` is
the tier's own clock: the inner optimizer sees only its tier's leaves and counts only its
tier's updates (Adam's bias correction included).

Which tiers are active depends only on ``i % lcm(C)``, so the optimizer declares that period
and branches on ``core.static_step(step)``.  Its ``phase_key`` is, per tier, the inner
optimizer's own phase at the tier's clock when the tier is active and ``None`` otherwise, so a
compiled step has one graph per distinct set of active tiers (3 for frequencies (1, 2, 4), not
4), and an inactive tier's inner optimizer is not in its graph at all.

Inside ``core.branch_free()`` (one graph for every step, the step a traced array: mlx-lm's
trainer through ``as_mlx_optimizer``) a tier instead runs its inner optimizer at every step and
``mx.where`` on ``(i + 1) % C_k == 0`` keeps its update, state, fresh chunk sum and count, or
the inactive step's values (``_gated_tier``): the same numbers, at the cost of every tier's
inner update on every step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim import optimizers
from nestedfn.optim.core import (
    Optimizer,
    OptState,
    PackGroups,
    Params,
    Step,
    branching_on,
    chain,
    is_no_update,
    learning_rate_of,
    no_update,
    static_step,
    tracing_step,
    with_learning_rate,
)
from nestedfn.optim.fused import NestedSpec, describe, register
from nestedfn.tiered.tiers import TierRule, by_depth, resolve
from nestedfn.tree import TreeDef, TreeMismatchError, flatten, tree_map, unflatten

__all__ = [
    "NestedState",
    "TierStats",
    "nested",
    "nested_adam",
    "tier_stats",
]

TierSpec = Any  # a tree of ints shaped like params, or (path, leaf) -> int
_LOW_PRECISION = (mx.float16, mx.bfloat16)


class NestedState(NamedTuple):
    """State of ``nested``; every leaf is an ``mx.array`` (or ``None``).

    inner:  per tier, the inner optimizer's state over that tier's leaves only.
    acc:    per tier, the running sum of the current chunk's gradients over the tier's leaves
            (float32 for float16/bfloat16 gradients); ``None`` for tiers of frequency 1.
    count:  per tier, an int32 scalar: updates the tier has applied so far.
    layout: int64 array ``(K, 3)``: per tier (frequency, arrays, parameters); constant, kept
            so that ``tier_stats(opt_state)`` needs nothing else.
    """

    inner: tuple
    acc: tuple
    count: tuple
    layout: mx.array


class TierStats(NamedTuple):
    """One row of ``tier_stats``."""

    tier: int
    frequency: int
    arrays: int
    parameters: int
    updates: int


class _Plan(NamedTuple):
    """How a params structure splits into tiers (computed once per ``TreeDef``)."""

    treedef: TreeDef
    index: tuple[tuple[int, ...], ...]  # per tier: positions of its leaves in flatten order
    subdefs: tuple[TreeDef, ...]  # per tier: the structure of its pruned sub-tree


def _paths(td: TreeDef) -> list[str]:
    """Dotted leaf paths for messages; leaf positions where the tree has no dotted paths."""
    try:
        return td.paths()
    except LookupError:
        return [f"<leaf {i}>" for i in range(td.num_leaves)]


def _rename(problems: list[tuple[str, str]], second: str) -> list[tuple[str, str]]:
    """``tree_map``'s diff speaks of the first/second tree: name them params and ``second``."""
    return [
        (p, why.replace("the first tree", "params").replace("the second tree", second))
        for p, why in problems
    ]


def _is_int(x: Any) -> bool:
    """Python and numpy integers; not ``bool`` (a ``True`` label is a bug, not tier 1)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _prune(node: Any, labels: Any, k: int) -> tuple[Any, bool]:
    """``node`` restricted to the leaves labelled ``k``.

    Dict entries without such leaves are dropped; list/tuple entries become ``None`` (an
    empty node), so every kept leaf keeps its dotted path.
    """
    if node is None:
        return None, False
    if isinstance(node, dict):
        out = {}
        for key, child in node.items():
            sub, has = _prune(child, labels[key], k)
            if has:
                out[key] = sub
        return out, bool(out)
    if isinstance(node, (list, tuple)):
        parts = [_prune(c, lab, k) for c, lab in zip(node, labels)]
        children = [s if h else None for s, h in parts]
        has = any(h for _, h in parts)
        if isinstance(node, list):
            return children, has
        if hasattr(type(node), "_fields"):
            return type(node)(*children), has
        return tuple(children), has
    return (node, True) if int(labels) == k else (None, False)


def _make_plan(params: Params, spec: TierSpec, frequencies: tuple[int, ...]) -> _Plan:
    """Resolve ``spec`` against ``params`` and check it: every leaf in exactly one tier, no tier
    empty, the labels tree shaped like params."""
    leaves, td = flatten(params)
    n_tiers = len(frequencies)
    if isinstance(spec, TierRule):
        spec = spec.resolve(params)
    if callable(spec):
        labels_leaves = [spec(p, x) for p, x in zip(td.paths(), leaves)]
    else:
        labels_leaves = flatten(resolve(spec, params))[0]
    paths = _paths(td)
    index: list[list[int]] = [[] for _ in range(n_tiers)]
    for i, (path, lab) in enumerate(zip(paths, labels_leaves)):
        if not _is_int(lab):
            raise ValueError(
                f"nested: leaf {path!r} has no tier (label {lab!r}); every parameter needs an "
                f"int tier in 0..{n_tiers - 1}"
            )
        if not 0 <= int(lab) < n_tiers:
            raise ValueError(
                f"nested: leaf {path!r} has tier {int(lab)}, out of range for "
                f"{n_tiers} frequencies {frequencies} (tiers are 0..{n_tiers - 1})"
            )
        index[int(lab)].append(i)
    for k, idx in enumerate(index):
        if not idx:
            raise ValueError(
                f"nested: tier {k} (frequency {frequencies[k]}) has no leaves; every tier "
                "needs at least one parameter (use fewer frequencies or another tier map)"
            )
    labels = unflatten(td, [int(lab) for lab in labels_leaves])
    subdefs = tuple(flatten(_prune(params, labels, k)[0])[1] for k in range(n_tiers))
    return _Plan(td, tuple(tuple(i) for i in index), subdefs)


def _check_frequencies(frequencies: Sequence[int]) -> tuple[int, ...]:
    freqs = tuple(frequencies)
    if not freqs:
        raise ValueError("nested: frequencies is empty; give at least one tier frequency")
    for k, f in enumerate(freqs):
        if not _is_int(f) or f < 1:
            raise ValueError(
                f"nested: frequency {f!r} of tier {k} is not a positive int (frequencies={freqs!r})"
            )
    return tuple(int(f) for f in freqs)


def _acc_zeros(g: mx.array) -> mx.array:
    dtype = mx.float32 if g.dtype in _LOW_PRECISION else g.dtype
    return mx.zeros(g.shape, dtype=dtype)


def nested(
    inner: Optimizer | Sequence[Optimizer],
    tiers: TierSpec,
    frequencies: Sequence[int] = (1, 2, 4),
    reduce: str = "mean",
) -> Optimizer:
    """A multi-frequency optimizer: tier ``k`` of the parameters updates every
    ``frequencies[k]`` steps with the CMS rule (the chunk's mean or sum of gradients).

    Args:
      inner: one ``Optimizer`` used by every tier (each tier gets its own state over its own
        leaves) or a sequence with one per tier.
      tiers: a tree of ints shaped like params (see ``nestedfn.tiered.tiers``), a function
        ``(path, leaf) -> int`` over dotted paths (``nestedfn.tree.to_flat``'s keys), a
        ``nestedfn.tiered.tiers.TierRule``, or ``"depth"``: ``by_depth(params, len(frequencies))``
        computed at ``init``.
      frequencies: positive ints; tier ``k`` updates on 0-based steps ``i`` with
        ``(i + 1) % frequencies[k] == 0``.
      reduce: ``"mean"`` (default: a learning rate means the same at every frequency) or
        ``"sum"`` (the paper's equation, ``θ ← θ − η Σ_chunk ∇``).

    Returns an ``Optimizer`` with ``period = lcm_k(frequencies[k] * inner_k.period)``, a
    ``phase_key`` that tells apart only steps whose active tiers (and their inner optimizers'
    phases) differ, and a ``NestedState``.  Leaves of tiers inactive at a step get
    ``core.no_update`` updates (``-0.0``): ``apply_updates`` returns those very arrays, and
    any other consumer adding them gets them back bit-identical.  Errors (at ``init``): a
    tier with no leaves, a leaf with no tier or a tier out of range, a tiers tree shaped unlike
    params; at construction: a frequency that is not a positive int, a wrong number of inner
    optimizers.
    """
    freqs = _check_frequencies(frequencies)
    return _nested(inner, _resolver(tiers, len(freqs), "shallow_fast", "nested"), freqs, reduce)


def _resolver(tiers: Any, n_tiers: int, order: str, who: str) -> Callable[[Params], TierSpec]:
    """``params -> tier spec``: ``"depth"`` is resolved against the params, anything else is
    passed on as is."""
    if isinstance(tiers, str):
        if tiers != "depth":
            raise ValueError(f"{who}: tiers must be 'depth' or a tier spec, got {tiers!r}")
        return lambda params: by_depth(params, n_tiers, order)
    return lambda params: tiers


def _inners(inner: Optimizer | Sequence[Optimizer], freqs: tuple[int, ...]) -> tuple:
    """One inner optimizer per tier."""
    if isinstance(inner, Optimizer):
        return (inner,) * len(freqs)
    inners = tuple(inner)
    if len(inners) != len(freqs) or not all(isinstance(o, Optimizer) for o in inners):
        raise ValueError(
            f"nested: inner must be one Optimizer or {len(freqs)} (one per frequency "
            f"{freqs}), got {len(inners)} item(s)"
        )
    return inners


def _check_grads_like(plan: _Plan, gtd: TreeDef, params: Params, grads: Any) -> None:
    """Raise ``TreeMismatchError`` naming where ``grads`` differs from ``params``."""
    if gtd == plan.treedef:
        return
    try:
        tree_map(lambda a, b: None, params, grads)
    except TreeMismatchError as e:
        raise TreeMismatchError(
            _rename(e.problems, "grads"), "nested: grads shaped unlike params"
        ) from None
    raise TreeMismatchError([("", f"{gtd!r} vs {plan.treedef!r}")], "nested: grads")


def _chunk(summed: list[Any], grads_k: list[Any], f: int, reduce: str) -> list[Any]:
    """The gradient an active tier's inner optimizer reads: the chunk sum (/ C_k for "mean"),
    in each gradient's dtype."""
    chunk = summed if (f == 1 or reduce == "sum") else [a / f for a in summed]
    return [c if c.dtype == g.dtype else c.astype(g.dtype) for c, g in zip(chunk, grads_k)]


def _inner_update(
    opt: Optimizer, k: int, sub: TreeDef, chunk: list[Any], inner_state: Any, params_k: Params,
    step: Step,
) -> tuple[list[Any], Any]:  # fmt: skip
    """Tier ``k``'s inner update over its sub-tree: the update leaves and the inner state."""
    updates_k, new_inner = opt.update(unflatten(sub, chunk), inner_state, params_k, step)
    u_leaves, utd = flatten(updates_k)
    if utd != sub:
        raise TreeMismatchError(
            [("", f"inner optimizer of tier {k} returned updates shaped {utd!r}")],
            "nested: inner updates shaped unlike the tier's params",
        )
    return u_leaves, new_inner


def _active_tier(
    opt: Optimizer, f: int, reduce: str, summed: list[Any], grads_k: list[Any],
    state: NestedState, k: int, sub: TreeDef, params_k: Params, step: Step, s: int,
) -> tuple[list[Any], Any, Any, Any]:  # fmt: skip
    """Tier ``k`` at one of its updates: the inner optimizer on the chunk at the tier's clock
    ``s // f``, then a fresh chunk sum and count + 1."""
    chunk = _chunk(summed, grads_k, f, reduce)
    inner_step = s // f if isinstance(step, int) else step // f
    with tracing_step(s // f):
        u_leaves, inner = _inner_update(opt, k, sub, chunk, state.inner[k], params_k, inner_step)
    acc = unflatten(sub, [mx.zeros_like(a) for a in summed]) if f > 1 else state.acc[k]
    return u_leaves, inner, acc, state.count[k] + 1


def _init_state(
    plan: _Plan, leaves: list[Any], inners: tuple[Optimizer, ...], freqs: tuple[int, ...]
) -> NestedState:
    """Per tier: the inner optimizer's state over its sub-tree, a zero chunk sum (C_k > 1),
    count 0; and the layout ``tier_stats`` reads."""
    inner_states, accs, layout = [], [], []
    for k, (opt, idx, sub) in enumerate(zip(inners, plan.index, plan.subdefs)):
        inner_states.append(opt.init(unflatten(sub, [leaves[i] for i in idx])))
        accs.append(None if freqs[k] == 1 else unflatten(sub, [_acc_zeros(leaves[i]) for i in idx]))
        size = sum(int(leaves[i].size) if isinstance(leaves[i], mx.array) else 1 for i in idx)
        layout.append([freqs[k], len(idx), size])
    counts = tuple(mx.array(0, dtype=mx.int32) for _ in freqs)
    return NestedState(tuple(inner_states), tuple(accs), counts, mx.array(layout, dtype=mx.int64))


def _pack_groups(
    plan: _Plan,
    leaves: list[Any],
    inners: tuple[Optimizer, ...],
    freqs: tuple[int, ...],
    reduce: str,
) -> PackGroups:
    """Packed buffers hold one tier each: the tier-local inner states and chunk sums then map
    tier by tier between the params' sub-trees and the tier's buffers."""
    labels = [0] * len(leaves)
    for k, idx in enumerate(plan.index):
        for i in idx:
            labels[i] = k

    def rebind(buffer_tiers: list[int]) -> tuple[Optimizer, tuple[TreeDef, ...]]:
        tiers = list(buffer_tiers)
        opt = _nested(inners, lambda p: tiers, freqs, reduce)
        bufs = [mx.zeros((1,)) for _ in tiers]
        return opt, _make_plan(bufs, tiers, freqs).subdefs

    return PackGroups(tuple(labels), plan.subdefs, rebind)


def _nested(
    inner: Optimizer | Sequence[Optimizer],
    resolve: Callable[[Params], TierSpec],
    freqs: tuple[int, ...],
    reduce: str,
) -> Optimizer:
    """``nested`` with the tier spec computed from params (``nested_adam``'s ``"depth"``)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"nested: reduce must be 'mean' or 'sum', got {reduce!r}")
    inners = _inners(inner, freqs)
    plans: dict[TreeDef, _Plan] = {}

    def plan_for(params: Params) -> tuple[_Plan, list[Any]]:
        """The (cached) tier plan for this params structure, and the params' leaves."""
        leaves, td = flatten(params)
        plan = plans.get(td)
        if plan is None:
            plan = plans[td] = _make_plan(params, resolve(params), freqs)
        return plan, leaves

    def init_fn(params: Params) -> NestedState:
        return _init_state(*plan_for(params), inners, freqs)

    def update_fn(
        grads: Any, state: NestedState, params: Params, step: Step
    ) -> tuple[Any, NestedState]:
        if not isinstance(state, NestedState) or len(state.inner) != len(freqs):
            raise ValueError(f"nested: expected a NestedState of {len(freqs)} tiers, got {state!r}")
        plan, p_leaves = plan_for(params)
        g_leaves, gtd = flatten(grads)
        _check_grads_like(plan, gtd, params, grads)
        branching = branching_on(step)
        s = static_step(step) if branching else 0
        out: list[Any] = [None] * len(g_leaves)
        tiers: list[tuple[Any, Any, Any]] = []  # per tier: inner state, chunk sum, count
        for k, (opt, f, idx, sub) in enumerate(zip(inners, freqs, plan.index, plan.subdefs)):
            grads_k = [g_leaves[i] for i in idx]
            summed = grads_k
            if f > 1:  # the chunk sum so far, this step's gradients included (float32)
                summed = [
                    a + (g if g.dtype == a.dtype else g.astype(a.dtype))
                    for a, g in zip(flatten(state.acc[k])[0], grads_k)
                ]
            if branching and (s + 1) % f != 0:  # inactive: the parameters stay as they are
                u_leaves = [no_update(p_leaves[i]) for i in idx]
                tiers.append((state.inner[k], unflatten(sub, summed), state.count[k]))
                for i, u in zip(idx, u_leaves):
                    out[i] = u
                continue
            params_k = unflatten(sub, [p_leaves[i] for i in idx])
            args = (opt, f, reduce, summed, grads_k, state, k, sub, params_k, step)
            u_leaves, *rest = _active_tier(*args, s) if branching else _gated_tier(*args)
            tiers.append(tuple(rest))
            for i, u in zip(idx, u_leaves):
                out[i] = u
        inner_states, accs, counts = (tuple(t) for t in zip(*tiers))
        return unflatten(plan.treedef, out), NestedState(inner_states, accs, counts, state.layout)

    def phase_key(step: int) -> tuple:
        # the graph depends on which tiers are active and, inside an active tier, on the inner
        # optimizer's phase at the tier's clock step // f (what tracing_step gives it)
        return tuple(
            (o.phase(step // f),) if (step + 1) % f == 0 else None for o, f in zip(inners, freqs)
        )

    def pack_groups(params: Params) -> PackGroups:
        return _pack_groups(*plan_for(params), inners, freqs, reduce)

    period = math.lcm(*(f * o.period for f, o in zip(freqs, inners)))
    rates = {id(r): r for r in (learning_rate_of(o) for o in inners)}
    rate = next(iter(rates.values())) if len(rates) == 1 else None
    if callable(rate):  # a tier's schedule runs at its own clock: no one global value
        rate = None
    opt = Optimizer(init_fn, update_fn, period, phase_key, pack_groups)
    spec = NestedSpec(inners, freqs, reduce, plan_for, NestedState)
    return with_learning_rate(register(opt, spec), rate)


def _select(active: mx.array, new: Any, old: Any) -> Any:
    """``new`` where ``active`` else ``old``, leaf by leaf (non-array leaves must agree)."""

    def leaf(n: Any, o: Any) -> Any:
        if isinstance(n, mx.array):
            return mx.where(active, n, o)
        if n is not o and n != o:
            raise TypeError(
                f"nested (branch-free): the inner state holds a Python value that changed "
                f"({o!r} -> {n!r}); keep state leaves as mx.arrays"
            )
        return o

    return tree_map(leaf, new, old)


def _gated_tier(
    opt: Optimizer,
    f: int,
    reduce: str,
    summed: list[Any],
    grads_k: list[Any],
    state: NestedState,
    k: int,
    sub: TreeDef,
    params_k: Params,
    step: mx.array,
) -> tuple[list[Any], Any, Any, mx.array]:
    """Tier ``k``'s step with no branch on the traced ``step`` (``core.branch_free``): the inner
    optimizer runs at every step on the chunk so far and ``mx.where`` on ``(step + 1) % f == 0``
    keeps its result (updates, inner state, a fresh chunk sum, count + 1) or the
    inactive step's (``-0.0`` updates, the old inner state, the running sum, the old count).
    The kept values are the ones the branching form computes, so the two agree bit for bit.

    Returns the tier's update leaves, inner state, chunk sum and count."""
    chunk = _chunk(summed, grads_k, f, reduce)
    u_leaves, new_inner = _inner_update(opt, k, sub, chunk, state.inner[k], params_k, step // f)
    if f == 1:
        return u_leaves, new_inner, state.acc[k], state.count[k] + 1
    active = ((step + 1) % f) == 0
    u_leaves = [mx.where(active, u, mx.full(u.shape, -0.0, dtype=u.dtype)) for u in u_leaves]
    acc = unflatten(sub, [mx.where(active, mx.zeros_like(a), a) for a in summed])
    count = state.count[k] + active.astype(mx.int32)
    return u_leaves, _select(active, new_inner, state.inner[k]), acc, count


def _find_nested(state: Any) -> NestedState | None:
    if isinstance(state, NestedState):
        return state
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        for child in state:
            found = _find_nested(child)
            if found is not None:
                return found
    return None


def tier_stats(opt_state: OptState) -> list[TierStats]:
    """Per tier: frequency, number of arrays, number of parameters, updates so far.

    ``opt_state`` is a ``NestedState`` or any state tree holding one (e.g. inside ``chain``);
    the first found is reported.  Reading the counts synchronises with the device.
    """
    st = _find_nested(opt_state)
    if st is None:
        raise ValueError("tier_stats: opt_state holds no NestedState (not a nested optimizer)")
    layout = st.layout.tolist()
    return [
        TierStats(k, int(f), int(a), int(n), int(c.item()))
        for k, ((f, a, n), c) in enumerate(zip(layout, st.count))
    ]


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# nested_adam: Adam in multi-frequency tiers in one call
# ---------------------------------------------------------------------------------------------


def _scale_by_global_schedule(schedule: Callable[[Step], Any]) -> Optimizer:
    """Multiply updates by ``schedule(step)`` at the global step; the ``no_update`` leaves of
    inactive tiers pass through as they are (so their parameters are not rewritten)."""

    def init_fn(params: Params) -> tuple:
        return ()

    def update_fn(updates: Any, state: tuple, params: Params, step: Step) -> Any:
        lr = schedule(step)
        return tree_map(lambda u: u if is_no_update(u) else u * lr, updates), state

    return with_learning_rate(Optimizer(init_fn, update_fn), schedule)


def nested_adam(
    learning_rate: float | Callable[[Step], Any],
    frequencies: Sequence[int] = (1, 2, 4),
    tiers: Any = "depth",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    reduce: str = "mean",
    order: str = "shallow_fast",
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """Adam (AdamW when ``weight_decay > 0``) in multi-frequency tiers.

    ``tiers="depth"`` splits the params at ``init`` with ``nestedfn.tiered.tiers.by_depth(params,
    len(frequencies), order)`` (contiguous blocks of ``layers.N``); any other value is a tier
    spec for ``nested``.  Each tier keeps its own Adam moments and bias correction counted in
    its own updates, and feeds Adam the mean (``reduce``) of its chunk's gradients.

    A constant ``learning_rate`` goes to each tier's Adam; a schedule is read at the *global*
    step (warmup and decay in training steps for every tier): the tiers run Adam with learning
    rate 1 and the updates are scaled by ``learning_rate(step)`` (Adam and decoupled weight
    decay are linear in the learning rate).  ``state_dtype=mx.float32`` keeps the moments in
    float32 for low-precision params (the chunk accumulators are float32 for float16/bfloat16
    gradients regardless).
    """
    freqs = _check_frequencies(frequencies)
    lr = 1.0 if callable(learning_rate) else learning_rate
    if weight_decay:
        inner = optimizers.adamw(
            lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype
        )
    else:
        inner = optimizers.adam(lr, b1=b1, b2=b2, eps=eps, state_dtype=state_dtype)
    opt = _nested(inner, _resolver(tiers, len(freqs), order, "nested_adam"), freqs, reduce)
    if callable(learning_rate):
        scheduled = chain(opt, _scale_by_global_schedule(learning_rate))
        spec = describe(opt)
        return register(scheduled, spec._replace(post=learning_rate)) if spec else scheduled
    return opt
