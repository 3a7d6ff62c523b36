"""Gradient transformations: small pure ``Optimizer(init, update)`` pairs that compose.

Each function returns an ``Optimizer`` whose state is a NamedTuple of trees (optax style);
``core.chain`` composes them.  Every ``update`` is ``(grads, state, params, step) ->
(updates, state)``, with ``step`` the number of updates applied so far (a Python int, or a
traced ``mx.array`` under ``mx.compile``).  Descent transforms end with a negative scale
(``scale_by_learning_rate``) because updates are *added* to params.

Mixed precision: updates come back in each gradient's dtype; moments kept by
``scale_by_adam``/``scale_by_lion``/``trace`` are in the parameter's dtype, or in
``state_dtype`` when given (e.g. ``mx.float32`` moments for ``bfloat16`` params).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.checks import (
    FINITE,
    LEARNING_RATE,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT,
    UNIT_OPEN,
    check_float_params,
    declare,
)
from nestedfn.optim.core import (
    Optimizer,
    OptState,
    PackGroups,
    Params,
    Schedule,
    Step,
    with_learning_rate,
)
from nestedfn.tree import TreeMismatchError, flatten, tree_map, unflatten

__all__ = [
    "AddDecayedWeightsState",
    "ClipByGlobalNormState",
    "EmptyState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleState",
    "TraceState",
    "add_decayed_weights",
    "clip_by_global_norm",
    "newton_schulz",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_newton_schulz",
    "trace",
]


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


ScaleState = EmptyState
AddDecayedWeightsState = EmptyState
ClipByGlobalNormState = EmptyState


class ScaleByAdamState(NamedTuple):
    """Adam's moments, trees shaped like params: ``mu`` (first), ``nu`` (second)."""

    mu: Any
    nu: Any


class ScaleByLionState(NamedTuple):
    """Lion's momentum ``mu``, a tree shaped like params."""

    mu: Any


class TraceState(NamedTuple):
    """The momentum trace of ``trace``, a tree shaped like params."""

    trace: Any


def _zeros(p: Any, dtype: mx.Dtype | None) -> mx.array:
    return mx.zeros(p.shape, dtype=dtype if dtype is not None else p.dtype)


def _as(x: Any, like: mx.array) -> Any:
    """A scalar factor in ``like``'s dtype (arrays are cast so that a float32 scalar does not
    promote a float16 leaf; Python numbers are weakly typed already).  A scalar already of
    that dtype is returned as it is, not through a no-op ``astype`` per leaf."""
    if isinstance(x, mx.array) and x.dtype != like.dtype:
        return x.astype(like.dtype)
    return x


def _sqrt(x: Any) -> Any:
    return mx.sqrt(x) if isinstance(x, mx.array) else math.sqrt(x)


def _map_n(fn: Callable[..., tuple], n: int, tree: Any, *rest: Any) -> tuple[Any, ...]:
    """Like ``tree_map`` for a leaf function returning ``n`` values: ``n`` trees shaped like
    ``tree`` (structures are checked as ``tree_map`` checks them, naming the path)."""
    lv, td = flatten(tree)
    others = []
    for r in rest:
        rl, rtd = flatten(r)
        if rtd != td:
            tree_map(lambda *xs: None, tree, r)  # raises TreeMismatchError naming the path
        others.append(rl)
    outs = [fn(*xs) for xs in zip(lv, *others)]
    return tuple(unflatten(td, [o[i] for o in outs]) for i in range(n))


def _empty_init(params: Params) -> OptState:
    return EmptyState()


@declare(factor=FINITE)
def scale(factor: float) -> Optimizer:
    """``updates = factor * grads``."""

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        return tree_map(lambda g: g * factor, grads), state

    return Optimizer(_empty_init, update_fn)


@declare(learning_rate=LEARNING_RATE)
def scale_by_learning_rate(learning_rate: float | Schedule) -> Optimizer:
    """``updates = -lr(step) * grads``: the descent step every optimizer ends with.

    ``learning_rate`` is a float or a schedule ``step -> value`` (``nestedfn.schedules``),
    read at the step being taken (0 for the first update).  ``init`` refuses parameters that
    are not real floating point (``checks.check_float_params``), naming the path.
    """

    def init_fn(params: Params) -> OptState:
        check_float_params(params, "scale_by_learning_rate")
        return EmptyState()

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        neg = -lr
        return tree_map(lambda g: g * _as(neg, g), grads), state

    return with_learning_rate(Optimizer(init_fn, update_fn), learning_rate)


def _bias_correction(b: float, step: Step) -> Any:
    """``1 - b ** t`` with ``t = step + 1`` (the update being taken, 1-based)."""
    if isinstance(step, mx.array):
        t = (step + 1).astype(mx.float32)
        return 1.0 - mx.power(mx.array(b, dtype=mx.float32), t)
    return 1.0 - b ** (int(step) + 1)


