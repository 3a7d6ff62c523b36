"""nestedfn.lm.fine_tune: the trainer from Python, with mlx-lm's callback."""

from __future__ import annotations

import pytest
import yaml

from nestedfn.lm import TrainingCallback, fine_tune
from nestedfn.lm.api import as_config
from nestedfn.lm.config import TrainConfig


class Calls(TrainingCallback):
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def on_train_loss_report(self, info):
        self.calls.append(("train", info))

    def on_val_loss_report(self, info):
        self.calls.append(("val", info))

    def on_checkpoint(self, info):
        self.calls.append(("checkpoint", info))

    def on_test_loss_report(self, info):
        self.calls.append(("test", info))


def test_a_config_a_mapping_a_path_and_keywords_mean_the_same(assets, tmp_path):
    model, data = assets
    keys = {"model": str(model), "data": str(data), "iters": 7, "num_layers": 2}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(keys))
    want = TrainConfig(model=str(model), data=str(data), steps=7, lora_layers=2)
    assert as_config(keys) == as_config(None, **keys) == as_config(path) == want
    assert as_config(path, iters=3).steps == 3 and as_config(want, batch_size=2).batch_size == 2
    with pytest.raises(TypeError):
        as_config(42)


def test_the_callback_gets_mlx_lm_s_reports_and_nestedfn_s_two_more(assets, tmp_path):
    model, data = assets
    (data / "test.jsonl").write_text((data / "valid.jsonl").read_text())
    cb = Calls()
    summary = fine_tune(
        model=str(model), data=str(data), iters=4, num_layers=2, batch_size=2,
        max_seq_length=24, lora_parameters={"rank": 2}, steps_per_report=2, steps_per_eval=2,
        val_batches=1, save_every=2, test=True, test_batches=1, out=tmp_path / "run",
        training_callback=cb, progress=False, log=lambda s: None,
    )  # fmt: skip
    kinds = [(k, i["iteration"]) for k, i in cb.calls]
    # evals before iterations 1, 2 and 4 (mlx-lm's points), reports at 2 and 4, saves at 2, 4
    assert kinds == [
        ("val", 0), ("val", 1), ("train", 2), ("checkpoint", 2), ("val", 3), ("train", 4),
        ("checkpoint", 4), ("test", 4),
    ]  # fmt: skip
    train = dict(cb.calls[2][1])
    assert set(train) >= {
        "train_loss", "learning_rate", "iterations_per_second", "tokens_per_second",
        "trained_tokens", "peak_memory", "tier_updates",
    }  # fmt: skip
    assert train["tier_updates"] is None  # adam: no tiers unless asked for
    assert cb.calls[-1][1]["test_loss"] == summary.test_loss
    assert cb.calls[3][1]["path"].name == "step_00000002"
