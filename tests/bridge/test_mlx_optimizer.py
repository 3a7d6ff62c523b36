"""as_mlx_optimizer: a nestedfn optimizer where MLX code expects an mlx.optimizers.Optimizer,
checked against nestedfn's own steps (``compile_step``/``apply_gradients``) and mlx-lm's
trainer."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import nestedfn as nf
from nestedfn.bridge import as_mlx_optimizer
from nestedfn.fast.compile import compile_step
from nestedfn.tree import flatten, leaves
from tests.devices import ON_CPU


def _bits(tree):
    return [np.array(x).view(np.uint32).tolist() for x in leaves(tree)]


def _same(a, b) -> bool:
    """Bit for bit on the CPU; to float32 rounding (1e-5 of the largest value) on a GPU, where
    two graphs of the same arithmetic fuse differently (``tests.devices``)."""
    if ON_CPU:
        return _bits(a) == _bits(b)
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape
        and float(mx.max(mx.abs(x - y))) <= 1e-5 * float(mx.max(mx.abs(y))) + 1e-30
        for x, y in zip(la, lb)
    )


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "layers": [
            {"w": mx.array(rng.normal(size=(4, 3)).astype(np.float32)), "b": mx.zeros((3,))}
            for _ in range(4)
        ]
    }


def _grads(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = {
            "layers": [
                {
                    "w": mx.array(rng.normal(size=(4, 3)).astype(np.float32)),
                    "b": mx.array(rng.normal(size=(3,)).astype(np.float32)),
                }
                for _ in range(4)
            ]
        }
        out.append(g)
    return out


OPTIMIZERS = {
    "nested_adam": lambda: nf.nested_adam(1e-2),
    "nested_adam_schedule": lambda: nf.nested_adam(nf.warmup_cosine(1e-2, 2, 20)),
    "accumulate_nested": lambda: nf.accumulate(nf.nested_adam(1e-2, frequencies=(1, 2)), 3),
    "skip_chain": lambda: nf.skip_nonfinite(nf.chain(nf.clip_by_global_norm(1.0), nf.adamw(1e-2))),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_with_captured_state_equals_compile_step(name):
    """mx.compile of a whole step with optimizer.state captured (the step a traced array, so
    tiers and accumulation run branch-free) gives compile_step's params, bit for bit (on a
    GPU: to float32 rounding)."""
    opt = OPTIMIZERS[name]()
    wrapper = as_mlx_optimizer(opt)
    params = _params()
    holder = nn.Module()
    holder.layers = [dict(x) for x in params["layers"]]
    state = [holder.state, wrapper.state]

    def step(g):
        wrapper.update(holder, g)

    step = mx.compile(step, inputs=state, outputs=state)
    ref = nf.init(opt, params)
    ref_step = compile_step(opt, native=False)  # an MLX graph, as the wrapper's
    for g in _grads(12, seed=1):
        step(g)
        ref = ref_step(ref, g)
        assert _same(holder.parameters(), ref.params)
    assert int(wrapper.step) == 12
    assert flatten(wrapper.opt_state)[1] == flatten(ref.opt_state)[1]
    assert _same(wrapper.opt_state, ref.opt_state)


def test_update_model_learning_rate_and_tier_counts():
    """update(model, grads) changes the module in place; learning_rate reads the schedule at
    the step of the last update, as mlx.optimizers keeps it; tier counts via opt_state."""
    mx.random.seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    schedule = nf.linear_warmup(1e-2, 4)
    wrapper = as_mlx_optimizer(nf.nested_adam(schedule))
    peer = nf.init(nf.nested_adam(schedule), model.trainable_parameters())
    assert float(wrapper.learning_rate) == pytest.approx(float(schedule(0)))
    for i, g in enumerate(_grads(4, seed=2)):
        grads = {"layers": [{"weight": x["w"][:3], "bias": x["b"]} for x in g["layers"]]}
        wrapper.update(model, grads)
        peer = nf.apply_gradients(nf.nested_adam(schedule), peer, grads)
        assert float(wrapper.learning_rate) == pytest.approx(float(schedule(i)))
    # the wrapper's step is an array (float32 bias correction), the peer's a Python int
    np.testing.assert_allclose(
        np.array(model.layers[3].weight),
        np.array(peer.params["layers"][3]["weight"]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert [(s.frequency, s.updates) for s in nf.tier_stats(wrapper.opt_state)] == [
        (1, 4),
        (2, 2),
        (4, 1),
    ]


def test_unknown_learning_rate_is_a_clear_error_and_cannot_be_set():
    opt = nf.Optimizer(lambda p: (), lambda g, s, p, t: (g, s))
    wrapper = as_mlx_optimizer(opt)
    with pytest.raises(AttributeError, match="learning_rate="):
        wrapper.learning_rate  # noqa: B018
    assert float(as_mlx_optimizer(opt, learning_rate=0.5).learning_rate) == 0.5
    with pytest.raises(AttributeError, match="inject_hyperparams"):
        as_mlx_optimizer(nf.adam(0.1)).learning_rate = 0.2


def test_state_saves_and_loads_as_mlx_documents(tmp_path):
    """tree_flatten + save_safetensors, then tree_unflatten + load into a fresh wrapper: the
    continued trajectory equals the uninterrupted one; a state of another layout is refused."""
    make = lambda: nf.nested_adam(1e-2)  # noqa: E731
    grads = _grads(6, seed=3)
    straight = as_mlx_optimizer(make())
    p_straight = _params()
    for g in grads:
        p_straight = straight.apply_gradients(g, p_straight)

    first = as_mlx_optimizer(make())
    p = _params()
    for g in grads[:3]:
        p = first.apply_gradients(g, p)
    path = str(tmp_path / "optimizer.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(first.state)))
    second = as_mlx_optimizer(make())
    second.state = tree_unflatten(list(mx.load(path).items()))
    for g in grads[3:]:
        p = second.apply_gradients(g, p)
    assert _same(p, p_straight)
    assert int(second.step) == 6
    assert [s.updates for s in nf.tier_stats(second.opt_state)] == [6, 3, 1]

    other = as_mlx_optimizer(nf.adam(1e-2))
    other.state = tree_unflatten(list(mx.load(path).items()))
    with pytest.raises(ValueError, match="opt_state arrays"):
        other.apply_gradients(grads[0], _params())


def test_mlx_lm_trainer_runs_nested_adam_like_nestedfn(tmp_path):
    """mlx_lm.tuner.trainer.train with as_mlx_optimizer(nested_adam(1e-3)) on the demo model:
    the loss falls, the tiers updated (8, 4, 2) times, and the adapters equal, bit for bit
    (on a GPU: to float32 rounding), those of nestedfn's own compiled step on the same batches (its LoRA and loss)."""
    import mlx_lm
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from nestedfn.lm.demo import build_demo_model
    from nestedfn.lm.lora import LoraSpec, apply_lora
    from nestedfn.lm.loss import make_grad_fn

    path = str(build_demo_model(tmp_path / "model", seed=0))
    rng = np.random.default_rng(0)
    batch = mx.array(rng.integers(3, 200, size=(4, 17)).astype(np.int32))
    lengths = mx.array([[0, 17]] * 4)

    def fresh():
        model, _ = mlx_lm.load(path)
        return model, apply_lora(model, LoraSpec(rank=4), seed=0)

    def batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for _ in range(8):
            yield batch, lengths

    class Record:
        losses: list = []

        def on_train_loss_report(self, info):
            self.losses.append(info["train_loss"])

        def on_val_loss_report(self, info):
            pass

    model, _ = fresh()
    optimizer = as_mlx_optimizer(nf.nested_adam(1e-3))
    record = Record()
    args = TrainingArgs(
        batch_size=4, iters=8, steps_per_report=1, adapter_file=str(tmp_path / "a.safetensors")
    )
    train(model, optimizer, list(range(4)), args=args, iterate_batches=batches,
          training_callback=record)  # fmt: skip
    assert record.losses[-1] < record.losses[0] - 0.05
    assert [(s.frequency, s.updates) for s in nf.tier_stats(optimizer.opt_state)] == [
        (1, 8),
        (2, 4),
        (4, 2),
    ]
    assert int(optimizer.step) == 8
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)

    own_model, params = fresh()
    grad_fn = make_grad_fn(own_model, params)
    opt = nf.nested_adam(1e-3)
    state, step = nf.init(opt, params), compile_step(opt, native=False)
    for _ in range(8):  # the batches mlx-lm's train got, in its (tokens, lengths) form
        _, _, grads = grad_fn(state.params, batch, lengths)
        state = step(state, grads)
    assert _same(model.trainable_parameters(), state.params)


