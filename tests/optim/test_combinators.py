"""Combinators: accumulate, skip_nonfinite, partition, masked — against the optimizers they
wrap run by hand, eager and compiled, plus errors and purity."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nestedfn as nf
from nestedfn.fast.compile import compile_step
from nestedfn.optim import combinators as C
from nestedfn.optim import optimizers as opt
from nestedfn.optim.core import Optimizer, static_step
from nestedfn.testing import strategies as nfs
from nestedfn.tree import TreeMismatchError, flatten, tree_map, unflatten
from tests.devices import assert_same_math


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {"layers": [{"w": f(3, 4), "b": f(4)}, {"w": f(4, 2), "b": f(2)}], "head": f(2)}


def _grads_seq(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    lv, td = flatten(_params())
    return [
        unflatten(td, [mx.array(rng.standard_normal(x.shape).astype(np.float32)) for x in lv])
        for _ in range(n)
    ]


def _equal(a, b) -> None:
    la, ta = flatten(a)
    lb, tb = flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def _close(a, b, rtol=1e-6, atol=1e-7) -> None:
    la, ta = flatten(a)
    lb, tb = flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------- accumulate


def test_accumulate_holds_params_then_applies_opt_to_the_mean():
    inner = opt.adam(0.05)
    acc_opt = C.accumulate(inner, 4)
    assert acc_opt.period == 4
    params = _params()
    state = nf.init(acc_opt, params)
    ref = nf.init(inner, params)  # adam run by hand on the chunk means
    grads = _grads_seq(12)
    for k, g in enumerate(grads):
        state = nf.apply_gradients(acc_opt, state, g)
        if (k + 1) % 4:
            _equal(state.params, ref.params)  # unchanged between updates
        else:
            chunk = grads[k - 3 : k + 1]
            mean = tree_map(lambda *xs: sum(xs[1:], xs[0]) / 4, *chunk)
            ref = nf.apply_gradients(inner, ref, mean)  # adam's own step: k // 4
            _equal(state.params, ref.params)
            _equal(state.opt_state.inner, ref.opt_state)
            assert all(not np.any(np.array(a)) for a in flatten(state.opt_state.acc)[0])
    assert ref.step == 3


def _phase_opt() -> Optimizer:
    """A period-2 toy: even steps give ``-g``, odd steps ``-10 g`` (branching on the static
    step, as nested tiers do)."""

    def update(grads, state, params, step):
        f = -1.0 if static_step(step) % 2 == 0 else -10.0
        return tree_map(lambda g: g * f, grads), state

    return Optimizer(lambda p: (), update, period=2)


def test_accumulate_period_and_inner_phase_eager_and_compiled():
    acc_opt = C.accumulate(_phase_opt(), 3)
    assert acc_opt.period == 6
    params = _params()
    eager = nf.init(acc_opt, params)
    step_fn = compile_step(acc_opt)
    compiled = nf.init(acc_opt, params)
    grads = _grads_seq(12, seed=2)
    expected = params
    for k, g in enumerate(grads):
        eager = nf.apply_gradients(acc_opt, eager, g)
        compiled = step_fn(compiled, g)
        if (k + 1) % 3 == 0:  # inner update number (k + 1) // 3 - 1: even -> -1x, odd -> -10x
            f = -1.0 if ((k + 1) // 3 - 1) % 2 == 0 else -10.0
            mean = tree_map(lambda *xs: sum(xs[1:], xs[0]) / 3, *grads[k - 2 : k + 1])
            expected = tree_map(lambda p, m, f=f: p + m * f, expected, mean)
        _close(eager.params, expected, rtol=1e-5, atol=1e-6)
        _close(compiled.params, eager.params, rtol=1e-5, atol=1e-6)
    # phases: accumulating (shared by the 4 such steps of a period), update at inner phase 0,
    # update at inner phase 1
    assert [acc_opt.phase(s) for s in range(6)] == [None, None, (0,), None, None, (1,)]
    assert step_fn.graphs_built == 3


def _eager_and_compiled(o, n: int, seed: int, every_step_tol=None):
    """Run ``o`` eagerly and under ``compile_step`` on the same ``n`` gradients; with
    ``every_step_tol=(rtol, atol)`` compare params and state after every step.  Returns
    ``(eager, compiled, step_fn)``."""
    eager = compiled = nf.init(o, _params())
    step_fn = compile_step(o)
    for g in _grads_seq(n, seed=seed):
        eager = nf.apply_gradients(o, eager, g)
        compiled = step_fn(compiled, g)
        if every_step_tol is not None:
            rtol, atol = every_step_tol
            _close(compiled.params, eager.params, rtol=rtol, atol=atol)
            _close(compiled.opt_state, eager.opt_state, rtol=rtol, atol=atol)
    return eager, compiled, step_fn


def test_accumulate_adam_compiled_equals_eager():
    eager, compiled, _ = _eager_and_compiled(C.accumulate(opt.adam(0.01), 4), 8, seed=3)
    _close(compiled.params, eager.params, rtol=1e-5, atol=1e-6)
    _close(compiled.opt_state, eager.opt_state, rtol=1e-5, atol=1e-7)


def test_accumulate_rejects_bad_every():
    for every in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="every"):
            C.accumulate(opt.sgd(0.1), every)


# --------------------------------------------------------------------------- skip_nonfinite


def _poison(g: dict, where: str, value: float) -> dict:
    lv, td = flatten(g)
    paths = td.paths()
    out = []
    for p, x in zip(paths, lv):
        if p == where:
            a = np.array(x)
            a.flat[1] = value
            x = mx.array(a)
        out.append(x)
    return unflatten(td, out)


@pytest.mark.parametrize("compiled", [False, True])
def test_skip_nonfinite_changes_nothing_and_counts(compiled):
    inner = opt.adam(0.05)
    skip = C.skip_nonfinite(inner)
    step_fn = compile_step(skip) if compiled else (lambda s, g: nf.apply_gradients(skip, s, g))
    state = nf.init(skip, _params())
    ref = nf.init(inner, _params())
    grads = _grads_seq(8, seed=4)
    bad = {
        2: ("layers.0.w", math.nan),
        3: ("head", math.inf),
        5: ("layers.1.b", -math.inf),
    }
    for k, g in enumerate(grads):
        if k in bad:
            before = state
            state = step_fn(state, _poison(g, *bad[k]))
            _equal(state.params, before.params)
            _equal(state.opt_state.inner, before.opt_state.inner)
        else:
            state = step_fn(state, g)
            # the inner optimizer's clock counts applied steps only (optax's apply_if_finite):
            # the reference never saw the bad steps
            ref = nf.apply_gradients(inner, ref, g)
            # compiled: float32 bias correction and fused arithmetic, a few ulps apart
            _close(state.params, ref.params, rtol=1e-5, atol=5e-6 if compiled else 1e-6)
        assert int(state.opt_state.skipped) == sum(1 for j in bad if j <= k)
    assert int(state.step) == 8


@pytest.mark.parametrize("compiled", [False, True])
def test_skip_nonfinite_of_accumulate_is_as_if_the_bad_steps_never_happened(compiled):
    """The inner clock is data-dependent (``step - skipped``), so skip_nonfinite has period 1
    and runs accumulate branch-free: its chunks restart counting after a skipped step, and
    the params equal accumulate's on the good gradients alone, bit for bit on the CPU
    (``tests.devices``: to float32 rounding on a GPU, where the two graphs fuse differently)."""
    inner = C.accumulate(opt.adam(0.1), 3)
    skip = C.skip_nonfinite(inner)
    assert skip.period == 1
    step_fn = compile_step(skip) if compiled else (lambda s, g: nf.apply_gradients(skip, s, g))
    ref_fn = compile_step(inner)
    state, ref = nf.init(skip, _params()), nf.init(inner, _params())
    bad = {1: ("head", math.nan), 4: ("layers.0.w", math.inf)}
    for k, g in enumerate(_grads_seq(9, seed=7)):
        if k in bad:
            state = step_fn(state, _poison(g, *bad[k]))
            continue
        state = step_fn(state, g)
        ref = ref_fn(ref, g)
        for a, b in zip(flatten(state.params)[0], flatten(ref.params)[0]):
            assert_same_math(a, b)  # bit for bit on the CPU
    assert int(state.opt_state.skipped) == 2


@pytest.mark.parametrize("compiled", [False, True])
def test_skip_nonfinite_skipped_step_keeps_signed_zeros_and_accumulate_passes_params_through(
    compiled,
):
    """A skipped step adds ``-0.0`` (``+0.0`` would turn a ``-0.0`` parameter into ``+0.0``);
    accumulate's in-between steps give ``no_update``: eager, the very same arrays come back."""
    params = {"w": mx.array([-0.0, 0.0, 1.5]), "b": mx.array([-0.0, float("nan")])}

    def bits(t):  # float32 bits, NaNs canonical (a GPU may change a NaN's payload)
        return [
            np.where(np.isnan(a), np.float32("nan"), a).view(np.uint32).tolist()
            for a in (np.array(x) for x in flatten(t)[0])
        ]

    bad = {"w": mx.array([float("nan"), 1.0, 1.0]), "b": mx.ones((2,))}
    good = tree_map(mx.ones_like, params)
    for o in (C.skip_nonfinite(opt.adam(0.1)), C.skip_nonfinite(C.accumulate(opt.sgd(0.1), 2))):
        step_fn = compile_step(o) if compiled else (lambda s, g, o=o: nf.apply_gradients(o, s, g))
        state = step_fn(nf.init(o, params), bad)
        assert bits(state.params) == bits(params)
    acc_opt = C.accumulate(opt.sgd(0.1), 2)
    step_fn = (
        compile_step(acc_opt) if compiled else (lambda s, g: nf.apply_gradients(acc_opt, s, g))
    )
    state = step_fn(nf.init(acc_opt, params), good)
    assert bits(state.params) == bits(params)
    if not compiled:
        assert state.params["w"] is params["w"] and state.params["b"] is params["b"]


