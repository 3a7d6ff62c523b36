"""nestedfn.fast.native: compile_step's native step equals eager apply_gradients bit for bit,
keeps the tree-layout state, and falls back to the MLX graph wherever it cannot serve."""

from __future__ import annotations

import inspect
import warnings

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nestedfn as nf
import nestedfn.fast.native as native
from nestedfn.fast.compile import compile_step
from nestedfn.optim.core import apply_gradients, init
from nestedfn.optim.fused import describe
from nestedfn.optim.optimizers import adam, adamw, lion, momentum
from nestedfn.optim.schedules import warmup_cosine
from nestedfn.testing import strategies as nfs
from nestedfn.tiered.cms import nested, nested_adam, tier_stats
from nestedfn.tree import TreeMismatchError, flatten, tree_map

pytestmark = pytest.mark.skipif(
    native.native_module() is None, reason="nestedfn.fast._native is not built"
)


def _tree(seed: int, dtype=mx.float32) -> dict:
    rng = np.random.default_rng(seed)

    def a(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return {
        "model": {
            "layers": [
                {"lora_a": a(6, 2), "lora_b": a(2, 6)},
                {},
                {"lora_a": a(6, 2), "lora_b": a(2, 6), "bias": a(6)},
                {"lora_a": a(70000)},  # more than one 2^16-element work item
            ],
            "head": (a(3, 3),),
        }
    }


def _grads_like(params, seed: int, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    return tree_map(
        lambda p: mx.array(scale * rng.standard_normal(p.shape).astype(np.float32)).astype(p.dtype),
        params,
    )


def _assert_identical(a, b):
    la, ta = flatten(a)
    lb, tb = flatten(b)
    assert ta == tb
    for path, x, y in zip(ta.paths(), la, lb):
        if not isinstance(x, mx.array):
            assert x == y, path
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert mx.array_equal(x, y, equal_nan=True).item(), f"{path} differs"


def _run(opt, params, steps: int, seed: int = 100, keep_old: bool = False):
    """``steps`` native steps and eager steps side by side, compared bit for bit."""
    eager = init(opt, params)
    state = init(opt, params)
    step_fn = compile_step(opt)
    for t in range(steps):
        grads = _grads_like(params, seed + t)
        eager = apply_gradients(opt, eager, grads)
        old = state
        state = step_fn(state, grads)
        if not keep_old:
            del old  # donated buffers: the kernel writes in place
        mx.eval(state.params, state.opt_state)
        assert state.step == eager.step == t + 1
        _assert_identical(state, eager)
    return state, eager, step_fn


OPTIMIZERS = {
    "adam": lambda: adam(1e-2),
    "adam_no_bias_correction": lambda: adam(1e-2, bias_correction=False),
    "adam_schedule": lambda: adam(warmup_cosine(1e-2, warmup_steps=3, decay_steps=20)),
    "adamw": lambda: adamw(1e-2, weight_decay=0.1),
    "adamw_zero_decay": lambda: adamw(1e-2, weight_decay=0.0),
    "lion": lambda: lion(1e-3),
    "lion_wd": lambda: lion(1e-3, weight_decay=0.5),
    "momentum": lambda: momentum(1e-2, 0.9),
    "nesterov": lambda: momentum(1e-2, 0.8, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_native_equals_eager_bit_for_bit(name, dtype):
    opt = OPTIMIZERS[name]()
    assert describe(opt) is not None
    _, _, step_fn = _run(opt, _tree(1, dtype), 7)
    assert step_fn.native_steps == 1  # it served every step (one structure, one phase)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_float32_moments_for_low_precision_params(dtype):
    _, _, step_fn = _run(adamw(1e-2, state_dtype=mx.float32), _tree(2, dtype), 5)
    assert step_fn.native_steps == 1


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda: nested_adam(1e-2, frequencies=(1, 2, 4)),
        lambda: nested_adam(
            warmup_cosine(1e-2, warmup_steps=3, decay_steps=20), frequencies=(1, 2, 4)
        ),
        lambda: nested_adam(1e-2, frequencies=(1, 3), weight_decay=0.1, reduce="sum"),
        lambda: nested(
            [lion(1e-3), momentum(1e-2)], lambda path, leaf: 0 if "head" in path else 1, (1, 2)
        ),
    ],
)
def test_nested_native_equals_eager_tier_by_tier(make, dtype):
    opt = make()
    if dtype != mx.float32 and describe(opt).post is not None:
        pytest.skip("a scheduled nested_adam on bfloat16 params takes the MLX graph (tested below)")
    state, eager, step_fn = _run(opt, _tree(3, dtype), 12)
    assert step_fn.native_steps == step_fn.graphs_built > 0
    assert tier_stats(state.opt_state) == tier_stats(eager.opt_state)


def test_nested_adam_one_native_plan_per_active_tier_set():
    _, _, step_fn = _run(nested_adam(1e-2, frequencies=(1, 2, 4)), _tree(4), 8)
    assert step_fn.graphs_built == step_fn.native_steps == 3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=nfs.param_trees(max_layers=3, dtypes=(mx.float32, mx.bfloat16)),
    which=st.sampled_from(["adam", "adamw", "lion_wd", "nesterov"]),
    seed=st.integers(0, 2**16),
)
def test_random_trees_native_equals_eager(params, which, seed):
    _run(OPTIMIZERS[which](), params, 3, seed=seed)


def test_inputs_are_not_mutated_when_the_caller_keeps_them():
    """The old state is still referred to: the kernel must write fresh buffers."""
    opt = adam(1e-1)
    params = _tree(5)
    state = init(opt, params)
    before = [np.array(x) for x in flatten(state)[0]]
    grads = _grads_like(params, 6)
    g_before = [np.array(x) for x in flatten(grads)[0]]
    step_fn = compile_step(opt)
    new = step_fn(state, grads)
    new = step_fn(new, grads)  # the intermediate state is dropped: donated
    mx.eval(new.params, new.opt_state)
    for x, y in zip(flatten(state)[0], before):
        np.testing.assert_array_equal(np.array(x), y)
    for x, y in zip(flatten(grads)[0], g_before):
        np.testing.assert_array_equal(np.array(x), y)
    _run(opt, params, 4, keep_old=True)


def test_strided_and_broadcast_inputs():
    opt = adam(1e-2)
    params = {"w": mx.random.normal((5, 7)), "b": mx.random.normal((7,))}
    grads = {"w": mx.random.normal((7, 5)).T, "b": mx.broadcast_to(mx.array(0.3), (7,))}
    expected = apply_gradients(opt, init(opt, params), grads)
    got = compile_step(opt)(init(opt, params), grads)
    _assert_identical(got, expected)


def test_lazy_gradients_are_evaluated_first():
    opt = momentum(1e-2)
    params = _tree(7)
    grads = tree_map(lambda p: mx.sin(p) * 0.1, params)  # not evaluated yet
    expected = apply_gradients(opt, init(opt, params), grads)
    _assert_identical(compile_step(opt)(init(opt, params), grads), expected)


def test_unsupported_calls_take_the_mlx_graph():
    # bfloat16 grads on float32 params: eager promotes; the kernel does not, so the graph runs
    opt = adam(1e-2)
    params = _tree(8)
    grads = tree_map(lambda g: g.astype(mx.bfloat16), _grads_like(params, 9))
    step_fn = compile_step(opt)
    got = step_fn(init(opt, params), grads)
    expected = apply_gradients(opt, init(opt, params), grads)
    assert step_fn.native_steps == 0 and step_fn.graphs_built == 1
    for x, y in zip(flatten(got)[0], flatten(expected)[0]):
        if isinstance(x, mx.array):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-6)
    # a masked AdamW has no native spec at all
    masked = adamw(1e-2, mask=tree_map(lambda p: p.ndim > 1, params))
    assert describe(masked) is None


