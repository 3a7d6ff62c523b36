"""Loading a run's model, data, LoRA and optimizer: all checked before anything is written.

``prepare(config)`` is everything a run starts from (``Prepared``); a user error in any of it
is a ``RunError`` naming the path or option.  ``inspect`` shows the tier table and model
summary a run would start from, without training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from nestedfn.lm.build import build_optimizer, build_schedule, resolve_tiers
from nestedfn.lm.config import TrainConfig, is_tiered
from nestedfn.lm.errors import RunError
from nestedfn.lm.lora import LoraSpec, apply_lora
from nestedfn.optim.core import Optimizer, Params, Step, TrainState, init
from nestedfn.run import distributed

__all__ = ["Prepared", "inspect", "load_run_model", "overview", "prepare"]


def load_run_model(model_path: str | Path | None) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` of a local model directory; a missing path is a ``RunError`` (never a
    Hugging Face download attempt)."""
    if not model_path:
        raise RunError("no model given: pass --model PATH (an mlx-lm model directory)")
    path = Path(model_path)
    if not path.is_dir():
        raise RunError(f"model path {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise RunError(f"model path {path} holds no config.json: not an mlx-lm model directory")
    import mlx_lm

    try:
        return mlx_lm.load(str(path))
    except Exception as e:  # mlx-lm raises many kinds; the user needs the path and the reason
        raise RunError(f"could not load the model in {path}: {type(e).__name__}: {e}") from e


@dataclass
class Prepared:
    config: TrainConfig
    model: nn.Module
    train_set: Any
    valid_set: Any
    spec: LoraSpec
    params: Params
    opt: Optimizer
    schedule: Callable[[Step], Any]
    state: TrainState
    tiers: Params | None


def prepare(config: TrainConfig, need_data: bool = True) -> Prepared:
    from nestedfn.lm.data import DataError, load_dataset
    from nestedfn.lm.lora import LoraError

    model, tokenizer = load_run_model(config.model)
    train_set = valid_set = None
    if need_data or config.data:
        if not config.data:
            raise RunError("no data given: pass --data DIR (with train.jsonl and valid.jsonl)")
        data = Path(config.data)
        if not data.is_dir():
            raise RunError(f"data directory {data} does not exist")
        try:
            train_set = load_dataset(data, "train", tokenizer, config.max_seq_len)
            valid_set = load_dataset(data, "valid", tokenizer, config.max_seq_len)
        except DataError as e:
            raise RunError(str(e)) from None
    world = distributed.world_size()
    if config.batch_size % world:
        raise RunError(f"batch_size {config.batch_size} is not a multiple of {world} processes")
    keys = tuple(config.lora_keys) if config.lora_keys is not None else None
    spec = LoraSpec(
        config.lora_rank, config.lora_scale, config.lora_dropout, config.lora_layers, keys
    )
    try:
        params = apply_lora(model, spec, seed=config.seed)
    except LoraError as e:
        raise RunError(str(e)) from None
    try:
        tiers = resolve_tiers(config, params) if is_tiered(config) else None
        schedule = build_schedule(config)
        opt = build_optimizer(config, schedule, tiers)
        state = init(opt, params)
    except (ValueError, TypeError, KeyError) as e:
        raise RunError(f"optimizer {config.optimizer!r}: {e}") from None
    return Prepared(config, model, train_set, valid_set, spec, params, opt, schedule, state, tiers)


def overview(prep: Prepared) -> str:
    from nestedfn.tiered.tiers import describe
    from nestedfn.tree import to_flat

    c = prep.config
    flat = to_flat(prep.params)
    n_blocks = len(prep.model.layers)
    lora_blocks = n_blocks if c.lora_layers == -1 else c.lora_layers
    size = sum(int(x.size) for x in flat.values())
    lines = [
        f"model {c.model}: {n_blocks} blocks; LoRA rank {c.lora_rank} on the last "
        f"{lora_blocks}: {len(flat)} arrays, {size:,} trainable parameters",
        f"optimizer {c.optimizer}, learning rate {c.learning_rate:g} ({c.schedule}, warmup "
        f"{c.warmup_steps}), batch {c.batch_size} x accumulation {c.grad_accumulation}",
    ]
    if prep.train_set is not None:
        lines.insert(
            1,
            f"data {c.data}: {len(prep.train_set)} train / {len(prep.valid_set)} valid examples "
            f"({prep.train_set.format})",
        )
    if prep.tiers is not None:
        lines.append(describe(prep.tiers, prep.params, list(c.frequencies)))
    return "\n".join(lines)


def inspect(config: TrainConfig) -> str:
    """The tier table and model summary a run with ``config`` would start from (model, data,
    LoRA and optimizer all loaded and checked; nothing written)."""
    return overview(prepare(config, need_data=False))