def test_combinators_phase_keys_combine_children_and_compiled_graphs_follow_them():
    """chain and partition key on the tuple of their children's phases, masked and
    skip_nonfinite on their child's: accumulate every 2 and every 3 give 4 distinct phases in
    a period of 6, so 4 graphs, each step equal to eager."""
    a2, a3 = C.accumulate(opt.sgd(0.1), 2), C.accumulate(opt.adam(0.1), 3)
    part = C.partition({"matrix": a2, "vector": a3}, _by_ndim)
    chained = nf.chain(a2, opt.sgd(1.0))
    mask = C.masked(a3, lambda p: tree_map(lambda x: x.ndim == 2, p))
    for s in range(12):
        assert part.phase(s) == (a2.phase(s), a3.phase(s))
        assert chained.phase(s) == (a2.phase(s), 0)
        assert mask.phase(s) == a3.phase(s)
        assert part.phase(s) == part.phase(s + part.period)
    assert nf.chain(opt.adam(0.1), opt.sgd(1.0)).phase_key is None  # period 1: nothing varies
    assert len({part.phase(s) for s in range(6)}) == 4
    for o, graphs in ((part, 4), (mask, 2)):
        # Adam's bias correction: float32 on the compiled array step, float64 eager
        _, _, step_fn = _eager_and_compiled(o, 12, seed=9, every_step_tol=(1e-5, 1e-5))
        assert step_fn.graphs_built == graphs


