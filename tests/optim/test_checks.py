"""Gradients shaped unlike the params are refused by every step (eager, compiled, packed),
naming the path and both shapes, instead of broadcasting into the params."""

from __future__ import annotations

import mlx.core as mx
import pytest

import nestedfn as nf
from nestedfn.optim import checks, schedules
from nestedfn.tree import TreeMismatchError

STEPS = {
    "eager": lambda opt: lambda s, g: nf.apply_gradients(opt, s, g),
    "compiled": lambda opt: nf.compile_step(opt),
    "shapeless": lambda opt: nf.compile_step(opt, shapeless=True),
    "packed": lambda opt: nf.compile_step(opt, packed=True),
}


@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("shape", [(3, 4), (4,), (1, 1), (4, 1)])
def test_grads_of_another_shape_are_refused(kind, shape):
    opt = nf.adam(1e-2)
    state = nf.init(opt, {"w": mx.zeros((1, 4)), "b": mx.zeros((2,))})
    grads = {"w": mx.ones(shape), "b": mx.ones((2,))}
    with pytest.raises(TreeMismatchError) as e:
        STEPS[kind](opt)(state, grads)
    assert e.value.problems[0][0] == "w"
    assert str(shape) in str(e.value) and "(1, 4)" in str(e.value)


@pytest.mark.parametrize("kind", list(STEPS))
def test_grads_of_another_structure_are_refused(kind):
    opt = nf.sgd(1e-2)
    state = nf.init(opt, {"w": mx.zeros((2,)), "b": mx.zeros((2,))})
    with pytest.raises(TreeMismatchError) as e:
        STEPS[kind](opt)(state, {"w": mx.ones((2,)), "c": mx.ones((2,))})
    paths = {p for p, _ in e.value.problems}
    assert {"b", "c"} <= paths


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_other_dtypes_are_allowed_and_params_keep_theirs(kind):
    opt = nf.sgd(0.5)
    state = nf.init(opt, {"w": mx.zeros((3,), dtype=mx.float32)})
    new = STEPS[kind](opt)(state, {"w": mx.ones((3,), dtype=mx.bfloat16)})
    assert new.params["w"].dtype == mx.float32
    assert new.params["w"].tolist() == [-0.5, -0.5, -0.5]


def test_a_signature_is_compared_once():
    p = {"w": mx.zeros((5, 7))}
    g = {"w": mx.ones((5, 7))}
    calls = []
    real = checks.grads_problems
    checks.grads_problems = lambda *a: calls.append(1) or real(*a)
    try:
        for _ in range(3):
            checks.check_grads(p, g)
    finally:
        checks.grads_problems = real
    assert len(calls) <= 1  # zero if another test saw this signature first


def test_the_compiled_step_checks_only_when_it_builds_a_graph(monkeypatch):
    import nestedfn.fast.compile as compile_mod

    calls = []
    monkeypatch.setattr(compile_mod, "check_grads", lambda *a: calls.append(1))
    opt = nf.sgd(1e-2)
    step = nf.compile_step(opt)
    state = nf.init(opt, {"w": mx.zeros((2,))})
    for _ in range(4):
        state = step(state, {"w": mx.ones((2,))})
    assert calls == [1] and step.graphs_built == 1


# ---- argument domains, declared where the value is born (issue 23) -----------------------

import math  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nestedfn.optim.hyperparams import inject_hyperparams, set_hyperparams  # noqa: E402

