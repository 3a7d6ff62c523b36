"""The optimizer a ``TrainConfig`` describes: schedule, tiers, clipping, accumulation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nestedfn.lm.config import ConfigError, TrainConfig
from nestedfn.optim.core import Optimizer, Params, Step, chain, with_learning_rate
from nestedfn.optim.from_mlx import MLX_OPTIMIZERS
from nestedfn.tree import flatten, tree_map

__all__ = ["build_optimizer", "build_schedule", "resolve_tiers"]


def build_schedule(config: TrainConfig) -> Callable[[Step], Any]:
    """The learning rate per optimizer update: mlx-lm's ``lr_schedule`` when given (then
    ``learning_rate`` is not read, as in mlx-lm), else linear warmup over ``warmup_steps``
    from 0, then constant or cosine decay to ``min_lr_ratio * learning_rate`` at
    ``decay_steps`` (default: the run's number of updates)."""
    from nestedfn.optim import schedules

    if config.lr_schedule is not None:
        from nestedfn.lm.lr_schedule import from_lr_schedule

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
    from nestedfn.tiered.tiers import by_depth, by_pattern

    if config.tiers == "depth":
        return by_depth(params, len(config.frequencies), config.tier_order, depths=depths)
    labels = by_pattern({str(k): int(v) for k, v in config.tiers.items()}, params=params)
    used = {int(x) for x in flatten(labels)[0]}
    n = len(config.frequencies)
    empty = [k for k in range(n) if k not in used]
    if empty or max(used) >= n:
        raise ValueError(
            f"tiers {dict(config.tiers)} give tiers {sorted(used)} but frequencies "
            f"{list(config.frequencies)} need exactly tiers 0..{n - 1}; empty: {empty}"
        )
    return labels


def _mlx_rule(name: str, kw: dict[str, Any], config: TrainConfig) -> Optimizer:
    """``mlx.optimizers``' ``name`` at learning rate 1, through ``from_mlx`` (all of them are
    linear in the learning rate, so the run's schedule scales their updates).  Adafactor
    defaults to ``relative_step=False``: its own step size would ignore ``learning_rate``."""
    import mlx.optimizers

    from nestedfn.optim.from_mlx import from_mlx

    if name == "adafactor":
        if kw.get("relative_step"):
            raise ConfigError(
                "adafactor with relative_step: true ignores learning_rate, which the run's "
                "schedule still multiplies in; leave relative_step false"
            )
        kw = {"relative_step": False, **kw}
        if config.weight_decay:
            kw.setdefault("weight_decay", config.weight_decay)
    elif config.weight_decay:
        raise ConfigError(f"{name} has no weight decay; weight_decay must be 0 with it")
    cls = getattr(mlx.optimizers, MLX_OPTIMIZERS[name])
    try:
        return from_mlx(cls(learning_rate=1.0, **kw))
    except TypeError as e:
        raise ConfigError(f"optimizer_args for {name}: {e}") from None


def build_optimizer(
    config: TrainConfig, schedule: Callable[[Step], Any], tiers: Params | None
) -> Optimizer:
    """The optimizer a config describes, outermost first: ``accumulate`` (when
    ``grad_accumulation > 1``), ``clip_by_global_norm`` (when ``grad_clip > 0``), then the
    optimizer, in ``tiers`` (from ``resolve_tiers``; ``None`` when not ``is_tiered``).  Tiered
    optimizers run with learning rate 1 inside the tiers and their updates are scaled by
    ``schedule`` at the global update count, so warmup and decay count updates for every tier
    (as ``nested_adam`` does)."""
    from nestedfn.optim import combinators, optimizers, transforms
    from nestedfn.tiered import multiscale_momentum, nested, nested_adam

    name, kw = config.optimizer, dict(config.optimizer_args)
    freqs = tuple(config.frequencies)
    if name in ("nested_adam", "adamw", "lion", "muon") and config.weight_decay:
        kw.setdefault("weight_decay", config.weight_decay)
    if name == "nested_adam":
        if tiers is None:
            raise ValueError("nested_adam needs tiers (more than one frequency)")
        opt = nested_adam(schedule, frequencies=freqs, tiers=tiers, reduce=config.tier_reduce, **kw)
    elif name == "multiscale_momentum":
        opt = multiscale_momentum(schedule, **kw)
    elif name in MLX_OPTIMIZERS:
        inner = _mlx_rule(name, kw, config)
        if tiers is not None:
            inner = nested(inner, tiers, freqs, config.tier_reduce)
        opt = chain(inner, _scale_by_schedule(schedule))
    elif tiers is not None:
        inner = getattr(optimizers, name)(1.0, **kw)
        opt = chain(nested(inner, tiers, freqs, config.tier_reduce), _scale_by_schedule(schedule))
    else:
        opt = getattr(optimizers, name)(schedule, **kw)
    if config.grad_clip:
        opt = chain(transforms.clip_by_global_norm(float(config.grad_clip)), opt)
    if config.grad_accumulation > 1:
        opt = combinators.accumulate(opt, config.grad_accumulation)
    return opt
