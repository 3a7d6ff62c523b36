"""LoRA through mlx-lm's tuner and adapters in mlx-lm's format (nestedfn.lm.lora/adapters)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE, load_adapters, save_adapters
from nestedfn.lm.lora import LoraError, LoraSpec, apply_lora, bind
from nestedfn.tree import to_flat, tree_map


def tiny_llama(seed: int = 0):
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    args = ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=4,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def test_apply_lora_trains_only_lora_leaves_of_the_last_blocks():
    model = tiny_llama()
    params = apply_lora(model, LoraSpec(rank=2, num_layers=2, keys=("self_attn.q_proj",)))
    flat = to_flat(params)
    assert sorted(flat) == [
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}" for i in (2, 3) for ab in "ab"
    ]
    assert flat["model.layers.3.self_attn.q_proj.lora_a"].shape == (32, 2)
    assert float(mx.abs(flat["model.layers.3.self_attn.q_proj.lora_b"]).sum()) == 0.0


def test_apply_lora_is_seeded():
    a = to_flat(apply_lora(tiny_llama(), LoraSpec(rank=2), seed=3))
    b = to_flat(apply_lora(tiny_llama(), LoraSpec(rank=2), seed=3))
    c = to_flat(apply_lora(tiny_llama(), LoraSpec(rank=2), seed=4))
    k = "model.layers.0.mlp.up_proj.lora_a"
    assert mx.array_equal(a[k], b[k]) and not mx.array_equal(a[k], c[k])


def test_apply_lora_rejects_bad_options():
    with pytest.raises(LoraError, match="matched no module"):
        apply_lora(tiny_llama(), LoraSpec(keys=("self_attn.nope",)))
    with pytest.raises(LoraError, match="num_layers"):
        apply_lora(tiny_llama(), LoraSpec(num_layers=9))
    with pytest.raises(LoraError, match="rank"):
        apply_lora(tiny_llama(), LoraSpec(rank=0))


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
