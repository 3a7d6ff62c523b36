"""Loading a run's model, data, LoRA and optimizer: all checked before anything is written.

``prepare(config)`` is everything a run starts from (``Prepared``); a user error in any of it
is a ``RunError`` naming the path or option: ``optimizer_args`` before the model is loaded
(``check_optimizer_args``), batch size, sequence length and LoRA rank against the data, the
model and the memory before anything of their size is allocated (``check_sizes``).  ``inspect`` shows the tier table and model
summary a run would start from, without training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from nestedfn.lm.blocks import block_depths
from nestedfn.lm.build import build_optimizer, build_schedule, resolve_tiers
from nestedfn.lm.config import TrainConfig, is_tiered
from nestedfn.lm.errors import RunError
from nestedfn.lm.lora import LoraSpec, apply_lora
from nestedfn.optim.core import Optimizer, Params, Step, TrainState, init
from nestedfn.run import distributed

__all__ = ["Prepared", "inspect", "load_run_model", "overview", "prepare"]


def load_run_model(
    model_path: str | Path | None, trust_remote_code: bool = False, adapter_path: Any = None
) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` of a local model directory; a missing path is a ``RunError`` (never a
    Hugging Face download attempt)."""
    if not model_path:
        raise RunError("no model given: pass --model PATH (an mlx-lm model directory)")
    path = Path(model_path)
    if not path.is_dir():
        hint = ""
        if not path.is_absolute() and str(model_path).count("/") == 1:
            hint = (
                " (a Hugging Face repo id needs the network; nestedfn loads local directories: "
                "download it first, e.g. `hf download REPO --local-dir DIR`)"
            )
        raise RunError(f"model path {path.absolute()} does not exist or is not a directory{hint}")
    if not (path / "config.json").is_file():
        raise RunError(f"model path {path} holds no config.json: not an mlx-lm model directory")
    import mlx_lm

    kw: dict[str, Any] = {"adapter_path": str(adapter_path)} if adapter_path else {}
    if trust_remote_code:
        kw["tokenizer_config"] = {"trust_remote_code": True}
    try:
        return mlx_lm.load(str(path), **kw)
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
    test_set: Any = None


