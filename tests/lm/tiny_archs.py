"""Tiny random-weight instances of mlx-lm's architectures, built offline like the demo model.

``ARCHS`` maps a name to an mlx-lm ``config.json`` (``model_type`` and tiny sizes: hidden 32,
2-4 blocks, a few heads/experts, the demo tokenizer's vocabulary); ``build_tiny(name, dir)``
instantiates ``mlx_lm.models.<model_type>.Model`` with seeded random weights and writes the
config, the weights and the demo's byte tokenizer, so ``mlx_lm.load(dir)`` opens it offline.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

H, V = 32, 259  # hidden size; the demo tokenizer's 256 bytes + 3 special tokens
_COMMON = {"vocab_size": V, "hidden_size": H, "intermediate_size": 64, "rms_norm_eps": 1e-5}

ARCHS: dict[str, dict] = {
    "llama": {
        **_COMMON,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "qwen3_moe": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 16,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 256,
        "norm_topk_prob": True,
    },
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 256,
    },
    "phi3": {
        **_COMMON,
        "model_type": "phi3",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": V,
        "n_ctx": 256,
        "n_embd": H,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 256,
        "layer_norm_epsilon": 1e-5,
    },
    "mamba": {
        "model_type": "mamba",
        "vocab_size": V,
        "hidden_size": H,
        "intermediate_size": 64,
        "state_size": 4,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
        "tie_word_embeddings": True,
    },
    "deepseek_v3": {
        **_COMMON,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 8,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "qk_nope_head_dim": 8,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 256,
    },
    "olmo2": {
        **_COMMON,
        "model_type": "olmo2",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "cohere2": {
        **_COMMON,
        "model_type": "cohere2",
        "head_dim": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
    },
    "granitemoehybrid": {
        **_COMMON,
        "model_type": "granitemoehybrid",
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "layer_types": ["mamba", "attention"],
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 32,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_proj_bias": False,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
    },
    "afm7": {  # model.layers + model.kv_reuse_layers: tiers must follow that order
        "model_type": "afm7",
        "vocab_size": V,
        "hidden_dim": H,
        "num_layers": 4,
        "num_kv_reuse_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
    },
}


def build_tiny(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write ``ARCHS[name]`` with random weights (``mx.random.seed(seed)``) into ``out_dir``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from nestedfn.lm.demo import build_demo_model

    config = dict(ARCHS[name], eos_token_id=V - 1, bos_token_id=V - 2)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    demo = build_demo_model(out / "_demo", seed=0)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo / f, out / f)
    shutil.rmtree(demo)
    return out
