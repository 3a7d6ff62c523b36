"""compile_step(packed=True): the same results as eager apply_gradients, on flat buffers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.fast.compile import compile_step
from nestedfn.fast.packed_step import PackedState, first_mismatch
from nestedfn.fast.packing import NotPackableError
from nestedfn.optim.core import Optimizer, apply_gradients, chain, init
from nestedfn.tree import TreeMismatchError, flatten, tree_map
from tests.fast.test_compile import (
    _adam,
    _adam_moments,
    _assert_close,
    _every,
    _scale_by_schedule,
    _tree,
)


@pytest.mark.parametrize("chunk", [1, 8, 1 << 22])
def test_packed_equals_eager_over_20_steps_adam_and_schedule(chunk):
    def decay(step):
        return -2e-2 / (1.0 + 0.1 * step)

    for opt in (_adam(1e-2), chain(_adam_moments(b1=0.8), _scale_by_schedule(decay))):
        params = _tree(4)
        eager = init(opt, params)
        packed = init(opt, params)  # a tree-layout state: packed on the way in
        step_fn = compile_step(opt, packed=True, chunk_size=chunk)
        for t in range(20):
            grads = _tree(300 + t)
            eager = apply_gradients(opt, eager, grads)
            packed = step_fn(packed, grads)
            assert isinstance(packed.opt_state, PackedState)
            assert packed.step == eager.step
            tree_layout = step_fn.unpack_state(packed)
            assert flatten(tree_layout)[1] == flatten(eager)[1]
            _assert_close(tree_layout.params, eager.params)
            _assert_close(tree_layout.opt_state, eager.opt_state)
        assert step_fn.graphs_built == 1


def test_packed_period_four_and_params_from_elsewhere():
    opt = _every(4, 0.5)
    params = _tree(9)
    eager = init(opt, params)
    step_fn = compile_step(opt, packed=True, chunk_size=10)
    packed = step_fn.init(params)
    for t in range(12):
        grads = _tree(70 + t)
        eager = apply_gradients(opt, eager, grads)
        if t == 5:  # params the step did not produce (e.g. edited): packed afresh
            packed = packed._replace(params=tree_map(lambda x: x + 0, packed.params))
        if t == 9:  # a tree-layout state mid-run (e.g. a restored checkpoint)
            packed = step_fn.unpack_state(packed)
        packed = step_fn(packed, grads)
        _assert_close(packed.params, eager.params)
        _assert_close(step_fn.unpack_state(packed).opt_state, eager.opt_state)
    assert step_fn.graphs_built == 4


def test_packed_mixed_dtypes_keep_dtypes():
    rng = np.random.default_rng(0)
    params = {
        "a": mx.array(rng.standard_normal((4, 3)).astype(np.float32)).astype(mx.bfloat16),
        "b": mx.array(rng.standard_normal((5,)).astype(np.float32)),
    }
    opt = _adam(0.125)
    step_fn = compile_step(opt, packed=True)
    state = step_fn(init(opt, params), params)
    assert state.params["a"].dtype == mx.bfloat16 and state.params["b"].dtype == mx.float32
    expected = apply_gradients(opt, init(opt, params), params)
    _assert_close(state.params, expected.params)
    _assert_close(step_fn.unpack_state(state).opt_state, expected.opt_state)


def test_packed_refuses_what_it_cannot_do():
    def per_leaf_normalise():  # divides each leaf by its own norm: not elementwise
        def update_fn(grads, state, params, step):
            return tree_map(lambda g: -g / mx.sqrt(mx.sum(g * g)), grads), state

        return Optimizer(lambda p: (), update_fn)

    opt = per_leaf_normalise()
    shared = ((3, 4), (5, 4), (2, 2))  # the two layers share a buffer (trailing shape (4,))
    with pytest.raises(NotPackableError, match="not elementwise"):
        compile_step(opt, packed=True)(init(opt, _tree(0, shared)), _tree(1, shared))
    adam = _adam(1e-2)
    step_fn = compile_step(adam, packed=True)
    with pytest.raises(TreeMismatchError, match="grads shaped unlike params"):
        step_fn(init(adam, _tree(0)), {"x": mx.ones(2)})
    for bad in (None, {"w": mx.ones((3, 4))}, [mx.ones((3, 4))], 1.0):  # a node or number
        grads = _tree(1)
        grads["model"]["layers"][0]["w"] = bad
        with pytest.raises(TreeMismatchError, match="grads shaped unlike params"):
            step_fn(step_fn.init(_tree(0)), grads)
    other = _tree(0, shapes=((2, 2), (3,), (1,)))
    with pytest.raises(TreeMismatchError, match="does not fit"):  # a state for other params
        step_fn(step_fn.init(_tree(0))._replace(params=other), other)


def test_packed_threads_agree_with_eager_for_a_global_norm_clip():
    """Each thread's graph recomputes shared reductions, so a global-norm clip (not
    elementwise per buffer) still gives eager's numbers with 1 or 3 threads."""
    from nestedfn.optim.optimizers import adam
    from nestedfn.optim.transforms import clip_by_global_norm

    opt = chain(clip_by_global_norm(0.05), adam(1e-2))
    for threads in (1, 3):
        eager = init(opt, _tree(21))
        step_fn = compile_step(opt, packed=True, chunk_size=4, threads=threads)
        packed = step_fn.init(_tree(21))
        for t in range(8):
            grads = _tree(500 + t)  # norms >> 0.05: the clip is active every step
            eager = apply_gradients(opt, eager, grads)
            packed = step_fn(packed, grads)
            _assert_close(packed.params, eager.params)
            _assert_close(step_fn.unpack_state(packed).opt_state, eager.opt_state)