# -------------------------------------------------------------------------------- partition


def _by_ndim(path: str, leaf) -> str:
    return "matrix" if leaf.ndim == 2 else "vector"


def test_partition_equals_each_optimizer_on_its_own_leaves():
    adam, sgd = opt.adam(0.02), opt.sgd(0.1)
    part = C.partition({"matrix": adam, "vector": sgd}, _by_ndim)
    params = _params()
    state = nf.init(part, params)
    mats = {"w0": params["layers"][0]["w"], "w1": params["layers"][1]["w"]}
    vecs = {"b0": params["layers"][0]["b"], "b1": params["layers"][1]["b"], "h": params["head"]}
    sa, sb = nf.init(adam, mats), nf.init(sgd, vecs)
    for g in _grads_seq(10, seed=5):
        state = nf.apply_gradients(part, state, g)
        sa = nf.apply_gradients(adam, sa, {"w0": g["layers"][0]["w"], "w1": g["layers"][1]["w"]})
        sb = nf.apply_gradients(
            sgd, sb, {"b0": g["layers"][0]["b"], "b1": g["layers"][1]["b"], "h": g["head"]}
        )
    p = state.params
    _equal({"w0": p["layers"][0]["w"], "w1": p["layers"][1]["w"]}, sa.params)
    _equal({"b0": p["layers"][0]["b"], "b1": p["layers"][1]["b"], "h": p["head"]}, sb.params)


