"""optax's convention: every transform, recipe, schedule, combinator (and their states) is
also at the top level, as the very same object."""

from __future__ import annotations

import pytest

import nestedfn as nf
from nestedfn.optim import (
    combinators,
    from_mlx,
    hyperparams,
    optimizers,
    schedules,
    transforms,
)


@pytest.mark.parametrize(
    "module", [transforms, optimizers, schedules, combinators, hyperparams, from_mlx]
)
def test_every_public_name_is_at_the_top_level(module):
    missing = [n for n in module.__all__ if n != "MLX_OPTIMIZERS" and not hasattr(nf, n)]
    assert not missing, f"{module.__name__}: not at nf's top level: {missing}"
    for name in module.__all__:
        if hasattr(nf, name) and name not in ("from_mlx",):
            assert getattr(nf, name) is getattr(module, name)
    assert nf.from_mlx is from_mlx.from_mlx
