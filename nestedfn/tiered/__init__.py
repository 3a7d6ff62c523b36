"""Nested Learning: parameters in tiers that update at their own frequency.  Stands on
``nestedfn.optim`` and ``nestedfn.tree``.

- ``cms``: ``nested`` (any optimizer run in tiers, the Continuum Memory System rule for the
  slow ones), ``nested_adam``, ``tier_stats``;
- ``tiers``: tier maps (``by_depth``, ``by_pattern``, ``manual``, ``by_grad_norm``) and
  ``describe``;
- ``multiscale``: ``multiscale_momentum``, the paper's multi-scale momentum optimizer.
"""

from nestedfn.tiered.cms import NestedState, TierStats, nested, nested_adam, tier_stats
from nestedfn.tiered.multiscale import MultiscaleMomentumState, multiscale_momentum
from nestedfn.tiered.tiers import TierRule, by_depth, by_grad_norm, by_pattern, describe, manual

__all__ = [
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
]
