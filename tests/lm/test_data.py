"""Data loading in mlx-lm's formats (errors name file and line) and deterministic batches."""

from __future__ import annotations

import json

import mlx_lm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedfn.lm.data import (
    DataError,
    TokenDataset,
    batch_at,
    batch_positions,
    load_dataset,
    load_records,
    read_jsonl,
)
from nestedfn.lm.demo import build_demo_model, write_demo_dataset


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    _, tokenizer = mlx_lm.load(str(build_demo_model(tmp_path_factory.mktemp("m"))))
    return tokenizer


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- load_records / load_dataset errors -------------------------------------------------


def test_missing_and_empty_files_name_the_file(tmp_path, tok):
    with pytest.raises(DataError, match=r"train\.jsonl: data file not found"):
        load_dataset(tmp_path, "train", tok)
    write(tmp_path / "train.jsonl", ["", "   "])
    with pytest.raises(DataError, match=r"train\.jsonl: data file is empty"):
        load_records(tmp_path / "train.jsonl")
    (tmp_path / "valid.jsonl").write_text("")
    with pytest.raises(DataError, match=r"valid\.jsonl: data file is empty"):
        load_dataset(tmp_path, "valid", tok)


def test_load_records_skips_blank_lines(tmp_path):
    recs = [{"text": "a"}, {"prompt": "p", "completion": "c", "extra": [1, 2]}]
    write(tmp_path / "x.jsonl", [json.dumps(recs[0]), "", "  ", json.dumps(recs[1])])
    assert load_records(tmp_path / "x.jsonl") == recs
    assert [n for n, _ in read_jsonl(tmp_path / "x.jsonl")] == [1, 4]


@pytest.mark.parametrize(
    "bad, what",
    [
        ('{"text": "a"', "malformed JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"txt": "typo"}', "none of the known formats"),
        ('{"prompt": "p", "completion": "c"}', "mixed formats"),
        ('{"text": 3}', "'text' must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tok, bad, what):
    write(tmp_path / "train.jsonl", ['{"text": "ok"}', "", bad, '{"text": "fine"}'])
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, "train", tok)
    msg = str(e.value)
    assert f"{tmp_path / 'train.jsonl'}:3:" in msg and what in msg
    assert isinstance(e.value, ValueError)


def test_non_utf8_bytes_name_file_and_line(tmp_path, tok):
    # line 2 is UTF-8 (é as 2 bytes), line 4 Latin-1 (é as the single byte 0xe9, byte 14)
    lines = [b'{"text": "ok"}', '{"text": "caf\u00e9"}'.encode(), b"", b'{"text": "caf\xe9"}']
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, "train", tok)
    assert str(e.value) == (
        f"{tmp_path / 'train.jsonl'}:4: not UTF-8 text (byte 0xe9 at byte 14 of the line)"
    )
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines[:3]) + b"\r\n")
    assert read_jsonl(tmp_path / "train.jsonl") == [(1, {"text": "ok"}), (2, {"text": "café"})]


def test_first_record_unknown_format_names_line(tmp_path, tok):
    write(tmp_path / "train.jsonl", ['{"input": "x", "output": "y"}'])
    with pytest.raises(DataError, match=r"train\.jsonl:1: record in none of the known formats"):
        load_dataset(tmp_path, "train", tok)


@pytest.mark.parametrize(
    "bad, what",
    [
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"content": "no role"}]}', "messages[0]"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] has role 'robot'"),
        ('{"prompt": "p", "completion": 5}', "'completion' must be a string"),
    ],
)
def test_bad_chat_and_completion_records(tmp_path, tok, bad, what):
    good = (
        '{"messages": [{"role": "user", "content": "q"}]}'
        if "messages" in bad
        else '{"prompt": "p", "completion": "c"}'
    )
    write(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, "train", tok)
    assert f"{tmp_path / 'train.jsonl'}:2:" in str(e.value) and what in str(e.value)


def test_prompt_filling_max_seq_len_is_an_error(tmp_path, tok):
    write(tmp_path / "train.jsonl", [json.dumps({"prompt": "x" * 40, "completion": "y"})])
    with pytest.raises(DataError, match=r"train\.jsonl:1: the prompt"):
        load_dataset(tmp_path, "train", tok, max_seq_len=16, mask_prompt=True)


