"""nestedfn.lm.adapters: adapters in mlx-lm's format, loaded by mlx-lm with the same logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE, load_adapters, save_adapters
from nestedfn.lm.lora import LoraSpec, apply_lora, bind
from nestedfn.tree import to_flat, tree_map
from tests.lm.test_lora import tiny_llama


def test_saved_adapters_load_in_mlx_lm_and_give_the_same_logits(tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    spec = LoraSpec(rank=4, scale=10.0, num_layers=3)
    model = tiny_llama()
    params = apply_lora(model, spec)
    # move every adapter leaf away from its init so lora_b != 0 changes the logits
    rng = np.random.default_rng(0)
    trained = tree_map(lambda x: x + mx.array(rng.normal(size=x.shape).astype(np.float32)), params)
    bind(model, trained)
    tokens = mx.array([[1, 5, 9, 2, 7, 3]])
    expected = model(tokens)

    save_adapters(tmp_path, trained, spec, n_blocks=4, extra={"optimizer": "nested_adam"})
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 3
    assert config["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0}
    assert set(mx.load(str(tmp_path / ADAPTER_FILE))) == set(to_flat(trained))

    fresh = mlx_lm_load_adapters(tiny_llama(), str(tmp_path))  # what mlx_lm.load runs
    got = fresh(tokens)
    assert mx.allclose(got, expected, atol=1e-5).item()
    assert not mx.allclose(tiny_llama()(tokens), expected, atol=1e-3).item()

    back = load_adapters(tmp_path, like=params)
    for k, v in to_flat(trained).items():
        assert mx.array_equal(to_flat(back)[k], v)


def test_load_adapters_refuses_a_tree_that_does_not_fit(tmp_path):
    spec = LoraSpec(rank=2, num_layers=2)
    params = apply_lora(tiny_llama(), spec)
    save_adapters(tmp_path, params, spec, n_blocks=4)
    other = apply_lora(tiny_llama(), LoraSpec(rank=2, num_layers=3))
    with pytest.raises(ValueError, match="missing"):
        load_adapters(tmp_path, like=other)
    with pytest.raises(FileNotFoundError):
        load_adapters(tmp_path / "nope", like=params)