# every constructor's hyperparameters and the domain they must lie in (the expectation,
# written independently of the `declare` decorators)
UNIT_OPEN = lambda v: 0 <= v < 1  # noqa: E731
UNIT = lambda v: 0 <= v <= 1  # noqa: E731
POS = lambda v: v > 0  # noqa: E731
NONNEG = lambda v: v >= 0  # noqa: E731
DOMAINS = {
    "sgd": (nf.sgd, {"learning_rate": NONNEG}),
    "momentum": (nf.momentum, {"learning_rate": NONNEG, "decay": UNIT}),
    "adam": (nf.adam, {"learning_rate": NONNEG, "b1": UNIT_OPEN, "b2": UNIT_OPEN, "eps": POS}),
    "adamw": (
        nf.adamw,
        {
            "learning_rate": NONNEG,
            "b1": UNIT_OPEN,
            "b2": UNIT_OPEN,
            "eps": POS,
            "weight_decay": NONNEG,
        },
    ),
    "lion": (nf.lion, {"learning_rate": NONNEG, "b1": UNIT, "b2": UNIT, "weight_decay": NONNEG}),
    "muon": (nf.muon, {"learning_rate": NONNEG, "beta": UNIT, "weight_decay": NONNEG}),
}
BAD_TYPES = st.one_of(
    st.text(max_size=4), st.booleans(), st.none(), st.lists(st.floats(), max_size=2)
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.sampled_from([0.0, 1.0, -0.0]),
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(DOMAINS)), st.data())
def test_hyperparameters_are_checked_at_construction(name, data):
    """A value in the domain constructs and takes a finite step; outside it, the constructor
    raises naming the argument and the value; never a silent acceptance."""
    make, domains = DOMAINS[name]
    arg = data.draw(st.sampled_from(sorted(domains)))
    value = data.draw(st.one_of(NUMBERS, BAD_TYPES))
    kwargs = {"learning_rate": 1e-2, arg: value}
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # in the domain: finite, representable in float32 (where the step computes) and in range
    in_float32 = number and math.isfinite(value) and abs(value) <= checks.FLOAT32_MAX
    if in_float32 and domains[arg](value):
        opt = make(**kwargs)
        state = nf.init(opt, {"w": mx.ones((2, 3))})
        new = nf.apply_gradients(opt, state, {"w": mx.full((2, 3), 0.5)})
        assert new.params["w"].shape == (2, 3)
        assert bool(mx.all(mx.isfinite(new.params["w"])).item())
        return
    with pytest.raises((TypeError, ValueError)) as e:
        make(**kwargs)
    assert f"{name}: {arg} must be" in str(e.value) and repr(value)[:10] in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "0.1", True])
def test_set_hyperparams_refuses_what_the_constructor_would(value):
    opt = inject_hyperparams(nf.adam)(learning_rate=1e-3)
    state = nf.init(opt, {"w": mx.ones(2)})
    with pytest.raises((TypeError, ValueError), match="set_hyperparams: learning_rate"):
        set_hyperparams(state, learning_rate=value)
    with pytest.raises((TypeError, ValueError), match="adam: b1"):
        inject_hyperparams(nf.adam)(learning_rate=1e-3, b1=1.5 if value != "0.1" else value)


@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize(
    "value,ok",
    [
        (lambda s: mx.array([[0.1], [0.2], [0.3]]), False),
        (lambda s: mx.array([0.1, 0.2]), False),
        (lambda s: mx.array([0.5]), True),  # one element: a scalar
        (lambda s: 0.5, True),
    ],
)
def test_a_schedule_value_must_be_a_scalar(kind, value, ok):
    """A schedule's value never broadcasts into a parameter's shape."""
    opt = nf.sgd(value)
    state = nf.init(opt, {"w": mx.ones((4,))})
    step = STEPS[kind](opt)
    if ok:
        new = step(state, {"w": mx.ones((4,))})
        assert new.params["w"].shape == (4,) and mx.allclose(new.params["w"], mx.full((4,), 0.5))
    else:
        with pytest.raises(TypeError, match="schedule gave an array of shape"):
            step(state, {"w": mx.ones((4,))})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_schedule_value_must_be_finite(bad):
    opt = nf.sgd(lambda s: bad if s >= 1 else 0.1)
    state = nf.init(opt, {"w": mx.ones((4,))})
    state = nf.apply_gradients(opt, state, {"w": mx.ones((4,))})
    with pytest.raises(ValueError, match="learning_rate .*step 1.* must be a finite number"):
        nf.apply_gradients(opt, state, {"w": mx.ones((4,))})


@pytest.mark.parametrize("dtype", [mx.int32, mx.int8, mx.uint8, mx.complex64, mx.bool_])
@pytest.mark.parametrize("make", [nf.sgd, nf.adam, nf.lion, nf.momentum])
def test_non_float_params_are_refused_naming_the_path(make, dtype):
    params = {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((3,), dtype=dtype)}]}
    with pytest.raises(TypeError, match=r"parameter layers\.1\.w is"):
        nf.init(make(1e-2), params)


