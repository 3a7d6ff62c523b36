"""Ready optimizers, each a ``chain`` of ``nestedfn.transforms``.

Every optimizer takes its learning rate as a float or a schedule ``step -> value``
(``nestedfn.schedules``) read at the step being taken.  All are pure ``Optimizer``s.  Each
declares its arguments' domains (``checks.declare``): a bad one is a ``TypeError`` or
``ValueError`` at construction naming the argument and the value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from nestedfn.optim import transforms as t
from nestedfn.optim.checks import (
    LEARNING_RATE,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT,
    UNIT_OPEN,
    declare,
)
from nestedfn.optim.core import Optimizer, Params, Schedule, chain
from nestedfn.optim.fused import ADAM, LION, MOMENTUM, ElementwiseSpec, register

__all__ = ["adam", "adamw", "lion", "momentum", "muon", "sgd"]

LearningRate = float | Schedule


@declare(learning_rate=LEARNING_RATE)
def sgd(learning_rate: LearningRate) -> Optimizer:
    """Plain gradient descent: ``p <- p - lr g``."""
    return t.scale_by_learning_rate(learning_rate)


@declare(learning_rate=LEARNING_RATE, decay=UNIT)
def momentum(
    learning_rate: LearningRate,
    decay: float = 0.9,
    nesterov: bool = False,
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """SGD with (heavy-ball or Nesterov) momentum: ``m = g + decay m``; ``p <- p - lr m``
    (Nesterov: ``p <- p - lr (g + decay m)``)."""
    opt = chain(t.trace(decay, nesterov, state_dtype), t.scale_by_learning_rate(learning_rate))
    spec = ElementwiseSpec(MOMENTUM, learning_rate, t.TraceState, 2, b1=decay, nesterov=nesterov)
    return register(opt, spec)


@declare(learning_rate=LEARNING_RATE, b1=UNIT_OPEN, b2=UNIT_OPEN, eps=POSITIVE)
def adam(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    bias_correction: bool = True,
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """Adam: ``p <- p - lr mu_hat / (sqrt(nu_hat) + eps)`` (see ``transforms.scale_by_adam``).
    ``state_dtype=mx.float32`` keeps the moments in float32 for low-precision params."""
    opt = chain(
        t.scale_by_adam(b1, b2, eps, bias_correction, state_dtype),
        t.scale_by_learning_rate(learning_rate),
    )
    spec = ElementwiseSpec(ADAM, learning_rate, t.ScaleByAdamState, 2, b1, b2, eps, bias_correction)
    return register(opt, spec)


@declare(
    learning_rate=LEARNING_RATE, b1=UNIT_OPEN, b2=UNIT_OPEN, eps=POSITIVE, weight_decay=NONNEGATIVE
)
def adamw(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Any | Callable[[Params], Any] | None = None,
    bias_correction: bool = True,
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """AdamW (Loshchilov & Hutter): decay decoupled from the moments,
    ``p <- p - lr (adam(g) + weight_decay p)``; ``mask`` limits the decay to some leaves."""
    opt = chain(
        t.scale_by_adam(b1, b2, eps, bias_correction, state_dtype),
        t.add_decayed_weights(weight_decay, mask),
        t.scale_by_learning_rate(learning_rate),
    )
    if mask is not None:  # per-leaf decay: the MLX graph serves
        return opt
    spec = ElementwiseSpec(
        ADAM,
        learning_rate,
        t.ScaleByAdamState,
        3,
        b1,
        b2,
        eps,
        bias_correction,
        has_wd=True,
        weight_decay=weight_decay,
    )
    return register(opt, spec)


@declare(learning_rate=LEARNING_RATE, b1=UNIT, b2=UNIT, weight_decay=NONNEGATIVE)
def lion(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """Lion: ``p <- p - lr (sign(b1 mu + (1 - b1) g) + weight_decay p)``,
    ``mu <- b2 mu + (1 - b2) g``.  Use a learning rate 3-10x smaller than AdamW's."""
    parts = [t.scale_by_lion(b1, b2, state_dtype)]
    if weight_decay:
        parts.append(t.add_decayed_weights(weight_decay, mask))
    parts.append(t.scale_by_learning_rate(learning_rate))
    opt = chain(*parts)
    if weight_decay and mask is not None:
        return opt
    spec = ElementwiseSpec(
        LION,
        learning_rate,
        t.ScaleByLionState,
        len(parts),
        b1,
        b2,
        has_wd=bool(weight_decay),
        weight_decay=weight_decay,
    )
    return register(opt, spec)


@declare(learning_rate=LEARNING_RATE, beta=UNIT, ns_steps=POSITIVE_INT, weight_decay=NONNEGATIVE)
def muon(
    learning_rate: LearningRate,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    state_dtype: mx.Dtype | None = None,
) -> Optimizer:
    """Muon (Jordan et al. 2024): momentum, then Newton–Schulz orthogonalisation of each 2-D
    leaf, then the learning rate: ``p <- p - lr (NS(m) + weight_decay p)``.

    Leaves that are not 2-D get plain (Nesterov) momentum SGD; to give them another optimizer
    (usually AdamW), route them with ``combinators.partition``.
    """
    parts = [t.trace(beta, nesterov, state_dtype), t.scale_by_newton_schulz(ns_steps)]
    if weight_decay:
        parts.append(t.add_decayed_weights(weight_decay, mask))
    parts.append(t.scale_by_learning_rate(learning_rate))
    return chain(*parts)
