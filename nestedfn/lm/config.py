"""Training options: one dataclass, read from YAML, overridden by CLI flags, saved with the run.

``TrainConfig`` lists every option with its default.  ``load_config(path)`` reads a YAML
mapping of those names (an unknown key is an error listing the valid ones, so a typo never
silently trains with a default); ``resolve(base, overrides)`` applies CLI flags on top; the
resolved config is written into the run directory as ``config.yaml`` and is what
``--resume`` reads back, so a resumed run continues with exactly the options it started with.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nestedfn.lm.lr_schedule import check_lr_schedule
from nestedfn.lm.mlxlm_compat import (
    NormalizeError,
    accepted_keys,
    closest,
    normalize,
    to_face,
)
from nestedfn.optim.checks import FLOAT32_MAX
from nestedfn.run.checkpoint import atomic_write_text

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "FINE_TUNE_TYPES",
    "ConfigError",
    "TrainConfig",
    "is_tiered",
    "untiered_reason",
    "from_mapping",
    "load_config",
    "parse_yaml",
    "resolve",
    "save_config",
]

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = (
    ("nested_adam", "adam", "adamw", "sgd", "lion", "muon", "multiscale_momentum")
    # mlx.optimizers' own, through nestedfn.optim.from_mlx
    + ("adafactor", "rmsprop", "adagrad", "adadelta", "adamax")
)
SCHEDULES = ("constant", "cosine")
TIER_ORDERS = ("shallow_fast", "deep_fast")
TIER_REDUCES = ("mean", "sum")
RUN_CONFIG = "config.yaml"
NESTED_ADAM_FREQUENCIES = (1, 2, 4)  # nested_adam's tiers when frequencies is not given
MAX_SEED = 2**32  # seeds are in [0, 2**32): a step's dropout seed is seed * 1_000_003 + step


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` and ``1E5`` (no dot) as floats, as YAML 1.2
    and ``mlx_lm lora`` do (YAML 1.1 reads them as strings).  A private subclass: the
    process-wide ``yaml.SafeLoader`` is left alone (``import mlx_lm.lora`` patches that one,
    so reading through it would depend on what else was imported)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, except that ``1e-3`` is the float 0.001; bounded (alias
    expansion, depth), string keys only, one-line errors (``lm.yamlload``)."""
    from nestedfn.lm.yamlload import load_yaml

    return load_yaml(text, _Loader)


