"""Gradients shaped unlike the params are refused by every step (eager, compiled, packed),
naming the path and both shapes, instead of broadcasting into the params."""

from __future__ import annotations

import mlx.core as mx
import pytest

import nestedfn as nf
from nestedfn.optim import checks
from nestedfn.tree import TreeMismatchError

STEPS = {
    "eager": lambda opt: lambda s, g: nf.apply_gradients(opt, s, g),
    "compiled": lambda opt: nf.compile_step(opt),
    "packed": lambda opt: nf.compile_step(opt, packed=True),
}


@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("shape", [(3, 4), (4,), (1, 1), (4, 1)])
def test_grads_of_another_shape_are_refused(kind, shape):
    opt = nf.adam(1e-2)
    state = nf.init(opt, {"w": mx.zeros((1, 4)), "b": mx.zeros((2,))})
    grads = {"w": mx.ones(shape), "b": mx.ones((2,))}
    with pytest.raises(TreeMismatchError) as e:
        STEPS[kind](opt)(state, grads)
    assert e.value.problems[0][0] == "w"
    assert str(shape) in str(e.value) and "(1, 4)" in str(e.value)


@pytest.mark.parametrize("kind", list(STEPS))
def test_grads_of_another_structure_are_refused(kind):
    opt = nf.sgd(1e-2)
    state = nf.init(opt, {"w": mx.zeros((2,)), "b": mx.zeros((2,))})
    with pytest.raises(TreeMismatchError) as e:
        STEPS[kind](opt)(state, {"w": mx.ones((2,)), "c": mx.ones((2,))})
    paths = {p for p, _ in e.value.problems}
    assert {"b", "c"} <= paths


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_other_dtypes_are_allowed_and_params_keep_theirs(kind):
    opt = nf.sgd(0.5)
    state = nf.init(opt, {"w": mx.zeros((3,), dtype=mx.float32)})
    new = STEPS[kind](opt)(state, {"w": mx.ones((3,), dtype=mx.bfloat16)})
    assert new.params["w"].dtype == mx.float32
    assert new.params["w"].tolist() == [-0.5, -0.5, -0.5]


def test_a_signature_is_compared_once():
    p = {"w": mx.zeros((5, 7))}
    g = {"w": mx.ones((5, 7))}
    calls = []
    real = checks.grads_problems
    checks.grads_problems = lambda *a: calls.append(1) or real(*a)
    try:
        for _ in range(3):
            checks.check_grads(p, g)
    finally:
        checks.grads_problems = real
    assert len(calls) <= 1  # zero if another test saw this signature first


def test_the_compiled_step_checks_only_when_it_builds_a_graph(monkeypatch):
    import nestedfn.fast.compile as compile_mod

    calls = []
    monkeypatch.setattr(compile_mod, "check_grads", lambda *a: calls.append(1))
    opt = nf.sgd(1e-2)
    step = nf.compile_step(opt)
    state = nf.init(opt, {"w": mx.zeros((2,))})
    for _ in range(4):
        state = step(state, {"w": mx.ones((2,))})
    assert calls == [1] and step.graphs_built == 1
