"""Gradient transformations against closed forms and numpy references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from nestedfn import transforms as t
from nestedfn.tree import TreeMismatchError


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
