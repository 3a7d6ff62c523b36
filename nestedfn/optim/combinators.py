"""Combinators: optimizers built from optimizers.

- ``partition``: a different optimizer per group of leaves (labels per leaf).
- ``masked``: an optimizer on some leaves; the others' gradients pass through unchanged.
- ``accumulate``: gradient accumulation over ``every`` steps.
- ``skip_nonfinite``: a step with a NaN/Inf gradient changes nothing and is counted.

All are pure; all keep ``Optimizer.period`` and ``phase_key`` right so that ``compile_step``
builds one graph per phase (see ``core.static_step``): ``partition`` keys on the tuple of its
optimizers' phases, ``masked`` and ``skip_nonfinite`` on their inner one's, ``accumulate`` on
``None`` between updates and on the inner optimizer's phase (at its own clock) at an update.

A sub-optimizer of ``partition``/``masked`` sees params, grads and state as trees shaped like
params with ``None`` (an empty node) in place of the leaves that are not its own; element-wise
transforms run unchanged on such trees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.core import (
    Optimizer,
    OptState,
    Params,
    Step,
    branch_free,
    branching_on,
    combined_phase_key,
    identity,
    is_no_update,
    learning_rate_of,
    no_update,
    static_step,
    tracing_step,
    with_learning_rate,
)
from nestedfn.tree import TreeDef, TreeMismatchError, flatten, tree_map, unflatten

__all__ = [
    "AccumulateState",
    "MaskedState",
    "PartitionState",
    "SkipNonfiniteState",
    "accumulate",
    "masked",
    "partition",
    "skip_nonfinite",
]

Labels = Any | Callable[[str, Any], Hashable]


class PartitionState(NamedTuple):
    """``inner``: a dict label -> that optimizer's state (over its own leaves only)."""

    inner: dict


class MaskedState(NamedTuple):
    """``inner``: the masked optimizer's state (over the selected leaves only)."""

    inner: Any


class AccumulateState(NamedTuple):
    """``acc``: the sum of this chunk's gradients (shaped like params); ``inner``: the inner
    optimizer's state."""

    acc: Any
    inner: Any


class SkipNonfiniteState(NamedTuple):
    """``inner``: the inner state; ``skipped``: int32 count of steps skipped so far."""

    inner: Any
    skipped: mx.array


# ---------------------------------------------------------------------------------------------
# labelling leaves
# ---------------------------------------------------------------------------------------------


def _paths(td: TreeDef) -> list[str]:
    """Dotted leaf paths for messages (leaf positions where the tree has no dotted paths)."""
    try:
        return td.paths()
    except LookupError:
        return [f"<leaf {i}>" for i in range(td.num_leaves)]


def _leaf_labels(params: Params, labels: Labels, who: str) -> tuple[list[Any], TreeDef]:
    """One label per leaf of ``params`` (in ``flatten`` order), and params' structure."""
    lv, td = flatten(params)
    if callable(labels):
        return [labels(p, x) for p, x in zip(_paths(td), lv)], td
    ll, ltd = flatten(labels)
    if ltd != td:
        try:
            tree_map(lambda *a: None, params, labels)
        except TreeMismatchError as e:
            problems = [
                (p, why.replace("the first tree", "params").replace("the second tree", who))
                for p, why in e.problems
            ]
            raise TreeMismatchError(problems, f"{who}: the tree is shaped unlike params") from None
        raise TreeMismatchError([("", "structures differ")], f"{who}: shaped unlike params")
    return ll, td


def _select(lv: list[Any], td: TreeDef, keep: list[bool]) -> Any:
    """``td``'s tree with ``None`` in place of the leaves where ``keep`` is false."""
    return unflatten(td, [x if k else None for x, k in zip(lv, keep)])


def _sub(tree: Any, td: TreeDef, keep: list[bool], what: str) -> Any:
    lv, ttd = flatten(tree)
    if ttd != td:
        tree_map(lambda *a: None, tree, unflatten(td, [0] * td.num_leaves))  # names the path
        raise TreeMismatchError([("", f"{what} shaped unlike params")])
    return _select(lv, td, keep)


def _groups(
    params: Params, labels: Labels, known: Mapping[Hashable, Any], who: str, require_all: bool
) -> tuple[TreeDef, dict[Hashable, list[bool]]]:
    """Per label in ``known``: which leaves carry it.  A leaf with an unknown label raises
    naming its path; with ``require_all``, so does a label that no leaf carries."""
    ll, td = _leaf_labels(params, labels, who)
    paths = None
    for i, lab in enumerate(ll):
        try:
            ok = lab in known
        except TypeError:
            ok = False
        if not ok:
            paths = paths or _paths(td)
            raise KeyError(
                f"{who}: the leaf at {paths[i]!r} has label {lab!r}, which names no optimizer "
                f"(known labels: {list(known)})"
            )
    groups = {k: [lab == k for lab in ll] for k in known}
    if require_all:
        empty = [k for k, g in groups.items() if not any(g)]
        if empty:
            raise ValueError(f"{who}: no parameter has label(s) {empty}; each needs a leaf")
    return td, groups


