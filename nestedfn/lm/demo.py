"""A tiny model and dataset built offline, so ``nestedfn demo`` and the tests need no download.

``build_demo_model`` writes a model directory that ``mlx_lm.load`` opens like any other:

* ``config.json`` for a real mlx-lm architecture (``mlx_lm.models.llama``: hidden 64, 4 layers,
  4 heads, 2 kv heads, tied embeddings), so LoRA, tiers by depth and adapters work on the
  same ``model.layers.N...`` paths as on a downloaded model;
* ``model.safetensors`` with random weights drawn from ``numpy.random.Generator(seed)``
  (explicit randomness: the same seed gives the same bytes on every machine, independent of
  MLX's global random state and of its initializer code);
* ``tokenizer.json``: a byte-level BPE *with no merges* made with ``tokenizers`` (every UTF-8
  byte is one token, plus three special tokens), and ``tokenizer_config.json`` naming
  ``PreTrainedTokenizerFast``, the eos/bos tokens and a small chat template, so the
  ``messages`` data format works too.

``write_demo_dataset`` writes ``train.jsonl``/``valid.jsonl`` of templated sentences whose
structure a random tiny model learns within a hundred steps (the fixed template bytes become
predictable first, then the slot-to-slot associations such as animal -> sound).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEMO_CONFIG",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_demo_model",
    "build_demo_tokenizer",
    "demo_sentence",
    "write_demo_dataset",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# A minimal role-tagged chat format (Jinja, as Hugging Face's apply_chat_template expects).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '" + EOS_TOKEN + "' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Architecture of the demo model; ``vocab_size`` is filled from the tokenizer.
DEMO_CONFIG: dict = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def build_demo_tokenizer():
    """A byte-level BPE with no merges: 256 byte tokens followed by ``<pad>``, ``<s>``, ``</s>``.

    Returns a ``tokenizers.Tokenizer``.  With no merges every byte of the UTF-8 text is one
    token, so any text encodes (no unknown token) and decoding is exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _random_params(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Draw every parameter from one ``Generator(seed)`` in sorted-path order.

    Matrices whose path names an embedding get N(0, 1/d) (as ``nn.Embedding``), other matrices
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (as ``nn.Linear``), vectors (RMSNorm scales) are ones.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, np.ndarray] = {}
    for path in sorted(shapes):
        shape = shapes[path]
        if len(shape) == 1:
            out[path] = np.ones(shape, dtype=np.float32)
        elif "embed" in path:
            out[path] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        else:
            bound = 1.0 / np.sqrt(shape[-1])
            out[path] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out


def build_demo_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the demo model directory (config, weights, tokenizer) into ``out_dir``; return it.

    ``mlx_lm.load(str(path))`` opens the result offline.  Same ``seed`` -> identical weight
    bytes.  Existing files of the same names in ``out_dir`` are overwritten.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_demo_tokenizer()
    config = dict(DEMO_CONFIG, vocab_size=tok.get_vocab_size())
    config["bos_token_id"] = tok.token_to_id(BOS_TOKEN)
    config["eos_token_id"] = tok.token_to_id(EOS_TOKEN)

    # Shapes come from the real mlx-lm module (lazy arrays, never evaluated).
    model = Model(ModelArgs.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    weights = {k: mx.array(v) for k, v in _random_params(shapes, seed).items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    _write_json(out / "config.json", config)
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    return out


_ANIMALS = {
    "cat": "meow",
    "dog": "woof",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "frog": "ribbit",
    "lion": "roar",
}
_COLORS = ["red", "blue", "green", "yellow", "black", "white"]
_PLACES = ["farm", "forest", "garden", "river", "barn", "field"]
_NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def demo_sentence(rng: np.random.Generator) -> str:
    """One templated sentence drawn with ``rng``: fixed wording, a few random slots, and
    slots that determine others (the animal fixes its sound, a number fixes its successor)."""
    kind = int(rng.integers(3))
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    animal = list(_ANIMALS)[int(rng.integers(len(_ANIMALS)))]
    color = _COLORS[int(rng.integers(len(_COLORS)))]
    place = _PLACES[int(rng.integers(len(_PLACES)))]
    if kind == 0:
        return (
            f"{name} has a {color} {animal} on the {place}. The {animal} says {_ANIMALS[animal]}."
        )
    if kind == 1:
        n = int(rng.integers(len(_NUMBERS) - 1))
        return (
            f"{name} sees {_NUMBERS[n]} {animal}s in the {place}. "
            f"One more comes, now there are {_NUMBERS[n + 1]}."
        )
    return f"In the {place}, the {color} {animal} says {_ANIMALS[animal]} to {name}."


def write_demo_dataset(
    out_dir: str | Path, seed: int = 0, n_train: int = 400, n_valid: int = 40
) -> Path:
    """Write ``train.jsonl`` and ``valid.jsonl`` of ``{"text": ...}`` records into ``out_dir``.

    Sentences come from ``demo_sentence`` with ``Generator(seed)``; deterministic by seed.
    """
    if n_train < 1 or n_valid < 1:
        raise ValueError(f"n_train and n_valid must be >= 1, got {n_train}, {n_valid}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    for split, n in (("train", n_train), ("valid", n_valid)):
        lines = [json.dumps({"text": demo_sentence(rng)}) for _ in range(n)]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
