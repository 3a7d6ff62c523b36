"""Training options: one dataclass, read from YAML, overridden by CLI flags, saved with the run.

``TrainConfig`` lists every option with its default.  ``load_config(path)`` reads a YAML
mapping of those names (an unknown key is an error listing the valid ones, so a typo never
silently trains with a default); ``resolve(base, overrides)`` applies CLI flags on top; the
resolved config is written into the run directory as ``config.yaml`` and is what
``--resume`` reads back, so a resumed run continues with exactly the options it started with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "ConfigError",
    "TrainConfig",
    "load_config",
    "resolve",
    "save_config",
]

OPTIMIZERS = ("nested_adam", "adam", "adamw", "sgd", "lion", "muon", "multiscale_momentum")
SCHEDULES = ("constant", "cosine")
RUN_CONFIG = "config.yaml"


class ConfigError(ValueError):
    """An option that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``nestedfn train`` (the CLI flag is the name with ``-`` for ``_``).

    Model/data: ``model`` (mlx-lm model directory), ``data`` (directory with train.jsonl and
    valid.jsonl), ``max_seq_len`` (longer examples are truncated), ``batch_size``.
    LoRA: ``lora_rank``, ``lora_scale``, ``lora_dropout``, ``lora_layers`` (last N blocks,
    -1 all), ``lora_keys`` (module paths inside a block, ``None``: every linear).
    Optimizer: ``optimizer`` (one of ``OPTIMIZERS``), ``learning_rate``, ``weight_decay``,
    ``optimizer_args`` (extra keyword arguments for the optimizer), ``frequencies`` and
    ``tiers`` (``"depth"`` or ``{regex: tier}``) and ``tier_order``/``tier_reduce`` for the
    nested optimizers, ``schedule`` (``constant`` or ``cosine`` decay to ``min_lr_ratio``)
    with ``warmup_steps`` of linear warmup (both counted in optimizer updates; the cosine ends at
    ``decay_steps``, default the run's updates, pinned when the run starts), ``grad_clip`` (max global norm, 0 off),
    ``grad_accumulation`` (micro-batches per update).
    Loop: ``steps`` (micro-batches in all), ``eval_every``/``eval_batches`` (-1: the whole
    valid set), ``save_every``, ``keep_last`` (checkpoints kept), ``early_stopping`` (evals
    without a better valid loss before stopping, 0 off), ``seed``, ``compile``.
    """

    model: str | None = None
    data: str | None = None
    max_seq_len: int = 256
    batch_size: int = 4
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_layers: int = -1
    lora_keys: list[str] | None = None
    optimizer: str = "nested_adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    frequencies: list[int] = field(default_factory=lambda: [1, 2, 4])
    tiers: Any = "depth"
    tier_order: str = "shallow_fast"
    tier_reduce: str = "mean"
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    grad_clip: float = 0.0
    grad_accumulation: int = 1
    steps: int = 200
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 3
    early_stopping: int = 0
    seed: int = 0
    compile: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


_POSITIVE = ("max_seq_len", "batch_size", "lora_rank", "grad_accumulation", "steps", "keep_last")
_NON_NEGATIVE = (
    "warmup_steps",
    "grad_clip",
    "eval_every",
    "save_every",
    "early_stopping",
    "weight_decay",
)


def _validate(c: TrainConfig) -> None:
    for name in _POSITIVE:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")
    for name in _NON_NEGATIVE:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
    if c.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {c.optimizer!r}")
    if c.schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {c.schedule!r}")
    if not isinstance(c.learning_rate, (int, float)) or c.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be a number > 0, got {c.learning_rate!r}")
    freqs = c.frequencies
    if (
        not isinstance(freqs, (list, tuple))
        or not freqs
        or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in freqs)
    ):
        raise ConfigError(f"frequencies must be a non-empty list of positive ints, got {freqs!r}")
    if not (c.tiers == "depth" or isinstance(c.tiers, dict)):
        raise ConfigError(f"tiers must be 'depth' or a mapping {{regex: tier}}, got {c.tiers!r}")
    if c.decay_steps is not None and (
        isinstance(c.decay_steps, bool) or not isinstance(c.decay_steps, int) or c.decay_steps < 1
    ):
        raise ConfigError(f"decay_steps must be a positive int or null, got {c.decay_steps!r}")
    if c.eval_batches == 0 or c.eval_batches < -1:
        raise ConfigError(f"eval_batches must be -1 (all) or >= 1, got {c.eval_batches!r}")
    if not isinstance(c.optimizer_args, dict):
        raise ConfigError(f"optimizer_args must be a mapping, got {c.optimizer_args!r}")
    if c.lora_keys is not None and not (
        isinstance(c.lora_keys, (list, tuple)) and all(isinstance(k, str) for k in c.lora_keys)
    ):
        raise ConfigError(f"lora_keys must be a list of module paths, got {c.lora_keys!r}")


def _check_keys(data: dict[str, Any], source: str) -> None:
    valid = _names()
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(
            f"{source}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}"
        )


def _build(data: dict[str, Any], source: str) -> TrainConfig:
    _check_keys(data, source)
    try:
        return TrainConfig(**data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML mapping of ``TrainConfig`` options (missing ones take their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    return _build(data, str(path))


def resolve(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``base`` with the options in ``overrides`` that are not ``None`` replaced."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return _build({**base.to_dict(), **given}, "command line")


def save_config(config: TrainConfig, directory: str | Path) -> Path:
    """Write the resolved config as ``directory/config.yaml`` (read back by ``load_config``)."""
    path = Path(directory) / RUN_CONFIG
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