def _merge(td: TreeDef, parts: list[tuple[list[bool], Any]]) -> Any:
    """Put each part's leaves (a tree with ``None`` at the others) back at their positions."""
    out: list[Any] = [None] * td.num_leaves
    for keep, tree in parts:
        it = iter(flatten(tree)[0])
        for i, k in enumerate(keep):
            if k:
                out[i] = next(it)
    return unflatten(td, out)


# ---------------------------------------------------------------------------------------------
# partition, masked
# ---------------------------------------------------------------------------------------------


def partition(transforms: Mapping[str, Optimizer], labels: Labels) -> Optimizer:
    """A different optimizer per group of leaves (optax's ``multi_transform``).

    ``transforms`` maps str labels to optimizers.
    ``labels`` is a tree shaped like params whose leaves are labels, or a function
    ``(path, leaf) -> label`` of the dotted path (``"layers.0.attn.q"``).  Every label must
    be a key of ``transforms`` and every optimizer must get at least one leaf; otherwise an
    error names the path (or the label).  A labels tree shaped unlike params raises
    ``TreeMismatchError`` naming the differing paths.  ``period`` is the lcm of the inner ones.
    """
    transforms = dict(transforms)
    if not transforms:
        raise ValueError("partition: no optimizers given")
    for label in transforms:
        if not isinstance(label, str):  # the state is a dict keyed by label: a tree's keys
            raise TypeError(
                f"partition: label {label!r} is a {type(label).__name__}; labels must be str "
                "(they key the optimizer state, and tree dict keys are str)"
            )

    def init_fn(params: Params) -> OptState:
        td, groups = _groups(params, labels, transforms, "partition labels", True)
        lv = flatten(params)[0]
        return PartitionState(
            {k: o.init(_select(lv, td, groups[k])) for k, o in transforms.items()}
        )

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        td, groups = _groups(params, labels, transforms, "partition labels", True)
        lv = flatten(params)[0]
        if set(state.inner) != set(transforms):
            raise ValueError(
                f"partition: state has labels {list(state.inner)}, expected {list(transforms)}"
            )
        parts, inner = [], {}
        for k, o in transforms.items():
            keep = groups[k]
            u, inner[k] = o.update(
                _sub(grads, td, keep, "grads"), state.inner[k], _select(lv, td, keep), step
            )
            parts.append((keep, u))
        return _merge(td, parts), PartitionState(inner)

    period = math.lcm(*(o.period for o in transforms.values()))
    return Optimizer(init_fn, update_fn, period, combined_phase_key(transforms.values()))


def masked(opt: Optimizer, mask: Any | Callable[[Params], Any]) -> Optimizer:
    """``opt`` on the leaves where ``mask`` is ``True``; the other leaves' gradients pass
    through unchanged (optax's ``masked``).  ``mask`` is a tree of bools shaped like params,
    or a function ``params -> tree``."""
    known = {True: opt, False: identity()}

    def groups(params: Params) -> tuple[TreeDef, list[bool]]:
        m = mask(params) if callable(mask) else mask
        m = tree_map(bool, m) if not callable(m) else m
        td, g = _groups(params, m, known, "masked mask", False)
        return td, g[True]

    def init_fn(params: Params) -> OptState:
        td, keep = groups(params)
        return MaskedState(opt.init(_select(flatten(params)[0], td, keep)))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        td, keep = groups(params)
        u, inner = opt.update(
            _sub(grads, td, keep, "grads"),
            state.inner,
            _select(flatten(params)[0], td, keep),
            step,
        )
        rest = [not k for k in keep]
        return _merge(td, [(keep, u), (rest, _sub(grads, td, rest, "grads"))]), MaskedState(inner)

    return with_learning_rate(
        Optimizer(init_fn, update_fn, opt.period, opt.phase_key), learning_rate_of(opt)
    )


# ---------------------------------------------------------------------------------------------
# accumulate
# ---------------------------------------------------------------------------------------------


