"""Each optimizer against a few-line numpy reference over many steps on random trees with
``layers`` lists; Adam also against ``mlx.optimizers.Adam``."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nestedfn as nf
from nestedfn.fast.compile import compile_step
from nestedfn.optim import optimizers as opt
from nestedfn.optim import transforms as t
from nestedfn.testing import strategies as nfs
from nestedfn.tree import flatten, unflatten

STEPS = 60


def _tree(rng: np.random.Generator) -> dict:
    """A random MLX-style parameter tree: an embedding, a ``layers`` list of 2-4 blocks, a
    head bias; the sizes are drawn from ``rng``, so every seed is another tree."""

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    d, n = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    return {
        "embed": normal(int(rng.integers(3, 8)), d),
        "layers": [
            {"attn": {"q": normal(d, int(rng.integers(2, 6)))}, "norm": normal(d)} for _ in range(n)
        ],
        "head": {"bias": normal(int(rng.integers(1, 4)))},
    }


def _like(params: dict, rng: np.random.Generator) -> dict:
    """Standard-normal arrays shaped like ``params`` (gradients for it)."""
    return nf.tree_map(lambda x: mx.array(rng.standard_normal(x.shape).astype(np.float32)), params)


def _to_mx(tree_np: dict) -> dict:
    lv, td = flatten(tree_np)
    return unflatten(td, [mx.array(x) for x in lv])


def _run(optimizer: nf.Optimizer, reference, seed: int = 0, steps: int = STEPS, atol=2e-6):
    """Run ``optimizer`` and ``reference(p, g, state, step) -> (p, state)`` (numpy, leaf by
    leaf) side by side on the same gradients; compare params after every step.  Done on two
    random trees (``seed`` and ``seed + 100``)."""
    for s in (seed, seed + 100):
        state = _run_one(optimizer, reference, s, steps, atol)
    return state


def _run_one(optimizer: nf.Optimizer, reference, seed: int, steps: int, atol: float):
    rng = np.random.default_rng(seed)
    p_np, td = flatten(_tree(rng))
    p_np = [x.copy() for x in p_np]
    ref_states = [None] * len(p_np)
    state = nf.init(optimizer, unflatten(td, [mx.array(x) for x in p_np]))
    for k in range(steps):
        g_np = [rng.standard_normal(x.shape).astype(np.float32) for x in p_np]
        state = nf.apply_gradients(optimizer, state, unflatten(td, [mx.array(g) for g in g_np]))
        for i, g in enumerate(g_np):
            p_np[i], ref_states[i] = reference(p_np[i], g, ref_states[i], k)
        got, got_td = flatten(state.params)
        assert got_td == td
        for x, y in zip(got, p_np):
            assert x.dtype == mx.float32
            np.testing.assert_allclose(np.array(x), y, rtol=2e-5, atol=atol, err_msg=f"step {k}")
    assert state.step == steps
    return state


def test_sgd_matches_numpy():
    lr = 0.05
    _run(opt.sgd(lr), lambda p, g, s, k: (p - np.float32(lr) * g, None))


def test_sgd_with_schedule_reads_step():
    sched = lambda step: 0.1 / (1.0 + step)  # noqa: E731
    _run(opt.sgd(sched), lambda p, g, s, k: (p - np.float32(0.1 / (1.0 + k)) * g, None))


def _np_adam(lr, b1, b2, eps, bias_correction=True, wd=0.0):
    def ref(p, g, s, k):
        m, v = s if s is not None else (np.zeros_like(p), np.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        t = k + 1
        if bias_correction:
            u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        else:
            u = m / (np.sqrt(v) + eps)
        return (p - lr(k) * (u + wd * p)).astype(np.float32), (m, v)

    return ref


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adam_matches_numpy(bias_correction):
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-8
    _run(
        opt.adam(lr, b1=b1, b2=b2, eps=eps, bias_correction=bias_correction),
        _np_adam(lambda k: lr, b1, b2, eps, bias_correction),
        seed=1,
    )


def test_adam_with_schedule_matches_numpy():
    sched = lambda step: 0.02 * 0.97**step  # noqa: E731
    _run(opt.adam(sched), _np_adam(sched, 0.9, 0.999, 1e-8), seed=2)


def test_adam_matches_mlx_optimizers_adam():
    rng = np.random.default_rng(3)
    params = _to_mx(_tree(rng))
    ours = opt.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8)
    state = nf.init(ours, params)
    theirs = mlx.optimizers.Adam(
        learning_rate=1e-2, betas=[0.9, 0.999], eps=1e-8, bias_correction=True
    )
    their_params = params
    for _ in range(STEPS):
        grads = _like(params, rng)
        state = nf.apply_gradients(ours, state, grads)
        their_params = theirs.apply_gradients(grads, their_params)
        for a, b in zip(flatten(state.params)[0], flatten(their_params)[0]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_numpy(nesterov):
    lr, d = 0.03, 0.8

    def ref(p, g, m, k):
        m = g + d * (m if m is not None else 0.0)
        u = g + d * m if nesterov else m
        return (p - lr * u).astype(np.float32), m

    _run(opt.momentum(lr, decay=d, nesterov=nesterov), ref, seed=4)


def test_adamw_matches_numpy():
    lr, wd = 0.01, 0.1
    _run(
        opt.adamw(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd),
        _np_adam(lambda k: lr, 0.9, 0.99, 1e-8, wd=wd),
        seed=5,
    )


def test_adamw_mask_decays_only_masked_leaves():
    lr, wd = 0.01, 0.5
    decay_2d = lambda params: nf.tree_map(lambda x: x.ndim == 2, params)  # noqa: E731
    full = _np_adam(lambda k: lr, 0.9, 0.999, 1e-8, wd=wd)
    plain = _np_adam(lambda k: lr, 0.9, 0.999, 1e-8, wd=0.0)

    def ref(p, g, s, k):
        return (full if p.ndim == 2 else plain)(p, g, s, k)

    _run(opt.adamw(lr, weight_decay=wd, mask=decay_2d), ref, seed=6)


@pytest.mark.parametrize("wd", [0.0, 0.2])
def test_lion_matches_numpy(wd):
    lr, b1, b2 = 3e-3, 0.9, 0.99

    def ref(p, g, m, k):
        m = np.zeros_like(p) if m is None else m
        u = np.sign(b1 * m + (1 - b1) * g) + wd * p
        return (p - lr * u).astype(np.float32), (b2 * m + (1 - b2) * g).astype(np.float32)

    _run(opt.lion(lr, b1=b1, b2=b2, weight_decay=wd), ref, seed=7)


def _np_newton_schulz(g: np.ndarray, steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.astype(np.float64)
    tr = x.shape[0] > x.shape[1]
    x = x.T if tr else x
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tr else x


def test_muon_matches_numpy():
    lr, beta = 0.02, 0.95

    def ref(p, g, m, k):
        m = g + beta * (m if m is not None else 0.0)
        u = g + beta * m  # nesterov
        if p.ndim == 2:
            u = _np_newton_schulz(u)
        return (p - lr * u).astype(np.float32), m

    _run(opt.muon(lr, beta=beta), ref, seed=8, atol=5e-5)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("name", ["adam", "adamw", "lion", "momentum"])
def test_low_precision_params_keep_dtype_and_float32_state(dtype, name):
    make = {
        "adam": lambda: opt.adam(1e-2, state_dtype=mx.float32),
        "adamw": lambda: opt.adamw(1e-2, weight_decay=0.1, state_dtype=mx.float32),
        "lion": lambda: opt.lion(1e-3, weight_decay=0.1, state_dtype=mx.float32),
        "momentum": lambda: opt.momentum(1e-2, state_dtype=mx.float32),
    }[name]
    optimizer = make()
    rng = np.random.default_rng(9)
    lv, td = flatten(_tree(rng))
    p32 = unflatten(td, [mx.array(x) for x in lv])
    p_lo = nf.tree_map(lambda x: x.astype(dtype), p32)
    s_lo, s32 = nf.init(optimizer, p_lo), nf.init(optimizer, p_lo)
    s32 = nf.TrainState(nf.tree_map(lambda x: x.astype(mx.float32), p_lo), s32.opt_state, 0)
    for _ in range(10):
        g = unflatten(td, [mx.array(rng.standard_normal(x.shape).astype(np.float32)) for x in lv])
        s_lo = nf.apply_gradients(optimizer, s_lo, nf.tree_map(lambda x: x.astype(dtype), g))
        s32 = nf.apply_gradients(optimizer, s32, g)
    for x in flatten(s_lo.params)[0]:
        assert x.dtype == dtype
    for x in flatten(s_lo.opt_state)[0]:
        assert x.dtype == mx.float32
    # the low-precision run tracks the float32 one to within its own rounding: each of the
    # 10 steps rounds the param to half an ulp, |p| * 2**-8 for bfloat16 (2**-11 for float16)
    for a, b in zip(flatten(s_lo.params)[0], flatten(s32.params)[0]):
        np.testing.assert_allclose(
            np.array(a.astype(mx.float32)), np.array(b), rtol=0.05, atol=0.02
        )


def test_adam_default_state_follows_param_dtype_except_float16():
    p = {"w": mx.ones((3,), dtype=mx.bfloat16)}
    s = nf.init(opt.adam(1e-2), p)
    assert {x.dtype for x in flatten(s.opt_state)[0]} == {mx.bfloat16}
    s = nf.apply_gradients(opt.adam(1e-2), s, p)
    assert s.params["w"].dtype == mx.bfloat16
    assert {x.dtype for x in flatten(s.opt_state)[0]} == {mx.bfloat16}
    p16 = {"w": mx.ones((3,), dtype=mx.float16)}
    assert {x.dtype for x in flatten(nf.init(opt.adam(1e-2), p16).opt_state)[0]} == {mx.float32}


def test_float16_adam_small_gradients_move_params_by_about_lr():
    # |g| = 1e-4: g² = 1e-8 is below float16's smallest subnormal (6e-8); with float16 moments
    # nu would be 0 and the update -inf.  Adam's first step moves each weight by about lr.
    p = {"w": mx.ones((4,), dtype=mx.float16)}
    g = {"w": mx.full((4,), 1e-4, dtype=mx.float16)}
    s = nf.apply_gradients(opt.adam(1e-3), nf.init(opt.adam(1e-3), p), g)
    w = np.array(s.params["w"].astype(mx.float32))
    assert s.params["w"].dtype == mx.float16
    np.testing.assert_allclose(w, 1.0 - 1e-3, atol=1e-3)  # float16 spacing near 1 is 1e-3


def _snapshot(tree) -> tuple:
    lv, td = flatten(tree)
    return td, [np.array(x) if isinstance(x, mx.array) else x for x in lv]


def _assert_same(tree, snap) -> None:
    td, want = snap
    lv, got_td = flatten(tree)
    assert got_td == td
    for x, y in zip(lv, want):
        np.testing.assert_array_equal(np.array(x) if isinstance(x, mx.array) else x, y)


PURE = {
    "sgd": lambda: opt.sgd(0.1),
    "momentum": lambda: opt.momentum(0.1, nesterov=True),
    "adam": lambda: opt.adam(0.1),
    "adamw": lambda: opt.adamw(0.1, weight_decay=0.1),
    "lion": lambda: opt.lion(0.1, weight_decay=0.1),
    "muon": lambda: opt.muon(0.1, weight_decay=0.1),
    "clipped_adam": lambda: nf.chain(t.clip_by_global_norm(0.5), opt.adam(0.1)),
}


@pytest.mark.parametrize("name", sorted(PURE))
@settings(max_examples=8)
@given(params=nfs.param_trees(max_layers=3), seed=st.integers(0, 2**16))
def test_init_update_apply_gradients_leave_inputs_untouched(name, params, seed):
    optimizer = PURE[name]()
    rng = np.random.default_rng(seed)
    lv, td = flatten(params)
    grads = unflatten(td, [mx.array(rng.standard_normal(x.shape).astype(np.float32)) for x in lv])
    p_snap, g_snap = _snapshot(params), _snapshot(grads)
    state = nf.init(optimizer, params)
    _assert_same(params, p_snap)
    s_snap = _snapshot(state.opt_state)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, params, 0)
    state2 = nf.apply_gradients(optimizer, state, grads)
    state3 = nf.apply_gradients(optimizer, state2, grads)
    mx.eval(updates, new_opt_state, state3)
    _assert_same(params, p_snap)
    _assert_same(grads, g_snap)
    _assert_same(state.opt_state, s_snap)
    assert state.step == 0 and state2.step == 1 and state3.step == 2
    # the step's result is what update + apply_updates say it is
    _assert_same(state2.params, _snapshot(nf.apply_updates(params, updates)))


@pytest.mark.parametrize("name", ["adam", "lion", "momentum"])
def test_scheduled_optimizer_compiled_equals_eager(name):
    # the schedule reads a traced array step inside the compiled graph: one graph, 20 values
    sched = nf.warmup_cosine(0.05, warmup_steps=5, decay_steps=20, end_value=0.001)
    optimizer = {"adam": opt.adam, "lion": opt.lion, "momentum": opt.momentum}[name](sched)
    rng = np.random.default_rng(10)
    params = _to_mx(_tree(rng))
    step_fn = compile_step(optimizer)
    eager = compiled = nf.init(optimizer, params)
    for _ in range(20):
        g = _like(params, rng)
        eager = nf.apply_gradients(optimizer, eager, g)
        compiled = step_fn(compiled, g)
    assert step_fn.graphs_built == 1
    for a, b in zip(flatten(compiled.params)[0], flatten(eager.params)[0]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=2e-6)
