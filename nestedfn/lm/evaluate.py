"""Evaluation as mlx-lm evaluates: the valid loss during training, the test loss after it.

``mlx_lm.tuner.trainer.evaluate`` computes the loss (``Σ loss·tokens / Σ tokens`` over the
first ``val_batches``/``test_batches`` batches, summed over processes) on the batches
``nestedfn.lm.batches`` replays in mlx-lm's order.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from nestedfn.lm.batches import RunBatches
from nestedfn.lm.loss import Loss, evaluate_batches
from nestedfn.optim.core import Params

__all__ = ["test_loss", "valid_loss"]


def valid_loss(
    model: nn.Module, params: Params, batches: RunBatches, done: int, config: Any, loss: Loss
) -> float:
    """The valid loss of ``params`` in the evaluation after ``done`` steps."""
    return evaluate_batches(model, params, batches.valid(done), config.eval_batches, loss)


def test_loss(
    model: nn.Module, params: Params, batches: RunBatches, config: Any, loss: Loss
) -> float:
    """The test loss of ``params`` after training."""
    return evaluate_batches(model, params, batches.test(), config.test_batches, loss)