def test_partition_labels_tree_and_function_see_dotted_paths():
    seen = []

    def label(path, leaf):
        seen.append(path)
        return "a" if path.endswith("w") else "b"

    part_fn = C.partition({"a": opt.sgd(1.0), "b": opt.sgd(0.0)}, label)
    tree_labels = {"layers": [{"w": "a", "b": "b"}, {"w": "a", "b": "b"}], "head": "b"}
    part_tree = C.partition({"a": opt.sgd(1.0), "b": opt.sgd(0.0)}, tree_labels)
    params, (g,) = _params(), _grads_seq(1)
    s1 = nf.apply_gradients(part_fn, nf.init(part_fn, params), g)
    s2 = nf.apply_gradients(part_tree, nf.init(part_tree, params), g)
    assert seen[:5] == ["layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b", "head"]
    _equal(s1.params, s2.params)
    np.testing.assert_array_equal(np.array(s1.params["head"]), np.array(params["head"]))
    np.testing.assert_allclose(
        np.array(s1.params["layers"][1]["w"]),
        np.array(params["layers"][1]["w"]) - np.array(g["layers"][1]["w"]),
    )


def test_partition_unknown_label_names_path():
    labels = {"layers": [{"w": "a", "b": "a"}, {"w": "a", "b": "oops"}], "head": "a"}
    with pytest.raises(KeyError, match=r"layers\.1\.b.*'oops'"):
        C.partition({"a": opt.sgd(0.1)}, labels).init(_params())
    with pytest.raises(KeyError, match=r"'head'"):
        C.partition({"a": opt.sgd(0.1)}, lambda p, x: "a" if "layers" in p else 7).init(_params())


def test_partition_labels_shaped_unlike_params_names_path():
    labels = {"layers": [{"w": "a", "b": "a"}], "head": "a"}
    with pytest.raises(TreeMismatchError, match=r"partition labels(.|\n)*layers"):
        C.partition({"a": opt.sgd(0.1)}, labels).init(_params())
    labels = {"layers": [{"w": "a", "b": "a"}, {"w": "a", "bias": "a"}], "head": "a"}
    with pytest.raises(TreeMismatchError, match=r"layers\.1"):
        C.partition({"a": opt.sgd(0.1)}, labels).init(_params())


def test_partition_optimizer_without_leaves_raises():
    with pytest.raises(ValueError, match="'unused'"):
        C.partition({"a": opt.sgd(0.1), "unused": opt.adam(0.1)}, lambda p, x: "a").init(_params())


