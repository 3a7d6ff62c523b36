"""The branch-free forms (``core.branch_free``): one compiled graph with the step a traced
input serves every step, and gives the branching forms' results step by step, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import nestedfn as nf
from nestedfn.optim.core import branch_free, branching_on, static_step
from nestedfn.tree import flatten, leaves, unflatten
from tests.devices import assert_same_math


def _params():
    rng = np.random.default_rng(0)
    return {"layers": [{"w": mx.array(rng.normal(size=(3, 2)).astype(np.float32))} for _ in "abc"]}


def _grads(n):
    rng = np.random.default_rng(1)
    return [
        {"layers": [{"w": mx.array(rng.normal(size=(3, 2)).astype(np.float32))} for _ in "abc"]}
        for _ in range(n)
    ]


CASES = {
    "nested_mean": lambda: nf.nested(nf.adam(0.1), "depth", frequencies=(1, 2, 3)),
    "nested_sum_chain": lambda: nf.chain(
        nf.clip_by_global_norm(1.0),
        nf.nested(nf.momentum(0.1, 0.9), "depth", frequencies=(2, 1, 4), reduce="sum"),
    ),
    "accumulate_of_nested": lambda: nf.accumulate(nf.nested_adam(0.1, frequencies=(1, 2, 2)), 2),
    "nested_of_accumulate": lambda: nf.nested(
        nf.accumulate(nf.adam(0.1), 2), "depth", frequencies=(1, 1, 3)
    ),
    "multiscale_momentum": lambda: nf.multiscale_momentum(0.01, slow_every=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_graph_equals_compile_step_every_step(name):
    opt = CASES[name]()
    params = _params()
    state = nf.init(opt, params)
    leaves0, td = flatten((state.params, state.opt_state))

    def step(t, state_leaves, grads):
        p, s = unflatten(td, state_leaves)
        with branch_free():
            u, s = opt.update(grads, s, p, t)
        return flatten((nf.apply_updates(p, u), s))[0]

    one_graph = mx.compile(step)
    ref, ref_step = state, nf.compile_step(opt, native=False)  # graph vs graph
    cur = leaves0
    for i, g in enumerate(_grads(2 * opt.period + 1)):
        cur = one_graph(mx.array(i, dtype=mx.int32), cur, g)
        ref = ref_step(ref, g)
        want = leaves((ref.params, ref.opt_state))
        assert len(cur) == len(want), f"step {i}"
        for a, b in zip(cur, want):
            assert_same_math(a, b)  # bit for bit on the CPU (tests.devices)


def test_static_step_refuses_to_answer_inside_branch_free():
    assert branching_on(3) and branching_on(mx.array(3))
    with branch_free():
        assert branching_on(3) and not branching_on(mx.array(3))
        assert static_step(3) == 3
        with pytest.raises(RuntimeError, match="branch-free form"):
            static_step(mx.array(3))