def test_grads_shaped_unlike_params_fail_loud_naming_the_path():
    opt = adam(1e-2)
    params = _tree(10)
    grads = _grads_like(params, 11)
    grads["model"]["head"] = (mx.zeros((4, 3)),)
    with pytest.raises((TreeMismatchError, ValueError), match="head"):
        compile_step(opt)(init(opt, params), grads)
    del grads["model"]["layers"][0]["lora_b"]
    with pytest.raises(TreeMismatchError, match="lora_b"):
        compile_step(opt)(init(opt, params), grads)


def test_fallback_when_turned_off(monkeypatch):
    monkeypatch.setenv("NESTEDFN_NATIVE", "0")
    opt = nested_adam(1e-2, frequencies=(1, 2))
    params = _tree(12)
    eager = init(opt, params)
    state = init(opt, params)
    step_fn = compile_step(opt)
    for t in range(6):
        grads = _grads_like(params, 50 + t)
        eager = apply_gradients(opt, eager, grads)
        state = step_fn(state, grads)
    assert step_fn.native_steps == 0 and step_fn.graphs_built == 2
    for x, y in zip(flatten(state)[0], flatten(eager)[0]):
        if isinstance(x, mx.array):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-6)


def test_a_module_built_for_another_mlx_is_not_used(monkeypatch):
    class Stale:
        MLX_VERSION = "0.0.1"

    monkeypatch.setattr(native, "_MODULE", [])
    monkeypatch.setattr(native, "_WARNED", set())
    import nestedfn.fast as fast_pkg

    monkeypatch.setattr(fast_pkg, "_native", Stale, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "nestedfn.fast._native", Stale)
    with pytest.warns(RuntimeWarning, match="built against MLX 0.0.1"):
        assert native.native_module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.native_module() is None  # warned once
    opt = adam(1e-2)
    step_fn = compile_step(opt)
    step_fn(init(opt, _tree(13)), _grads_like(_tree(13), 14))
    assert step_fn.native_steps == 0


