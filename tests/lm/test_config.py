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
        ("optimizer: adagrad2\n", "optimizer must be one of"),
        ("frequencies: [1, 0]\n", "frequencies"),
        ("tiers: width\n", "tiers"),
        ("steps: [\n", "YAML"),
        ("lora_scale: big\n", "lora_scale must be a finite number, got 'big'"),
        ("lora_scale: .inf\n", "lora_scale must be a finite number"),
        ("lora_dropout: high\n", r"lora_dropout must be a number in \[0, 1\), got 'high'"),
        ("lora_dropout: 1.0\n", r"lora_dropout must be a number in \[0, 1\)"),
        ("lora_dropout: -0.1\n", r"lora_dropout must be a number in \[0, 1\)"),
        ("learning_rate: .nan\n", "learning_rate must be a finite number"),
        ("learning_rate: '1e-3'\n", "learning_rate must be a finite number > 0, got '1e-3'"),
        ("min_lr_ratio: low\n", "min_lr_ratio"),
        ("grad_clip: .nan\n", "grad_clip"),
        ("eval_batches: all\n", "eval_batches"),
        ("seed: -1\n", "seed"),
        ("tier_order: upside_down\n", "tier_order must be one of shallow_fast, deep_fast"),
        ("frequencies: [1]\ntiers: {mlp: 1}\n", "would be ignored: frequencies"),
        ("optimizer: multiscale_momentum\ntiers: {mlp: 1}\n", "would be ignored: multiscale"),
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


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_option_but_the_paths_refuses_a_word_naming_itself(name):
    # a word where a number, list, mapping, bool or one of a few choices is meant is an error
    # naming the option when the config is made (not in the first forward pass of the run)
    from nestedfn.lm.config import FEATURES

    if name in ("model", "data", "resume_adapter_file", "adapter_path", *FEATURES):
        assert getattr(TrainConfig(**{name: "big"}), name) == "big"
        return
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        TrainConfig(**{name: "big"})


def test_floats_without_a_dot_read_as_floats_without_touching_yaml_safe_loader(tmp_path):
    # In a fresh interpreter (no `import mlx_lm.lora`, which patches yaml.SafeLoader for the
    # whole process): 1e-3 is a float in the config and in --optimizer-args values, and the
    # process-wide SafeLoader still reads it as the string YAML 1.1 says it is.
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-3\nlora_scale: 2E1\noptimizer_args: {eps: 1.5e-8}\n")
    code = (
        "import sys, yaml; from nestedfn.lm.config import load_config; "
        "c = load_config(sys.argv[1]); "
        "print(repr((c.learning_rate, c.lora_scale, c.optimizer_args['eps'], "
        "yaml.safe_load('x: 1e-3')['x'], 'mlx_lm.lora' in sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr((0.001, 20.0, 1.5e-8, "1e-3", False))


def test_int_for_a_float_option_becomes_a_float_and_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1\nlora_scale: 16\n")
    c = load_config(path)
    assert (c.learning_rate, c.lora_scale) == (1.0, 16.0)
    assert isinstance(c.learning_rate, float) and isinstance(c.lora_scale, float)
    save_config(c, tmp_path)
    assert load_config(tmp_path / "config.yaml") == c


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x"])
def test_a_tiers_key_that_is_no_regex_is_a_config_error(pattern):
    from nestedfn.lm.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="is not a regular expression"):
        TrainConfig(tiers={pattern: 0})
