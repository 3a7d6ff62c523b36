"""JSONL data in mlx-lm's formats, tokenized once, and batches that are a pure function of
``(seed, index)``.

Formats (detected per record, as ``mlx_lm.tuner.datasets.create_dataset`` does; one file must
use one format):

* ``{"text": str}`` -- tokens of the text, eos appended if the tokenizer did not end with it;
* ``{"messages": [{"role", "content"}, ...]}`` -- the tokenizer's chat template; the prompt is
  everything before the last message (rendered with a generation prompt when that last message
  is the assistant's);
* ``{"prompt": str, "completion": str}`` -- rendered as a user/assistant chat (as mlx-lm does);
  the prompt is the user turn plus the generation prompt.  A tokenizer with no chat template
  falls back to ``encode(prompt) + encode(completion) + [eos]``.

``TokenDataset`` keeps, per example, the token list and ``offset`` = the number of leading
prompt tokens (0 for ``text``) so the loss can leave the prompt out.

Batches: the trainer takes mlx-lm's (``nestedfn.lm.batches``).  ``batch_at`` is nestedfn's
own stream, kept for the benchmarks that evaluate fixed batches: the examples are read as one
endless stream, epoch after epoch, each epoch in its own
order ``permutation(n)`` drawn from ``numpy.random.default_rng([seed, epoch])``.  Global batch
``index`` is stream positions ``index*B ... index*B + B - 1`` (position ``p`` is example
``perm_{p // n}[p % n]``), so every example appears exactly once per epoch, a batch may straddle
two epochs, resuming is "continue from the next index", and with ``world`` processes rank ``r``
takes the contiguous slice ``[r*B/world, (r+1)*B/world)`` of the global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "TokenDataset",
    "batch_at",
    "batch_positions",
    "detect_format",
    "load_dataset",
    "load_records",
    "read_jsonl",
]

FORMATS = ("completion", "chat", "text")


class DataError(ValueError):
    """Bad training data; the message names the file (and line, where there is one)."""


def read_jsonl(path: Path | str) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a JSONL file.

    Raises ``DataError`` naming the file for a missing or empty file, and naming file and line
    for a line that is not UTF-8, not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records: list[tuple[int, dict]] = []
    with open(path, "rb") as f:  # bytes, so that a non-UTF-8 line is an error naming its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                    f"{e.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                ) from e
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            records.append((lineno, rec))
    if not records:
        raise DataError(f"{path}: data file is empty (no JSON records)")
    return records


def load_records(path: Path | str) -> list[dict]:
    """The records of a JSONL file (blank lines skipped); errors as ``read_jsonl``."""
    return [rec for _, rec in read_jsonl(path)]


def detect_format(record: dict) -> str | None:
    """``"completion"``, ``"chat"``, ``"text"`` or ``None``, checked in mlx-lm's order."""
    if "prompt" in record and "completion" in record:
        return "completion"
    if "messages" in record:
        return "chat"
    if "text" in record:
        return "text"
    return None


@dataclass(frozen=True)
class TokenDataset:
    """Tokenized examples of one file: ``tokens[i]`` (ints) and ``offsets[i]`` (prompt length,
    the number of leading tokens the loss masks)."""

    tokens: list[list[int]]
    offsets: list[int]
    path: Path
    format: str
    lines: list[int] = field(default_factory=list)
    record_sizes: list[int] = field(default_factory=list)  # len(record): mlx-lm's batch sort key

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _as_ids(x: Any) -> list[int]:
    """Token ids from ``apply_chat_template``/``encode`` (list, or dict with ``input_ids``)."""
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(t) for t in x]


