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
- ``from_mlx``: any ``mlx.optimizers.Optimizer`` as a functional ``Optimizer`` (the function
  ``nestedfn.optim.from_mlx.from_mlx``, ``nf.from_mlx``; not re-exported here, where the name is
  its module's).

``__all__`` is the package's public face; ``nestedfn`` re-exports it.
"""

from nestedfn.optim.combinators import (
    AccumulateState,
    MaskedState,
    PartitionState,
    SkipNonfiniteState,
    accumulate,
    masked,
    partition,
    skip_nonfinite,
)
from nestedfn.optim.core import (
    Optimizer,
    TrainState,
    apply_gradients,
    apply_updates,
    branch_free,
    chain,
    identity,
    init,
    learning_rate_of,
    static_step,
)
from nestedfn.optim.hyperparams import (
    InjectHyperparamsState,
    inject_hyperparams,
    set_hyperparams,
)
from nestedfn.optim.optimizers import (
    adam,
    adamw,
    lion,
    momentum,
    muon,
    sgd,
)
from nestedfn.optim.schedules import (
    constant,
    cosine_decay,
    exponential_decay,
    join,
    linear_warmup,
    step_decay,
    warmup_cosine,
)
from nestedfn.optim.transforms import (
    AddDecayedWeightsState,
    ClipByGlobalNormState,
    EmptyState,
    ScaleByAdamState,
    ScaleByLionState,
    ScaleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    newton_schulz,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_newton_schulz,
    trace,
)

__all__ = [
    "from_mlx",  # the module; its function is ``nf.from_mlx``
    "AccumulateState",
    "AddDecayedWeightsState",
    "ClipByGlobalNormState",
    "EmptyState",
    "InjectHyperparamsState",
    "MaskedState",
    "Optimizer",
    "PartitionState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleState",
    "SkipNonfiniteState",
    "TraceState",
    "TrainState",
    "accumulate",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_gradients",
    "apply_updates",
    "branch_free",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "identity",
    "init",
    "inject_hyperparams",
    "join",
    "learning_rate_of",
    "linear_warmup",
    "lion",
    "masked",
    "momentum",
    "muon",
    "newton_schulz",
    "partition",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_newton_schulz",
    "set_hyperparams",
    "sgd",
    "skip_nonfinite",
    "static_step",
    "step_decay",
    "trace",
    "warmup_cosine",
]