class ConfigError(ValueError):
    """An option that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``nestedfn train`` (the CLI flag is the name with ``-`` for ``_``).

    A config file and the flags also take mlx-lm's names for these options (``iters`` for
    ``steps``, ``num_layers`` for ``lora_layers``, ``lora_parameters``, ...: see
    ``nestedfn.lm.mlxlm_compat``), and those are the names ``--help`` and the saved
    ``config.yaml`` show.  The options mlx-lm has take mlx-lm's defaults (learning rate 1e-5,
    1000 iterations, ...), so a config that leaves one out means what it means there;
    ``lora_layers`` unset is mlx-lm's 16, or every block of a model with fewer (where mlx-lm
    stops with an error).  The optimizer is mlx-lm's default, ``adam`` (``mlx.optimizers.Adam``:
    no bias correction); Nested Learning runs only when asked for: ``optimizer: nested_adam``
    (tiers ``[1, 2, 4]`` unless ``frequencies`` says otherwise), ``multiscale_momentum``, or
    ``frequencies`` with more than one tier (the chosen optimizer, in tiers).

    Model/data: ``model`` (mlx-lm model directory), ``data`` (directory with train.jsonl and
    valid.jsonl), ``max_seq_len`` (longer examples are truncated), ``batch_size``.
    LoRA: ``lora_rank``, ``lora_scale``, ``lora_dropout``, ``lora_layers`` (last N blocks,
    -1 all), ``lora_keys`` (module paths inside a block, ``None``: every linear).
    Optimizer: ``optimizer`` (one of ``OPTIMIZERS``; mlx-lm's names mean ``mlx.optimizers``'
    classes with their defaults), ``learning_rate``, ``weight_decay`` (``None``: the
    optimizer's own default, e.g. AdamW's 0.01), ``optimizer_args`` (keyword arguments of the
    optimizer, mlx-lm's ``optimizer_config`` entry), ``frequencies`` and
    ``tiers`` (``"depth"`` or ``{regex: tier}``) and ``tier_order``/``tier_reduce`` for the
    nested optimizers, ``schedule`` (``constant`` or ``cosine`` decay to ``min_lr_ratio``)
    with ``warmup_steps`` of linear warmup (both counted in optimizer updates; the cosine ends at
    ``decay_steps``, default the run's updates, pinned when the run starts), ``grad_clip`` (max global norm, 0 off),
    ``grad_accumulation`` (micro-batches per update).
    Loop: ``steps`` (micro-batches in all), ``eval_every``/``eval_batches`` (-1: the whole
    valid set), ``save_every``, ``keep_last`` (checkpoints kept), ``early_stopping`` (evals
    without a better valid loss before stopping, 0 off), ``seed``, ``compile``.
    mlx-lm's: ``fine_tune_type`` (``lora``, ``dora``, ``full``: the last ``lora_layers``
    blocks' own weights), ``mask_prompt`` (leave prompts out of the loss; mlx-lm's default,
    off), ``grad_checkpoint``, ``resume_adapter_file`` (start from these adapters with a fresh
    optimizer), ``test``/``test_batches`` (evaluate test.jsonl after training), ``train``
    (``false`` with ``test``: only evaluate the adapters in ``adapter_path``),
    ``steps_per_report`` (a plain log line every N steps when the output is not a terminal),
    ``lr_schedule`` (mlx-lm's ``{name, arguments, warmup, warmup_init}``; then
    ``learning_rate`` is ``arguments[0]``), ``adapter_path`` (the run directory, ``--out``),
    ``clear_cache_threshold`` (bytes; clear MLX's cache when it grows past it, 0 off),
    ``trust_remote_code`` (for the tokenizer), ``prompt_feature``/``completion_feature``/
    ``text_feature``/``chat_feature`` (the record keys of the data formats).
    ``pad_target`` (nestedfn's): ``true`` (default) is mlx-lm's ``default_loss``, whose mask runs
    one target past each sequence (the padding token after it, when the batch is padded);
    ``false`` counts only the sequence's own targets (docs/mlx_lm.md gives the difference).
    """

    model: str | None = None
    data: str | None = None
    max_seq_len: int = 2048
    batch_size: int = 4
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_layers: int | None = None
    lora_keys: list[str] | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-5
    weight_decay: float | None = None
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    frequencies: list[int] | None = None
    tiers: Any = "depth"
    tier_order: str = "shallow_fast"
    tier_reduce: str = "mean"
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    grad_clip: float = 0.0
    grad_accumulation: int = 1
    steps: int = 1000
    eval_every: int = 200
    eval_batches: int = 25
    save_every: int = 100
    keep_last: int = 3
    early_stopping: int = 0
    seed: int = 0
    compile: bool = True
    fine_tune_type: str = "lora"
    mask_prompt: bool = False
    grad_checkpoint: bool = False
    resume_adapter_file: str | None = None
    train: bool = True
    test: bool = False
    test_batches: int = 500
    steps_per_report: int = 10
    lr_schedule: dict[str, Any] | None = None
    adapter_path: str | None = None
    clear_cache_threshold: int = 0
    trust_remote_code: bool = False
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    text_feature: str = "text"
    chat_feature: str = "messages"
    pad_target: bool = True

    def __post_init__(self) -> None:
        for name in _PATHS:  # a Path is fine, but the saved YAML needs a str
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                object.__setattr__(self, name, os.fspath(v))
        for name in _FLOATS:  # an int where a float is meant (YAML `learning_rate: 1`)
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                try:
                    object.__setattr__(self, name, float(v))
                except OverflowError:
                    raise ConfigError(f"{name} must be a finite number, got {v!r}") from None
        if self.frequencies is None and self.optimizer == "nested_adam":
            object.__setattr__(self, "frequencies", list(NESTED_ADAM_FREQUENCIES))
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


