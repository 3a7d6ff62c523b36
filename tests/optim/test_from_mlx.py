"""from_mlx: every optimizer class MLX ships, as a functional Optimizer, against the MLX
optimizer itself (its own apply_gradients) over 50 steps on random trees."""

from __future__ import annotations

import inspect
import zlib

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

import nestedfn as nf
from nestedfn.fast.compile import compile_step
from nestedfn.optim.from_mlx import from_mlx
from nestedfn.tree import leaves
from tests.devices import GPU_ATOL, GPU_RTOL, ON_CPU

# at least one configuration per class; schedules, momentum, weight decay and first moments on
CASES = {
    "SGD": lambda: optim.SGD(0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "SGD-schedule": lambda: optim.SGD(optim.cosine_decay(0.1, 50)),
    "RMSprop": lambda: optim.RMSprop(0.01),
    "Adagrad": lambda: optim.Adagrad(0.1),
    "AdaDelta": lambda: optim.AdaDelta(1.0),
    "Adam": lambda: optim.Adam(0.01, bias_correction=True),
    "AdamW": lambda: optim.AdamW(optim.linear_schedule(0.0, 0.01, 10)),
    "Adamax": lambda: optim.Adamax(0.01),
    "Lion": lambda: optim.Lion(1e-3, weight_decay=0.1),
    "Adafactor": lambda: optim.Adafactor(),
    "Adafactor-lr": lambda: optim.Adafactor(
        0.01, relative_step=False, beta_1=0.9, weight_decay=0.01
    ),
    "Muon": lambda: optim.Muon(0.01),
    "MultiOptimizer": lambda: optim.MultiOptimizer(
        [optim.Adam(0.01), optim.SGD(0.1)], [lambda path, x: path.startswith("b")]
    ),
}


def _tree(rng: np.random.Generator) -> dict:
    def a(*shape):
        return mx.array(rng.normal(size=shape).astype(np.float32))

    return {"a": a(4, 3), "b": [a(5), a(2, 3, 4)], "c": {"d": a(3, 6)}}


def _run_mlx(mlx_opt, params, grads):
    out = []
    for g in grads:
        params = mlx_opt.apply_gradients(g, params)
        out.append(params)
    return out


def test_every_optimizer_class_mlx_ships_is_covered():
    shipped = {
        name
        for name, cls in inspect.getmembers(optim, inspect.isclass)
        if issubclass(cls, optim.Optimizer) and cls is not optim.Optimizer
    }
    covered = {type(make()).__name__ for make in CASES.values()}
    assert shipped <= covered, f"classes without a from_mlx test: {shipped - covered}"


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_from_mlx_equals_the_mlx_optimizer_over_50_steps(name, compiled):
    """Eager: bit for bit, except where ``p + (new - p)`` rounds (AdamW: an ulp); compiled
    (fused kernels, the step an array): within float32 rounding."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(50)]
    expected = _run_mlx(CASES[name](), params, grads)
    opt = from_mlx(CASES[name]())
    step = compile_step(opt) if compiled else (lambda s, g: nf.apply_gradients(opt, s, g))
    state = nf.init(opt, params)
    # compiled on a GPU: fused kernels of its own graph (tests.devices)
    rtol, atol = (2e-6, 1e-7) if ON_CPU or not compiled else (GPU_RTOL, GPU_ATOL)
    for g, want in zip(grads, expected):
        state = step(state, g)
        got, want = nf.to_flat(state.params), nf.to_flat(want)  # MultiOptimizer reorders keys
        assert set(got) == set(want)
        for k in got:
            np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=rtol, atol=atol)
    exact = all(bool(mx.array_equal(got[k], want[k])) for k in got)
    assert exact or compiled or name == "AdamW"


def test_from_mlx_leaves_the_mlx_optimizer_untouched():
    mlx_opt = optim.Adam(optim.linear_schedule(0.0, 0.1, 5))
    before = dict(mlx_opt.state)
    opt = from_mlx(mlx_opt)
    params = {"w": mx.ones((3,))}
    state = nf.init(opt, params)
    for _ in range(3):
        state = nf.apply_gradients(opt, state, {"w": mx.ones((3,))})
    assert set(mlx_opt.state) == set(before) and int(mlx_opt.step) == 0
    assert not mlx_opt._initialized


def test_from_mlx_nests_in_accumulate_nested_and_chain():
    """accumulate: MLX's rule on the chunk means at every 2nd step; nested: each tier is MLX's
    optimizer on that tier's leaves at its own clock; chain: after global-norm clipping,
    MLX's rule on MLX's clip_grad_norm of the gradients."""
    rng = np.random.default_rng(5)
    params = {"layers": [{"w": mx.array(rng.normal(size=(3, 2)).astype(np.float32))}] * 2}
    grads = [
        {"layers": [{"w": mx.array(rng.normal(size=(3, 2)).astype(np.float32))} for _ in "ab"]}
        for _ in range(8)
    ]

    acc = nf.accumulate(from_mlx(optim.Adam(0.01)), 2)
    state = nf.init(acc, params)
    ref, ref_p = optim.Adam(0.01), params
    for i, g in enumerate(grads):
        state = nf.apply_gradients(acc, state, g)
        if i % 2 == 1:
            mean = nf.tree_map(lambda a, b: (a + b) / 2, grads[i - 1], g)
            ref_p = ref.apply_gradients(mean, ref_p)
    assert all(bool(mx.array_equal(x, y)) for x, y in zip(leaves(state.params), leaves(ref_p)))

    tiers = {"layers": [{"w": 0}, {"w": 1}]}
    tiered = nf.nested(from_mlx(optim.Adamax(0.01)), tiers, frequencies=(1, 2))
    state = nf.init(tiered, params)
    fast, slow = optim.Adamax(0.01), optim.Adamax(0.01)
    pf, ps = params["layers"][0], params["layers"][1]
    for i, g in enumerate(grads):
        state = nf.apply_gradients(tiered, state, g)
        pf = fast.apply_gradients(g["layers"][0], pf)
        if i % 2 == 1:
            chunk = nf.tree_map(lambda a, b: (a + b) / 2, grads[i - 1]["layers"][1], g["layers"][1])
            ps = slow.apply_gradients(chunk, ps)
    np.testing.assert_array_equal(np.array(state.params["layers"][0]["w"]), np.array(pf["w"]))
    np.testing.assert_array_equal(np.array(state.params["layers"][1]["w"]), np.array(ps["w"]))

    chained = nf.chain(nf.clip_by_global_norm(1.0), from_mlx(optim.SGD(0.1)))
    state = nf.init(chained, params)
    ref_p = params
    for g in grads[:3]:
        state = nf.apply_gradients(chained, state, g)
        clipped, _ = optim.clip_grad_norm(g, 1.0)
        ref_p = optim.SGD(0.1).apply_gradients(clipped, ref_p)
    for x, y in zip(leaves(state.params), leaves(ref_p)):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-6, atol=1e-7)


def test_from_mlx_refuses_what_is_not_an_mlx_optimizer():
    with pytest.raises(TypeError, match="mlx.optimizers.Optimizer"):
        from_mlx(nf.adam(0.1))