def check_optimizer_args(config: TrainConfig) -> None:
    """``optimizer_args`` held to the domains the optimizer declares (``optim.checks``;
    names it does not declare: ``checks.BY_NAME``, else a finite number), before anything is
    loaded: a ``RunError`` naming the argument and value."""
    from nestedfn.optim import checks, optimizers

    fn = getattr(optimizers, config.optimizer, None)
    domains = getattr(fn, "domains", {})
    for k, v in dict(config.optimizer_args or {}).items():
        domain = domains.get(k, checks.BY_NAME.get(k))
        try:
            if domain is not None:
                checks.check_value(config.optimizer, k, v, domain)
            elif isinstance(v, float):
                checks.check_value(config.optimizer, k, v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    if isinstance(x, float):
                        checks.check_value(config.optimizer, k, x)
        except (TypeError, ValueError) as e:
            raise RunError(f"optimizer_args: {e}") from None


def _memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_sizes(config: TrainConfig, model: nn.Module) -> None:
    """Batch size, sequence length and LoRA rank against the model and the machine's memory,
    before anything of their size is allocated: a memory estimate -- the logits of a batch
    (``batch x max_seq_len x vocab`` float32) or the adapters with their gradients and two
    moments (``4 x rank x sum(in + out)`` float32 over the adapted linear layers) -- larger
    than the machine's physical memory is a ``RunError`` naming the option.  A batch larger
    than a split is refused where batches are made (``lm.batches.split_batches``)."""
    mem = _memory()
    if mem is None:
        return
    vocab = _vocab(model)
    if vocab:
        need = config.batch_size * config.max_seq_len * vocab * 4
        if need > mem:
            raise RunError(
                f"batch_size {config.batch_size} x max_seq_len {config.max_seq_len}: the logits "
                f"alone need about {need / 2**30:,.1f} GiB ({vocab:,} vocabulary entries), more "
                f"than this machine's {mem / 2**30:,.1f} GiB; lower --batch-size or --max-seq-len"
            )
    if config.fine_tune_type != "full":
        n = default_layers(config, model)
        blocks = model.layers if n == -1 else model.layers[-n:] if n > 0 else []
        dims = 0
        for block in blocks:
            for _, m in block.named_modules():
                w = getattr(m, "weight", None)
                if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and w is not None:
                    out_dim, in_dim = w.shape[0], getattr(m, "input_dims", w.shape[1])
                    dims += in_dim + out_dim
        need = 4 * 4 * config.lora_rank * dims
        if need > mem:
            raise RunError(
                f"lora_rank {config.lora_rank}: the adapters with their gradients and optimizer "
                f"moments need about {need / 2**30:,.1f} GiB, more than this machine's "
                f"{mem / 2**30:,.1f} GiB; lower --lora-rank"
            )


def _vocab(model: nn.Module) -> int | None:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def prepare(config: TrainConfig, need_data: bool = True) -> Prepared:
    from nestedfn.lm.data import DataError, load_dataset
    from nestedfn.lm.lora import LoraError

    check_optimizer_args(config)
    model, tokenizer = load_run_model(config.model, config.trust_remote_code)
    train_set = valid_set = test_set = None
    if need_data or config.data:
        if not config.data:
            raise RunError("no data given: pass --data DIR (with train.jsonl and valid.jsonl)")
        data = Path(config.data)
        if not data.is_dir():
            raise RunError(f"data directory {data.absolute()} does not exist")
        splits = ("train", "valid", "test") if config.test else ("train", "valid")
        try:
            train_set, valid_set, *rest = (
                load_dataset(
                    data, s, tokenizer, config.max_seq_len, config.mask_prompt, features(config)
                )
                for s in splits
            )
        except DataError as e:
            raise RunError(str(e)) from None
        test_set = rest[0] if rest else None
    check_sizes(config, model)
    world = distributed.world_size()
    if config.batch_size % world:
        raise RunError(f"batch_size {config.batch_size} is not a multiple of {world} processes")
    keys = tuple(config.lora_keys) if config.lora_keys is not None else None
    spec = LoraSpec(
        config.lora_rank,
        config.lora_scale,
        config.lora_dropout,
        default_layers(config, model),
        keys,
        config.fine_tune_type,
    )
    try:
        params = apply_lora(model, spec, seed=config.seed)
    except LoraError as e:
        raise RunError(str(e)) from None
    except Exception as e:  # a model class mlx-lm's LoRA cannot take (freeze() fails, ...)
        message = " ".join(str(e).split())
        raise RunError(
            f"the model in {config.model} ({type(model).__name__}) cannot take LoRA adapters: "
            f"{type(e).__name__}: {message}"
        ) from None
    if config.resume_adapter_file:
        params = _start_from(config.resume_adapter_file, params)
    if config.grad_checkpoint:
        from nestedfn.lm.remat import checkpoint_blocks

        checkpoint_blocks(model)
    try:
        depths = block_depths(model, params)
        tiers = resolve_tiers(config, params, depths) if is_tiered(config) else None
        schedule = build_schedule(config)
        opt = build_optimizer(config, schedule, tiers)
        state = init(opt, params)
    except (ValueError, TypeError, KeyError) as e:
        raise RunError(f"optimizer {config.optimizer!r}: {e}") from None
    return Prepared(
        config, model, train_set, valid_set, spec, params, opt, schedule, state, tiers, test_set
    )


def _start_from(path: str, params: Params) -> Params:
    """``resume_adapter_file``: the trainable tree with the values saved in ``path`` (an
    ``adapters.safetensors`` file or a directory holding one), every leaf checked; the
    optimizer starts fresh, as in mlx-lm."""
    from nestedfn.lm.adapters import load_adapters

    try:
        return load_adapters(path, like=params)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"resume_adapter_file: {e}") from None


def features(config: TrainConfig) -> dict[str, str]:
    """The data record keys (mlx-lm's ``*_feature`` options), for ``load_dataset``."""
    return {
        "prompt": config.prompt_feature,
        "completion": config.completion_feature,
        "text": config.text_feature,
        "messages": config.chat_feature,
    }


MLX_LM_NUM_LAYERS = 16  # mlx-lm's default num_layers


def default_layers(config: TrainConfig, model: nn.Module) -> int:
    """``lora_layers``, or when unset mlx-lm's 16, at most the model's blocks."""
    if config.lora_layers is not None:
        return config.lora_layers
    return min(MLX_LM_NUM_LAYERS, len(model.layers))


def overview(prep: Prepared) -> str:
    from nestedfn.tiered.tiers import describe
    from nestedfn.tree import to_flat

    c = prep.config
    flat = to_flat(prep.params)
    n_blocks = len(prep.model.layers)
    lora_blocks = prep.spec.num_layers if prep.spec.num_layers != -1 else n_blocks
    size = sum(int(x.size) for x in flat.values())
    what = (
        "full fine-tuning of"
        if c.fine_tune_type == "full"
        else f"{ {'lora': 'LoRA', 'dora': 'DoRA'}[c.fine_tune_type] } rank {c.lora_rank} on"
    )
    if c.lr_schedule is not None:
        lr = f"lr_schedule {c.lr_schedule['name']}{tuple(c.lr_schedule['arguments'])}"
        lr += f", warmup {c.lr_schedule.get('warmup', 0)}"
    else:
        lr = f"learning rate {c.learning_rate:g} ({c.schedule}, warmup {c.warmup_steps})"
    lines = [
        f"model {c.model}: {n_blocks} blocks; {what} the last {lora_blocks}: {len(flat)} "
        f"arrays, {size:,} trainable parameters",
        f"optimizer {c.optimizer}, {lr}, batch {c.batch_size} x accumulation {c.grad_accumulation}",
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
