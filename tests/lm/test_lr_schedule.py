"""mlx-lm's lr_schedule (nestedfn.lm.lr_schedule) against mlx-lm's own build_schedule."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from nestedfn.lm.lr_schedule import check_lr_schedule, from_lr_schedule

SCHEDULES = [
    {"name": "cosine_decay", "arguments": [1e-3, 20, 1e-5], "warmup": 5, "warmup_init": 1e-6},
    {"name": "cosine_decay", "arguments": [2e-4, 10]},
    {"name": "cosine_decay", "arguments": {"init": 1e-3, "decay_steps": 8}, "warmup": 1},
    {"name": "exponential_decay", "arguments": [1e-3, 0.9], "warmup": 3},
    {"name": "step_decay", "arguments": [1e-3, 0.5, 4]},
    {"name": "linear_schedule", "arguments": [1e-3, 1e-5, 12], "warmup": 4, "warmup_init": 0.0},
]


def _mlx_lm_form(config: dict) -> dict:
    args = config["arguments"]
    if isinstance(args, dict):  # mlx-lm takes a list; the mapping is nestedfn's convenience
        args = list(args.values())
    return {**config, "arguments": args}


@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: f"{c['name']}-{c.get('warmup', 0)}")
def test_every_step_equals_mlx_lm_build_schedule_warmup_boundary_included(config):
    from mlx_lm.tuner.utils import build_schedule

    peer = build_schedule(_mlx_lm_form(config))
    ours = from_lr_schedule(config)
    for step in range(40):  # float32 on the array path: 1e-6 of the 1e-3 peak
        want = peer(mx.array(step)).item()
        assert ours(step) == pytest.approx(want, rel=1e-5, abs=1e-9), step
        assert ours(mx.array(step)).item() == pytest.approx(want, rel=1e-5, abs=1e-9), step
    warmup = config.get("warmup", 0)
    if warmup:  # the peak twice: the ramp ends at step W, the schedule starts at W + 1
        peak = config["arguments"][0] if isinstance(config["arguments"], list) else 1e-3
        assert ours(warmup) == pytest.approx(peak) and ours(warmup + 1) == pytest.approx(peak)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"name": "cosine", "arguments": [1e-3, 10]}, "name must be one of cosine_decay"),
        ({"name": "cosine_decay"}, "needs 'arguments'"),
        ({"name": "cosine_decay", "arguments": [1e-3, 10], "warm": 2}, "unknown key"),
        ({"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": -1}, "warmup must be"),
        ({"name": "step_decay", "arguments": [1e-3]}, "step_decay"),
        ({"name": "cosine_decay", "arguments": [0.0, 10]}, "must be > 0"),
    ],
)
def test_bad_schedules_name_what_is_wrong(config, match):
    with pytest.raises(ValueError, match=match):
        check_lr_schedule(config)


def test_a_run_logs_mlx_lm_s_learning_rate_at_every_update(assets, tmp_path):
    from mlx_lm.tuner.utils import build_schedule

    from nestedfn.lm.trainer import train
    from tests.lm.conftest import small

    sched = {"name": "cosine_decay", "arguments": [3e-3, 4, 1e-4], "warmup": 2}
    cfg = small(assets, steps=10, grad_accumulation=2, lr_schedule=sched)
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if r["type"] == "train"]
    peer = build_schedule(sched)
    # micro-step i uses update i // 2's learning rate
    assert lrs == pytest.approx([peer(mx.array(i // 2)).item() for i in range(10)], rel=1e-6)
