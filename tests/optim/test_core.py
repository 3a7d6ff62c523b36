"""Tests of nestedfn.core: Optimizer/TrainState plumbing, chain, apply_updates, static_step."""

from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest

import nestedfn as nf
from nestedfn.optim import core
from nestedfn.tree import TreeMismatchError


class CountState(NamedTuple):
    count: mx.array


def counting_scale(factor: float) -> nf.Optimizer:
    """A reference transform: multiplies by ``factor`` and counts its calls in its state."""

    def init_fn(params):
        return CountState(mx.array(0))

    def update_fn(grads, state, params, step):
        return nf.tree_map(lambda g: g * factor, grads), CountState(state.count + 1)

    return nf.Optimizer(init_fn, update_fn)


def params_tree():
    return {
        "model": {
            "layers": [
                {"w": mx.array([[1.0, 2.0], [3.0, 4.0]])},
                {},
                {"w": mx.array([[5.0, 6.0], [7.0, 8.0]])},
            ],
            "bias": mx.array([0.5, -0.5]),
        }
    }


def test_init_builds_train_state_at_step_zero():
    p = params_tree()
    state = nf.init(counting_scale(2.0), p)
    assert isinstance(state, nf.TrainState)
    assert state.params is p
    assert state.step == 0
    assert state.opt_state.count.item() == 0


def test_apply_gradients_adds_updates_and_counts_steps():
    p = params_tree()
    g = nf.tree_map(lambda x: mx.ones_like(x), p)
    opt = core.chain(counting_scale(2.0), counting_scale(-0.5))  # total factor -1
    state = nf.init(opt, p)
    for _ in range(3):
        state = nf.apply_gradients(opt, state, g)
    assert state.step == 3
    assert [s.count.item() for s in state.opt_state] == [3, 3]
    want = np.array(p["model"]["layers"][0]["w"]) - 3.0
    np.testing.assert_array_equal(np.array(state.params["model"]["layers"][0]["w"]), want)
    # the empty layer survives as an empty dict
    assert state.params["model"]["layers"][1] == {}


def test_apply_gradients_is_pure():
    p = params_tree()
    g = nf.tree_map(lambda x: mx.full(x.shape, 0.25), p)
    before_p = {k: np.array(v) for k, v in nf.to_flat(p).items()}
    before_g = {k: np.array(v) for k, v in nf.to_flat(g).items()}
    opt = counting_scale(-1.0)
    state = nf.init(opt, p)
    new = nf.apply_gradients(opt, state, g)
    assert new is not state and new.params is not p
    for k, v in nf.to_flat(p).items():
        np.testing.assert_array_equal(np.array(v), before_p[k])
    for k, v in nf.to_flat(g).items():
        np.testing.assert_array_equal(np.array(v), before_g[k])
    assert state.opt_state.count.item() == 0


def test_apply_updates_keeps_param_dtype():
    p = {"a": mx.ones((3,), dtype=mx.bfloat16), "b": mx.ones((2,), dtype=mx.float16)}
    u = {"a": mx.full((3,), 0.5, dtype=mx.float32), "b": mx.full((2,), 0.25, dtype=mx.float32)}
    out = nf.apply_updates(p, u)
    assert out["a"].dtype == mx.bfloat16 and out["b"].dtype == mx.float16
    np.testing.assert_allclose(np.array(out["a"].astype(mx.float32)), 1.5)


def test_apply_updates_structure_mismatch_names_path():
    p = {"a": mx.ones((2,)), "b": mx.ones((2,))}
    with pytest.raises(nf.TreeMismatchError, match="b"):
        nf.apply_updates(p, {"a": mx.ones((2,))})


def test_chain_period_is_lcm_of_parts():
    a = core.Optimizer(lambda p: (), lambda g, s, p, t: (g, s), 4)
    b = core.Optimizer(lambda p: (), lambda g, s, p, t: (g, s), 6)
    assert core.chain(a, b).period == 12
    assert core.chain(counting_scale(1.0)).period == 1


def test_identity_passes_gradients_through():
    g = {"x": mx.array([1.0, 2.0])}
    out, state = core.identity().update(g, (), None, 0)
    assert out is g and state == ()


