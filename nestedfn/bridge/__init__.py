"""Bridges to ``mlx.optimizers``: ``as_mlx_optimizer`` runs a nestedfn optimizer wherever MLX
code expects an ``mlx.optimizers.Optimizer`` (mlx-lm's trainer).  (The other direction,
``from_mlx``, is functional and lives in ``nestedfn.optim.from_mlx``.)"""

from nestedfn.bridge.mlx_optimizer import NestedfnOptimizer, as_mlx_optimizer

__all__ = ["NestedfnOptimizer", "as_mlx_optimizer"]
