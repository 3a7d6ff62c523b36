"""Each optimizer against a few-line numpy reference over many steps on random trees with
``layers`` lists; Adam also against ``mlx.optimizers.Adam``."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers
import numpy as np
import pytest

import nestedfn as nf
from nestedfn import optimizers as opt
from nestedfn.tree import flatten, unflatten

STEPS = 60


def _tree(rng: np.random.Generator) -> dict:
    """A small MLX-style parameter tree: an embedding, a ``layers`` list, a head bias."""
    return {
        "embed": rng.standard_normal((5, 3)).astype(np.float32),
        "layers": [
            {
                "attn": {"q": rng.standard_normal((3, 4)).astype(np.float32)},
                "norm": rng.standard_normal((3,)).astype(np.float32),
            }
            for _ in range(3)
        ],
        "head": {"bias": rng.standard_normal((2,)).astype(np.float32)},
    }


def _to_mx(tree_np: dict) -> dict:
    lv, td = flatten(tree_np)
    return unflatten(td, [mx.array(x) for x in lv])


def _run(optimizer: nf.Optimizer, reference, seed: int = 0, steps: int = STEPS, atol=2e-6):
    """Run ``optimizer`` and ``reference(p, g, state, step) -> (p, state)`` (numpy, leaf by
    leaf) side by side on the same gradients; compare params after every step."""
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
        grads = _to_mx({k: v for k, v in _tree(rng).items()})
        state = nf.apply_gradients(ours, state, grads)
        their_params = theirs.apply_gradients(grads, their_params)
        for a, b in zip(flatten(state.params)[0], flatten(their_params)[0]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
