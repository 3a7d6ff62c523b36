"""nestedfn.lm.lora: LoRA through mlx-lm's tuner, only on the last blocks, seeded."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import pytest

from nestedfn.lm.lora import LoraError, LoraSpec, apply_lora
from nestedfn.tree import to_flat
from tests import tiny_models

# these tests (and tests/lm/test_adapters.py) have always used the tied-embedding variant
tiny_llama = partial(tiny_models.tiny_llama, tie_word_embeddings=True)


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
