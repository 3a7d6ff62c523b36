"""Tests for nestedfn.tiered.cms: tier schedule, CMS rule, tier-local inner state, errors.

The inner optimizers here are written in the test (a few lines each) so that the expected
values come from an independent numpy reference, not from nestedfn's own optimizers.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nestedfn.optim.core import Optimizer, apply_updates, static_step
from nestedfn.testing import strategies as nfs
from nestedfn.tiered import NestedState, TierStats, nested, tier_stats
from nestedfn.tree import TreeMismatchError, flatten, tree_map, unflatten


def sgd(lr: float) -> Optimizer:
    """Test-local SGD: updates = -lr * g, no state."""
    return Optimizer(lambda p: (), lambda g, s, p, step: (tree_map(lambda x: -lr * x, g), s))


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Test-local Adam with bias correction from the step it is called with (0-based)."""

    def init(p):
        return (tree_map(mx.zeros_like, p), tree_map(mx.zeros_like, p))

    def update(g, s, p, step):
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, s[0], g)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, s[1], g)
        t = step + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        u = tree_map(lambda m, v: -lr * (m / c1) / (mx.sqrt(v / c2) + eps), m, v)
        return u, (m, v)

    return Optimizer(init, update)


def np_adam_step(x, m, v, g, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    return x - lr * mh / (np.sqrt(vh) + eps), m, v


def run(opt, params, grads_at, steps, start=0):
    """Apply ``opt`` for ``steps`` steps; ``grads_at(i)`` gives step i's gradient tree."""
    state = opt.init(params)
    history = []
    for i in range(start, start + steps):
        updates, state = opt.update(grads_at(i), state, params, i)
        params = apply_updates(params, updates)
        history.append(params)
    return params, state, history


def three_leaf_params():
    return {"a": mx.zeros((3,)), "b": mx.zeros((2, 2)), "c": mx.zeros((4,))}


TIERS3 = {"a": 0, "b": 1, "c": 2}


def test_schedule_10_steps_updates_10_5_2_times_through_the_params():
    params = three_leaf_params()
    ones = tree_map(mx.ones_like, params)
    opt = nested(sgd(1.0), TIERS3, (1, 2, 4))
    final, state, _ = run(opt, params, lambda i: ones, 10)
    # constant gradient 1, chunk mean 1, lr 1: each update moves every entry by exactly -1
    assert np.array_equal(np.array(final["a"]), np.full((3,), -10.0))
    assert np.array_equal(np.array(final["b"]), np.full((2, 2), -5.0))
    assert np.array_equal(np.array(final["c"]), np.full((4,), -2.0))
    assert [s.updates for s in tier_stats(state)] == [10, 5, 2]
    assert tier_stats(state) == [
        TierStats(0, 1, 1, 3, 10),
        TierStats(1, 2, 1, 4, 5),
        TierStats(2, 4, 1, 4, 2),
    ]
    assert opt.period == 4


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_cms_rule_frequency_4_under_sgd_matches_hand_reference(reduce):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((5, 3)).astype(np.float32)
    fast0 = rng.standard_normal((2,)).astype(np.float32)
    gs = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(8)]
    lr = 0.1
    params = {"fast": mx.array(fast0), "slow": mx.array(p0)}
    opt = nested(sgd(lr), {"fast": 0, "slow": 1}, (1, 4), reduce=reduce)
    grads_at = lambda i: {"fast": mx.ones((2,)), "slow": mx.array(gs[i])}  # noqa: E731
    _, _, hist = run(opt, params, grads_at, 8)
    for i in range(3):  # steps 0, 1, 2: not moved at all, bit for bit
        assert np.array_equal(np.array(hist[i]["slow"]).view(np.uint32), p0.view(np.uint32))
    chunk = ((np.zeros_like(p0) + gs[0]) + gs[1] + gs[2]) + gs[3]
    if reduce == "mean":
        chunk = chunk / np.float32(4)
    expected = p0 + np.float32(-lr) * chunk
    np.testing.assert_allclose(np.array(hist[3]["slow"]), expected, rtol=0, atol=1e-6)
    # the next chunk starts from a reset accumulator: only gradients 4..7 count
    for i in range(4, 7):
        assert np.array_equal(np.array(hist[i]["slow"]), np.array(hist[3]["slow"]))
    chunk2 = ((np.zeros_like(p0) + gs[4]) + gs[5] + gs[6]) + gs[7]
    if reduce == "mean":
        chunk2 = chunk2 / np.float32(4)
    np.testing.assert_allclose(
        np.array(hist[7]["slow"]), expected + np.float32(-lr) * chunk2, rtol=0, atol=1e-6
    )
    # the fast tier moved every step
    np.testing.assert_allclose(np.array(hist[7]["fast"]), fast0 - 8 * lr, atol=1e-6)