def _layers_tree(seed: int, n: int = 6, dtype=mx.float32) -> dict:
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return {
        "embed": normal(5, 4),
        "layers": [{"a": normal(4, 3), "b": normal(3, 4), "n": normal(4)} for _ in range(n)],
        "head": {"bias": normal(2)},
    }


@pytest.mark.parametrize("threads", [1, 3])
def test_packed_nested_equals_eager_tier_by_tier(threads):
    """Nested optimizers pack tier by tier (one tier per buffer): every step of two periods
    equals eager apply_gradients, params and the whole tree-layout state, and graphs are
    built once per set of active tiers."""
    from nestedfn.optim.optimizers import adam, sgd
    from nestedfn.tiered import nested, nested_adam, tier_stats

    def by_layer(path, leaf):
        if not path.startswith("layers."):
            return 0
        return min(int(path.split(".")[1]) // 2, 2)

    cases = [
        nested_adam(1e-2, (1, 2, 4)),  # tiers by depth, resolved at init
        nested_adam(lambda step: 1e-2 / (1 + step), (1, 2, 4), tiers=by_layer),  # schedule
        nested(sgd(0.1), by_layer, (1, 3, 4), reduce="sum"),
        nested([adam(1e-2), sgd(0.1), adam(3e-3)], by_layer, (1, 2, 4)),
    ]
    for opt in cases:
        params = _layers_tree(0)
        eager = init(opt, params)
        step_fn = compile_step(opt, packed=True, chunk_size=20, threads=threads)
        packed = step_fn.init(params)
        for t in range(8 if opt.period <= 4 else 24):
            grads = _layers_tree(100 + t)
            eager = apply_gradients(opt, eager, grads)
            packed = step_fn(packed, grads)
            _assert_close(packed.params, eager.params)
            _assert_close(step_fn.unpack_state(packed).opt_state, eager.opt_state)
        # a buffer never mixes tiers, and the tier table reads the same through the pack
        assert tier_stats(packed.opt_state) == tier_stats(eager.opt_state)
        n_active_sets = len({tuple((s + 1) % f == 0 for f in (1, 2, 4)) for s in range(4)})
        if opt.period == 4:
            assert step_fn.graphs_built == n_active_sets == 3


def test_packed_nested_keeps_low_precision_params_and_float32_chunk_sums():
    from nestedfn.tiered import nested_adam

    opt = nested_adam(1e-2, (1, 2, 4), state_dtype=mx.float32)
    params = _layers_tree(1, dtype=mx.bfloat16)
    eager, step_fn = init(opt, params), compile_step(opt, packed=True)
    packed = step_fn.init(params)
    for t in range(8):
        grads = _layers_tree(200 + t, dtype=mx.bfloat16)
        eager, packed = apply_gradients(opt, eager, grads), step_fn(packed, grads)
    for a, b in zip(flatten(packed.params)[0], flatten(eager.params)[0]):
        assert a.dtype == b.dtype == mx.bfloat16
    _assert_close(packed.params, eager.params, rtol=2e-2, atol=1e-2)
    state = step_fn.unpack_state(packed).opt_state
    assert {x.dtype for x in flatten(state.inner)[0] if x.ndim} == {mx.float32}
    assert {x.dtype for x in flatten(state.acc)[0]} == {mx.float32}


def test_packed_refuses_a_nested_optimizer_it_cannot_split_by_tier():
    from nestedfn.optim.combinators import accumulate
    from nestedfn.tiered import nested_adam

    # accumulate around nested hides the tiers from the packed step: refused, not mixed
    opt = accumulate(nested_adam(1e-2, (1, 2), tiers=lambda p, x: 0 if "head" in p else 1), 2)
    with pytest.raises(NotPackableError, match="compile_step\\(opt\\)"):
        compile_step(opt, packed=True)(init(opt, _tree(0)), _tree(1))


def test_params_changed_in_place_between_steps_are_seen():
    """MLX arrays can be assigned into (``x[i] = v`` keeps the object): a step must read the
    params it is given, not the buffers behind the views it returned last time."""
    from nestedfn.optim.optimizers import sgd

    opt = sgd(1.0)
    params = {"a": mx.zeros((3,)), "b": mx.zeros((2, 2))}
    grads = {"a": mx.ones((3,)), "b": mx.ones((2, 2))}
    step_fn = compile_step(opt, packed=True)
    packed, eager = step_fn.init(params), init(opt, params)
    for t in range(3):
        packed, eager = step_fn(packed, grads), apply_gradients(opt, eager, grads)
        packed.params["a"][0] = 100.0 + t  # in place, on the returned view
        eager.params["a"][0] = 100.0 + t
        packed.params["b"][1] = mx.array([7.0, 8.0])
        eager.params["b"][1] = mx.array([7.0, 8.0])
    packed, eager = step_fn(packed, grads), apply_gradients(opt, eager, grads)
    _assert_close(packed.params, eager.params)
    np.testing.assert_array_equal(np.array(packed.params["a"]), [101.0, -4.0, -4.0])


def test_grads_that_are_not_mlx_arrays_are_refused_at_their_path():
    step_fn = compile_step(_adam(1e-2), packed=True)
    state = step_fn.init(_tree(0))
    grads = _tree(1)
    grads["model"]["head"] = (np.ones((2, 2), dtype=np.float32),)  # right shape, numpy
    with pytest.raises(TreeMismatchError, match="model.head.0"):
        step_fn(state, grads)


def test_grads_mixing_dtypes_in_one_buffer_name_both_leaves():
    step_fn = compile_step(_adam(1e-2), packed=True)
    params = {"a": mx.ones((3,)), "s": mx.ones((2,))}  # one buffer (trailing shape ())
    grads = {"a": mx.ones((3,)), "s": mx.ones((2,), dtype=mx.float16)}
    with pytest.raises(NotPackableError, match="'s' is mlx.core.float16.*'a', which is"):
        step_fn(step_fn.init(params), grads)


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_with_bfloat16_grads_on_float32_params_equals_eager(threads):
    """Gradients of another dtype than the params (here bfloat16 on float32) take their own
    graph and are gathered with a dtype check; every step equals eager within bfloat16's
    rounding, for Adam and for nested Adam, and the first-step check allows that rounding
    (it used to compare at float32 tolerance and refuse nested Adam for some seeds)."""
    from nestedfn.optim.optimizers import adam
    from nestedfn.tiered import nested_adam

    def tree(rng, dtype):
        def normal(*shape):
            return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

        return {
            "layers": [{"a": normal(8, 4), "b": normal(4, 8), "n": normal(8)} for _ in range(6)]
        }

    for seed in (1, 10, 12):
        for opt in (nested_adam(1e-2, frequencies=(1, 2, 3)), adam(1e-2)):
            rng = np.random.default_rng(seed)
            params = tree(rng, mx.float32)
            eager = init(opt, params)
            step_fn = compile_step(opt, packed=True, chunk_size=64, threads=threads)
            packed = step_fn.init(params)
            for _ in range(7):
                grads = tree(rng, mx.bfloat16)
                eager = apply_gradients(opt, eager, grads)
                packed = step_fn(packed, grads)
                for got, want in zip(flatten(packed.params)[0], flatten(eager.params)[0]):
                    assert got.dtype == want.dtype == mx.float32
                    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-2, atol=1e-3)