def test_learning_rate_of_an_injected_optimizer_can_be_set_without_a_new_graph():
    """With inject_hyperparams the MLX-style ``optimizer.learning_rate = x`` lands in the
    state: the compiled step keeps its graph and continues like adam at the new rate."""
    wrapper = as_mlx_optimizer(nf.inject_hyperparams(nf.adam)(learning_rate=1e-2))
    holder = nn.Module()
    holder.layers = [dict(x) for x in _params()["layers"]]
    state = [holder.state, wrapper.state]
    traces = []

    def body(g):
        traces.append(1)
        wrapper.update(holder, g)

    step = mx.compile(body, inputs=state, outputs=state)
    ref_opt = nf.adam(1e-2)
    ref, ref_step = nf.init(ref_opt, _params()), compile_step(ref_opt, native=False)
    grads = _grads(6, seed=4)
    for g in grads[:3]:
        step(g)
        ref = ref_step(ref, g)
    assert float(wrapper.learning_rate) == pytest.approx(1e-2)
    traced_before = len(traces)
    wrapper.learning_rate = 1e-3
    assert float(wrapper.learning_rate) == pytest.approx(1e-3)
    ref_opt = nf.adam(1e-3)
    ref_step = compile_step(ref_opt, native=False)
    for g in grads[3:]:
        step(g)
        ref = ref_step(ref, g)
    for x, y in zip(leaves(holder.parameters()), leaves(ref.params)):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-6, atol=1e-7)
    # traced twice before the change (the first call initialises the state inside the graph,
    # the second sees it as inputs), never after it
    assert len(traces) == traced_before == 2
