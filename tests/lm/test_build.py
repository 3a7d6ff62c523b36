"""nestedfn.lm.build: the optimizer and schedule a TrainConfig describes."""

from __future__ import annotations

import mlx.core as mx
import pytest

from nestedfn.lm.build import build_optimizer, build_schedule
from tests.lm.conftest import small


def test_build_optimizer_layers_accumulate_clip_and_tiers(assets):
    from nestedfn.optim.combinators import AccumulateState
    from nestedfn.tiered import NestedState

    cfg = small(assets, grad_accumulation=3, grad_clip=1.0, optimizer="adam", frequencies=[1, 2])
    params = {"model": {"layers": [{"w": mx.ones((2,))}, {"w": mx.ones((2,))}]}}
    tiers = {"model": {"layers": [{"w": 0}, {"w": 1}]}}
    opt = build_optimizer(cfg, build_schedule(cfg), tiers)
    state = opt.init(params)
    assert isinstance(state, AccumulateState)
    assert opt.period == 3 * 2
    found = [s for s in state.inner[1] if isinstance(s, NestedState)]
    assert len(found) == 1


def test_cosine_schedule_warms_up_and_decays_in_updates(assets):
    cfg = small(assets, steps=40, grad_accumulation=2, schedule="cosine", warmup_steps=4)
    lr = build_schedule(cfg)
    assert lr(0) == 0.0 and lr(4) == pytest.approx(3e-3)
    assert lr(20) == pytest.approx(3e-4)  # 40 micro-steps = 20 updates, end = 0.1 * peak


@pytest.mark.parametrize("name", ["adafactor", "rmsprop", "adagrad", "adadelta", "adamax"])
def test_mlx_optimizer_names_run_mlx_rules_plain_and_in_tiers(assets, name):
    """The MLX names build from_mlx of the mlx.optimizers class: without tiers, the run's
    (constant) learning rate times the rule at rate 1 equals MLX's optimizer at that rate;
    in tiers, the tiers update at their frequencies."""
    import mlx.optimizers as optim
    import numpy as np

    from nestedfn.optim.core import apply_gradients, init
    from nestedfn.optim.from_mlx import MLX_OPTIMIZERS
    from nestedfn.tiered import tier_stats
    from nestedfn.tree import leaves

    rng = np.random.default_rng(0)
    params = {"model": {"layers": [{"w": mx.array(rng.normal(size=(3, 4)).astype(np.float32))}]}}
    grads = [
        {"model": {"layers": [{"w": mx.array(rng.normal(size=(3, 4)).astype(np.float32))}]}}
        for _ in range(5)
    ]
    cfg = small(assets, optimizer=name, frequencies=[1], learning_rate=1e-2)
    opt = build_optimizer(cfg, build_schedule(cfg), None)
    state = init(opt, params)
    peer = getattr(optim, MLX_OPTIMIZERS[name])(learning_rate=1e-2)  # mlx-lm's: its defaults
    want = params
    for g in grads:
        state = apply_gradients(opt, state, g)
        want = peer.apply_gradients(g, want)
    for x, y in zip(leaves(state.params), leaves(want)):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-7)

    two = {"model": {"layers": params["model"]["layers"] * 2}}
    cfg = small(assets, optimizer=name, frequencies=[1, 2])
    tiers = {"model": {"layers": [{"w": 0}, {"w": 1}]}}
    opt = build_optimizer(cfg, build_schedule(cfg), tiers)
    state = init(opt, two)
    for g in grads[:4]:
        state = apply_gradients(opt, state, {"model": {"layers": g["model"]["layers"] * 2}})
    assert [s.updates for s in tier_stats(state.opt_state)] == [4, 2]


def test_mlx_optimizer_names_refuse_options_that_would_be_ignored(assets):
    from nestedfn.lm.config import ConfigError

    cfg = small(assets, optimizer="rmsprop", frequencies=[1], weight_decay=0.1)
    with pytest.raises(ConfigError, match="rmsprop has no weight decay"):
        build_optimizer(cfg, build_schedule(cfg), None)
    # in tiers the schedule scales the updates, which Adafactor's relative step would ignore
    cfg = small(assets, optimizer="adafactor", frequencies=[1, 2])
    cfg = type(cfg)(**{**cfg.__dict__, "optimizer_args": {"relative_step": True}})
    with pytest.raises(ConfigError, match="relative_step"):
        build_optimizer(cfg, build_schedule(cfg), {"w": 0, "v": 1})