# ---- formats ----------------------------------------------------------------------------


def test_text_format_appends_eos(tmp_path, tok):
    write(tmp_path / "train.jsonl", ['{"text": "ab c"}'])
    ds = load_dataset(tmp_path, "train", tok)
    assert ds.format == "text"
    assert ds.tokens == [tok.encode("ab c") + [tok.eos_token_id]]
    assert len(ds.tokens[0]) == 5  # one token per byte, plus eos
    assert ds.offsets == [0] and len(ds) == 1


def test_completion_format_offset_marks_prompt(tmp_path, tok):
    write(tmp_path / "train.jsonl", [json.dumps({"prompt": "2+2?", "completion": "4"})])
    ds = load_dataset(tmp_path, "train", tok, mask_prompt=True)
    # the demo chat template, rendered by hand
    full = "<|user|>\n2+2?\n<|assistant|>\n4</s>\n"
    head = "<|user|>\n2+2?\n<|assistant|>\n"
    assert tok.decode(ds.tokens[0], skip_special_tokens=False) == full
    assert ds.offsets[0] == len(tok.encode(head))
    assert tok.decode(ds.tokens[0][ds.offsets[0] :], skip_special_tokens=False) == "4</s>\n"
    unmasked = load_dataset(tmp_path, "train", tok, mask_prompt=False)
    assert unmasked.offsets == [0] and unmasked.tokens == ds.tokens


