"""nestedfn.tiered.multiscale: multi-scale momentum (M3) against a numpy reference of its
equations, on its own clock eager and compiled."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.optim.core import apply_updates
from nestedfn.tiered import nested
from tests.tiered.test_cms import (
    _compiled_equals_eager_every_step,
    _two_tier_problem,
    np_newton_schulz,
)


@pytest.mark.parametrize(
    "form,orthogonalize,slow_every", [("paper", True, 3), ("ema", True, 4), ("paper", False, 1)]
)
def test_multiscale_momentum_matches_numpy_reference(form, orthogonalize, slow_every):
    from nestedfn.tiered import multiscale_momentum

    rng = np.random.default_rng(3)
    shapes = {"w": (5, 3), "u": (3, 6), "bias": (4,)}
    x = {k: rng.standard_normal(s) for k, s in shapes.items()}
    lr, b1, b2, b3, alpha, eps = 0.01, 0.9, 0.99, 0.8, 0.5, 1e-8
    opt = multiscale_momentum(
        lambda step: lr * (1 + 0 * step),  # a schedule: called with the step
        b1=b1,
        b2=b2,
        b3=b3,
        alpha=alpha,
        eps=eps,
        slow_every=slow_every,
        ns_steps=5,
        orthogonalize=orthogonalize,
        form=form,
    )
    assert opt.period == slow_every
    params = {k: mx.array(v.astype(np.float32)) for k, v in x.items()}
    state = opt.init(params)
    mem = {k: {n: np.zeros(s) for n in ("m1", "v", "m2", "o2", "acc")} for k, s in shapes.items()}
    orth = lambda m: np_newton_schulz(m, 5) if orthogonalize and m.ndim == 2 else m  # noqa: E731
    for t in range(13):
        gs = {k: rng.standard_normal(s) for k, s in shapes.items()}
        updates, state = opt.update(
            {k: mx.array(g.astype(np.float32)) for k, g in gs.items()}, state, params, t
        )
        params = apply_updates(params, updates)
        for k, g in gs.items():
            m = mem[k]
            if form == "paper":
                m["m1"] = m["m1"] + b1 * g
                m["v"] = m["v"] + b2 * g * g
            else:
                m["m1"] = b1 * m["m1"] + (1 - b1) * g
                m["v"] = b2 * m["v"] + (1 - b2) * g * g
            m["acc"] = m["acc"] + g
            if (t + 1) % slow_every == 0:
                if form == "paper":
                    m["m2"] = m["m2"] + b3 * m["acc"]
                else:
                    m["m2"] = b3 * m["m2"] + (1 - b3) * m["acc"] / slow_every
                m["o2"] = orth(m["m2"])
                m["acc"] = np.zeros_like(m["acc"])
            x[k] = x[k] - lr * (orth(m["m1"]) + alpha * m["o2"]) / np.sqrt(m["v"] + eps)
        for k in shapes:
            np.testing.assert_allclose(np.array(params[k]), x[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(state.m2["w"]), mem["w"]["m2"], rtol=1e-4, atol=1e-5)


def test_multiscale_momentum_errors():
    from nestedfn.tiered import multiscale_momentum

    with pytest.raises(ValueError, match="slow_every must be a positive int"):
        multiscale_momentum(0.1, slow_every=0)
    with pytest.raises(ValueError, match="form must be"):
        multiscale_momentum(0.1, form="adam")


def test_inner_period_graphs_shared_across_slow_tier_phases_multiscale_1_4():
    """multiscale_momentum(slow_every=2) in tiers (1, 4): period lcm(2, 8) = 8, but the graph
    only depends on (tier 0 slow?, tier 1 active and slow?): 4 graphs over 16 steps, each
    shared by two steps of the period, every step equal to eager."""
    from nestedfn.tiered import multiscale_momentum

    inner = multiscale_momentum(0.05, slow_every=2, alpha=1.0, ns_steps=3)
    params, gs = _two_tier_problem(8, 16)
    opt = nested(inner, {"fast": 0, "slow": 1}, (1, 4))
    assert opt.period == 8
    assert len({opt.phase(i) for i in range(8)}) == 4
    assert opt.phase(3) != opt.phase(7)  # tier 1's first update is fast-only, its second slow
    step_fn = _compiled_equals_eager_every_step(opt, params, gs)
    assert step_fn.graphs_built == 4
