"""Shared by the trainer tests: a tiny demo model and dataset, and a small run's options."""

from __future__ import annotations

import pytest

from nestedfn.lm.config import TrainConfig


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
