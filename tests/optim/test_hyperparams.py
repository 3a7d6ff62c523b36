"""inject_hyperparams: hyperparameters in the state, changed between compiled steps without
a new graph, against optimizers built with those values."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import nestedfn as nf
from nestedfn.fast.compile import compile_step
from nestedfn.optim.hyperparams import InjectHyperparamsState, inject_hyperparams, set_hyperparams
from nestedfn.tree import leaves


def _params():
    return {"w": mx.array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)), "b": mx.ones(3)}


def _grads(n):
    rng = np.random.default_rng(0)
    return [
        {"w": mx.array(rng.normal(size=(3, 4)).astype(np.float32)),
         "b": mx.array(rng.normal(size=(3,)).astype(np.float32))}
        for _ in range(n)
    ]  # fmt: skip


def _close(a, b):
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-6, atol=1e-7)


def test_changed_learning_rate_reuses_the_graph_and_equals_a_rebuilt_optimizer():
    """Steps 0-2 at lr 1e-2, then 3-5 at 1e-3 (and b1 0.8): one graph; the trajectory equals
    adam(1e-2) for 3 steps continued by adam(1e-3, b1=0.8) on the same Adam moments."""
    opt = inject_hyperparams(nf.adam)(learning_rate=1e-2, b1=0.9)
    step = compile_step(opt)
    state = nf.init(opt, _params())
    assert isinstance(state.opt_state, InjectHyperparamsState)
    grads = _grads(6)
    ref_step = compile_step(nf.adam(1e-2, b1=0.9), native=False)  # graph vs graph
    ref = nf.init(nf.adam(1e-2, b1=0.9), _params())
    for g in grads[:3]:
        state, ref = step(state, g), ref_step(ref, g)
    _close(state.params, ref.params)
    state = set_hyperparams(state, learning_rate=1e-3, b1=0.8)
    ref_step = compile_step(nf.adam(1e-3, b1=0.8), native=False)
    for g in grads[3:]:
        state, ref = step(state, g), ref_step(ref, g)
    _close(state.params, ref.params)
    assert step.graphs_built == 1
    assert float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-3)


def test_schedules_are_read_at_the_step_and_kept_in_the_state():
    schedule = nf.linear_warmup(1e-2, 4)
    opt = inject_hyperparams(nf.sgd)(learning_rate=schedule)
    state = nf.init(opt, _params())
    ref_opt = nf.sgd(schedule)
    ref = nf.init(ref_opt, _params())
    for i, g in enumerate(_grads(5)):
        state, ref = nf.apply_gradients(opt, state, g), nf.apply_gradients(ref_opt, ref, g)
        assert float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(schedule(i))
    _close(state.params, ref.params)


def test_static_values_and_unknown_names():
    opt = inject_hyperparams(nf.muon)(learning_rate=0.1, ns_steps=3)  # an int: static
    state = nf.init(opt, _params())
    assert set(state.opt_state.hyperparams) == {"learning_rate"}
    with pytest.raises(KeyError, match="known: \\['learning_rate'\\]"):
        set_hyperparams(state, ns_steps=4)
    with pytest.raises(ValueError, match="no InjectHyperparamsState"):
        set_hyperparams(nf.init(nf.adam(0.1), _params()), learning_rate=0.1)