def test_inactive_leaves_come_back_bit_identical_including_signed_zero_and_nan():
    special = mx.array([-0.0, 0.0, float("nan"), float("inf"), -1e-38, 3.5])
    params = {"fast": mx.ones((2,)), "slow": special, "half": mx.array([-0.0, 2.0], mx.bfloat16)}
    grads = tree_map(lambda p: mx.ones(p.shape, p.dtype), params)
    opt = nested(sgd(0.5), {"fast": 0, "slow": 1, "half": 1}, (1, 3))
    state = opt.init(params)
    p = params
    for i in range(2):
        updates, state = opt.update(grads, state, p, i)
        new = apply_updates(p, updates)
        for key in ("slow", "half"):
            a, b = np.array(new[key].astype(mx.float32)), np.array(p[key].astype(mx.float32))
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), key
            assert new[key].dtype == p[key].dtype
        p = new
    assert not np.array_equal(np.array(p["fast"]), np.ones((2,)))


def test_per_tier_adam_state_advances_only_on_its_steps_and_counts_its_updates():
    rng = np.random.default_rng(1)
    shapes = {"a": (3,), "b": (2, 3)}
    x0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    gs = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(9)
    ]
    lr = 0.01
    opt = nested(adam(lr), {"a": 0, "b": 1}, (1, 3))
    params = {k: mx.array(v) for k, v in x0.items()}
    state = opt.init(params)
    ref = {k: [x0[k], np.zeros(shapes[k], np.float32), np.zeros(shapes[k], np.float32)] for k in x0}
    acc = np.zeros(shapes["b"], np.float32)
    for i in range(9):
        before_b = state.inner[1]
        updates, state = opt.update({k: mx.array(v) for k, v in gs[i].items()}, state, params, i)
        params = apply_updates(params, updates)
        ref["a"] = list(np_adam_step(*ref["a"], gs[i]["a"], i, lr))
        acc = acc + gs[i]["b"]
        if (i + 1) % 3 == 0:
            ref["b"] = list(np_adam_step(*ref["b"], acc / 3, (i + 1) // 3 - 1, lr))
            acc = np.zeros_like(acc)
        else:  # tier 1's inner state is the very same object: it did not advance
            assert state.inner[1] is before_b
        for k in x0:
            np.testing.assert_allclose(np.array(params[k]), ref[k][0], rtol=1e-5, atol=1e-6)
    assert [s.updates for s in tier_stats(state)] == [9, 3]


def test_one_inner_per_tier_and_function_tiers_by_path():
    params = {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((2,))}], "head": mx.ones((3,))}
    opt = nested(
        [sgd(1.0), sgd(10.0)],
        lambda path, leaf: 0 if path.startswith("layers.0") else 1,
        (1, 2),
        reduce="sum",
    )
    grads = tree_map(mx.ones_like, params)
    final, state, _ = run(opt, params, lambda i: grads, 2)
    np.testing.assert_array_equal(np.array(final["layers"][0]["w"]), [-1.0, -1.0])
    # tier 1 (lr 10, sum of 2 grads of 1) moved once by -20
    np.testing.assert_array_equal(np.array(final["layers"][1]["w"]), [-19.0, -19.0])
    np.testing.assert_array_equal(np.array(final["head"]), [-19.0] * 3)
    assert [(s.arrays, s.parameters) for s in tier_stats(state)] == [(1, 2), (2, 5)]