_FLOATS = (
    "lora_scale",
    "lora_dropout",
    "learning_rate",
    "weight_decay",
    "min_lr_ratio",
    "grad_clip",
)
FEATURES = ("prompt_feature", "completion_feature", "text_feature", "chat_feature")
_PATHS = ("model", "data", "resume_adapter_file", "adapter_path")
_POSITIVE = (
    "max_seq_len",
    "batch_size",
    "lora_rank",
    "grad_accumulation",
    "steps",
    "keep_last",
    "steps_per_report",
)
_NON_NEGATIVE = (
    "warmup_steps",
    "eval_every",
    "save_every",
    "early_stopping",
    "clear_cache_threshold",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def _one_of(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {v!r}")


def _validate(c: TrainConfig) -> None:
    """Every option's type and range, so that a bad value is a ``ConfigError`` naming it before
    a run starts (never a traceback in the first forward pass, after the run directory was
    cleared)."""
    _check_counts(c)
    _check_numbers(c)
    _check_lora(c)
    _check_optimizer(c)
    _check_tiers(c)
    _check_switches(c)
    _check_schedule(c)


def _check_counts(c: TrainConfig) -> None:
    for name in _PATHS:
        v = getattr(c, name)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{name} must be a path, got {v!r}")
    for name in _POSITIVE:
        v = getattr(c, name)
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")
    for name in _NON_NEGATIVE:
        v = getattr(c, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {v!r}")
    for name in ("eval_batches", "test_batches"):
        v = getattr(c, name)
        if not _is_int(v) or (v != -1 and v < 1):
            raise ConfigError(f"{name} must be -1 (all) or >= 1, got {v!r}")
    if c.decay_steps is not None and (not _is_int(c.decay_steps) or c.decay_steps < 1):
        raise ConfigError(f"decay_steps must be a positive int or null, got {c.decay_steps!r}")
    if not _is_int(c.seed) or not 0 <= c.seed < MAX_SEED:
        raise ConfigError(f"seed must be an int in [0, 2**32), got {c.seed!r}")


def _check_numbers(c: TrainConfig) -> None:
    for name in ("grad_clip", "min_lr_ratio"):
        v = getattr(c, name)
        if not _is_finite(v) or v < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
    if c.weight_decay is not None and (not _is_finite(c.weight_decay) or c.weight_decay < 0):
        raise ConfigError(
            f"weight_decay must be a finite number >= 0 or null, got {c.weight_decay!r}"
        )
    if not _is_finite(c.learning_rate) or c.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be a finite number > 0, got {c.learning_rate!r}")
    if c.learning_rate > FLOAT32_MAX:  # inf in float32, where the step computes
        raise ConfigError(
            f"learning_rate must be a finite number > 0 in float32, got {c.learning_rate!r}"
        )


def _check_lora(c: TrainConfig) -> None:
    if not _is_finite(c.lora_scale):
        raise ConfigError(f"lora_scale must be a finite number, got {c.lora_scale!r}")
    if not _is_finite(c.lora_dropout) or not 0.0 <= c.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be a number in [0, 1), got {c.lora_dropout!r}")
    if c.lora_layers is not None and (
        not _is_int(c.lora_layers) or (c.lora_layers != -1 and c.lora_layers < 1)
    ):
        raise ConfigError(
            f"lora_layers must be -1 (all), a positive int or null (mlx-lm's 16, at most the "
            f"model's blocks), got {c.lora_layers!r}"
        )
    if c.lora_keys is not None and not (
        isinstance(c.lora_keys, (list, tuple)) and all(isinstance(k, str) for k in c.lora_keys)
    ):
        raise ConfigError(f"lora_keys must be a list of module paths, got {c.lora_keys!r}")
    _one_of("fine_tune_type", c.fine_tune_type, FINE_TUNE_TYPES)
    for name in FEATURES:
        if not isinstance(getattr(c, name), str) or not getattr(c, name):
            raise ConfigError(f"{name} must be a record key, got {getattr(c, name)!r}")


def _check_optimizer(c: TrainConfig) -> None:
    _one_of("optimizer", c.optimizer, OPTIMIZERS)
    if not isinstance(c.optimizer_args, dict) or not all(
        isinstance(k, str) for k in c.optimizer_args
    ):
        raise ConfigError(
            f"optimizer_args must be a mapping of keyword arguments, got {c.optimizer_args!r}"
        )
    freqs = c.frequencies
    if freqs is not None and (
        not isinstance(freqs, (list, tuple))
        or not freqs
        or any(not _is_int(f) or f < 1 for f in freqs)
    ):
        raise ConfigError(
            f"frequencies must be a non-empty list of positive ints or null, got {freqs!r}"
        )


def _check_tiers(c: TrainConfig) -> None:
    _one_of("tier_order", c.tier_order, TIER_ORDERS)
    _one_of("tier_reduce", c.tier_reduce, TIER_REDUCES)
    if not (
        c.tiers == "depth"
        or isinstance(c.tiers, dict)
        and all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in c.tiers.items())
    ):
        raise ConfigError(
            f"tiers must be 'depth' or a mapping {{regex: tier index}}, got {c.tiers!r}"
        )
    if isinstance(c.tiers, dict):
        for pattern in c.tiers:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"tiers: {pattern!r} is not a regular expression ({e})") from None
        if not is_tiered(c):
            raise ConfigError(
                f"tiers {c.tiers!r} would be ignored: {untiered_reason(c)}; drop tiers or give "
                "the tiers' frequencies (e.g. frequencies: [1, 4])"
            )


def _check_switches(c: TrainConfig) -> None:
    switches = ("compile", "mask_prompt", "grad_checkpoint", "train", "test", "trust_remote_code")
    for name in (*switches, "pad_target"):
        if not isinstance(getattr(c, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(c, name)!r}")
    if not c.train and not c.test:
        raise ConfigError(
            "train: false needs test: true (nothing to do otherwise; mlx-lm: 'Must provide at "
            "least one of --train or --test')"
        )


def _check_schedule(c: TrainConfig) -> None:
    _one_of("schedule", c.schedule, SCHEDULES)
    if c.lr_schedule is None:
        return
    try:
        check_lr_schedule(c.lr_schedule)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.schedule != "constant" or c.warmup_steps:
        raise ConfigError(
            "lr_schedule (mlx-lm's) and schedule/warmup_steps (nestedfn's) both describe "
            "the learning rate schedule; keep one"
        )


def is_tiered(config: TrainConfig) -> bool:
    """Whether the optimizer runs in ``frequencies`` tiers (``multiscale_momentum`` has its own
    timescales; no frequencies or one frequency ``[1]`` means a plain optimizer): where
    ``tiers``, ``tier_order`` and ``tier_reduce`` apply."""
    freqs = config.frequencies
    return config.optimizer != "multiscale_momentum" and freqs is not None and len(freqs) > 1


def untiered_reason(config: TrainConfig) -> str:
    """Why ``config``'s optimizer runs without tiers (``not is_tiered(config)``), for the
    errors about tier options it would ignore."""
    if config.optimizer == "multiscale_momentum":
        return "multiscale_momentum has its own timescales"
    if config.frequencies is None:
        return f"{config.optimizer} runs untiered unless frequencies gives more than one tier"
    return f"frequencies {list(config.frequencies)} is a single tier"


def _check_keys(data: dict[str, Any], source: str) -> None:
    valid = _names()
    unknown = [k for k in data if k not in valid]
    if unknown:
        accepted = accepted_keys(valid)
        named = ", ".join(f"{k!r}{closest(k, accepted)}" for k in unknown)
        raise ConfigError(
            f"{source}: unknown option(s) {named}; valid options: {', '.join(accepted)}"
        )


def from_mapping(data: dict[str, Any], source: str) -> TrainConfig:
    """The ``TrainConfig`` of a mapping in mlx-lm's or nestedfn's key names; ``source`` names
    it in errors."""
    try:
        data = normalize(data, source)
    except NormalizeError as e:
        raise ConfigError(str(e)) from None
    _check_keys(data, source)
    try:
        return TrainConfig(**data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, optimizer: str | None = None) -> TrainConfig:
    """Read a YAML mapping of ``TrainConfig`` options, in nestedfn's or mlx-lm's names
    (missing ones take their defaults).  ``optimizer`` (a ``--optimizer`` flag) replaces the
    file's, so that ``optimizer_config`` gives the arguments of the optimizer that runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    if optimizer is not None:
        data = {**data, "optimizer": optimizer}
    return from_mapping(data, str(path))


def resolve(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``base`` with the options in ``overrides`` (mlx-lm's names or nestedfn's) that are not
    ``None`` replaced."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        # optimizer_config's entry is the optimizer that runs: the override's, else the base's
        given = normalize({"optimizer": base.optimizer, **given}, "command line")
    except NormalizeError as e:
        raise ConfigError(str(e)) from None
    return from_mapping({**base.to_dict(), **given}, "command line")


def save_config(config: TrainConfig, directory: str | Path) -> Path:
    """Write the resolved config as ``directory/config.yaml`` (read back by ``load_config``),
    atomically: a resume that rewrites it leaves the old one or the new one, never a part."""
    return atomic_write_text(
        Path(directory) / RUN_CONFIG, yaml.safe_dump(to_face(config.to_dict()), sort_keys=False)
    )