def _mask_trees(rng):
    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    params = {"w": normal(4, 3), "bias": normal(3), "norm": normal(5), "v": normal(2, 2)}
    return params, {k: normal(*v.shape) for k, v in params.items()}


@pytest.mark.parametrize("maker", ["adamw", "lion", "adamw_fn"])
def test_packed_masked_weight_decay_equals_eager(maker):
    """A mask tree (or function) of weight decay splits the buffers into decayed and
    undecayed ones: the packed step equals the eager one (it used to fail with list vs
    dict)."""
    from nestedfn.optim.optimizers import adamw, lion

    mask = {"w": True, "bias": False, "norm": False, "v": True}
    opt = {
        "adamw": lambda: adamw(1e-2, weight_decay=0.5, mask=mask),
        "lion": lambda: lion(1e-2, weight_decay=0.5, mask=mask),
        "adamw_fn": lambda: adamw(1e-2, weight_decay=0.5, mask=lambda p: {k: k in "wv" for k in p}),
    }[maker]()
    rng = np.random.default_rng(0)
    params, _ = _mask_trees(rng)
    eager = init(opt, params)
    step_fn = compile_step(opt, packed=True, threads=1)
    packed = step_fn.init(params)
    for _ in range(3):
        _, grads = _mask_trees(rng)
        eager, packed = apply_gradients(opt, eager, grads), step_fn(packed, grads)
    for k in params:
        np.testing.assert_allclose(
            np.array(packed.params[k]), np.array(eager.params[k]), 1e-5, 1e-6
        )