def test_pure_inputs_untouched_and_state_is_all_arrays():
    params = three_leaf_params()
    grads = tree_map(lambda p: mx.ones_like(p) * 2, params)
    opt = nested(adam(0.1), TIERS3, (1, 2, 4))
    state = opt.init(params)
    snap = [np.array(x) for x in flatten((params, grads, state))[0]]
    opt.update(grads, state, params, 0)
    assert all(
        np.array_equal(a, np.array(b)) for a, b in zip(snap, flatten((params, grads, state))[0])
    )
    assert all(isinstance(x, mx.array) for x in flatten(state)[0])
    assert isinstance(state, NestedState)


def _bits(x: mx.array) -> np.ndarray:
    """The raw bits of ``x`` (float32/bfloat16/float16), for bit-identity checks."""
    width = {mx.float32: mx.uint32, mx.bfloat16: mx.uint16, mx.float16: mx.uint16}[x.dtype]
    return np.array(x.view(width))


def _active_sets(freqs, period):
    return {frozenset(k for k, f in enumerate(freqs) if (s + 1) % f == 0) for s in range(period)}


@pytest.mark.parametrize(
    "freqs,steps,graphs",
    [((1, 2, 4), 8, 3), ((1, 3, 4), 24, 4), ((2, 3), 12, 4), ((1, 1, 5), 10, 2)],
)
def test_compile_step_one_graph_per_active_set_equal_to_eager_every_step(freqs, steps, graphs):
    """compile_step caches by ``opt.phase(step)``: one graph per distinct set of active tiers
    (3 for (1, 2, 4) where ``step % period`` has 4 values; 4 for (1, 3, 4) against 12), each
    reused at later steps of its set, and every step equals eager ``apply_gradients``: a graph
    traced at one step gives the right result at every step that shares it.  Inactive leaves
    (before a slow tier's first update: signed zeros, NaN, a subnormal) come back bit-identical
    from the compiled graph."""
    from nestedfn.fast.compile import compile_step
    from nestedfn.optim.core import TrainState, apply_gradients

    rng = np.random.default_rng(2)
    names = "abc"[: len(freqs)]
    special = mx.array([-0.0, 0.0, float("nan"), -1e-38])
    params = {
        k: mx.concatenate([mx.array(rng.standard_normal((3,)).astype(np.float32)), special])
        for k in names
    }
    opt = nested(adam(0.1), {k: i for i, k in enumerate(names)}, freqs)
    period = math.lcm(*freqs)
    assert opt.period == period and steps % period == 0 and steps >= 2 * period
    assert len({opt.phase(s) for s in range(period)}) == graphs == len(_active_sets(freqs, period))
    assert all(opt.phase(s) == opt.phase(s + period) for s in range(period))
    gs = [
        tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)), params)
        for _ in range(steps)
    ]
    step_fn = compile_step(opt)
    eager = compiled = TrainState(params, opt.init(params), 0)
    for i in range(steps):
        before = compiled.params
        eager = apply_gradients(opt, eager, gs[i])
        compiled = step_fn(compiled, gs[i])
        for k, f in zip(names, freqs):
            # Adam's b**t is float32 with an array step, float64 with a Python int step: a
            # few ulps a step (a graph shared wrongly would be off by a whole update, ~0.1)
            np.testing.assert_allclose(
                np.array(compiled.params[k]), np.array(eager.params[k]), rtol=1e-5, atol=1e-5
            )
            same = np.array_equal(_bits(compiled.params[k]), _bits(before[k]))
            assert same == ((i + 1) % f != 0), (i, k)
        for x, y in zip(flatten(compiled.opt_state)[0], flatten(eager.opt_state)[0]):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-6)
        if i == period - 1:
            assert step_fn.graphs_built == graphs  # all built within the first period
    assert step_fn.graphs_built == graphs  # ... and only reused after it
    assert [t.updates for t in tier_stats(compiled.opt_state)] == [steps // f for f in freqs]


def test_inactive_leaves_pass_through_as_the_same_arrays_eager():
    """An inactive tier's update is ``core.no_update``: ``apply_updates`` hands back the very
    parameter array (nothing computed), while the update itself still reads ``-0.0`` for any
    code that adds it by hand; a learning-rate schedule (``nested_adam``) keeps the mark."""
    from nestedfn.optim.core import is_no_update
    from nestedfn.tiered import nested_adam

    params = {"a": mx.ones((2,)), "b": mx.array([-0.0, float("nan")]), "c": mx.ones((3,))}
    grads = tree_map(mx.ones_like, params)
    opt = nested(sgd(0.5), TIERS3, (1, 2, 4))
    updates, _ = opt.update(grads, opt.init(params), params, 0)
    assert not is_no_update(updates["a"])
    assert is_no_update(updates["b"]) and is_no_update(updates["c"])
    new = apply_updates(params, updates)
    assert new["b"] is params["b"] and new["c"] is params["c"]
    by_hand = np.array(params["b"] + updates["b"])  # -0.0 stays -0.0, NaN stays NaN (a GPU
    assert np.signbit(by_hand[0]) and by_hand[0] == 0.0 and np.isnan(by_hand[1])  # may change
    # the NaN's payload, so bits are compared only where apply_updates passes through)
    sched = nested_adam(lambda step: 0.1 / (1 + step), (1, 2, 4), tiers=TIERS3)
    updates, _ = sched.update(grads, sched.init(params), params, 0)
    new = apply_updates(params, updates)
    assert new["b"] is params["b"] and new["c"] is params["c"]
    assert not np.array_equal(np.array(new["a"]), np.array(params["a"]))


@st.composite
def tiered_problems(draw):
    """A random tree (dict/list/tuple/NamedTuple/None nodes, awkward keys included), a tier
    map with every tier non-empty, random frequencies, reduce and per-tier learning rates."""
    params = draw(
        nfs.trees(nfs.mlx_arrays(max_dims=2, max_side=3), max_leaves=8).filter(
            lambda t: len(flatten(t)[0]) >= 1
        )
    )
    n_leaves = len(flatten(params)[0])
    n_tiers = draw(st.integers(1, min(3, n_leaves)))
    freqs = tuple(draw(st.lists(st.integers(1, 4), min_size=n_tiers, max_size=n_tiers)))
    rest = draw(
        st.lists(st.integers(0, n_tiers - 1), min_size=n_leaves - n_tiers, max_size=n_leaves)
    )
    labels = draw(st.permutations(list(range(n_tiers)) + rest[: n_leaves - n_tiers]))
    lrs = draw(st.lists(st.sampled_from([0.5, 0.25, 2.0]), min_size=n_tiers, max_size=n_tiers))
    seed = draw(st.integers(0, 2**31 - 1))
    reduce = draw(st.sampled_from(["mean", "sum"]))
    return params, freqs, labels, lrs, seed, reduce


@given(tiered_problems())
def test_property_matches_numpy_reference_over_two_periods(problem):
    params, freqs, labels, lrs, seed, reduce = problem
    rng = np.random.default_rng(seed)
    x0, td = flatten(params)
    x = [np.array(v) for v in x0]
    period = math.lcm(*freqs)
    steps = 2 * period
    gs = [[rng.standard_normal(v.shape).astype(np.float32) for v in x] for _ in range(steps)]

    opt = nested([sgd(lr) for lr in lrs], unflatten(td, labels), freqs, reduce=reduce)
    grads_at = lambda i: unflatten(td, [mx.array(g) for g in gs[i]])  # noqa: E731
    final, state, _ = run(opt, params, grads_at, steps)

    # reference: plain numpy CMS loop
    acc = [np.zeros_like(v) for v in x]
    for i in range(steps):
        for j, k in enumerate(labels):
            acc[j] = acc[j] + gs[i][j]
            if (i + 1) % freqs[k] == 0:
                chunk = acc[j] / np.float32(freqs[k]) if reduce == "mean" else acc[j]
                x[j] = x[j] + np.float32(-lrs[k]) * chunk
                acc[j] = np.zeros_like(acc[j])
    got, final_td = flatten(final)
    assert final_td == td
    for j in range(len(x)):
        np.testing.assert_allclose(np.array(got[j]), x[j], rtol=1e-5, atol=1e-5)
    assert [s.updates for s in tier_stats(state)] == [steps // f for f in freqs]
    assert [s.arrays for s in tier_stats(state)] == [labels.count(k) for k in range(len(freqs))]
    assert opt.period == period


def test_error_empty_tier():
    with pytest.raises(ValueError, match=r"tier 2 \(frequency 4\) has no leaves"):
        nested(sgd(1.0), {"a": 0, "b": 1, "c": 1}, (1, 2, 4)).init(three_leaf_params())


def test_error_leaf_without_tier():
    opt = nested(sgd(1.0), lambda path, leaf: None if path == "b" else 0, (1,))
    with pytest.raises(ValueError, match=r"leaf 'b' has no tier"):
        opt.init(three_leaf_params())
    with pytest.raises(ValueError, match=r"leaf 'c' has tier 3, out of range"):
        nested(sgd(1.0), {"a": 0, "b": 1, "c": 3}, (1, 2, 4)).init(three_leaf_params())
    with pytest.raises(ValueError, match=r"leaf 'a' has no tier"):
        nested(sgd(1.0), {"a": True, "b": 1, "c": 0}, (1, 2)).init(three_leaf_params())


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_error_bad_frequency(bad):
    with pytest.raises(ValueError, match="is not a positive int"):
        nested(sgd(1.0), TIERS3, (1, bad, 4))


def test_error_labels_shaped_unlike_params():
    with pytest.raises(
        TreeMismatchError, match=r"tiers tree is shaped unlike params(.|\n)*c: missing in tiers"
    ):
        nested(sgd(1.0), {"a": 0, "b": 1}, (1, 2)).init(three_leaf_params())
    with pytest.raises(TreeMismatchError, match="shaped unlike params"):
        nested(sgd(1.0), {"a": 0, "b": None, "c": 1}, (1, 2)).init(three_leaf_params())


def test_error_wrong_inner_count_reduce_and_grads():
    with pytest.raises(ValueError, match="one Optimizer or 3"):
        nested([sgd(1.0), sgd(1.0)], TIERS3, (1, 2, 4))
    with pytest.raises(ValueError, match="reduce must be"):
        nested(sgd(1.0), TIERS3, (1, 2, 4), reduce="max")
    opt = nested(sgd(1.0), TIERS3, (1, 2, 4))
    params = three_leaf_params()
    with pytest.raises(TreeMismatchError, match="grads shaped unlike params"):
        opt.update({"a": mx.ones((3,))}, opt.init(params), params, 0)
    with pytest.raises(ValueError, match="no NestedState"):
        tier_stats(((), ()))


def test_tier_stats_finds_state_inside_a_chain_state():
    params = three_leaf_params()
    state = nested(sgd(1.0), TIERS3, (1, 2, 4)).init(params)
    assert tier_stats(((), state)) == tier_stats(state)


def test_tier_rules_are_checked_when_nested_meets_the_params():
    from nestedfn.tiered.tiers import by_pattern, manual
    from nestedfn.tree import PathError

    params = three_leaf_params()
    opt = nested(sgd(1.0), manual({"a": 0, "b": 1}, default=2), (1, 2, 4))
    assert [s.arrays for s in tier_stats(opt.init(params))] == [1, 1, 1]
    with pytest.raises(PathError, match="unknown path 'd'"):
        nested(sgd(1.0), manual({"d": 0}, default=1), (1, 2)).init(params)
    with pytest.raises(ValueError, match="pattern 'z' matches no parameter path"):
        nested(sgd(1.0), by_pattern({"z": 0}, default=1), (1, 2)).init(params)


def np_newton_schulz(g, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.astype(np.float64)
    tr = x.shape[0] > x.shape[1]
    x = x.T if tr else x
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tr else x


def depth_params(rng):
    shapes = {"embed": (5,), "l0": (3, 2), "l1": (4,), "l2": (2, 2)}
    x = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return shapes, x


def as_tree(d):
    return {
        "model": {
            "embed": mx.array(d["embed"]),
            "layers": [
                {"w": mx.array(d["l0"])},
                {"w": mx.array(d["l1"])},
                {"w": mx.array(d["l2"])},
            ],
        }
    }


def from_tree(t):
    m = t["model"]
    return {"embed": m["embed"], **{f"l{i}": m["layers"][i]["w"] for i in range(3)}}


@pytest.mark.parametrize("variant", ["constant", "weight_decay", "schedule"])
def test_nested_adam_matches_numpy_reference(variant):
    from nestedfn.tiered import nested_adam

    rng = np.random.default_rng(5)
    shapes, x = depth_params(rng)
    tier = {"embed": 0, "l0": 0, "l1": 1, "l2": 2}  # by_depth: layer i -> tier i, outside -> 0
    freqs = (1, 2, 4)
    wd = 0.1 if variant == "weight_decay" else 0.0
    sched = lambda s: 0.01 * (s + 1) / 8  # noqa: E731
    lr_arg = sched if variant == "schedule" else 0.01
    opt = nested_adam(lr_arg, frequencies=freqs, weight_decay=wd)
    params = as_tree(x)
    state = opt.init(params)
    m = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    v = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    acc = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    ref = {k: a.astype(np.float64) for k, a in x.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(8):
        g = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        updates, state = opt.update(as_tree(g), state, params, step)
        params = apply_updates(params, updates)
        for k in shapes:
            f = freqs[tier[k]]
            acc[k] = acc[k] + g[k]
            if (step + 1) % f:
                continue
            t = (step + 1) // f  # tier's own update count, 1-based
            chunk, acc[k] = acc[k] / f, np.zeros(shapes[k])
            m[k] = b1 * m[k] + (1 - b1) * chunk
            v[k] = b2 * v[k] + (1 - b2) * chunk * chunk
            lr = sched(step) if variant == "schedule" else 0.01
            direction = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            ref[k] = ref[k] - lr * (direction + wd * ref[k])
        got = from_tree(params)
        for k in shapes:
            np.testing.assert_allclose(np.array(got[k]), ref[k], rtol=1e-5, atol=1e-6)
    assert [s.updates for s in tier_stats(state)] == [8, 4, 2]
    assert [s.arrays for s in tier_stats(state)] == [2, 1, 1]


def test_nested_adam_tiers_errors_and_explicit_spec():
    from nestedfn.tiered import nested_adam

    params = {"layers": [{"w": mx.zeros(2)}, {"w": mx.zeros(2)}]}
    with pytest.raises(ValueError, match="3 tiers need at least 3 distinct layer indices"):
        nested_adam(0.1).init(params)
    with pytest.raises(ValueError, match="tiers must be 'depth'"):
        nested_adam(0.1, tiers="width")
    state = nested_adam(0.1, frequencies=(1, 3), tiers={"layers": [{"w": 1}, {"w": 0}]}).init(
        params
    )
    assert nested_adam(0.1, frequencies=(1, 3)).period == 3
    assert [s.frequency for s in tier_stats(state)] == [1, 3]


def test_nested_depth_string_splits_by_layers_at_init():
    params = {"embed": mx.zeros(3), "layers": [{"w": mx.zeros(2)} for _ in range(4)]}
    opt = nested(sgd(1.0), "depth", (1, 2))
    # layers 0, 1 and the embedding -> tier 0; layers 2, 3 -> tier 1
    assert [(s.arrays, s.parameters) for s in tier_stats(opt.init(params))] == [(3, 7), (2, 4)]
    with pytest.raises(ValueError, match="nested: tiers must be 'depth' or a tier spec"):
        nested(sgd(1.0), "width", (1, 2))


def test_nested_adam_bfloat16_params_keep_dtype_and_float32_state():
    from nestedfn.tiered import nested_adam

    rng = np.random.default_rng(6)
    params = {
        "layers": [{"w": mx.array(rng.standard_normal((3, 2)), mx.bfloat16)} for _ in range(3)]
    }
    opt = nested_adam(1e-2, state_dtype=mx.float32)
    state = opt.init(params)
    dtypes0 = [x.dtype for x in flatten(state)[0]]
    assert mx.float32 in dtypes0 and mx.bfloat16 not in dtypes0  # moments and accumulators
    for step in range(3):
        g = tree_map(lambda p: mx.array(rng.standard_normal(p.shape), mx.bfloat16), params)
        updates, state = opt.update(g, state, params, step)
        new = apply_updates(params, updates)
        assert all(x.dtype == mx.bfloat16 for x in flatten(new)[0])
        assert [x.dtype for x in flatten(state)[0]] == dtypes0
        # layer 2 (frequency 4) has not updated yet: bit-identical
        assert np.array_equal(
            np.array(new["layers"][2]["w"].view(mx.uint16)),
            np.array(params["layers"][2]["w"].view(mx.uint16)),
        )
        params = new


def test_inner_with_its_own_period_runs_on_the_tier_clock_eager_and_compiled():
    """An inner optimizer that branches on the step (multiscale_momentum, slow_every=2) sees
    its tier's update count, also inside compile_step (tracing_step gives it step // f).
    With frequency 2 the global step would make every update of the slow tier a slow-memory
    update; the tier clock makes every other one."""
    from nestedfn.fast.compile import compile_step
    from nestedfn.optim.core import TrainState
    from nestedfn.tiered import multiscale_momentum

    rng = np.random.default_rng(7)
    inner = multiscale_momentum(0.05, slow_every=2, alpha=1.0, ns_steps=3)
    params = {"fast": mx.array(rng.standard_normal((3, 2)).astype(np.float32))}
    params["slow"] = mx.array(rng.standard_normal((2, 3)).astype(np.float32))
    opt = nested(inner, {"fast": 0, "slow": 1}, (1, 2))
    assert opt.period == math.lcm(1 * 2, 2 * 2)
    gs = [
        tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)), params)
        for _ in range(12)
    ]
    eager, _, _ = run(opt, params, lambda i: gs[i], 12)

    # reference: the same inner run alone on the slow tier's chunk means, with its own clock
    ref_p, ref_s = {"slow": params["slow"]}, inner.init({"slow": params["slow"]})
    for n in range(6):
        chunk = (gs[2 * n]["slow"] + gs[2 * n + 1]["slow"]) / 2
        u, ref_s = inner.update({"slow": chunk}, ref_s, ref_p, n)
        ref_p = apply_updates(ref_p, u)
    np.testing.assert_allclose(np.array(eager["slow"]), np.array(ref_p["slow"]), rtol=1e-5)

    step = compile_step(opt)
    state = TrainState(params, opt.init(params), 0)
    for i in range(12):
        state = step(state, gs[i])
    # phases: tier 0's inner is slow on odd steps; tier 1 is active on odd steps, slow on
    # every other one of them -> (F, -), (T, F), (F, -), (T, T): 3 graphs for period 4
    assert [opt.phase(i) for i in range(4)] == [
        ((False,), None),
        ((True,), (False,)),
        ((False,), None),
        ((True,), (True,)),
    ]
    assert step.graphs_built == 3
    for k in ("fast", "slow"):
        np.testing.assert_allclose(np.array(state.params[k]), np.array(eager[k]), rtol=1e-5)


def _compiled_equals_eager_every_step(opt, params, gs, rtol=1e-5, atol=1e-6):
    """Run ``compile_step(opt)`` and eager ``apply_gradients`` side by side over ``gs``,
    comparing params and opt_state after every step; returns the compiled step function."""
    from nestedfn.fast.compile import compile_step
    from nestedfn.optim.core import TrainState, apply_gradients

    step_fn = compile_step(opt)
    eager = compiled = TrainState(params, opt.init(params), 0)
    for i, g in enumerate(gs):
        eager = apply_gradients(opt, eager, g)
        compiled = step_fn(compiled, g)
        got, td = flatten((compiled.params, compiled.opt_state))
        want, td2 = flatten((eager.params, eager.opt_state))
        assert td == td2
        for path, x, y in zip(td.paths(), got, want):
            np.testing.assert_allclose(
                np.array(x), np.array(y), rtol=rtol, atol=atol, err_msg=f"step {i} {path}"
            )
    return step_fn


def _period_two(lr: float) -> Optimizer:
    """A test-local period-2 SGD with the default phase key (``step % 2``): ``-lr g`` on even
    steps of its clock, ``-10 lr g`` on odd ones, decided by branching on the static step."""

    def update(g, s, p, step):
        f = -lr if static_step(step) % 2 == 0 else -10 * lr
        return tree_map(lambda x: f * x, g), s

    return Optimizer(lambda p: (), update, period=2)


def _two_tier_problem(seed: int, steps: int):
    rng = np.random.default_rng(seed)
    params = {"fast": mx.array(rng.standard_normal((3, 2)).astype(np.float32))}
    params["slow"] = mx.array(rng.standard_normal((2, 3)).astype(np.float32))
    gs = [
        tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)), params)
        for _ in range(steps)
    ]
    return params, gs


