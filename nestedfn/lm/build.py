"""The optimizer a ``TrainConfig`` describes: schedule, tiers, clipping, accumulation.

A config in mlx-lm's terms builds mlx-lm's optimizer: ``adam``/``adamw`` are
``mlx.optimizers.Adam``/``AdamW``'s rule with their defaults (run by nestedfn's fused Adam),
``sgd``, ``muon``, ``adafactor`` (and ``rmsprop``, ``adagrad``, ``adadelta``, ``adamax``) the
``mlx.optimizers`` class itself through ``from_mlx``.  Tiers come only with ``nested_adam``,
``multiscale_momentum`` or ``frequencies`` of more than one tier.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import mlx.optimizers

from nestedfn.lm.config import ConfigError, TrainConfig
from nestedfn.lm.lr_schedule import from_lr_schedule
from nestedfn.optim import combinators, optimizers, schedules, transforms
from nestedfn.optim.core import Optimizer, Params, Step, chain, with_learning_rate
from nestedfn.optim.from_mlx import MLX_OPTIMIZERS, from_mlx
from nestedfn.tiered import multiscale_momentum, nested, nested_adam
from nestedfn.tiered.tiers import by_depth, by_pattern
from nestedfn.tree import flatten, tree_map

__all__ = ["build_optimizer", "build_schedule", "resolve_tiers"]


def build_schedule(config: TrainConfig) -> Callable[[Step], Any]:
    """The learning rate per optimizer update: mlx-lm's ``lr_schedule`` when given (then
    ``learning_rate`` is not read, as in mlx-lm), else linear warmup over ``warmup_steps``
    from 0, then constant or cosine decay to ``min_lr_ratio * learning_rate`` at
    ``decay_steps`` (default: the run's number of updates)."""
    if config.lr_schedule is not None:
        return from_lr_schedule(config.lr_schedule)

    lr = float(config.learning_rate)
    if config.schedule == "cosine":
        decay = config.decay_steps or max(config.steps // config.grad_accumulation, 1)
        if decay <= config.warmup_steps:
            raise ConfigError(
                f"decay_steps ({decay}) must exceed warmup_steps ({config.warmup_steps})"
            )
        return schedules.warmup_cosine(
            lr, config.warmup_steps, decay, end_value=lr * config.min_lr_ratio
        )
    if config.warmup_steps:
        return schedules.linear_warmup(lr, config.warmup_steps)
    return schedules.constant(lr)


def _scale_by_schedule(schedule: Callable[[Step], Any]) -> Optimizer:
    """Multiply updates by ``schedule(step)`` (non-negative, so ``-0.0`` stays ``-0.0`` and
    leaves of inactive tiers stay bit-identical)."""

    def update_fn(updates: Any, state: tuple, params: Params, step: Step) -> Any:
        lr = schedule(step)
        return tree_map(lambda u: u * lr, updates), state

    return with_learning_rate(Optimizer(lambda params: (), update_fn), schedule)


def resolve_tiers(
    config: TrainConfig, params: Params, depths: dict[str, int] | None = None
) -> Params:
    """The tree of tier indices for ``params``: ``by_depth`` for ``tiers: depth`` (by
    ``depths``, each leaf's position in the model's block order, when given), else
    ``by_pattern`` of the ``{regex: tier}`` mapping.  Raises ``ValueError`` when a tier would be
    empty or a pattern matches nothing."""
    if config.tiers == "depth":
        return by_depth(params, len(config.frequencies or ()), config.tier_order, depths=depths)
    labels = by_pattern({str(k): int(v) for k, v in config.tiers.items()}, params=params)
    used = {int(x) for x in flatten(labels)[0]}
    n = len(config.frequencies or ())
    empty = [k for k in range(n) if k not in used]
    if empty or max(used) >= n:
        raise ValueError(
            f"tiers {dict(config.tiers)} give tiers {sorted(used)} but frequencies "
            f"{list(config.frequencies)} need exactly tiers 0..{n - 1}; empty: {empty}"
        )
    return labels


# mlx-lm's names that run on nestedfn's own (fused) Adam: the same update rule, with
# mlx.optimizers.Adam/AdamW's defaults (no bias correction; AdamW's weight decay 0.01).
NATIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"bias_correction": False},
    "adamw": {"bias_correction": False, "weight_decay": 0.01},
}
# every other mlx.optimizers class, by the name the config takes
MLX_CLASSES: dict[str, str] = {"sgd": "SGD", "muon": "Muon", **MLX_OPTIMIZERS}