@declare(b1=UNIT_OPEN, b2=UNIT_OPEN, eps=POSITIVE)
def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    bias_correction: bool = True,
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """Adam's direction (Kingma & Ba), without the learning rate::

        mu  = b1 mu + (1 - b1) g          nu = b2 nu + (1 - b2) g²
        u   = mu_hat / (sqrt(nu_hat) + eps),   mu_hat = mu / (1 - b1^t),  nu_hat = nu / (1 - b2^t)

    with ``t = step + 1``; without ``bias_correction``, ``u = mu / (sqrt(nu) + eps)``.
    The moments are kept in ``state_dtype``; by default in each parameter's dtype, except
    float16, whose moments are float32: float16 cannot hold ``g²`` for ``|g| < 2.4e-4`` (it
    flushes to 0) nor ``eps = 1e-8``, so ``nu`` and the denominator would be 0 and the update
    infinite.  bfloat16 has float32's range and keeps its own dtype.
    """

    def moment_zeros(p: mx.array) -> mx.array:
        dtype = state_dtype
        if dtype is None and p.dtype == mx.float16:
            dtype = mx.float32
        return _zeros(p, dtype)

    def init_fn(params: Params) -> OptState:
        return ScaleByAdamState(tree_map(moment_zeros, params), tree_map(moment_zeros, params))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        if bias_correction:
            c1 = 1.0 / _bias_correction(b1, step)
            c2 = 1.0 / _sqrt(_bias_correction(b2, step))

        def leaf(g: mx.array, m: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            gs = g.astype(m.dtype)
            m = b1 * m + (1.0 - b1) * gs
            v = b2 * v + (1.0 - b2) * (gs * gs)
            if bias_correction:
                u = (m * _as(c1, m)) / (mx.sqrt(v) * _as(c2, v) + eps)
            else:
                u = m / (mx.sqrt(v) + eps)
            return u.astype(g.dtype), m, v

        updates, mu, nu = _map_n(leaf, 3, grads, state.mu, state.nu)
        return updates, ScaleByAdamState(mu, nu)

    return Optimizer(init_fn, update_fn)


@declare(b1=UNIT, b2=UNIT)
def scale_by_lion(
    b1: float = 0.9, b2: float = 0.99, state_dtype: mx.Dtype | None = None
) -> Optimizer:
    """Lion's direction (Chen et al. 2023), without the learning rate::

    u  = sign(b1 mu + (1 - b1) g)        mu = b2 mu + (1 - b2) g
    """

    def init_fn(params: Params) -> OptState:
        return ScaleByLionState(tree_map(lambda p: _zeros(p, state_dtype), params))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        def leaf(g: mx.array, m: mx.array) -> tuple[mx.array, mx.array]:
            gs = g.astype(m.dtype)
            u = mx.sign(b1 * m + (1.0 - b1) * gs)
            return u.astype(g.dtype), b2 * m + (1.0 - b2) * gs

        updates, mu = _map_n(leaf, 2, grads, state.mu)
        return updates, ScaleByLionState(mu)

    return Optimizer(init_fn, update_fn)


@declare(decay=UNIT)
def trace(decay: float, nesterov: bool = False, state_dtype: mx.Dtype | None = None) -> Optimizer:
    """Momentum: ``t = g + decay t``; ``u = t``, or ``u = g + decay t`` with ``nesterov``."""

    def init_fn(params: Params) -> OptState:
        return TraceState(tree_map(lambda p: _zeros(p, state_dtype), params))

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        def leaf(g: mx.array, t: mx.array) -> tuple[mx.array, mx.array]:
            gs = g.astype(t.dtype)
            t = gs + decay * t
            u = gs + decay * t if nesterov else t
            return u.astype(g.dtype), t

        updates, tr = _map_n(leaf, 2, grads, state.trace)
        return updates, TraceState(tr)

    return Optimizer(init_fn, update_fn)


@declare(weight_decay=NONNEGATIVE)
def add_decayed_weights(
    weight_decay: float, mask: Any | Callable[[Params], Any] | None = None
) -> Optimizer:
    """``u = g + weight_decay * params`` (decoupled weight decay once scaled by ``-lr``).

    ``mask``: a tree of bools shaped like params (or a function ``params -> tree``); only
    leaves marked ``True`` decay (e.g. not biases or norms).  A mask shaped unlike params
    raises ``TreeMismatchError`` naming the path.  Under ``compile_step(packed=True)`` the
    mask splits the buffers into decayed and undecayed ones (``pack_groups``), so a masked
    AdamW or Lion runs packed too.
    """

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        if params is None:
            raise ValueError("add_decayed_weights needs params (got params=None)")
        decay = lambda g, p: g + (weight_decay * p).astype(g.dtype)  # noqa: E731
        if mask is None:
            return tree_map(decay, grads, params), state
        m = mask(params) if callable(mask) else mask
        try:
            out = tree_map(lambda g, p, keep: decay(g, p) if keep else g, grads, params, m)
        except TreeMismatchError as e:
            raise TreeMismatchError(
                e.problems, "add_decayed_weights: grads, params and mask differ in structure"
            ) from None
        return out, state

    if mask is None:
        return Optimizer(_empty_init, update_fn)
    return Optimizer(_empty_init, update_fn, pack_groups=_mask_groups(weight_decay, mask))


class _NoGroupState(NamedTuple):
    """Stands for the (empty) per-group state of a masked weight decay: matches no state."""

    nothing: Any


def _mask_groups(weight_decay: float, mask: Any) -> Callable[[Params], PackGroups]:
    """``pack_groups`` of a masked ``add_decayed_weights``: leaves grouped by their mask value,
    so that each packed buffer either decays or does not; rebound, the mask is one bool per
    buffer."""
    no_state = flatten(_NoGroupState(0))[1]

    def pack_groups(params: Params) -> PackGroups:
        m = mask(params) if callable(mask) else mask
        m_leaves, m_td = flatten(m)
        p_td = flatten(params)[1]
        if m_td != p_td:
            try:
                tree_map(lambda *_: None, params, m)
            except TreeMismatchError as e:
                raise TreeMismatchError(
                    e.problems, "add_decayed_weights: params and mask differ in structure"
                ) from None
        values = sorted({bool(v) for v in m_leaves})
        labels = tuple(values.index(bool(v)) for v in m_leaves)

        def rebind(buffer_labels: list[int]) -> tuple[Optimizer, tuple[Any, ...]]:
            buffer_mask = [values[g] for g in buffer_labels]
            opt = add_decayed_weights(weight_decay, buffer_mask)
            return opt._replace(pack_groups=None), (no_state,) * len(values)

        return PackGroups(labels, (no_state,) * len(values), rebind)

    return pack_groups


@declare(max_norm=POSITIVE)
def clip_by_global_norm(max_norm: float) -> Optimizer:
    """Rescale all gradients together so that their global L2 norm is at most ``max_norm``::

        n = sqrt(sum_leaves sum g²);   u = g * min(1, max_norm / n)

    Computed with ``mx.where`` (no Python branch on a value), so it traces under ``mx.compile``.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm!r}")

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        gl, _ = flatten(grads)
        if not gl:
            return grads, state
        sq = sum(mx.sum(mx.square(g.astype(mx.float32))) for g in gl)
        norm = mx.sqrt(sq)
        factor = mx.where(norm > max_norm, max_norm / mx.maximum(norm, 1e-30), 1.0)
        return tree_map(lambda g: g * factor.astype(g.dtype), grads), state

    return Optimizer(_empty_init, update_fn)


_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: mx.array, steps: int = 5, eps: float = 1e-7) -> mx.array:
    """Muon's quintic Newton–Schulz iteration on a 2-D ``g``: an approximate
    orthogonalisation (singular values pushed towards 1), computed in float32::

        X = G / (||G||_F + eps)                 (transposed so that rows <= columns)
        repeat steps:  A = X Xᵀ;  X = a X + (b A + c A²) X,   (a, b, c) = (3.4445, -4.7750, 2.0315)

    Returned in ``g``'s dtype and shape.  On CUDA GPUs MLX runs float32 matmuls at TF32
    precision (about 1e-3 relative) unless ``MLX_ENABLE_TF32=0`` is set before the first
    operation; Muon's iteration is approximate anyway, but results then differ from the CPU's.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz: expected a 2-D array, got shape {tuple(g.shape)}")
    a, b, c = _NS_COEFFS
    x = g.astype(mx.float32)
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    x = x / (mx.sqrt(mx.sum(x * x)) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if transpose:
        x = x.T
    return x.astype(g.dtype)


@declare(steps=POSITIVE_INT, eps=POSITIVE)
def scale_by_newton_schulz(steps: int = 5, eps: float = 1e-7) -> Optimizer:
    """Orthogonalise each 2-D leaf with ``newton_schulz`` (Muon); other leaves pass through."""
    if steps < 1:
        raise ValueError(f"scale_by_newton_schulz: steps must be >= 1, got {steps!r}")

    def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
        ortho = lambda g: newton_schulz(g, steps, eps) if g.ndim == 2 else g  # noqa: E731
        return tree_map(ortho, grads), state

    return Optimizer(_empty_init, update_fn)
