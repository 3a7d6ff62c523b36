"""The pure core of LoRA training: mlx-lm's masked loss, its gradients, its evaluation.

The loss is mlx-lm's: the mean cross entropy over the target tokens the mask selects
(``Σ mask·CE / Σ mask``).  ``params`` is the LoRA tree only; it enters the model through
``nestedfn.tree.update_module`` (``lora.bind``) inside the loss, so the model never holds
state the trainer does not know about.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from nestedfn.lm.lora import bind
from nestedfn.optim.core import Params
from nestedfn.tree import flatten, unflatten

__all__ = ["make_eval_fn", "make_grad_fn", "masked_cross_entropy"]


def masked_cross_entropy(
    logits: mx.array, targets: mx.array, mask: mx.array
) -> tuple[mx.array, mx.array]:
    """``(Σ mask·CE, Σ mask)`` in float32: the summed token loss and the number of tokens."""
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.astype(mx.float32).sum(), mask.astype(mx.float32).sum()


def make_grad_fn(
    model: nn.Module, params: Params, compile: bool = True
) -> Callable[..., tuple[mx.array, mx.array, Params]]:
    """``fn(params, inputs, targets, mask) -> (mean loss, tokens, grads)`` for the LoRA tree.

    ``params`` fixes the tree structure; the model's frozen weights are constants of the
    (compiled) graph.  The global random state is an input and output of the compiled graph so
    that LoRA dropout draws what ``mx.random.seed`` set before the call.
    """
    _, td = flatten(params)

    def loss_fn(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask: mx.array):
        bind(model, unflatten(td, leaves))
        model.train(True)
        total, ntoks = masked_cross_entropy(model(inputs), targets, mask)
        return total / ntoks, ntoks

    value_and_grad = mx.value_and_grad(loss_fn)

    def step(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask: mx.array):
        (loss, ntoks), grads = value_and_grad(leaves, inputs, targets, mask)
        return loss, ntoks, grads

    if compile:
        state = [mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)

    def grad_fn(params: Params, inputs: mx.array, targets: mx.array, mask: mx.array):
        leaves, got = flatten(params)
        if got != td:
            raise ValueError("grad_fn: params are not shaped like the tree it was built for")
        loss, ntoks, grads = step(leaves, inputs, targets, mask)
        return loss, ntoks, unflatten(td, grads)

    return grad_fn


def make_eval_fn(
    model: nn.Module, params: Params, compile: bool = True
) -> Callable[..., tuple[mx.array, mx.array]]:
    """``fn(params, inputs, targets, mask) -> (Σ mask·CE, Σ mask)`` with dropout off."""
    _, td = flatten(params)

    def fn(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask: mx.array):
        bind(model, unflatten(td, leaves))
        model.train(False)
        return masked_cross_entropy(model(inputs), targets, mask)

    if compile:
        fn = mx.compile(fn)

    def eval_fn(params: Params, inputs: mx.array, targets: mx.array, mask: mx.array):
        return fn(flatten(params)[0], inputs, targets, mask)

    return eval_fn