def test_partition_period_is_lcm_and_compiles():
    part = C.partition(
        {"matrix": C.accumulate(opt.sgd(0.1), 2), "vector": C.accumulate(opt.adam(0.1), 3)},
        _by_ndim,
    )
    assert part.period == 6
    eager, compiled, _ = _eager_and_compiled(part, 7, seed=6)
    _close(compiled.params, eager.params, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- masked


def test_masked_applies_opt_to_masked_leaves_and_passes_the_rest():
    mask = {"layers": [{"w": True, "b": False}, {"w": True, "b": False}], "head": False}
    m = C.masked(opt.adam(0.1), mask)
    params, (g,) = _params(), _grads_seq(1)
    u, s = m.update(g, m.init(params), params, 0)
    ua, _ = opt.adam(0.1).update(
        {"w": g["layers"][0]["w"]}, opt.adam(0.1).init({"w": params["layers"][0]["w"]}), None, 0
    )
    _equal(u["layers"][0]["w"], ua["w"])
    _equal(u["layers"][0]["b"], g["layers"][0]["b"])
    _equal(u["head"], g["head"])
    # the inner state holds only the masked leaves
    assert len(flatten(s.inner)[0]) == 2 * 2


def test_masked_callable_mask_and_bad_mask():
    m = C.masked(opt.sgd(1.0), lambda p: tree_map(lambda x: x.ndim == 1, p))
    params, (g,) = _params(), _grads_seq(1)
    u, _ = m.update(g, m.init(params), params, 0)
    _equal(u["head"], tree_map(lambda x: -x, g["head"]))
    _equal(u["layers"][0]["w"], g["layers"][0]["w"])
    with pytest.raises(TreeMismatchError, match="masked mask"):
        C.masked(opt.sgd(1.0), {"layers": [], "head": True}).init(params)


# ----------------------------------------------------------------------------------- purity


def _snapshot(tree):
    lv, td = flatten(tree)
    return td, [np.array(x) if isinstance(x, mx.array) else x for x in lv]


def _same(tree, snap):
    lv, td = flatten(tree)
    assert td == snap[0]
    for x, y in zip(lv, snap[1]):
        np.testing.assert_array_equal(np.array(x) if isinstance(x, mx.array) else x, y)


@settings(max_examples=10)
@given(params=nfs.param_trees(max_layers=3), seed=st.integers(0, 2**16), nan=st.booleans())
def test_combinators_leave_inputs_untouched(params, seed, nan):
    lv, td = flatten(params)
    assume(len(lv) >= 2)
    rng = np.random.default_rng(seed)
    g_np = [rng.standard_normal(x.shape).astype(np.float32) for x in lv]
    if nan:
        g_np[-1].flat[0] = np.nan
    grads = unflatten(td, [mx.array(x) for x in g_np])
    labels = unflatten(td, ["a" if i % 2 else "b" for i in range(len(lv))])
    mask = unflatten(td, [i % 2 == 0 for i in range(len(lv))])
    optimizers = [
        C.partition({"a": opt.adam(0.1), "b": opt.momentum(0.1)}, labels),
        C.masked(opt.adamw(0.1), mask),
        C.accumulate(opt.adam(0.1), 2),
        C.skip_nonfinite(opt.adam(0.1)),
    ]
    p_snap, g_snap = _snapshot(params), _snapshot(grads)
    for o in optimizers:
        state = nf.init(o, params)
        s_snap = _snapshot(state.opt_state)
        s1 = nf.apply_gradients(o, state, grads)
        s2 = nf.apply_gradients(o, s1, grads)
        mx.eval(s2)
        _same(params, p_snap)
        _same(grads, g_snap)
        _same(state.opt_state, s_snap)


def test_skip_nonfinite_refuses_python_state_it_cannot_revert():
    def update(grads, state, params, step):
        return grads, state + 1

    counting = Optimizer(lambda p: 0, update)
    with pytest.raises(TypeError, match="Python value that changed"):
        nf.apply_gradients(C.skip_nonfinite(counting), nf.init(C.skip_nonfinite(counting), {}), {})


def test_accumulate_acc_dtype_sums_low_precision_grads_in_float32():
    params = {"w": mx.zeros((4,), dtype=mx.bfloat16)}
    acc_opt = C.accumulate(opt.sgd(1.0), 3, acc_dtype=mx.float32)
    state = nf.init(acc_opt, params)
    assert state.opt_state.acc["w"].dtype == mx.float32
    # 1 + 2**-9 + 2**-9 is not representable in bfloat16 (8 bits): a bf16 sum would lose it
    vals = [1.0, 2.0**-9, 2.0**-9]
    for k, v in enumerate(vals):
        state = nf.apply_gradients(acc_opt, state, {"w": mx.full((4,), v, dtype=mx.bfloat16)})
        if k == 1:  # a bfloat16 sum would have rounded this back to 1.0
            np.testing.assert_array_equal(np.array(state.opt_state.acc["w"]), [1 + 2.0**-9] * 4)
    assert state.params["w"].dtype == mx.bfloat16
    want = -(1.0 + 2.0**-8) / 3  # the float32 mean, then rounded to bfloat16 by the update
    got = np.array(state.params["w"].astype(mx.float32))
    np.testing.assert_array_equal(
        got, np.float32(np.array(mx.array(want).astype(mx.bfloat16).astype(mx.float32)))
    )


def test_partition_refuses_labels_that_cannot_key_a_tree():
    with pytest.raises(TypeError, match="label 0 is a int; labels must be str"):
        C.partition({0: opt.sgd(0.1)}, lambda p, x: 0)
