"""The LoRA trainer (nestedfn.lm.trainer): exact resume, adapters mlx-lm loads, the pieces."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.lm.config import TrainConfig
from nestedfn.lm.trainer import RunError, build_optimizer, build_schedule, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    root = tmp_path_factory.mktemp("assets")
    model = build_demo_model(root / "model", seed=0)
    data = write_demo_dataset(root / "data", seed=0, n_train=64, n_valid=8)
    return model, data


def small(assets, **kw) -> TrainConfig:
    model, data = assets
    base = dict(
        model=str(model),
        data=str(data),
        batch_size=2,
        max_seq_len=24,
        lora_rank=2,
        lora_layers=4,
        learning_rate=3e-3,
        steps=4,
        eval_every=0,
        save_every=100,
        eval_batches=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def adapters(run) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


def test_resume_is_bit_identical_with_accumulation_and_slow_tiers_mid_chunk(assets, tmp_path):
    # micro-steps 10 = 5 updates with accumulation 2; stop after micro-step 5: mid accumulation
    # chunk (5 % 2 = 1), and after 2 updates tier 1 (every 4 updates) is mid chunk as well.
    cfg = small(assets, steps=10, grad_accumulation=2, frequencies=[1, 4], warmup_steps=2)
    straight = train(cfg, tmp_path / "straight", progress=False, log=lambda s: None)
    train(cfg, tmp_path / "split", progress=False, log=lambda s: None, stop_at=5)
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step_00000005"]
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False, log=lambda s: None)
    assert straight.steps == resumed.steps == 10
    a, b = adapters(tmp_path / "straight"), adapters(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) == 4 * 7 * 2
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    init = mx.load(str(tmp_path / "split" / "checkpoints" / "step_00000005" / "arrays.safetensors"))
    assert init, "checkpoint holds arrays"
    # the run really moved, and the slow tier moved only once (1 update in 5 at frequency 4)
    recs = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == list(range(1, 11)), "metrics: one record per step, none duplicated"
    assert recs[-1]["tier_updates"] == [5, 1]


def test_resume_with_more_steps_equals_the_longer_run(assets, tmp_path):
    cfg = small(assets, steps=6, frequencies=[1, 2, 4])
    long = train(cfg, tmp_path / "long", progress=False, log=lambda s: None)
    train(small(assets, steps=3, frequencies=[1, 2, 4]), tmp_path / "r", progress=False, log=str)
    with pytest.raises(RunError, match="cannot change learning_rate"):
        train(cfg, tmp_path / "r", resume=True, overrides={"learning_rate": 1.0}, log=str)
    train(cfg, tmp_path / "r", resume=True, overrides={"steps": 6}, progress=False, log=str)
    a, b = adapters(tmp_path / "long"), adapters(tmp_path / "r")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert long.last_loss < long.first_loss


def test_written_adapters_give_the_in_memory_models_logits_in_mlx_lm(assets, tmp_path):
    import mlx_lm

    run = tmp_path / "run"
    summary = train(small(assets, steps=3), run, progress=False, log=lambda s: None)
    tokens = mx.array([[40, 41, 42, 43, 44, 45, 46, 47]])
    expected = summary.model(tokens)
    model, _ = mlx_lm.load(str(assets[0]), adapter_path=str(run))
    got = model(tokens)
    assert mx.allclose(got, expected, atol=1e-5).item()
    base, _ = mlx_lm.load(str(assets[0]))
    assert not mx.allclose(base(tokens), expected, atol=1e-4).item()
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 2 and config["num_layers"] == 4


def test_build_optimizer_layers_accumulate_clip_and_tiers(assets):
    from nestedfn.combinators import AccumulateState
    from nestedfn.nested import NestedState

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


def test_early_stopping_stops_when_the_valid_loss_stops_improving(assets, tmp_path):
    # a learning rate of 1e-30 moves no logit in float32: the valid loss after step 1 equals
    # the one at step 0, which is no improvement, so patience 1 stops the run there
    cfg = small(assets, steps=6, eval_every=1, early_stopping=1, learning_rate=1e-30)
    s = train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert s.stopped_early and s.steps == 1
    assert [v for _, v in s.valid_losses][0] == s.valid_losses[1][1]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001").is_dir()