def accumulate(opt: Optimizer, every: int, acc_dtype: mx.Dtype | None = None) -> Optimizer:
    """Gradient accumulation: for ``every - 1`` steps the updates are ``core.no_update``
    (params come back as they are) while the gradients are summed; on every ``every``-th step
    (``(step + 1) % every == 0``) ``opt`` gets the chunk's mean gradient and the sum restarts.

    ``opt`` sees its own step count ``step // every`` (bias correction and schedules count
    real updates).  ``period = every * opt.period``: the branch taken depends on
    ``step % every`` and the inner optimizer's phase on ``(step // every) % opt.period``; the
    phase key is ``None`` between updates (one graph for all of them) and the inner
    optimizer's phase at ``step // every`` at an update.
    ``acc_dtype`` (default: each gradient's dtype) is the dtype of the running sum.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"accumulate: every must be an int >= 1, got {every!r}")

    def init_fn(params: Params) -> OptState:
        acc = tree_map(lambda p: mx.zeros(p.shape, acc_dtype or p.dtype), params)
        return AccumulateState(acc, opt.init(params))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        acc = tree_map(lambda a, g: a + g.astype(a.dtype), state.acc, grads)
        if not branching_on(step):
            return _gated_accumulate(opt, every, acc, grads, state, params, step)
        s = static_step(step)
        if (s + 1) % every != 0:
            return tree_map(no_update, params), AccumulateState(acc, state.inner)
        mean = tree_map(lambda a, g: (a / every).astype(g.dtype), acc, grads)
        inner_step = step // every
        if isinstance(step, mx.array):
            with tracing_step(s // every):
                updates, inner = opt.update(mean, state.inner, params, inner_step)
        else:
            updates, inner = opt.update(mean, state.inner, params, inner_step)
        fresh = tree_map(lambda a: mx.zeros(a.shape, a.dtype), acc)
        return updates, AccumulateState(fresh, inner)

    def phase_key(step: int) -> Any:
        return (opt.phase(step // every),) if (step + 1) % every == 0 else None

    rate = learning_rate_of(opt)
    if callable(rate):  # the inner schedule counts updates: step // every
        inner_rate = rate
        rate = lambda step: inner_rate(step // every)  # noqa: E731
    return with_learning_rate(Optimizer(init_fn, update_fn, every * opt.period, phase_key), rate)


def _gated_accumulate(
    opt: Optimizer, every: int, acc: Any, grads: Any, state: Any, params: Params, step: mx.array
) -> tuple[Any, AccumulateState]:
    """``accumulate``'s step with no branch on the traced ``step`` (``core.branch_free``): the
    inner optimizer runs on the chunk's mean at every step and ``mx.where`` on
    ``(step + 1) % every == 0`` keeps its updates, state and a fresh sum, or ``-0.0`` updates,
    the old state and the running sum: the values the branching form computes."""
    active = ((step + 1) % every) == 0
    mean = tree_map(lambda a, g: (a / every).astype(g.dtype), acc, grads)
    updates, inner = opt.update(mean, state.inner, params, step // every)
    updates = tree_map(lambda u: _or_no_update(active, u), updates)
    inner = tree_map(lambda new, old: _keep_if(active, new, old), inner, state.inner)
    acc = tree_map(lambda a: mx.where(active, mx.zeros_like(a), a), acc)
    return updates, AccumulateState(acc, inner)


# ---------------------------------------------------------------------------------------------
# skip_nonfinite
# ---------------------------------------------------------------------------------------------


def _keep_if(finite: mx.array, new: Any, old: Any) -> Any:
    if isinstance(new, mx.array):
        return mx.where(finite, new, old)
    if new is not old and new != old:
        raise TypeError(
            f"skip_nonfinite: the inner state holds a Python value that changed ({old!r} -> "
            f"{new!r}); it cannot be reverted by value, keep state leaves as mx.arrays"
        )
    return old


def _or_no_update(finite: mx.array, u: Any) -> Any:
    """``u`` where ``finite``, else ``-0.0`` (``+0.0`` would turn a ``-0.0`` param into ``+0.0``;
    ``mx.full``, not a scalar, which ``mx.compile`` inlines without its sign)."""
    if not isinstance(u, mx.array):
        return mx.where(finite, u, -0.0)
    return mx.where(finite, u, mx.full(u.shape, -0.0, dtype=u.dtype))


def skip_nonfinite(opt: Optimizer) -> Optimizer:
    """Skip steps whose gradients hold a NaN or Inf anywhere: such a step gives ``-0.0``
    updates (params bit-identical, signed zeros included), keeps the inner state exactly as
    it was, and adds one to ``skipped``.

    Decided with ``mx.where`` on the values (no Python branch), so it traces under
    ``mx.compile``.  ``opt``'s clock counts the steps it applied, as optax's
    ``apply_if_finite``: it sees ``step - skipped``, so after skipped steps the trajectory is
    the one where the bad steps never happened (Adam's bias correction, schedules, tier
    phases).  That clock is data-dependent, so an ``opt`` with ``period > 1`` (tiers,
    accumulation) runs in its branch-free form (``core.branch_free``) and the whole
    optimizer has period 1.
    """

    def init_fn(params: Params) -> OptState:
        return SkipNonfiniteState(opt.init(params), mx.array(0, dtype=mx.int32))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        gl = flatten(grads)[0]
        finite = mx.array(True)
        for g in gl:
            finite = mx.logical_and(finite, mx.all(mx.isfinite(g)))
        applied = step - state.skipped
        if opt.period > 1:
            with branch_free():
                updates, inner = opt.update(grads, state.inner, params, applied)
        else:
            updates, inner = opt.update(grads, state.inner, params, applied)
        updates = tree_map(lambda u: u if is_no_update(u) else _or_no_update(finite, u), updates)
        inner = tree_map(lambda new, old: _keep_if(finite, new, old), inner, state.inner)
        skipped = state.skipped + mx.where(finite, 0, 1).astype(mx.int32)
        return updates, SkipNonfiniteState(inner, skipped)

    return with_learning_rate(Optimizer(init_fn, update_fn), learning_rate_of(opt))
