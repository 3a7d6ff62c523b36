"""nestedfn: functional Nested Learning (multi-timescale) optimizers for MLX.

The packages stand on each other in one direction, each importing only from those before it::

    tree     exact tree plumbing (structure, dotted paths, the checked model.update)
    optim    functional optimizers: core, transforms, optimizers, schedules, combinators
    tiered   Nested Learning: multi-frequency tiers (nested, nested_adam, tier maps,
             multiscale_momentum)
    fast     compile_step, resident_step and the packed buffers behind them
    run      checkpoints and data-parallel processes
    lm       the LoRA trainer for mlx-lm models
    cli      ``nestedfn demo | train | inspect | plot``

(``tiered``, ``fast`` and ``run`` share a floor and do not import each other;
``tests/test_layout.py`` holds the code to this plan.)  This module only re-exports the public
API.  The modules that lived at the top level before the packages (``nestedfn.transforms``,
``nestedfn.tiers``, ...) keep working as aliases of their new homes (``CHANGELOG.md``).
"""

import sys as _sys

from nestedfn.bridge import NestedfnOptimizer, as_mlx_optimizer
from nestedfn.fast import compile as _compile_module
from nestedfn.fast.compile import compile_step
from nestedfn.fast.resident import ResidentState, ResidentStep, resident_step
from nestedfn.optim import combinators, core, optimizers, schedules, transforms
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
from nestedfn.optim.from_mlx import FromMlxState, from_mlx
from nestedfn.optim.hyperparams import InjectHyperparamsState, inject_hyperparams, set_hyperparams
from nestedfn.optim.optimizers import adam, adamw, lion, momentum, muon, sgd
from nestedfn.optim.schedules import (
    constant,
    cosine_decay,
    exponential_decay,
    join,
    linear_warmup,
    step_decay,
    warmup_cosine,
)

# every transform at the top level too, as optax has them (``nf.scale_by_adam``)
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
from nestedfn.run import checkpoint, distributed
from nestedfn.run.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from nestedfn.run.distributed import average_gradients
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
    tiers,
)
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

# Where the public modules of the flat layout went: ``import nestedfn.transforms`` (and
# ``from nestedfn.tiers import by_depth``) still work, as the very same module objects.
MOVED_MODULES = {
    "core": core,
    "transforms": transforms,
    "optimizers": optimizers,
    "schedules": schedules,
    "combinators": combinators,
    "tiers": tiers,
    "compile": _compile_module,
    "checkpoint": checkpoint,
    "distributed": distributed,
}
for _name, _module in MOVED_MODULES.items():
    _sys.modules[f"{__name__}.{_name}"] = _module
# ``from nestedfn.nested import nested_adam`` (the old module) still works; the attribute
# ``nf.nested`` stays the function it always was.
_sys.modules[f"{__name__}.nested"] = _sys.modules[f"{__name__}.tiered"]
globals()["compile"] = _compile_module  # ``nestedfn.compile``: the module, as before
del _name, _module

__version__ = "0.1.0"
