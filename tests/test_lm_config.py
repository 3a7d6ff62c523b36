"""Training options from YAML and flags (nestedfn.lm.config)."""

from __future__ import annotations

import dataclasses

import pytest

from nestedfn.lm.config import ConfigError, TrainConfig, load_config, resolve, save_config


def test_yaml_sets_options_and_the_rest_keep_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.01\nfrequencies: [1, 3]\ntiers: {'mlp': 1, '.*': 0}\n")
    c = load_config(path)
    assert c.learning_rate == 0.01 and c.frequencies == [1, 3]
    assert c.tiers == {"mlp": 1, ".*": 0}
    assert c.batch_size == TrainConfig().batch_size


def test_unknown_yaml_keys_are_an_error_listing_the_valid_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.01\nlearnig_rate: 0.1\nbatchsize: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'learnig_rate'" in msg and "'batchsize'" in msg and str(path) in msg
    for f in dataclasses.fields(TrainConfig):
        assert f.name in msg.split("valid options:")[1]


@pytest.mark.parametrize(
    "text, match",
    [
        ("- 1\n- 2\n", "mapping"),
        ("steps: 0\n", "steps"),
        ("optimizer: adagrad\n", "optimizer must be one of"),
        ("frequencies: [1, 0]\n", "frequencies"),
        ("tiers: width\n", "tiers"),
        ("steps: [\n", "YAML"),
    ],
)
def test_bad_values_name_the_option(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_flags_override_config_and_the_saved_config_round_trips(tmp_path):
    base = TrainConfig(learning_rate=0.01, steps=50)
    c = resolve(base, {"steps": 7, "learning_rate": None, "seed": 3})
    assert (c.steps, c.learning_rate, c.seed) == (7, 0.01, 3)
    save_config(c, tmp_path)
    assert load_config(tmp_path / "config.yaml") == c
    with pytest.raises(ConfigError, match="unknown option"):
        resolve(base, {"stepz": 3})
