"""The pure core of LoRA training: mlx-lm's loss, its gradients and its evaluation.

The loss is mlx-lm's ``default_loss(model, batch, lengths)``: the mean cross entropy over the
targets whose position ``t`` (1-based) satisfies ``offset <= t <= length``.  That mask runs one
target past each sequence (target ``length`` is the padding token after the last one, whenever
the batch is padded), so mlx-lm learns and reports "predict padding after the end" as well;
``pad_target=False`` (nestedfn's option) passes ``length - 1`` instead, which counts only the
sequence's own targets.  ``params`` is the LoRA tree only; it enters the model through
``nestedfn.tree.update_module`` (``lora.bind``) inside the loss, so the model never holds
state the trainer does not know about.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.trainer import evaluate as mlx_lm_evaluate

from nestedfn.lm.lora import bind
from nestedfn.optim.core import Params
from nestedfn.tree import flatten, unflatten

__all__ = ["evaluate_batches", "loss_fn", "make_grad_fn"]

Loss = Callable[[nn.Module, mx.array, mx.array], tuple[mx.array, mx.array]]
_LAST_TARGET = mx.array([0, 1], dtype=mx.int32)


def _real_targets_loss(model: nn.Module, batch: mx.array, lengths: mx.array) -> Any:
    """``default_loss`` over each sequence's own targets (its mask ends at ``length - 1``)."""
    return default_loss(model, batch, lengths - _LAST_TARGET.astype(lengths.dtype))


def loss_fn(pad_target: bool = True) -> Loss:
    """mlx-lm's ``default_loss`` (``pad_target=True``) or its real-targets variant."""
    return default_loss if pad_target else _real_targets_loss


def make_grad_fn(
    model: nn.Module, params: Params, compile: bool = True, loss: Loss = default_loss
) -> Callable[..., tuple[mx.array, mx.array, Params]]:
    """``fn(params, batch, lengths) -> (mean loss, tokens, grads)`` for the LoRA tree.

    ``params`` fixes the tree structure; the model's frozen weights are constants of the
    (compiled) graph.  The global random state is an input and output of the compiled graph so
    that LoRA dropout draws what ``mx.random.seed`` set before the call.
    """
    _, td = flatten(params)

    def loss_of(leaves: list[mx.array], batch: mx.array, lengths: mx.array) -> Any:
        bind(model, unflatten(td, leaves))
        model.train(True)
        return loss(model, batch, lengths)

    value_and_grad = mx.value_and_grad(loss_of)

    def step(leaves: list[mx.array], batch: mx.array, lengths: mx.array) -> Any:
        (mean, ntoks), grads = value_and_grad(leaves, batch, lengths)
        # (a cast of ntoks inside the differentiated function fails under mx.compile)
        return mean, ntoks.astype(mx.float32), grads

    if compile:
        state = [mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)

    def grad_fn(params: Params, batch: mx.array, lengths: mx.array) -> Any:
        leaves, got = flatten(params)
        if got != td:
            raise ValueError("grad_fn: params are not shaped like the tree it was built for")
        mean, ntoks, grads = step(leaves, batch, lengths)
        return mean, ntoks, unflatten(td, grads)

    return grad_fn


def evaluate_batches(
    model: nn.Module,
    params: Params | None,
    batches: Iterable[tuple[mx.array, mx.array]],
    num_batches: int,
    loss: Loss = default_loss,
) -> float:
    """mlx-lm's ``evaluate``: ``Σ loss·tokens / Σ tokens`` over the first ``num_batches`` of
    ``batches`` (-1: all), summed over processes, with ``params`` bound (``None``: the model as
    it is) and dropout off."""
    if params is not None:
        bind(model, params)

    def given(**_: Any) -> Iterable[tuple[mx.array, mx.array]]:
        return iter(batches)

    result = mlx_lm_evaluate(model, None, 0, num_batches, loss=loss, iterate_batches=given)
    return float(result)
