"""nestedfn: functional Nested Learning (multi-timescale) optimizers for MLX.

``import nestedfn as nf`` gives the public API: tree plumbing, optimizers and schedules
(optax's names, every transform included), the tiered optimizers, ``compile_step``,
checkpoints, the ``mlx.optimizers`` bridges and the exceptions worth catching.  ``__all__``
lists it; everything else is reached through its package.

The packages stand on each other in one direction, each importing only from those before it::

    tree     exact tree plumbing (structure, dotted paths, the checked model.update)
    optim    functional optimizers: core, transforms, optimizers, schedules, combinators
    tiered   Nested Learning: multi-frequency tiers (nested, nested_adam, tier maps,
             multiscale_momentum)
    fast     compile_step, resident_step and the packed buffers behind them
    run      checkpoints and data-parallel processes
    bridge   nestedfn optimizers where MLX code expects ``mlx.optimizers``
    lm       the LoRA trainer for mlx-lm models
    testing  Hypothesis strategies for trees and modules (imports Hypothesis; not re-exported)
    cli      ``nestedfn demo | train | inspect | plot``

``tiered``, ``fast`` and ``run`` share a floor and do not import each other, as do ``bridge``,
``lm`` and ``testing`` one floor up; ``tests/test_layout.py`` holds the code to this plan.
"""

from nestedfn.bridge import NestedfnOptimizer, as_mlx_optimizer
from nestedfn.fast import NotPackableError, ResidentState, ResidentStep, compile_step, resident_step
from nestedfn.lm import ConfigError, DataError, LoraError, RunError
from nestedfn.optim import (
    AccumulateState,
    AddDecayedWeightsState,
    ClipByGlobalNormState,
    EmptyState,
    InjectHyperparamsState,
    MaskedState,
    Optimizer,
    PartitionState,
    ScaleByAdamState,
    ScaleByLionState,
    ScaleState,
    SkipNonfiniteState,
    TraceState,
    TrainState,
    accumulate,
    adam,
    adamw,
    add_decayed_weights,
    apply_gradients,
    apply_updates,
    branch_free,
    chain,
    clip_by_global_norm,
    constant,
    cosine_decay,
    exponential_decay,
    identity,
    init,
    inject_hyperparams,
    join,
    learning_rate_of,
    linear_warmup,
    lion,
    masked,
    momentum,
    muon,
    newton_schulz,
    partition,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_newton_schulz,
    set_hyperparams,
    sgd,
    skip_nonfinite,
    static_step,
    step_decay,
    trace,
    warmup_cosine,
)
from nestedfn.optim.from_mlx import FromMlxState, from_mlx
from nestedfn.run import (
    CheckpointError,
    ConnectError,
    DivergenceError,
    average_gradients,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from nestedfn.tiered import (
    MultiscaleMomentumState,
    NestedState,
    TierRule,
    TierStats,
    by_depth,
    by_grad_norm,
    by_pattern,
    describe,
    manual,
    multiscale_momentum,
    nested,
    nested_adam,
    tier_stats,
)
from nestedfn.tree import (
    PathError,
    TreeDef,
    TreeDepthError,
    TreeMismatchError,
    check_fits,
    flatten,
    from_flat,
    is_leaf,
    leaves,
    set_paths,
    to_flat,
    tree_map,
    unflatten,
    update_module,
)

__version__ = "0.1.0"

__all__ = [
    # tree plumbing
    "TreeDef",
    "check_fits",
    "flatten",
    "from_flat",
    "is_leaf",
    "leaves",
    "set_paths",
    "to_flat",
    "tree_map",
    "unflatten",
    "update_module",
    # optimizers: the core
    "Optimizer",
    "TrainState",
    "apply_gradients",
    "apply_updates",
    "branch_free",
    "chain",
    "identity",
    "init",
    "learning_rate_of",
    "static_step",
    # optimizers: transforms and their states
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
    # optimizers: recipes, schedules, combinators, hyperparameters, mlx.optimizers
    "adam",
    "adamw",
    "lion",
    "momentum",
    "muon",
    "sgd",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "join",
    "linear_warmup",
    "step_decay",
    "warmup_cosine",
    "AccumulateState",
    "MaskedState",
    "PartitionState",
    "SkipNonfiniteState",
    "accumulate",
    "masked",
    "partition",
    "skip_nonfinite",
    "InjectHyperparamsState",
    "inject_hyperparams",
    "set_hyperparams",
    "FromMlxState",
    "from_mlx",
    "NestedfnOptimizer",
    "as_mlx_optimizer",
    # Nested Learning
    "MultiscaleMomentumState",
    "NestedState",
    "TierRule",
    "TierStats",
    "by_depth",
    "by_grad_norm",
    "by_pattern",
    "describe",
    "manual",
    "multiscale_momentum",
    "nested",
    "nested_adam",
    "tier_stats",
    # fast steps
    "ResidentState",
    "ResidentStep",
    "compile_step",
    "resident_step",
    # runs: checkpoints, processes
    "average_gradients",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    # the errors worth catching (every one a ValueError, LookupError or RuntimeError)
    "CheckpointError",
    "ConfigError",
    "ConnectError",
    "DataError",
    "DivergenceError",
    "LoraError",
    "NotPackableError",
    "PathError",
    "RunError",
    "TreeDepthError",
    "TreeMismatchError",
]