def test_state_is_the_tree_layout_for_checkpoints():
    opt = nested_adam(1e-2, frequencies=(1, 2, 4))
    params = _tree(15)
    state = compile_step(opt)(init(opt, params), _grads_like(params, 16))
    assert flatten(state.opt_state)[1] == flatten(init(opt, params).opt_state)[1]
    assert isinstance(nf.tier_stats(state.opt_state), list)


@pytest.mark.parametrize("name", ["adamw", "lion_wd", "nesterov"])
@pytest.mark.parametrize("lazy", [False, True])
def test_both_modes_equal_eager(monkeypatch, name, lazy):
    """The kernel computed in the call (trees of tiny leaves) and the lazy default (evaluated
    later, writing into the buffers of a state nothing refers to any more, and only then)."""
    monkeypatch.setattr(native, "_LAZY", lazy)
    _run(OPTIMIZERS[name](), _tree(17), 5)
    _run(OPTIMIZERS[name](), _tree(18, mx.bfloat16), 3, keep_old=True)
    _run(nested_adam(1e-2, frequencies=(1, 2)), _tree(19), 4)


def test_inside_mx_compile_the_mlx_graph_serves():
    opt = adam(1e-2)
    params = _tree(20)
    grads = _grads_like(params, 21)
    step_fn = compile_step(opt)

    @mx.compile
    def outer(p, g):
        return step_fn(init(opt, p), g).params

    got = outer(params, grads)
    expected = apply_gradients(opt, init(opt, params), grads).params
    for x, y in zip(flatten(got)[0], flatten(expected)[0]):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-6)


# -- the lazy kernel's graph: one FusedUpdate token, groups of new leaves taken from it --------


def _address(x: mx.array) -> int:
    return np.asarray(x).__array_interface__["data"][0]


def _lazy_leaves(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(size).astype(np.float32)) for _ in range(n)]


def _adam(mod):
    """The kernel's scalars for Adam, lr 1e-3, no bias correction."""
    h = mod.Hyper()
    h.algo, h.b1, h.b2, h.eps, h.neg_lr = mod.Algo.ADAM, 0.9, 0.999, 1e-8, -1e-3
    return h


def _adam_reference(p, g, m, v):
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * (g * g)
    return p + (-1e-3) * (m1 / (mx.sqrt(v1) + 1e-8)), m1, v1


def _adam_case(n: int, size: int, seed: int):
    """Evaluated leaves p, g, m, v (v >= 0) and the evaluated reference step of each."""
    p, g = _lazy_leaves(n, size, seed), _lazy_leaves(n, size, seed + 1)
    m, v = _lazy_leaves(n, size, seed + 2), [mx.abs(x) for x in _lazy_leaves(n, size, seed + 3)]
    mx.eval(p, g, m, v)
    expected = [_adam_reference(*a) for a in zip(p, g, m, v)]
    mx.eval(expected)
    return p, g, m, v, expected


@pytest.mark.parametrize("n", [1, 5, 300])
def test_a_dropped_state_is_updated_in_its_own_buffers(n):
    """Nothing else refers to the old leaves: every new leaf (params and both moments) is
    written into the old leaf's buffer (no second copy of the state), for trees of one leaf up
    to several hundred (several TakeOutputs groups)."""
    mod = native.native_module()
    p, g, m, v, expected = _adam_case(n, 33, 1)
    before = [_address(x) for x in p + m + v]
    out = mod.fused_update(p, g, [m, v], [], _adam(mod))
    del p, m, v
    mx.eval(out)
    assert [_address(x) for x in out] == before
    for i, (ep, em, ev) in enumerate(expected):
        for got, want in ((out[i], ep), (out[n + i], em), (out[2 * n + i], ev)):
            assert mx.array_equal(got, want).item()


def test_a_kept_state_is_left_as_it_was():
    mod = native.native_module()
    p, g, m, v = (_lazy_leaves(40, 9, s) for s in (5, 6, 7, 8))
    v = [mx.abs(x) for x in v]
    mx.eval(p, g, m, v)
    copies = [np.array(x) for x in p + g + m + v]
    addresses = {_address(x) for x in p + g + m + v}
    out = mod.fused_update(p, g, [m, v], [], _adam(mod))
    mx.eval(out)
    assert not addresses & {_address(x) for x in out}
    for x, c in zip(p + g + m + v, copies):
        np.testing.assert_array_equal(np.array(x), c)


