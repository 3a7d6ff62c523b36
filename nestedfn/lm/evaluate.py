"""Evaluation during training: the mean token loss over fixed batches of a held-out set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from nestedfn.lm.config import TrainConfig
from nestedfn.optim.core import Params
from nestedfn.run import distributed

__all__ = ["evaluate"]


def evaluate(
    eval_fn: Callable,
    params: Params,
    dataset: Any,
    config: TrainConfig,
    batches: int | None = None,
) -> float:
    """Mean token loss over the first ``batches`` (default ``eval_batches``) batches of
    ``dataset`` (the same batches every time; all of them with -1), summed over processes."""
    from nestedfn.lm.data import batch_at

    batches = config.eval_batches if batches is None else batches
    n = -(-len(dataset) // config.batch_size)
    if batches != -1:
        n = min(n, batches)
    rank, world = distributed.rank(), distributed.world_size()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    for i in range(n):
        batch = batch_at(
            dataset, i, config.batch_size, config.seed, config.max_seq_len, rank, world
        )
        s, t = eval_fn(params, *batch)
        total, ntoks = total + s, ntoks + t
    if world > 1:
        total, ntoks = distributed.all_sum([total, ntoks])
    return float((total / ntoks).item())
