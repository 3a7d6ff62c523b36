"""What a training run needs around the optimizer: files and processes.  Stands on
``nestedfn.optim`` and ``nestedfn.tree``.

- ``checkpoint``: atomic writes and exact ``TrainState`` checkpoints;
- ``distributed``: data parallelism over ``mx.distributed`` (gradient averaging, checks that
  every process holds the same state).
"""

from nestedfn.run.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from nestedfn.run.distributed import ConnectError, DivergenceError, average_gradients

__all__ = [
    "checkpoint",
    "distributed",
    "CheckpointError",
    "ConnectError",
    "DivergenceError",
    "average_gradients",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]
