"""Functional optimizers, optax-style: every piece an ``Optimizer(init, update)``.  Stands on
``nestedfn.tree`` only.

- ``core``: ``Optimizer``, ``TrainState``, ``init``, ``apply_gradients``, ``chain``, the step
  conventions (``static_step``, ``no_update``);
- ``transforms``: the building blocks (``scale_by_adam``, ``clip_by_global_norm``, ...);
- ``optimizers``: the usual recipes built from them (``adam``, ``adamw``, ``lion``, ...);
- ``schedules``: learning rates as functions of the step;
- ``combinators``: optimizers made of optimizers (``partition``, ``masked``, ``accumulate``,
  ``skip_nonfinite``);
- ``hyperparams``: ``inject_hyperparams`` (hyperparameters in the state, changed between
  compiled steps);
- ``from_mlx``: any ``mlx.optimizers.Optimizer`` as a functional ``Optimizer``.
"""

from nestedfn.optim.combinators import accumulate, masked, partition, skip_nonfinite
from nestedfn.optim.core import (
    Optimizer,
    TrainState,
    apply_gradients,
    apply_updates,
    chain,
    identity,
    init,
    static_step,
)
from nestedfn.optim.optimizers import adam, adamw, lion, momentum, muon, sgd
from nestedfn.optim.schedules import constant, cosine_decay, join, linear_warmup, warmup_cosine

__all__ = [
    "Optimizer",
    "TrainState",
    "accumulate",
    "adam",
    "adamw",
    "apply_gradients",
    "apply_updates",
    "chain",
    "constant",
    "cosine_decay",
    "identity",
    "init",
    "join",
    "linear_warmup",
    "lion",
    "masked",
    "momentum",
    "muon",
    "partition",
    "sgd",
    "skip_nonfinite",
    "static_step",
    "warmup_cosine",
]