def test_leaves_evaluated_in_parts_and_out_of_order():
    """Evaluating some new leaves runs the kernel once; the others, evaluated later (or in
    reverse order), hold the same values."""
    mod = native.native_module()
    p, g, m, v = (_lazy_leaves(200, 5, s) for s in (9, 10, 11, 12))
    v = [mx.abs(x) for x in v]
    mx.eval(p, g, m, v)
    expected = [_adam_reference(*a) for a in zip(p, g, m, v)]
    out = mod.fused_update(p, g, [m, v], [], _adam(mod))
    mx.eval(out[:3])
    mx.eval(out[-1])
    for k in reversed(range(len(out))):
        want = expected[k % 200][k // 200]
        assert mx.array_equal(out[k], want).item(), k


@pytest.mark.parametrize("size", [8, 40000])
def test_lazy_operands_and_chained_steps(size):
    """Gradients not evaluated yet (graph inputs) and two steps built before any evaluation
    (the second step's operands are the first's new leaves).  At 70 x 40000 elements the kernel
    runs on two threads, and its task starts after the gradients' tasks, often once MLX's main
    thread is done (the kernel then takes a pool worker instead of main)."""
    mod = native.native_module()
    p, g, m, v = (_lazy_leaves(70, size, s) for s in (13, 14, 15, 16))
    v = [mx.abs(x) for x in v]
    mx.eval(p, g, m, v)
    lazy_g = [x * 0.5 for x in g]
    ref1 = [_adam_reference(*a) for a in zip(p, lazy_g, m, v)]
    ref2 = [_adam_reference(a[0], gg, a[1], a[2]) for a, gg in zip(ref1, lazy_g)]
    out1 = mod.fused_update(p, lazy_g, [m, v], [], _adam(mod))
    out2 = mod.fused_update(out1[:70], lazy_g, [out1[70:140], out1[140:]], [], _adam(mod))
    del out1, p, m, v
    mx.eval(out2)
    for k, x in enumerate(out2):
        assert mx.array_equal(x, ref2[k % 70][k // 70]).item(), k


def test_a_step_dropped_unevaluated_and_steps_in_a_loop():
    """A step whose new leaves are never evaluated is harmless, and a loop of steps, each
    evaluated right after the caller drops the old state, gives the eager result bit for bit."""
    mod = native.native_module()
    p, g, m, v = (_lazy_leaves(8, 1000, s) for s in (49, 50, 51, 52))
    v = [mx.abs(x) for x in v]
    mx.eval(p, g, m, v)
    dropped = mod.fused_update([x + 0 for x in p], g, [m, v], [], _adam(mod))
    del dropped
    ref = [list(a) for a in zip(p, m, v)]
    for _ in range(30):
        ref = [list(_adam_reference(rp, gg, rm, rv)) for (rp, rm, rv), gg in zip(ref, g)]
        mx.eval(ref)
    for _ in range(30):
        out = mod.fused_update(p, g, [m, v], [], _adam(mod))
        p, m, v = out[:8], out[8:16], out[16:]
        del out
        mx.eval(p, m, v)
    for i in range(8):
        for got, want in zip((p[i], m[i], v[i]), ref[i]):
            assert mx.array_equal(got, want).item()


def test_async_eval_of_the_new_state():
    opt = adam(1e-2)
    params = _tree(30)
    grads = _grads_like(params, 31)
    expected = apply_gradients(opt, init(opt, params), grads)
    got = compile_step(opt)(init(opt, params), grads)
    mx.async_eval(got.params, got.opt_state)
    _assert_identical(got, expected)


def test_the_kernel_scalars_are_one_typed_struct():
    """``_native.Hyper`` refuses a value of the wrong type (no positional argument lists), and
    its algorithms are the names ``nestedfn.optim.fused`` uses."""
    mod = native.native_module()
    h = mod.Hyper()
    with pytest.raises(TypeError):
        h.b1 = "0.9"
    with pytest.raises(TypeError):
        h.algo = 7
    for opt in (adam(1e-2), lion(1e-3), momentum(1e-2)):
        assert isinstance(getattr(mod.Algo, describe(opt).algo), mod.Algo)


def test_the_optimizer_carries_its_spec_and_learning_rate():
    sched = warmup_cosine(1e-2, warmup_steps=3, decay_steps=20)
    for opt, lr in ((adam(1e-2), 1e-2), (adamw(sched), sched)):
        # a schedule is carried behind the construction-time check that wraps it
        assert describe(opt) is opt.fused and inspect.unwrap(describe(opt).learning_rate) is lr
        assert inspect.unwrap(nf.learning_rate_of(opt)) is lr
    assert describe(opt._replace(fused=None)) is None
