"""Gradient transformations against closed forms and numpy references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.optim import transforms as t
from nestedfn.tree import TreeMismatchError
from nestedfn.tree import leaves as nf_leaves
from nestedfn.tree import tree_map as nf_map


def _grads(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "layers": [
            {"w": mx.array(rng.standard_normal((3, 4)).astype(np.float32))},
            {"w": mx.array(rng.standard_normal((3, 4)).astype(np.float32))},
        ],
        "b": mx.array(rng.standard_normal((4,)).astype(np.float32)),
    }


def _np(tree: dict) -> dict:
    return {"layers": [{"w": np.array(x["w"])} for x in tree["layers"]], "b": np.array(tree["b"])}


def test_scale_multiplies_every_leaf():
    g = _grads()
    u, s = t.scale(2.5).update(g, t.scale(2.5).init(g), g, 0)
    assert s == t.EmptyState()
    np.testing.assert_array_equal(np.array(u["b"]), 2.5 * np.array(g["b"]))
    np.testing.assert_array_equal(
        np.array(u["layers"][1]["w"]), 2.5 * np.array(g["layers"][1]["w"])
    )


@pytest.mark.parametrize("step", [0, 7, mx.array(7)])
def test_scale_by_learning_rate_negates_and_reads_schedule(step):
    g = _grads()
    tr = t.scale_by_learning_rate(lambda k: 0.5 * (k + 1))
    u, _ = tr.update(g, tr.init(g), g, step)
    k = 0 if isinstance(step, int) and step == 0 else 7
    np.testing.assert_allclose(np.array(u["b"]), -0.5 * (k + 1) * np.array(g["b"]), rtol=1e-6)
    assert u["b"].dtype == mx.float32


def test_scale_by_learning_rate_keeps_low_precision_dtype_with_array_schedule():
    g = {"w": mx.ones((3,), dtype=mx.bfloat16)}
    tr = t.scale_by_learning_rate(lambda k: mx.array(0.25) * (k + 1))
    u, _ = tr.update(g, tr.init(g), g, mx.array(1))
    assert u["w"].dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(u["w"].astype(mx.float32)), [-0.5] * 3)


def test_scale_by_adam_first_step_is_sign_like_and_state_is_moments():
    # After one bias-corrected step: mu_hat = g, nu_hat = g², so u = g / (|g| + eps).
    g = _grads(1)
    tr = t.scale_by_adam(0.9, 0.999, 1e-8)
    u, s = tr.update(g, tr.init(g), g, 0)
    gb = np.array(g["b"])
    np.testing.assert_allclose(np.array(u["b"]), gb / (np.abs(gb) + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(np.array(s.mu["b"]), 0.1 * gb, rtol=1e-6)
    np.testing.assert_allclose(np.array(s.nu["b"]), 0.001 * gb * gb, rtol=1e-5)


def test_scale_by_adam_traced_step_equals_int_step():
    g = _grads(2)
    tr = t.scale_by_adam(0.8, 0.95, 1e-6)
    s = tr.init(g)
    for k in range(5):
        u_int, s_int = tr.update(g, s, g, k)
        u_arr, s_arr = tr.update(g, s, g, mx.array(k))
        np.testing.assert_allclose(np.array(u_int["b"]), np.array(u_arr["b"]), rtol=1e-6)
        s = s_int


def test_scale_by_adam_state_dtype_keeps_float32_moments_for_bf16():
    p = {"w": mx.ones((4,), dtype=mx.bfloat16)}
    tr = t.scale_by_adam(state_dtype=mx.float32)
    s = tr.init(p)
    assert s.mu["w"].dtype == mx.float32 and s.nu["w"].dtype == mx.float32
    u, s = tr.update(p, s, p, 0)
    assert u["w"].dtype == mx.bfloat16 and s.mu["w"].dtype == mx.float32
    tr16 = t.scale_by_adam()
    s16 = tr16.init(p)
    assert s16.mu["w"].dtype == mx.bfloat16
    u16, s16 = tr16.update(p, s16, p, 0)
    assert u16["w"].dtype == mx.bfloat16 and s16.nu["w"].dtype == mx.bfloat16


def test_scale_by_adam_state_shaped_unlike_grads_names_path():
    g = _grads()
    tr = t.scale_by_adam()
    bad = {"layers": [{"w": mx.zeros((3, 4))}], "b": mx.zeros((4,))}
    with pytest.raises(TreeMismatchError, match="layers"):
        tr.update(g, t.ScaleByAdamState(bad, bad), g, 0)


def test_bias_correction_math():
    assert t._bias_correction(0.9, 0) == pytest.approx(0.1)
    assert float(t._bias_correction(0.9, mx.array(2))) == pytest.approx(1 - 0.9**3, rel=1e-6)
    assert math.isclose(t._bias_correction(0.999, 9), 1 - 0.999**10)


def test_scale_by_lion_is_sign_of_interpolation():
    g = _grads(3)
    tr = t.scale_by_lion(0.9, 0.99)
    s = t.ScaleByLionState(nf_map(lambda x: x * 0.0 + 0.5, g))
    u, s2 = tr.update(g, s, g, 0)
    gb = np.array(g["b"])
    np.testing.assert_array_equal(np.array(u["b"]), np.sign(0.9 * 0.5 + 0.1 * gb))
    np.testing.assert_allclose(np.array(s2.mu["b"]), 0.99 * 0.5 + 0.01 * gb, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_matches_numpy(nesterov):
    tr = t.trace(0.7, nesterov)
    g0 = _grads(4)
    s = tr.init(g0)
    ref = np.zeros(4, np.float32)
    for k in range(5):
        g = _grads(10 + k)
        u, s = tr.update(g, s, g, k)
        gb = np.array(g["b"])
        ref = gb + 0.7 * ref
        want = gb + 0.7 * ref if nesterov else ref
        np.testing.assert_allclose(np.array(u["b"]), want, rtol=1e-6)
        np.testing.assert_allclose(np.array(s.trace["b"]), ref, rtol=1e-6)


def test_add_decayed_weights_with_and_without_mask():
    g, p = _grads(5), _grads(6)
    u, _ = t.add_decayed_weights(0.1).update(g, t.EmptyState(), p, 0)
    np.testing.assert_allclose(np.array(u["b"]), np.array(g["b"]) + 0.1 * np.array(p["b"]))
    mask = {"layers": [{"w": True}, {"w": False}], "b": False}
    u, _ = t.add_decayed_weights(0.1, mask).update(g, t.EmptyState(), p, 0)
    w0, w1 = (np.array(x["w"]) for x in g["layers"])
    np.testing.assert_allclose(
        np.array(u["layers"][0]["w"]), w0 + 0.1 * np.array(p["layers"][0]["w"]), rtol=1e-6
    )
    np.testing.assert_array_equal(np.array(u["layers"][1]["w"]), w1)
    np.testing.assert_array_equal(np.array(u["b"]), np.array(g["b"]))


def test_add_decayed_weights_mask_shaped_unlike_params_names_path():
    g = _grads()
    with pytest.raises(TreeMismatchError, match="add_decayed_weights(.|\\n)*layers: length 2 vs 1"):
        t.add_decayed_weights(0.1, {"layers": [{"w": True}], "b": True}).update(
            g, t.EmptyState(), g, 0
        )


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm(max_norm):
    g = _grads(7)
    flat = np.concatenate([np.array(x).ravel() for x in nf_leaves(g)])
    norm = np.linalg.norm(flat)
    u, _ = t.clip_by_global_norm(max_norm).update(g, t.EmptyState(), g, 0)
    factor = min(1.0, max_norm / norm)
    for a, b in zip(nf_leaves(u), nf_leaves(g)):
        np.testing.assert_allclose(np.array(a), factor * np.array(b), rtol=1e-5)
    got = np.linalg.norm(np.concatenate([np.array(x).ravel() for x in nf_leaves(u)]))
    assert got == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_clip_by_global_norm_traces_under_compile():
    tr = t.clip_by_global_norm(1.0)
    fn = mx.compile(lambda g: tr.update(g, t.EmptyState(), g, 0)[0])
    for scale_ in (0.01, 100.0):
        g = {"a": mx.full((3,), scale_), "b": mx.full((2, 2), -scale_)}
        norm = math.sqrt(7) * scale_
        want = min(1.0, 1.0 / norm) * scale_
        np.testing.assert_allclose(np.array(fn(g)["a"]), [want] * 3, rtol=1e-5)


def test_clip_by_global_norm_rejects_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        t.clip_by_global_norm(0.0)


@pytest.mark.parametrize("shape", [(3, 5), (6, 2), (4, 4)])
def test_newton_schulz_matches_numpy_and_orthogonalises(shape):
    rng = np.random.default_rng(sum(shape))
    g = rng.standard_normal(shape).astype(np.float32)
    got = np.array(t.newton_schulz(mx.array(g), 5))
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.astype(np.float64)
    x = x.T if shape[0] > shape[1] else x
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if shape[0] > shape[1] else x
    np.testing.assert_allclose(got, x, atol=2e-5)
    # Muon's quintic pushes singular values into roughly [0.7, 1.2]
    sv = np.linalg.svd(got, compute_uv=False)
    assert sv.min() > 0.5 and sv.max() < 1.3


def test_scale_by_newton_schulz_only_touches_2d_leaves():
    g = {
        "w": mx.array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)),
        "b": mx.array([1.0, -2.0]),
        "c": mx.ones((2, 2, 2)),
    }
    u, _ = t.scale_by_newton_schulz(5).update(g, t.EmptyState(), g, 0)
    np.testing.assert_allclose(np.array(u["w"]), np.array(t.newton_schulz(g["w"], 5)))
    np.testing.assert_array_equal(np.array(u["b"]), [1.0, -2.0])
    np.testing.assert_array_equal(np.array(u["c"]), np.ones((2, 2, 2)))
    assert u["w"].dtype == mx.float32
    u16, _ = t.scale_by_newton_schulz().update(
        {"w": g["w"].astype(mx.bfloat16)}, t.EmptyState(), None, 0
    )
    assert u16["w"].dtype == mx.bfloat16
    with pytest.raises(ValueError, match="2-D"):
        t.newton_schulz(g["b"])