def test_packed_mask_inside_tiers_is_refused_naming_the_cause():
    from nestedfn.optim.optimizers import adamw
    from nestedfn.tiered import nested

    params, grads = _mask_trees(np.random.default_rng(1))
    mask = {"w": True, "bias": False, "norm": False, "v": True}
    tiers = {"w": 0, "bias": 0, "norm": 1, "v": 1}
    opt = nested(adamw(1e-2, weight_decay=0.5, mask=mask), tiers, frequencies=(1, 2))
    with pytest.raises(NotPackableError, match="mask"):
        compile_step(opt, packed=True)(init(opt, params), grads)


def test_packed_int_gradients_are_refused_naming_the_dtype():
    from nestedfn.optim.optimizers import adam

    params = {"a": mx.zeros((2,)), "b": mx.zeros((3,))}
    grads = {"a": mx.ones((2,), dtype=mx.int32), "b": mx.ones((3,), dtype=mx.int32)}
    with pytest.raises(NotPackableError, match="'a' has dtype int32"):
        compile_step(adam(1e-2), packed=True)(init(adam(1e-2), params), grads)


def test_first_mismatch_judges_bfloat16_against_the_float32_step():
    """With the float32 step given, a bfloat16 leaf passes when it is about as accurate as
    the eager one, even where the two differ elementwise far beyond bfloat16 rounding of a
    small entry (what two GPU graphs do); a gross error is still found, naming the leaf."""
    rng = np.random.default_rng(0)
    exact = rng.standard_normal(64).astype(np.float32) * 4
    exact[3] = 0.01  # a small entry: elementwise tolerances fail there first
    eager = exact * (1 + 4e-3 * rng.standard_normal(64).astype(np.float32))
    other = exact * (1 + 4e-3 * rng.standard_normal(64).astype(np.float32))
    eager[3], other[3] = 0.0, 0.02  # 0.02 apart on an entry of 0.01

    def tree(x):
        return {"w": mx.array(x).astype(mx.bfloat16)}

    x = {"w": mx.array(exact)}
    assert first_mismatch(tree(eager), tree(other), True) == "w"  # elementwise: refused
    assert first_mismatch(tree(eager), tree(other), True, x) is None
    assert first_mismatch(tree(eager), tree(exact * 1.5), True, x) == "w"
    assert first_mismatch(tree(eager), tree(np.full(64, np.nan)), True, x) == "w"