def test_static_step_int_array_and_tracing():
    assert core.static_step(7) == 7
    assert core.static_step(mx.array(5)) == 5
    with core.tracing_step(11):
        assert core.static_step(mx.array(0)) == 11
        assert core.static_step(3) == 3
    assert core.static_step(mx.array(2)) == 2


def test_optimizer_phase_defaults_to_step_mod_period_and_stays_a_namedtuple():
    init_fn, update_fn = (lambda p: ()), (lambda g, s, p, t: (g, s))
    plain = core.Optimizer(init_fn, update_fn)
    assert plain.period == 1 and plain.phase_key is None
    assert [plain.phase(s) for s in range(3)] == [0, 0, 0]
    four = core.Optimizer(init_fn, update_fn, 4)
    assert [four.phase(s) for s in range(6)] == [0, 1, 2, 3, 0, 1]
    init_, update_, period, key, groups = core.Optimizer(
        init_fn, update_fn, 4, lambda s: s % 4 == 3
    )[:5]
    assert (init_, update_, period, groups) == (init_fn, update_fn, 4, None) and key(7) is True
    keyed = four._replace(phase_key=lambda s: (s + 1) % 4 == 0)
    assert [keyed.phase(s) for s in range(4)] == [False, False, False, True]


def test_chain_phase_is_the_tuple_of_its_parts_phases():
    a = core.Optimizer(lambda p: (), lambda g, s, p, t: (g, s), 2)
    b = core.Optimizer(lambda p: (), lambda g, s, p, t: (g, s), 3, lambda s: s % 3 == 0)
    c = core.chain(a, b, counting_scale(1.0))
    assert [c.phase(s) for s in range(4)] == [
        (0, True, 0),
        (1, False, 0),
        (0, False, 0),
        (1, True, 0),
    ]
    assert core.chain(counting_scale(1.0), counting_scale(2.0)).phase_key is None


def _bits(x):
    """float32 bits, every NaN as one canonical NaN (a GPU may change a NaN's payload)."""
    a = np.array(x)
    return np.where(np.isnan(a), np.float32("nan"), a).view(np.uint32)


def test_no_update_gives_the_param_itself_and_reads_as_negative_zero():
    p = {"a": mx.array([-0.0, 0.0, float("nan"), 1e-40, -3.0]), "b": mx.ones((2,)), "n": 2.0}
    u = {"a": core.no_update(p["a"]), "b": mx.full((2,), 0.5), "n": core.no_update(2.0)}
    assert core.is_no_update(u["a"]) and not core.is_no_update(u["b"])
    assert not core.is_no_update(u["a"] * 1.0) and not core.is_no_update(mx.zeros((5,)))
    assert u["n"] == 0.0 and str(u["n"]) == "-0.0"
    out = nf.apply_updates(p, u)
    assert out["a"] is p["a"]  # nothing computed: the same array
    np.testing.assert_array_equal(np.array(out["b"]), [1.5, 1.5])
    assert out["n"] == 2.0
    # a consumer that adds it by hand, or a rewritten copy, still leaves p bit-identical
    np.testing.assert_array_equal(_bits(p["a"] + u["a"]), _bits(p["a"]))
    np.testing.assert_array_equal(_bits(p["a"] + u["a"] * 2.0), _bits(p["a"]))
    # a mark of another shape neither replaces the param nor broadcasts into it
    with pytest.raises(TreeMismatchError, match=r"update shape \(5,\) vs param shape \(2, 5\)"):
        nf.apply_updates(mx.ones((2, 5)), core.no_update(p["a"]))


def test_no_update_under_mx_compile_passes_the_param_through_bit_identical():
    p = mx.array([-0.0, 0.0, float("nan"), 1e-40, -3.0])
    q = mx.array([-0.0, 1.0])

    def step(p, q):
        return nf.apply_updates([p, q], [core.no_update(p), core.no_update(q) * 2.0])

    for _ in range(2):  # trace, then replay
        out = mx.compile(step)(p, q)
        np.testing.assert_array_equal(_bits(out[0]), _bits(p))
        np.testing.assert_array_equal(_bits(out[1]), _bits(q))
