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