@pytest.mark.parametrize("every_inner", [False, True])
def test_inner_with_its_own_default_phase_key_is_told_apart_on_the_tier_clock(every_inner):
    """A period-2 inner with the default key (``step % 2``): the nested key must separate its
    phases at the tier clock (keying on the active tiers alone would share one graph between
    the slow tier's x1 and x10 updates and give wrong params).  With ``accumulate`` inside a
    tier, its ``None`` (accumulating) phase is shared."""
    from nestedfn.optim.combinators import accumulate

    params, gs = _two_tier_problem(9, 16)
    inner = accumulate(sgd(0.1), 2) if every_inner else _period_two(0.1)
    opt = nested(inner, {"fast": 0, "slow": 1}, (1, 2))
    assert opt.period == 4
    # steps 1 and 3 both have both tiers active, but the slow tier's inner is at phase 0 then
    # 1 of its own clock: _period_two (0,-), (1,0), (0,-), (1,1); accumulate (acc,-),
    # (upd,acc), (acc,-), (upd,upd): 3 graphs either way, not the 2 active sets
    assert opt.phase(1) != opt.phase(3) and opt.phase(0) == opt.phase(2)
    step_fn = _compiled_equals_eager_every_step(opt, params, gs)
    assert step_fn.graphs_built == 3
    if not every_inner:  # the slow tier alternates x1 and x10 of its chunk mean
        x = np.array(params["slow"])
        for n in range(8):
            chunk = (np.array(gs[2 * n]["slow"]) + np.array(gs[2 * n + 1]["slow"])) / 2
            x = x - (0.1 if n % 2 == 0 else 1.0) * chunk
        eager, _, _ = run(opt, params, lambda i: gs[i], 16)
        np.testing.assert_allclose(np.array(eager["slow"]), x, rtol=1e-5, atol=1e-5)