def test_chat_format_offset_is_prompt_before_last_reply(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    write(tmp_path / "train.jsonl", [json.dumps({"messages": msgs})])
    ds = load_dataset(tmp_path, "train", tok, mask_prompt=True)
    assert ds.format == "chat"
    text = tok.decode(ds.tokens[0], skip_special_tokens=False)
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nyo</s>\n"
    assert tok.decode(ds.tokens[0][ds.offsets[0] :], skip_special_tokens=False) == "yo</s>\n"


def test_demo_dataset_loads_and_truncates(tmp_path, tok):
    d = write_demo_dataset(tmp_path, n_train=20, n_valid=5)
    ds = load_dataset(d, "train", tok, max_seq_len=24)
    assert len(ds) == 20 and all(len(t) == 24 for t in ds.tokens)
    assert load_dataset(d, "valid", tok).format == "text"


def test_features_rename_the_record_keys_as_mlx_lm_s_feature_options(tmp_path, tok):
    write(tmp_path / "train.jsonl", [json.dumps({"question": "2+2?", "answer": "4"})])
    ds = load_dataset(
        tmp_path,
        "train",
        tok,
        mask_prompt=True,
        features={"prompt": "question", "completion": "answer"},
    )
    write(tmp_path / "valid.jsonl", [json.dumps({"prompt": "2+2?", "completion": "4"})])
    same = load_dataset(tmp_path, "valid", tok, mask_prompt=True)
    assert ds.format == "completion" and (ds.tokens, ds.offsets) == (same.tokens, same.offsets)


def test_mask_prompt_on_text_records_is_an_error_as_in_mlx_lm(tmp_path, tok):
    write(tmp_path / "train.jsonl", ['{"text": "ab c"}'])
    with pytest.raises(DataError, match=r"train\.jsonl:1: mask_prompt needs prompt/completion"):
        load_dataset(tmp_path, "train", tok, mask_prompt=True)


# ---- batches ----------------------------------------------------------------------------


def toy(lengths, offsets=None, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [[int(x) for x in rng.integers(1, 50, size=n)] for n in lengths]
    return TokenDataset(
        tokens=tokens,
        offsets=list(offsets or [0] * len(lengths)),
        path=None,
        format="text",
    )


@settings(max_examples=25)
@given(
    n=st.integers(1, 13),
    batch_size=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    epochs=st.integers(1, 3),
)
def test_each_example_exactly_once_per_epoch(n, batch_size, seed, epochs):
    total = n * epochs
    n_batches = -(-total // batch_size)
    stream = []
    for i in range(n_batches):
        stream += batch_positions(n, i, batch_size, seed)
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    # same (seed, index) -> same batch; the positions are a pure function
    assert stream[:batch_size] == batch_positions(n, 0, batch_size, seed)


def test_epochs_are_shuffled_differently_and_seed_matters():
    a = [batch_positions(50, i, 10, seed=1) for i in range(10)]
    assert sum(a[:5], []) != sum(a[5:], [])  # epoch 0 vs epoch 1 orders differ
    assert batch_positions(50, 0, 10, seed=1) != batch_positions(50, 0, 10, seed=2)


@settings(max_examples=20)
@given(
    n=st.integers(1, 11),
    index=st.integers(0, 20),
    world=st.sampled_from([2, 4]),
    per_rank=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_rank_shards_concatenate_to_global_batch(n, index, world, per_rank, seed):
    b = world * per_rank
    whole = batch_positions(n, index, b, seed)
    parts = [batch_positions(n, index, b, seed, rank=r, world=world) for r in range(world)]
    assert sum(parts, []) == whole


def test_batch_at_arrays_match_numpy_reference():
    lengths = [5, 12, 3, 9, 7, 20]
    offsets = [0, 4, 1, 0, 6, 2]
    ds = toy(lengths, offsets)
    for index in range(4):
        x, y, m = batch_at(ds, index, batch_size=3, seed=7, max_seq_len=16)
        idx = batch_positions(len(ds), index, 3, 7)
        seqs = [ds.tokens[i][:16] for i in idx]
        longest = max(len(s) for s in seqs) - 1
        width = min(8 * ((longest + 7) // 8), 15)
        assert x.shape == y.shape == m.shape == (3, width)
        x, y, m = np.array(x), np.array(y), np.array(m)
        assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == np.float32
        for b, i in enumerate(idx):
            s = seqs[b]
            for t in range(width):
                real = t + 1 < len(s)
                assert x[b, t] == (s[t] if real else 0)
                assert y[b, t] == (s[t + 1] if real else 0)
                # learn token t+1 iff it is real and not part of the prompt
                assert m[b, t] == float(real and t + 1 >= ds.offsets[i])


def test_batch_at_deterministic_and_sharded():
    ds = toy([4, 6, 9, 11, 3, 8, 5, 7, 10])
    a = batch_at(ds, 5, batch_size=4, seed=3, max_seq_len=32)
    b = batch_at(ds, 5, batch_size=4, seed=3, max_seq_len=32)
    for u, v in zip(a, b):
        assert np.array_equal(np.array(u), np.array(v))
    r0 = batch_at(ds, 5, batch_size=4, seed=3, max_seq_len=32, rank=0, world=2)
    r1 = batch_at(ds, 5, batch_size=4, seed=3, max_seq_len=32, rank=1, world=2)
    for whole, p0, p1 in zip(a, r0, r1):
        assert p0.shape == p1.shape == (2, whole.shape[1])  # same width on every rank
        assert np.array_equal(np.concatenate([np.array(p0), np.array(p1)]), np.array(whole))


def test_batch_arguments_checked():
    ds = toy([4, 5])
    with pytest.raises(ValueError, match="multiple of world"):
        batch_at(ds, 0, batch_size=3, seed=0, max_seq_len=8, world=2)
    with pytest.raises(ValueError, match="rank"):
        batch_at(ds, 0, batch_size=2, seed=0, max_seq_len=8, rank=2, world=2)
    with pytest.raises(ValueError, match=">= 0"):
        batch_at(ds, -1, batch_size=2, seed=0, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        batch_at(ds, 0, batch_size=2, seed=0, max_seq_len=1)


class _CountingTokenizer:
    """Bytes as tokens; records the longest text it was asked to encode."""

    eos_token_id = 0
    chat_template = None

    def __init__(self):
        self.longest = 0

    def encode(self, text):
        self.longest = max(self.longest, len(text))
        return [1 + (ord(c) % 250) for c in text]


def test_a_huge_line_is_tokenized_only_as_far_as_max_seq_len_needs(tmp_path):
    """A single 2 MB line with max_seq_len 96: the tokenizer sees a few kilobytes, and the
    tokens are exactly those of the whole line, truncated."""
    text = "".join(chr(97 + (i * 7) % 26) for i in range(2_000_000))
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    tok = _CountingTokenizer()
    ds = load_dataset(tmp_path, "train", tok, max_seq_len=96)
    assert tok.longest < 10_000
    assert ds.tokens[0] == _CountingTokenizer().encode(text)[:96]