def _encode_text(
    rec: dict, tokenizer: Any, where: str, max_tokens: int | None = None
) -> tuple[list[int], int]:
    text = rec["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    ids = _bounded_encode(tokenizer, text, max_tokens)
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, 0


_CUT_MARGIN = 16  # tokens past the limit: a cut of the text only changes the last few tokens


def _bounded_encode(tokenizer: Any, text: str, max_tokens: int | None) -> list[int]:
    """``encode(text)``, or when only the first ``max_tokens`` are kept, the encoding of a
    prefix of the text long enough to give them: the prefix doubles (from 8 characters per
    token) until it gives ``max_tokens + 16`` tokens, whose first ``max_tokens`` are those of
    the whole text (a cut changes only the tokens next to it).  The work is bounded by the
    sequence length, not by the line (a 50 MB line with ``max_seq_len`` 96 tokenizes a few
    kilobytes)."""
    if max_tokens is None:
        return _as_ids(tokenizer.encode(text))
    size = 8 * (max_tokens + _CUT_MARGIN)
    while size < len(text):
        ids = _as_ids(tokenizer.encode(text[:size]))
        if len(ids) >= max_tokens + _CUT_MARGIN:
            return ids[:max_tokens]
        size *= 2
    return _as_ids(tokenizer.encode(text))


# The roles of the chat format mlx-lm's data docs and chat templates use (OpenAI's messages).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            raise DataError(f"{where}: messages[{k}] must be an object with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: messages[{k}] has role {m['role']!r}; chat roles are "
                f"{', '.join(CHAT_ROLES)}"
            )


def _chat(tokenizer: Any, messages: list, where: str, **kw: Any) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat data needs a tokenizer with a chat template; this has none")
    try:
        return _as_ids(tokenizer.apply_chat_template(messages, return_dict=False, **kw))
    except DataError:
        raise
    except Exception as e:  # a template error is a data error for this record
        raise DataError(f"{where}: chat template failed: {e}") from e


def _encode_chat(rec: dict, tokenizer: Any, where: str) -> tuple[list[int], int]:
    messages = rec["messages"]
    _check_messages(messages, where)
    tools = rec.get("tools")
    ids = _chat(tokenizer, messages, where, tools=tools)
    gen = messages[-1]["role"] == "assistant"
    if len(messages) == 1 and not gen:
        return ids, 0
    prompt = _chat(tokenizer, messages[:-1], where, tools=tools, add_generation_prompt=gen)
    if ids[: len(prompt)] != prompt:
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix")
    return ids, len(prompt)


