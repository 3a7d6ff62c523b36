"""resident_step: the step over packed params equals value_and_grad + apply_gradients on the
tree, every step; its states convert to and from the tree layout; misfits fail loudly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nestedfn.fast.compile import compile_step
from nestedfn.fast.packing import NotPackableError
from nestedfn.fast.resident import ResidentState, resident_step
from nestedfn.optim.core import Optimizer, TrainState, apply_gradients, chain, init
from nestedfn.optim.optimizers import adam, adamw, lion, momentum, sgd
from nestedfn.optim.transforms import clip_by_global_norm
from nestedfn.testing import strategies as nfs
from nestedfn.tiered import nested, nested_adam, tier_stats
from nestedfn.tree import TreeMismatchError, flatten, tree_map
from tests.devices import ON_CPU


def _mlp(seed: int, dtype=mx.float32, n: int = 4) -> dict:
    """A tiny mlx-lm-like model: embedding, a ``layers`` list (one layer without
    parameters, as LoRA leaves untouched layers), a norm weight and a 0-d temperature."""
    rng = np.random.default_rng(seed)

    def normal(*shape, s=0.5):
        return mx.array((s * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)

    layers = [{"up": normal(4, 6), "down": normal(6, 4), "bias": normal(4)} for _ in range(n)]
    layers.insert(1, {})
    return {"model": {"embed": normal(7, 4), "layers": layers, "norm": normal(4) + 1.0}}, normal()


def _mlp_loss(params, tokens, targets):
    p, temp = params
    h = p["model"]["embed"][tokens]
    for layer in p["model"]["layers"]:
        if layer:
            h = h + mx.tanh(h @ layer["up"]) @ layer["down"] + layer["bias"]
    h = h * p["model"]["norm"]
    logits = (h @ p["model"]["embed"].T) * (1.0 + temp * temp)
    lse = mx.logsumexp(logits.astype(mx.float32), axis=-1)
    picked = mx.take_along_axis(logits.astype(mx.float32), targets[..., None], axis=-1)[..., 0]
    return mx.mean(lse - picked)


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, 7, (3, 5))), mx.array(rng.integers(0, 7, (3, 5)))


def _reference_step(opt, loss_fn, state: TrainState, *batch):
    """The usual way, eager: value_and_grad on the tree, then apply_gradients."""
    loss, grads = mx.value_and_grad(loss_fn)(state.params, *batch)
    return loss, apply_gradients(opt, state, grads)


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
    """Same structure; arrays of the same dtype within the tolerance (bfloat16: fused
    kernels round intermediates once), other leaves (the step count) equal."""
    la, ta = flatten(a)
    lb, tb = flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if not isinstance(x, mx.array):
            assert x == y
            continue
        assert x.dtype == y.dtype
        if x.dtype in (mx.bfloat16, mx.float16):
            rtol, atol = max(rtol, 2e-2), max(atol, 1e-3)
        x, y = x.astype(mx.float32), y.astype(mx.float32)
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=rtol, atol=atol)


def _upcast(state: TrainState) -> TrainState:
    def up(x):
        return x.astype(mx.float32) if isinstance(x, mx.array) and x.dtype == mx.bfloat16 else x

    return TrainState(tree_map(up, state.params), tree_map(up, state.opt_state), state.step)


def _assert_as_accurate(got: TrainState, want: TrainState, exact: TrainState) -> None:
    """Each bfloat16 leaf of ``got`` about as close to the float32 step ``exact`` as the eager
    bfloat16 step ``want`` is (L2 over the leaf: at most twice as far, plus 2^-8 of its
    norm).  On a GPU two graphs of bfloat16 arithmetic round intermediates differently
    (measured on an H100: 0.015 apart on a leaf of scale 4, both within 4% of float32), so an
    elementwise tolerance fails on small entries while neither graph is less accurate."""
    la, td = flatten(got)
    lb, lx = flatten(want)[0], flatten(exact)[0]
    for path, a, b, x in zip(td.paths(), la, lb, lx):
        if not isinstance(a, mx.array):
            assert a == b
            continue
        x = np.array(x.astype(mx.float32)).ravel()
        far = np.linalg.norm(np.array(a.astype(mx.float32)).ravel() - x)
        eager = np.linalg.norm(np.array(b.astype(mx.float32)).ravel() - x)
        assert far <= 2 * eager + 2.0**-8 * np.linalg.norm(x), path


def _close_for(dtype):
    return (3e-2, 2e-3) if dtype == mx.bfloat16 else (1e-5, 1e-6)


OPTIMIZERS = {
    "adam": lambda: adam(1e-2),
    "adamw": lambda: adamw(1e-2, weight_decay=0.1),
    "sgd": lambda: sgd(0.1),
    "momentum": lambda: momentum(0.05, nesterov=True),
    "lion": lambda: lion(3e-3),
    "clip+adam": lambda: chain(clip_by_global_norm(0.1), adam(1e-2)),
    "nested_adam": lambda: nested_adam(1e-2, (1, 2, 4)),
    "nested sgd/adam": lambda: nested(
        [sgd(0.1), adam(1e-2)], lambda path, x: 0 if "embed" in path else 1, (1, 3)
    ),
}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_step_equals_value_and_grad_plus_apply_gradients(name, dtype, threads=1):
    """From the state the resident step holds, one step of it equals one eager step of the
    usual way (value_and_grad on the tree, apply_gradients): loss, params and the whole
    tree-layout optimizer state, at every step of two nested periods."""
    opt = OPTIMIZERS[name]()
    params = _mlp(0, dtype)
    step_fn = resident_step(opt, _mlp_loss, params, chunk_size=24, threads=threads)
    state = step_fn.init()
    rtol, atol = _close_for(dtype)
    start = step_fn.unpack_state(state)
    _assert_close(start, init(opt, params))  # init is opt.init of the params
    for t in range(8 if opt.period <= 4 else 6):
        batch = _batch(100 + t)
        before = step_fn.unpack_state(state)
        want_loss, want = _reference_step(opt, _mlp_loss, before, *batch)
        loss, state = step_fn(state, *batch)
        assert isinstance(state, ResidentState) and state.step == want.step == t + 1
        got = step_fn.unpack_state(state)
        assert flatten(got)[1] == flatten(want)[1]
        if dtype == mx.bfloat16:
            _, exact = _reference_step(opt, _mlp_loss, _upcast(before), *batch)
            _assert_as_accurate(got, want, exact)
        if dtype != mx.bfloat16 or ON_CPU:  # one graph's rounding on the CPU: elementwise
            _assert_close(loss, want_loss, rtol=rtol, atol=atol)
            _assert_close(got.params, want.params, rtol=rtol, atol=atol)
            _assert_close(got.opt_state, want.opt_state, rtol=rtol, atol=atol)
        for a, b in zip(flatten(got.params)[0], flatten(want.params)[0]):
            assert a.dtype == b.dtype == dtype
    if opt.pack_groups is not None:  # the tier table reads the same through the pack
        assert tier_stats(got.opt_state) == tier_stats(want.opt_state)
    # and the parameters really moved
    assert not np.allclose(
        np.array(got.params[0]["model"]["embed"].astype(mx.float32)),
        np.array(params[0]["model"]["embed"].astype(mx.float32)),
    )
    assert step_fn.graphs_built == len({opt.phase(s) for s in range(8)})


@pytest.mark.parametrize("name", ["clip+adam", "nested_adam", "lion"])
def test_buffers_split_over_three_cpu_streams_give_the_same_steps(name):
    """threads=3: each stream gathers and updates its own buffers inside the one graph (a
    global-norm clip is computed by each); every step still equals the usual way."""
    with mx.stream(mx.cpu):  # CPU streams hold the arithmetic wherever the default device is
        test_every_step_equals_value_and_grad_plus_apply_gradients(name, mx.float32, threads=3)


def _quadratic(params, scale):
    """0.5 * scale * sum(p^2) plus a linear pull, over every leaf: gradients linear in the
    params, so rounding differences do not grow from step to step."""
    total = mx.array(0.0)
    for i, p in enumerate(flatten(params)[0]):
        p = p.astype(mx.float32)
        total = total + 0.5 * scale * mx.sum(p * p) + 0.1 * (i % 3 - 1) * mx.sum(p)
    return total


@pytest.mark.parametrize("name", ["adam", "momentum", "nested_adam"])
def test_trajectory_equals_eager_over_20_steps(name):
    opt = OPTIMIZERS[name]()
    params = _mlp(3)
    step_fn = resident_step(opt, _quadratic, params)
    state, eager = step_fn.init(), init(opt, params)
    for t in range(20):
        scale = mx.array(1.0 + 0.1 * t)
        want_loss, eager = _reference_step(opt, _quadratic, eager, scale)
        loss, state = step_fn(state, scale)
        _assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    # a step's few ulps feed back through the loss (Adam's m / sqrt(v) amplifies them near
    # a minimum), so the 20-step trajectory allows 10x the one-step atol
    _assert_close(step_fn.unpack_state(state), eager, rtol=1e-4, atol=1e-5)


def test_trajectory_equals_the_compiled_usual_way_on_a_nonlinear_loss():
    """On the MLP's loss (where rounding differences grow through the params), the resident
    step follows mx.compile(value_and_grad) + compile_step over 20 steps: same graph math."""
    opt = adam(1e-2)
    params = _mlp(4)
    step_fn = resident_step(opt, _mlp_loss, params)
    grad_fn = mx.compile(mx.value_and_grad(_mlp_loss))
    usual = compile_step(opt)
    state, other = step_fn.init(), init(opt, params)
    for t in range(20):
        batch = _batch(t)
        loss, state = step_fn(state, *batch)
        want_loss, grads = grad_fn(other.params, *batch)
        other = usual(other, grads)
        _assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    _assert_close(step_fn.unpack_state(state), other, rtol=1e-4, atol=1e-5)


def _tree_loss(params, x):
    total = mx.array(0.0)
    for p in flatten(params)[0]:
        p = p.astype(mx.float32)
        total = total + mx.sum(mx.tanh(p) * p) * x + mx.sum(p * p * p) * 0.01
    return total


@settings(max_examples=8)
@given(
    nfs.param_trees(dtypes=(mx.float32, mx.bfloat16)),
    st.sampled_from(["adam", "sgd", "lion", "nested_adam"]),
    st.sampled_from([1, 5, 1 << 20]),
)
def test_random_param_trees_equal_eager_one_step_at_a_time(params, name, chunk):
    leaves = flatten(params)[0]
    assume(leaves)  # a tree without arrays is refused (test_misfits...)
    layers = {i for i, layer in enumerate(params["model"]["layers"]) if layer}
    assume(name != "nested_adam" or len(layers) >= 3)  # by_depth: 3 non-empty tiers
    opt = OPTIMIZERS[name]()
    dtype = leaves[0].dtype
    rtol, atol = _close_for(dtype)
    step_fn = resident_step(opt, _tree_loss, params, chunk_size=chunk)
    state = step_fn.init()
    for t in range(2):
        x = mx.array(0.5 + t)
        want_loss, want = _reference_step(opt, _tree_loss, step_fn.unpack_state(state), x)
        loss, state = step_fn(state, x)
        _assert_close(loss, want_loss, rtol=rtol, atol=atol)
        _assert_close(step_fn.unpack_state(state), want, rtol=rtol, atol=atol)


def test_auxiliary_outputs_come_back_beside_the_loss():
    def loss_with_aux(params, tokens, targets):
        loss = _mlp_loss(params, tokens, targets)
        return loss, {"tokens": mx.array(tokens.size), "double": 2 * loss}

    opt = sgd(0.1)
    params = _mlp(5)
    step_fn = resident_step(opt, loss_with_aux, params)
    (loss, aux), state = step_fn(step_fn.init(), *_batch(0))
    want = _mlp_loss(params, *_batch(0))
    _assert_close(loss, want)
    assert int(aux["tokens"]) == 15
    _assert_close(aux["double"], 2 * want)


def test_pack_and_unpack_state_round_trip_and_resume_from_a_tree_state():
    """unpack_state gives what apply_gradients keeps; pack_state of it is the same state; a
    run that leaves the resident step for eager steps and comes back equals eager all along."""
    opt = nested_adam(1e-2, (1, 2))
    params = _mlp(6)
    step_fn = resident_step(opt, _mlp_loss, params)
    state, eager = step_fn.init(), init(opt, params)
    for t in range(6):
        batch = _batch(40 + t)
        if t == 2:  # a tree-layout state (a checkpoint, or eager steps) comes back in
            state = step_fn.pack_state(step_fn.unpack_state(state))
        if t == 4:  # two eager steps from the unpacked state, then resident again
            tree = step_fn.unpack_state(state)
            _, tree = _reference_step(opt, _mlp_loss, tree, *batch)
            _, eager = _reference_step(opt, _mlp_loss, eager, *batch)
            state = step_fn.pack_state(tree)
            continue
        _, eager = _reference_step(opt, _mlp_loss, eager, *batch)
        _, state = step_fn(state, *batch)
    round_trip = step_fn.pack_state(step_fn.unpack_state(state))
    for a, b in zip(flatten(round_trip)[0], flatten(state)[0]):
        np.testing.assert_array_equal(np.array(a), np.array(b))  # bit for bit
    assert state.step == eager.step == 6
    _assert_close(step_fn.unpack_state(state), eager, rtol=1e-4, atol=1e-5)
    _assert_close(step_fn.params(state), eager.params, rtol=1e-4, atol=1e-5)


def test_inputs_are_not_mutated_and_states_are_immutable():
    params = _mlp(7)
    before = [np.array(x) for x in flatten(params)[0]]
    step_fn = resident_step(adam(1e-2), _mlp_loss, params)
    s0 = step_fn.init()
    s0_bufs = [np.array(b) for b in s0.buffers]
    _, s1 = step_fn(s0, *_batch(0))
    _, s2 = step_fn(s1, *_batch(1))
    for x, y in zip(before, flatten(params)[0]):
        np.testing.assert_array_equal(x, np.array(y))
    for x, y in zip(s0_bufs, s0.buffers):
        np.testing.assert_array_equal(x, np.array(y))
    assert isinstance(s0.buffers, tuple)
    with pytest.raises(AttributeError):
        s0.step = 3  # type: ignore[misc]
    # a view handed out is a copy-on-write view: assigning into it leaves the state alone
    view = step_fn.params(s2)
    kept = np.array(s2.buffers[0])
    view[0]["model"]["embed"][0] = 99.0
    np.testing.assert_array_equal(kept, np.array(s2.buffers[0]))


def test_misfits_are_refused_naming_the_path():
    params = _mlp(8)
    step_fn = resident_step(adam(1e-2), _mlp_loss, params)
    state = step_fn.init()
    other = _mlp(8, n=3)  # one layer fewer
    with pytest.raises(TreeMismatchError, match="layers"):
        step_fn.pack_state(init(adam(1e-2), other))
    wrong = tree_map(lambda x: x, params)
    wrong[0]["model"]["norm"] = mx.ones((5,))
    with pytest.raises(TreeMismatchError, match="model.norm"):
        step_fn.pack_state(TrainState(wrong, adam(1e-2).init(params), 0))
    wrong[0]["model"]["norm"] = mx.ones((4,), dtype=mx.float16)
    with pytest.raises(TreeMismatchError, match="model.norm.*float16"):
        step_fn.pack_state(TrainState(wrong, adam(1e-2).init(params), 0))
    with pytest.raises(TreeMismatchError, match="opt_state"):
        step_fn.pack_state(TrainState(params, sgd(0.1).init(params), 0))
    with pytest.raises(TypeError, match="ResidentState"):
        step_fn(init(adam(1e-2), params), *_batch(0))
    with pytest.raises(TreeMismatchError, match="buffers"):
        step_fn(state._replace(buffers=state.buffers[:-1]), *_batch(0))
    with pytest.raises(TypeError, match=r"batch leaf '1\.k'"):
        step_fn(state, _batch(0)[0], {"k": 3})
    with pytest.raises(NotPackableError, match="model.layers.0.up.*not an mx.array"):
        bad = tree_map(lambda x: x, params)
        bad[0]["model"]["layers"][0]["up"] = np.ones((4, 6), dtype=np.float32)
        resident_step(adam(1e-2), _mlp_loss, bad)
    with pytest.raises(NotPackableError, match="no array leaves"):
        resident_step(adam(1e-2), _mlp_loss, {"model": {"layers": [{}]}})

    def vector_loss(p, tokens, targets):
        return p[0]["model"]["norm"] * 2

    with pytest.raises(ValueError, match="scalar"):
        bad_loss = resident_step(sgd(0.1), vector_loss, params)
        bad_loss(bad_loss.init(), *_batch(0))
    with pytest.raises(TreeMismatchError, match="opt_state was made for another"):
        bad_loss(state, *_batch(0))  # an Adam state for an SGD step


def test_an_optimizer_that_is_not_elementwise_is_refused_by_the_first_step_check():
    def per_leaf_normalise():  # divides each leaf by its own norm: not elementwise
        def update_fn(grads, state, params, step):
            return tree_map(lambda g: -g / mx.sqrt(mx.sum(g * g)), grads), state

        return Optimizer(lambda p: (), update_fn)

    for dtype in (mx.float32, mx.bfloat16):  # bfloat16: judged against a float32 step
        params = _mlp(9, dtype)
        step_fn = resident_step(per_leaf_normalise(), _mlp_loss, params, chunk_size=1 << 20)
        with pytest.raises(NotPackableError, match="not elementwise"):
            step_fn(step_fn.init(), *_batch(0))


def test_an_mlx_module_reading_its_weights_through_update_equals_nn_value_and_grad():
    """The mlx-lm pattern: ``model.update(params)`` inside ``loss_fn``, a frozen layer left
    out of the trainable tree; every step equals mlx.nn.value_and_grad on a twin model plus
    apply_gradients, and the model reads the trained weights after ``model.update``."""
    import mlx.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(4, 4) for _ in range(3)]

        def __call__(self, x):
            for layer in self.layers:
                x = mx.tanh(layer(x))
            return x

    mx.random.seed(3)
    model, twin = Net(), Net()
    twin.update(tree_map(lambda x: x, model.parameters()))
    for m in (model, twin):
        m.layers[1].freeze()
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((5, 4)).astype(np.float32))
    y = mx.array(rng.standard_normal((5, 4)).astype(np.float32))

    def loss_fn(params, x, y):
        model.update(params)
        return mx.mean((model(x) - y) ** 2)

    opt = adam(1e-2)
    step_fn = resident_step(opt, loss_fn, model.trainable_parameters())
    state, eager = step_fn.init(), init(opt, twin.trainable_parameters())
    peer = nn.value_and_grad(twin, lambda x, y: mx.mean((twin(x) - y) ** 2))
    for _ in range(4):
        loss, state = step_fn(state, x, y)
        want_loss, grads = peer(x, y)
        eager = apply_gradients(opt, eager, grads)
        twin.update(eager.params)
        _assert_close(loss, want_loss)
        _assert_close(step_fn.params(state), eager.params)
    model.update(step_fn.params(state))
    _assert_close(loss_fn(step_fn.params(state), x, y), mx.mean((twin(x) - y) ** 2))