def _mlx_rule(name: str, kw: dict[str, Any], learning_rate: Any, tiered: bool) -> Optimizer:
    """``mlx.optimizers``' ``name`` built as mlx-lm builds it (``cls(learning_rate, **kw)``),
    through ``from_mlx``.  In tiers it runs at learning rate 1 and the run's schedule scales its
    updates (every one of them is linear in the learning rate), so Adafactor there defaults to
    ``relative_step=False``: its own step size would ignore ``learning_rate``."""
    cls = getattr(mlx.optimizers, MLX_CLASSES[name])
    if tiered and name == "adafactor":
        if kw.get("relative_step"):
            raise ConfigError(
                "adafactor with relative_step: true ignores learning_rate, which the tiers' "
                "schedule still multiplies in; leave relative_step false"
            )
        kw = {"relative_step": False, **kw}
    try:
        return from_mlx(cls(learning_rate=learning_rate, **kw))
    except TypeError as e:
        raise ConfigError(f"optimizer_args for {name}: {e}") from None


def _rule(name: str, kw: dict[str, Any], learning_rate: Any, tiered: bool) -> Optimizer:
    """The plain optimizer ``name`` at ``learning_rate`` (a float or a schedule)."""
    if name in NATIVE_DEFAULTS:
        kw = {**NATIVE_DEFAULTS[name], **kw}
    try:
        if name in MLX_CLASSES:
            return _mlx_rule(name, kw, learning_rate, tiered)
        return getattr(optimizers, name)(learning_rate, **kw)
    except TypeError as e:
        raise ConfigError(f"optimizer_args for {name}: {e}") from None


def _takes_weight_decay(name: str) -> bool:
    if name in MLX_CLASSES:
        fn = getattr(mlx.optimizers, MLX_CLASSES[name]).__init__
    else:
        fn = {"nested_adam": nested_adam, "multiscale_momentum": multiscale_momentum}.get(
            name
        ) or getattr(optimizers, name)
    return "weight_decay" in inspect.signature(fn).parameters


def build_optimizer(
    config: TrainConfig, schedule: Callable[[Step], Any], tiers: Params | None
) -> Optimizer:
    """The optimizer a config describes, outermost first: ``accumulate`` (when
    ``grad_accumulation > 1``), ``clip_by_global_norm`` (when ``grad_clip > 0``), then the
    optimizer, in ``tiers`` (from ``resolve_tiers``; ``None`` when not ``is_tiered``).

    Untiered, mlx-lm's names are what ``mlx_lm lora`` builds: ``mlx.optimizers``' class with
    its defaults and ``optimizer_args``, at the run's learning rate (a float, or the schedule).
    Tiered optimizers run with learning rate 1 inside the tiers and their updates are scaled by
    ``schedule`` at the global update count, so warmup and decay count updates for every tier
    (as ``nested_adam`` does)."""
    name, kw = config.optimizer, dict(config.optimizer_args)
    if config.weight_decay is not None:
        if not _takes_weight_decay(name):
            raise ConfigError(f"{name} has no weight decay; leave weight_decay unset with it")
        kw.setdefault("weight_decay", config.weight_decay)
    if name == "nested_adam":
        if tiers is None:
            raise ValueError("nested_adam needs tiers (more than one frequency)")
        freqs = tuple(config.frequencies or ())
        opt = nested_adam(schedule, frequencies=freqs, tiers=tiers, reduce=config.tier_reduce, **kw)
    elif name == "multiscale_momentum":
        opt = multiscale_momentum(schedule, **kw)
    elif tiers is not None:
        inner = _rule(name, kw, 1.0, tiered=True)
        freqs = tuple(config.frequencies or ())
        opt = chain(nested(inner, tiers, freqs, config.tier_reduce), _scale_by_schedule(schedule))
    else:
        opt = _rule(name, kw, _learning_rate(config, schedule), tiered=False)
    if config.grad_clip:
        opt = chain(transforms.clip_by_global_norm(float(config.grad_clip)), opt)
    if config.grad_accumulation > 1:
        opt = combinators.accumulate(opt, config.grad_accumulation)
    return opt


def _learning_rate(config: TrainConfig, schedule: Callable[[Step], Any]) -> Any:
    """The float learning rate where the rate is constant (as mlx-lm passes it), else the
    schedule."""
    constant = config.lr_schedule is None and config.schedule == "constant"
    return float(config.learning_rate) if constant and not config.warmup_steps else schedule
