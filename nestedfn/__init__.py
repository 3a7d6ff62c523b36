"""nestedfn: functional Nested Learning (multi-timescale) optimizers for MLX.

This module only re-exports the public API; each idea lives in its own module.
"""

from nestedfn.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from nestedfn.combinators import accumulate, masked, partition, skip_nonfinite
from nestedfn.compile import compile_step
from nestedfn.core import (
    Optimizer,
    TrainState,
    apply_gradients,
    apply_updates,
    chain,
    identity,
    init,
    static_step,
)
from nestedfn.distributed import average_gradients
from nestedfn.nested import (
    MultiscaleMomentumState,
    NestedState,
    TierStats,
    multiscale_momentum,
    nested,
    nested_adam,
    tier_stats,
)
from nestedfn.optimizers import adam, adamw, lion, momentum, muon, sgd
from nestedfn.schedules import constant, cosine_decay, join, linear_warmup, warmup_cosine
from nestedfn.tiers import TierRule, by_depth, by_grad_norm, by_pattern, describe, manual
from nestedfn.tree import (
    PathError,
    TreeDef,
    TreeMismatchError,
    check_fits,
    flatten,
    from_flat,
    leaves,
    set_paths,
    to_flat,
    tree_map,
    unflatten,
    update_module,
)

__version__ = "0.1.0"
