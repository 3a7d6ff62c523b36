"""Multi-scale momentum (M3): the Nested Learning paper's optimizer of fast and slow momenta.

A fast Adam-style momentum ``m1`` (with second moment ``v``) and a slow momentum ``m2``
updated every ``slow_every`` steps from the chunk's gradient sum (the CMS rule), combined as
``(NS(m1) + alpha * o2) / (sqrt(v) + eps)``; ``NS`` is Newton–Schulz orthogonalisation on
2-D leaves (Behrouz et al., "Nested Learning: The Illusion of Deep Learning Architectures",
NeurIPS 2025, section 7.2, Algorithm 1).  Kept apart from the tier machinery in
``nestedfn.tiered.cms``: it is one optimizer, not a way of running others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.checks import FINITE, LEARNING_RATE, NONNEGATIVE, POSITIVE, declare
from nestedfn.optim.core import Optimizer, Params, Step, branching_on, static_step
from nestedfn.optim.transforms import newton_schulz
from nestedfn.tree import TreeMismatchError, flatten, tree_map, unflatten

__all__ = ["MultiscaleMomentumState", "multiscale_momentum"]

# multi-scale momentum (M3)
# ---------------------------------------------------------------------------------------------


class MultiscaleMomentumState(NamedTuple):
    """State of ``multiscale_momentum``: trees shaped like params.

    m1: fast momentum; v: second moment; m2: slow momentum; o2: the slow direction used
    between slow updates (``NS(m2)`` for 2-D leaves); acc: the current chunk's gradient sum.
    """

    m1: Any
    v: Any
    m2: Any
    o2: Any
    acc: Any


@declare(
    learning_rate=LEARNING_RATE,
    b1=NONNEGATIVE,
    b2=NONNEGATIVE,
    b3=NONNEGATIVE,
    alpha=FINITE,
    eps=POSITIVE,
)
def multiscale_momentum(
    learning_rate: float | Callable[[Step], Any],
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9,
    alpha: float = 1.0,
    eps: float = 1e-8,
    slow_every: int = 4,
    ns_steps: int = 5,
    orthogonalize: bool = True,
    form: str = "paper",
) -> Optimizer:
    """Multi-scale momentum (the Nested Learning paper's M3, ``shared/NESTED_LEARNING.md`` §3):
    a fast momentum every step and a slow momentum over chunks of ``slow_every`` steps.

    At 0-based step ``t`` with gradient ``g`` (``form="paper"``, the paper's running sums)::

        M1 <- M1 + b1 g;   V <- V + b2 g²;   O1 = NS(M1)
        A  <- A + g
        if (t + 1) % slow_every == 0:  M2 <- M2 + b3 A;  O2 = NS(M2);  A <- 0
        θ  <- θ - η (O1 + alpha O2) / sqrt(V + eps)

    so the slow memory sees every gradient of its chunk, and ``O2`` is kept between slow
    updates (zero before the first one).  ``form="ema"`` uses moving averages instead:
    ``M1 <- b1 M1 + (1-b1) g``, ``V <- b2 V + (1-b2) g²``, ``M2 <- b3 M2 + (1-b3) A/slow_every``
    (the chunk's mean), without bias correction.  ``NS`` is Muon's quintic Newton–Schulz
    (``ns_steps`` iterations) on 2-D leaves when ``orthogonalize``; other leaves use the
    momentum itself.  ``learning_rate`` may be a schedule ``step -> value``.
    """
    if isinstance(slow_every, bool) or not isinstance(slow_every, int) or slow_every < 1:
        raise ValueError(
            f"multiscale_momentum: slow_every must be a positive int, got {slow_every!r}"
        )
    if form not in ("paper", "ema"):
        raise ValueError(f"multiscale_momentum: form must be 'paper' or 'ema', got {form!r}")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"multiscale_momentum: ns_steps must be an int >= 0, got {ns_steps!r}")

    def orth(m: mx.array) -> mx.array:
        return newton_schulz(m, ns_steps) if orthogonalize and m.ndim == 2 else m

    def init_fn(params: Params) -> MultiscaleMomentumState:
        z = lambda: tree_map(mx.zeros_like, params)  # noqa: E731
        return MultiscaleMomentumState(z(), z(), z(), z(), z())

    def update_fn(
        grads: Any, state: MultiscaleMomentumState, params: Params, step: Step
    ) -> tuple[Any, MultiscaleMomentumState]:
        branching = branching_on(step)  # else core.branch_free: mx.where on the slow step
        slow = (
            (static_step(step) + 1) % slow_every == 0
            if branching
            else ((step + 1) % slow_every) == 0
        )
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        g_leaves, td = flatten(grads)
        fields = [flatten(x)[0] for x in state]
        for name, lv in zip(state._fields, fields):
            if len(lv) != len(g_leaves):
                raise TreeMismatchError(
                    [("", f"state.{name} has {len(lv)} leaves, grads {len(g_leaves)}")],
                    "multiscale_momentum: state shaped unlike grads",
                )
        out = {k: [] for k in ("u", "m1", "v", "m2", "o2", "acc")}
        for g, m1, v, m2, o2, acc in zip(g_leaves, *fields):
            if form == "paper":
                m1 = m1 + b1 * g
                v = v + b2 * (g * g)
            else:
                m1 = b1 * m1 + (1 - b1) * g
                v = b2 * v + (1 - b2) * (g * g)
            acc = acc + g
            if not branching or slow:
                if form == "paper":
                    m2_new = m2 + b3 * acc
                else:
                    m2_new = b3 * m2 + (1 - b3) * (acc / slow_every)
                o2_new = orth(m2_new)
                if branching:
                    m2, o2, acc = m2_new, o2_new, mx.zeros_like(acc)
                else:
                    m2 = mx.where(slow, m2_new, m2)
                    o2 = mx.where(slow, o2_new, o2)
                    acc = mx.where(slow, mx.zeros_like(acc), acc)
            direction = orth(m1) + alpha * o2 if alpha != 0 else orth(m1)
            out["u"].append(-lr * direction / mx.sqrt(v + eps))
            for name, x in (("m1", m1), ("v", v), ("m2", m2), ("o2", o2), ("acc", acc)):
                out[name].append(x)
        new = MultiscaleMomentumState(
            *(unflatten(td, out[name]) for name in ("m1", "v", "m2", "o2", "acc"))
        )
        return unflatten(td, out["u"]), new

    # the graph only depends on whether this is a slow step: 2 phases whatever slow_every is
    return Optimizer(init_fn, update_fn, slow_every, lambda step: (step + 1) % slow_every == 0)
