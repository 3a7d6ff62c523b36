"""The offline demo model opens with mlx-lm, is deterministic by seed, and its data is valid."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from nestedfn.lm.demo import (
    DEMO_CONFIG,
    EOS_TOKEN,
    build_demo_model,
    write_demo_dataset,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo_model"), seed=0)


def test_loads_with_mlx_lm_and_gives_finite_logits(demo_dir):
    model, tok = mlx_lm.load(str(demo_dir))
    text = "The cat says meow."
    ids = tok.encode(text)
    # byte-level BPE with no merges: one token per UTF-8 byte, exact round trip
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token == EOS_TOKEN
    assert tok.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    logits = model(mx.array([ids]))
    config = json.loads((demo_dir / "config.json").read_text())
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)))
    # a real mlx-lm Llama with a `layers` list of the configured depth
    assert len(model.layers) == DEMO_CONFIG["num_hidden_layers"] >= 4
    assert type(model).__module__ == "mlx_lm.models.llama"


def test_chat_template_renders_messages(demo_dir):
    _, tok = mlx_lm.load(str(demo_dir))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|user|>\nhi\n<|assistant|>\nyo</s>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"


def test_weights_deterministic_by_seed(demo_dir, tmp_path):
    same = build_demo_model(tmp_path / "same", seed=0)
    other = build_demo_model(tmp_path / "other", seed=1)
    ref = (demo_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == ref
    assert (other / "model.safetensors").read_bytes() != ref
    a = mx.load(str(demo_dir / "model.safetensors"))
    b = mx.load(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    emb = "model.embed_tokens.weight"
    assert not np.array_equal(np.array(a[emb]), np.array(b[emb]))
    # RMSNorm scales start at one, as in a freshly built module
    assert np.array_equal(np.array(a["model.norm.weight"]), np.ones(DEMO_CONFIG["hidden_size"]))


def test_dataset_files_valid_and_deterministic(tmp_path):
    d = write_demo_dataset(tmp_path / "a", seed=3, n_train=50, n_valid=7)
    for split, n in (("train", 50), ("valid", 7)):
        lines = (d / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            rec = json.loads(line)
            assert list(rec) == ["text"] and rec["text"].endswith(".")
    again = write_demo_dataset(tmp_path / "b", seed=3, n_train=50, n_valid=7)
    assert (again / "train.jsonl").read_bytes() == (d / "train.jsonl").read_bytes()
    other = write_demo_dataset(tmp_path / "c", seed=4, n_train=50, n_valid=7)
    assert (other / "train.jsonl").read_bytes() != (d / "train.jsonl").read_bytes()
    with pytest.raises(ValueError, match="n_train"):
        write_demo_dataset(tmp_path / "d", n_train=0)
