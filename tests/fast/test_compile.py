"""compile_step: the compiled step equals eager apply_gradients, one graph per phase."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedfn.fast.compile import compile_step
from nestedfn.optim.core import Optimizer, apply_gradients, chain, init, static_step
from nestedfn.tree import flatten, tree_map


class _AdamState(NamedTuple):
    mu: object
    nu: object


def _adam_moments(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """A small bias-corrected Adam direction (no learning rate), local to the tests."""

    def init_fn(params):
        return _AdamState(tree_map(mx.zeros_like, params), tree_map(mx.zeros_like, params))

    def update_fn(grads, state, params, step):
        mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        c1 = 1 - b1 ** (step + 1)
        c2 = 1 - b2 ** (step + 1)
        upd = tree_map(lambda m, v: (m / c1) / (mx.sqrt(v / c2) + eps), mu, nu)
        return upd, _AdamState(mu, nu)

    return Optimizer(init_fn, update_fn)


def _scale_by_schedule(fn) -> Optimizer:
    def update_fn(grads, state, params, step):
        s = fn(step)
        return tree_map(lambda g: g * s, grads), state

    return Optimizer(lambda p: (), update_fn)


def _adam(lr: float) -> Optimizer:
    return chain(_adam_moments(), _scale_by_schedule(lambda step: -lr))


def _every(k: int, lr: float) -> Optimizer:
    """SGD on the mean of each chunk of ``k`` gradients; branches on ``static_step``."""

    def init_fn(params):
        return tree_map(mx.zeros_like, params)

    def update_fn(grads, acc, params, step):
        acc = tree_map(lambda a, g: a + g, acc, grads)
        if (static_step(step) + 1) % k == 0:
            return tree_map(lambda a: -lr * a / k, acc), tree_map(mx.zeros_like, acc)
        return tree_map(mx.zeros_like, grads), acc

    return Optimizer(init_fn, update_fn, period=k)


def _tree(seed: int, shapes=((3, 4), (5,), (2, 2))) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "model": {
            "layers": [
                {"w": mx.array(rng.standard_normal(s).astype(np.float32))} for s in shapes[:2]
            ],
            "head": (mx.array(rng.standard_normal(shapes[2]).astype(np.float32)),),
        }
    }


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
    la, ta = flatten(a)
    lb, tb = flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        if x.dtype in (mx.bfloat16, mx.float16):  # fused kernels round intermediates once
            rtol, atol = max(rtol, 2e-2), max(atol, 1e-3)
        x, y = x.astype(mx.float32), y.astype(mx.float32)
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=rtol, atol=atol)


def _run_both(opt: Optimizer, steps: int, seed: int = 0):
    params = _tree(seed)
    eager = init(opt, params)
    compiled = init(opt, params)
    step_fn = compile_step(opt)
    for t in range(steps):
        grads = _tree(1000 + t)
        eager = apply_gradients(opt, eager, grads)
        compiled = step_fn(compiled, grads)
        assert compiled.step == eager.step == t + 1
        _assert_close(compiled.params, eager.params)
        _assert_close(compiled.opt_state, eager.opt_state)
    return eager, compiled, step_fn


def test_adam_equals_eager_over_20_steps_one_graph():
    eager, compiled, step_fn = _run_both(_adam(1e-2), 20)
    assert step_fn.graphs_built == 1
    # and the params really moved (not a trivially equal no-op)
    assert not np.allclose(
        np.array(compiled.params["model"]["head"][0]), np.array(_tree(0)["model"]["head"][0])
    )


def test_chain_with_schedule_equals_eager_and_does_not_retrace():
    def warmup(step):
        return (
            -1e-2 * mx.minimum((step + 1) / 5.0, 1.0)
            if isinstance(step, mx.array)
            else -1e-2 * min((step + 1) / 5.0, 1.0)
        )

    opt = chain(_adam_moments(b1=0.8), _scale_by_schedule(warmup))
    _, _, step_fn = _run_both(opt, 20, seed=3)
    assert step_fn.graphs_built == 1


def test_period_four_builds_four_graphs_over_12_steps_and_matches_reference():
    opt = _every(4, 0.5)
    params = _tree(7)
    p0 = np.array(params["model"]["layers"][1]["w"])
    state = init(opt, params)
    step_fn = compile_step(opt)
    chunk = []
    expected = p0.copy()
    for t in range(12):
        grads = _tree(50 + t)
        chunk.append(np.array(grads["model"]["layers"][1]["w"]))
        state = step_fn(state, grads)
        if (t + 1) % 4 == 0:
            expected = expected - 0.5 * np.mean(chunk, axis=0)
            chunk = []
        np.testing.assert_allclose(
            np.array(state.params["model"]["layers"][1]["w"]), expected, rtol=1e-6, atol=1e-6
        )
    assert step_fn.graphs_built == 4


def test_structure_change_builds_a_new_graph_and_stays_correct():
    opt = _adam(1e-2)
    step_fn = compile_step(opt)
    a = init(opt, _tree(0))
    a = step_fn(a, _tree(1))
    assert step_fn.graphs_built == 1
    other = _tree(2, shapes=((4, 4), (6,), (3,)))
    b = init(opt, other)
    b_compiled = step_fn(b, _tree(3, shapes=((4, 4), (6,), (3,))))
    b_eager = apply_gradients(opt, b, _tree(3, shapes=((4, 4), (6,), (3,))))
    assert step_fn.graphs_built == 2
    _assert_close(b_compiled.params, b_eager.params)
    # a different container structure too
    c = init(opt, {"x": mx.ones((2,))})
    c = step_fn(c, {"x": mx.ones((2,))})
    assert step_fn.graphs_built == 3
    step_fn(a, _tree(4))  # the first tree reuses its graph
    assert step_fn.graphs_built == 3


def test_non_array_leaf_is_refused_naming_its_path():
    opt = _scale_by_schedule(lambda step: -0.1)
    state = init(opt, {"a": mx.ones((2,)), "n": 3.0})
    with pytest.raises(TypeError, match="'params.n'"):
        compile_step(opt)(state, {"a": mx.ones((2,)), "n": 1.0})


def test_inputs_are_not_mutated():
    opt = _adam(1e-1)
    params = _tree(0)
    state = init(opt, params)
    before = [np.array(x) for x in flatten(state)[0]]
    grads = _tree(1)
    g_before = [np.array(x) for x in flatten(grads)[0]]
    new = compile_step(opt)(state, grads)
    mx.eval(flatten(new)[0])
    for x, y in zip(flatten(state)[0], before):
        np.testing.assert_array_equal(np.array(x), y)
    for x, y in zip(flatten(grads)[0], g_before):
        np.testing.assert_array_equal(np.array(x), y)


# --- with nestedfn's own optimizers ------------------------------------------------------------


def test_nestedfn_adam_and_scheduled_adamw_equal_eager_one_graph():
    from nestedfn.optim.optimizers import adam, adamw
    from nestedfn.optim.schedules import warmup_cosine

    sched = warmup_cosine(init_value=0.0, peak_value=1e-2, warmup_steps=5, decay_steps=20)
    for opt in (adam(1e-2), adamw(sched, weight_decay=0.1)):
        _, _, step_fn = _run_both(opt, 20, seed=11)
        assert step_fn.graphs_built == 1


def test_accumulate_and_nested_adam_build_one_graph_per_phase():
    from nestedfn.optim.combinators import accumulate
    from nestedfn.optim.optimizers import adam
    from nestedfn.tiered import nested_adam

    acc = accumulate(adam(1e-2), 4)
    _, _, step_fn = _run_both(acc, 12, seed=12)
    # the three accumulating steps of each chunk share one graph, the update step has its own
    assert acc.period == 4 and step_fn.graphs_built == 2
    nest = nested_adam(
        1e-2, frequencies=(1, 2), tiers=lambda path, leaf: 0 if "head" in path else 1
    )
    _, _, step_fn = _run_both(nest, 12, seed=13)
    assert nest.period == 2 and step_fn.graphs_built == 2


def test_graphs_are_cached_by_phase_key_and_traced_at_a_concrete_step():
    """``Optimizer.phase_key`` decides the cache: ``_every(4)`` keyed on "is this an update
    step" builds 2 graphs instead of 4, and stays equal to eager (each graph is traced at a
    concrete step of its phase; ``static_step`` sees that step)."""
    base = _every(4, 0.5)
    opt = base._replace(phase_key=lambda step: (step + 1) % 4 == 0)
    assert [opt.phase(s) for s in range(4)] == [False, False, False, True]
    assert base.phase(6) == 2 and base.phase_key is None  # the default: step % period
    _, _, step_fn = _run_both(opt, 12, seed=21)
    assert step_fn.graphs_built == 2
    with pytest.raises(ValueError, match="phase_key"):
        compile_step(base._replace(phase_key=3))


# ---- shapeless=True: one graph over shapes, never over dtypes, every call checked ----------


_SHAPELESS_CASE = st.tuples(
    st.sampled_from([(2,), (3,), (5,), (2, 3), (3, 2)]),  # the parameter's shape
    st.sampled_from(["same", "one", "transposed", "complex", "bfloat16"]),  # the gradient
)


def _shapeless_grad(shape: tuple[int, ...], kind: str, seed: int) -> mx.array:
    g = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    if kind == "one":
        return g.reshape(-1)[:1]  # broadcastable onto the parameter: never silently
    if kind == "transposed":
        return g.T if g.ndim == 2 and shape[0] != shape[1] else g.reshape(-1)[:-1]
    if kind == "complex":
        return g.astype(mx.complex64) * 1j
    return g.astype(mx.bfloat16) if kind == "bfloat16" else g


@settings(max_examples=10, deadline=None)
@given(cases=st.lists(_SHAPELESS_CASE, min_size=2, max_size=6))
def test_shapeless_step_equals_eager_or_refuses_like_it_whatever_came_before(cases):
    """A shapeless graph, traced once for the first shapes, serves every later call: each call
    does what eager ``apply_gradients`` does -- the same parameters, or the same refusal
    (a gradient of another shape: ``TreeMismatchError``; a complex gradient on a real
    parameter: ``TypeError`` naming the path) -- whatever real-gradient calls of the same
    structure came before it."""
    from nestedfn.tree import TreeMismatchError

    opt = _adam(1e-2)
    step_fn = compile_step(opt, shapeless=True)
    for i, (shape, kind) in enumerate(cases):
        state = init(opt, {"w": mx.ones(shape), "b": mx.zeros((2,))})
        grads = {"w": _shapeless_grad(shape, kind, i), "b": mx.ones((2,))}
        try:
            want = apply_gradients(opt, state, grads)
        except (TreeMismatchError, TypeError) as e:
            with pytest.raises(type(e)) as got:
                step_fn(state, grads)
            assert "w" in str(got.value) and str(got.value).startswith("compile_step")
            continue
        _assert_close(step_fn(state, grads).params, want.params)
    dtypes = {mx.bfloat16 if kind == "bfloat16" else mx.float32 for _, kind in cases}
    assert step_fn.graphs_built <= len(dtypes)  # one graph per gradient dtype, not per shape


def test_shapeless_complex_grads_after_a_real_graph_are_refused_naming_the_path():
    opt = _adam(1e-2)
    step_fn = compile_step(opt, shapeless=True)
    state = init(opt, {"layers": [{"w": mx.ones((3,))}]})
    step_fn(state, {"layers": [{"w": mx.ones((3,))}]})
    cplx = {"layers": [{"w": mx.ones((3,), dtype=mx.complex64) * 1j}]}
    with pytest.raises(TypeError, match=r"gradient of layers\.0\.w is .*complex64"):
        step_fn(state, cplx)
    assert step_fn.graphs_built == 1
