"""Tiny real mlx-lm models for tests (no download): one builder, every test's variant."""

from __future__ import annotations

import mlx.core as mx


def tiny_llama(seed: int = 0, lora_layers: int = 0, tie_word_embeddings: bool = False):
    """A 4-block Llama (hidden 32, vocab 64) with random weights from ``seed``; with
    ``lora_layers > 0`` frozen and LoRA (rank 4, scale 10) on its last ``lora_layers`` blocks,
    as mlx-lm's tuner does it."""
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

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
        tie_word_embeddings=tie_word_embeddings,
    )
    model = Model(args)
    if lora_layers:
        model.freeze()
        linear_to_lora_layers(model, lora_layers, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model