def test_from_flat_refuses_a_leaf_shaped_unlike_like():
    from nestedfn.tree import from_flat

    like = {"a": mx.zeros((2,)), "b": {"c": mx.zeros((1, 3))}}
    with pytest.raises(TreeMismatchError, match=r"a: shape \(7, 7\) where `like` has shape \(2,\)"):
        from_flat({"a": mx.zeros((7, 7)), "b.c": mx.zeros((1, 3))}, like=like)
    with pytest.raises(TreeMismatchError, match="b.c"):
        from_flat({"b.c": mx.zeros((3,)), "a": mx.zeros((2,))}, like=like)
    out = from_flat({"a": mx.ones((2,)), "b.c": mx.ones((1, 3))}, like=like)
    assert out["b"]["c"].shape == (1, 3)


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda v: schedules.constant(v), "value"),
        (lambda v: schedules.linear_warmup(v, 10), "peak_value"),
        (lambda v: schedules.cosine_decay(v, 10), "init_value"),
        (lambda v: schedules.exponential_decay(1.0, v), "decay_rate"),
        (lambda v: schedules.warmup_cosine(1.0, 2, 10, end_value=v), "end_value"),
        (lambda v: nf.multiscale_momentum(1e-3, b3=v), "b3"),
        (lambda v: nf.multiscale_momentum(v), "learning_rate"),
        (lambda v: nf.optim.transforms.scale(v), "factor"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1", None])
def test_schedules_and_other_constructors_check_their_values(make, arg, bad):
    if arg == "decay_rate" or arg == "b3" or arg == "learning_rate":
        bad = bad if bad is not None else -1.0  # negative: outside [0, ...)
    with pytest.raises((TypeError, ValueError), match=f"{arg} must be"):
        make(bad)


@pytest.mark.parametrize("kind", ["eager", "compiled", "shapeless"])
@pytest.mark.parametrize("make", [nf.sgd, nf.adam, nf.lion, nf.momentum])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_complex_grads_on_real_params_are_refused_naming_the_path(kind, make, dtype):
    """A complex gradient would lose its imaginary part in the cast back to the parameter's
    dtype; it is refused (after a real step with the same trees, so no cache lets it by)."""
    opt = make(1e-2)
    params = {"layers": [{"w": mx.ones((2,), dtype=dtype)}, {"w": mx.ones((3,), dtype=dtype)}]}
    state = nf.init(opt, params)
    step = STEPS[kind](opt)
    real = {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((3,))}]}
    step(state, real)
    cplx = {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((3,), dtype=mx.complex64) * 1j}]}
    before = [mx.array(w["w"]) for w in state.params["layers"]]
    with pytest.raises(TypeError, match=r"gradient of layers\.1\.w is .*complex64") as e:
        step(state, cplx)
    assert str(dtype) in str(e.value)
    for b, w in zip(before, state.params["layers"]):
        assert w["w"].dtype == dtype and mx.array_equal(w["w"], b)


@pytest.mark.parametrize("kind", ["eager", "compiled"])
@pytest.mark.parametrize("shape", [(3, 4), (1, 4), (4, 1), (1,), ()])
def test_an_update_shaped_unlike_its_param_is_refused_naming_the_path(kind, shape):
    """A transform's update never broadcasts into a new parameter shape (nor is one of
    another shape accepted): ``apply_updates`` compares shapes, eagerly and at trace time."""

    def update(grads, state, params, step):
        bad = mx.full(shape, -0.1)
        return {"layers": [{"w": -0.1 * grads["layers"][0]["w"]}, {"w": bad}]}, state

    opt = nf.Optimizer(lambda params: (), update)
    params = {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((4,))}]}
    state = nf.init(opt, params)
    grads = {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((4,))}]}
    with pytest.raises(TreeMismatchError) as e:
        STEPS[kind](opt)(state, grads)
    assert [p for p, _ in e.value.problems] == ["layers.1.w"]
    assert f"update shape {shape} vs param shape (4,)" in str(e.value)
    assert state.params["layers"][1]["w"].shape == (4,)


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_an_update_shaped_like_its_param_is_applied(kind):
    """The same custom transform with the right shape: ``params + updates`` exactly."""

    def update(grads, state, params, step):
        return nf.tree_map(lambda g: -0.5 * g, grads), state

    opt = nf.Optimizer(lambda params: (), update)
    state = nf.init(opt, {"w": mx.ones((2, 3))})
    new = STEPS[kind](opt)(state, {"w": mx.full((2, 3), 2.0)})
    assert new.params["w"].shape == (2, 3) and new.params["w"].tolist() == [[0.0] * 3] * 2