def _encode_completion(rec: dict, tokenizer: Any, where: str) -> tuple[list[int], int]:
    prompt, completion = rec["prompt"], rec["completion"]
    for key, val in (("prompt", prompt), ("completion", completion)):
        if not isinstance(val, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(val).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        p = _as_ids(tokenizer.encode(prompt))
        return p + _as_ids(tokenizer.encode(completion)) + [tokenizer.eos_token_id], len(p)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    tools = rec.get("tools")
    ids = _chat(tokenizer, messages, where, tools=tools)
    head = _chat(tokenizer, messages[:1], where, tools=tools, add_generation_prompt=True)
    return ids, len(head)


_ENCODERS = {"text": _encode_text, "chat": _encode_chat, "completion": _encode_completion}


def load_dataset(
    data_dir: Path | str,
    split: str,
    tokenizer: Any,
    max_seq_len: int | None = None,
    mask_prompt: bool = False,
    features: dict[str, str] | None = None,
) -> TokenDataset:
    """Load and tokenize ``data_dir/{split}.jsonl``.

    ``max_seq_len`` truncates every example to that many tokens (and raises if a prompt fills
    it, leaving nothing to learn).  ``mask_prompt=True`` leaves the prompt out of the loss
    (``offset`` = its length; an error for text records, which have none); ``False`` (mlx-lm's
    default) keeps it in (offset 0).  ``features`` renames the record keys, as mlx-lm's
    ``prompt_feature``/``completion_feature``/``text_feature``/``chat_feature`` do:
    ``{"prompt": "question"}`` reads the prompt from ``question``.  Every problem is a
    ``DataError`` naming file and line.
    """
    path = Path(data_dir) / f"{split}.jsonl"
    records = read_jsonl(path)
    renames = {v: k for k, v in (features or {}).items() if v != k}
    if renames:
        records = [(n, {renames.get(k, k): v for k, v in r.items()}) for n, r in records]
    first_line, first = records[0]
    fmt = detect_format(first)
    if mask_prompt and fmt == "text":
        raise DataError(
            f"{path}:{first_line}: mask_prompt needs prompt/completion or chat records (text "
            "records have no prompt; mlx-lm refuses them too); set mask_prompt: false"
        )
    tokens, offsets, lines, sizes = [], [], [], []
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        f = detect_format(rec)
        if f is None:
            raise DataError(
                f"{where}: record in none of the known formats (keys {sorted(rec)}; "
                "expected 'text', 'messages', or 'prompt' and 'completion')"
            )
        if f != fmt:
            raise DataError(
                f"{where}: mixed formats in one file: this record is {f!r}, "
                f"line {first_line} is {fmt!r}"
            )
        if fmt == "text":  # the one format whose work can be bounded by the truncation
            ids, offset = _encode_text(rec, tokenizer, where, max_seq_len)
        else:
            ids, offset = _ENCODERS[fmt](rec, tokenizer, where)
        if max_seq_len is not None:
            ids = ids[:max_seq_len]
        if not mask_prompt:
            offset = 0
        if len(ids) < 2:
            raise DataError(f"{where}: example has {len(ids)} token(s); need at least 2")
        if offset >= len(ids):
            raise DataError(
                f"{where}: the prompt ({offset} tokens) fills the example "
                f"({len(ids)} tokens after truncation); nothing left to learn"
            )
        tokens.append(ids)
        offsets.append(offset)
        lines.append(lineno)
        sizes.append(len(rec))
    return TokenDataset(tokens, offsets, path, fmt, lines, sizes)


@lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def batch_positions(
    n: int, index: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list[int]:
    """Example indices of this rank's share of global batch ``index`` (see module docstring)."""
    if n < 1:
        raise ValueError("dataset is empty")
    if index < 0:
        raise ValueError(f"batch index must be >= 0, got {index}")
    if batch_size < 1 or world < 1 or batch_size % world:
        raise ValueError(
            f"global batch_size ({batch_size}) must be a positive multiple of world ({world})"
        )
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    local = batch_size // world
    start = index * batch_size + rank * local
    return [int(_permutation(seed, p // n, n)[p % n]) for p in range(start, start + local)]


def batch_at(
    dataset: TokenDataset,
    index: int,
    batch_size: int,
    seed: int,
    max_seq_len: int,
    rank: int = 0,
    world: int = 1,
    pad_to: int = 8,
):
    """Rank ``rank``'s slice of global batch ``index``: ``(inputs, targets, mask)``, each
    ``[batch_size // world, T]``.

    Each example is truncated to ``max_seq_len`` tokens; ``inputs = seq[:-1]``,
    ``targets = seq[1:]``, padded with 0 to ``T`` = the longest ``len - 1`` in the batch rounded
    up to a multiple of ``pad_to`` (fewer distinct shapes to compile), at most
    ``max_seq_len - 1``; "the batch" is the global one, so all ranks share ``T``.  ``mask[b, t] = 1.0`` where target ``t`` (token ``t + 1``) is a real
    token at or after the prompt offset, else 0: padding and prompt are not learned.
    """
    import mlx.core as mx

    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    idx = batch_positions(len(dataset), index, batch_size, seed, rank, world)
    seqs = [dataset.tokens[i][:max_seq_len] for i in idx]
    # the width comes from the whole global batch, so every rank gets the same shape and the
    # ranks' slices concatenate to exactly the one-process batch
    everyone = idx if world == 1 else batch_positions(len(dataset), index, batch_size, seed)
    longest = min(max(len(dataset.tokens[i]) for i in everyone), max_seq_len) - 1
    width = min(-(-longest // pad_to) * pad_to, max_seq_len - 1)
    inputs = np.zeros((len(seqs), width), np.int32)
    targets = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for b, (i, s) in enumerate(zip(idx, seqs)):
        n = len(s) - 1
        inputs[b, :n] = s[:-1]
        targets[b, :n] = s[1:]
        first = max(dataset.offsets[i] - 1, 0)  # target t is token t + 1
        mask[b, first:n] = 1.0
    return mx.array(inputs), mx.array(targets), mx.array(mask)
