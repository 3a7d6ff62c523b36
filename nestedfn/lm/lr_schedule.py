"""mlx-lm's ``lr_schedule`` config as a nestedfn schedule, value for value.

mlx-lm (``mlx_lm.tuner.utils.build_schedule``) reads ``{name, arguments, warmup,
warmup_init}``: ``name`` is a function of ``mlx.optimizers.schedulers`` called with
``arguments`` (its first argument is the peak learning rate), and ``warmup: W > 0`` puts a
linear ramp from ``warmup_init`` (default 0) to that peak in front.  The ramp reaches the peak
at step ``W`` and the main schedule starts, from its own step 0, at step ``W + 1`` (mlx-lm
joins them at boundary ``W + 1``), so the peak is used twice: at steps ``W`` and ``W + 1``.
With ``t`` the number of optimizer updates so far:

* ``cosine_decay(init, decay_steps, end=0)``: ``end + (init - end) (1 + cos(pi min(t, D) / D)) / 2``
* ``exponential_decay(init, decay_rate)``: ``init decay_rate^t``
* ``step_decay(init, decay_rate, step_size)``: ``init decay_rate^(t // step_size)``
* ``linear_schedule(init, end, steps)``: ``init + (end - init) min(t, steps) / steps``

``arguments`` may also be a mapping of those names.  ``tests/lm/test_lr_schedule.py`` compares
every value with mlx-lm's own ``build_schedule``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from nestedfn.optim import schedules

__all__ = ["MLX_SCHEDULES", "check_lr_schedule", "from_lr_schedule", "peak_learning_rate"]

_KEYS = ("name", "arguments", "warmup", "warmup_init")


def _linear(init: float, end: float, steps: int) -> Callable:
    return schedules.linear_warmup(end, steps, init_value=init)


def _cosine(init: float, decay_steps: int, end: float = 0.0) -> Callable:
    return schedules.cosine_decay(init, decay_steps, end)


def _exponential(init: float, decay_rate: float) -> Callable:
    return schedules.exponential_decay(init, decay_rate)


def _step(init: float, decay_rate: float, step_size: int) -> Callable:
    return schedules.step_decay(init, decay_rate, step_size)


MLX_SCHEDULES: dict[str, Callable[..., Callable]] = {
    "cosine_decay": _cosine,
    "exponential_decay": _exponential,
    "step_decay": _step,
    "linear_schedule": _linear,
}


def _arguments(config: dict[str, Any]) -> tuple[str, list[Any]]:
    name, args = config["name"], config["arguments"]
    if isinstance(args, dict):
        params = list(inspect.signature(MLX_SCHEDULES[name]).parameters)
        unknown = [k for k in args if k not in params]
        if unknown:
            raise ValueError(
                f"lr_schedule: {name} takes {', '.join(params)}; unknown {', '.join(unknown)}"
            )
        args = [args[k] for k in params if k in args]
    return name, list(args)


def check_lr_schedule(config: Any) -> None:
    """Raise ``ValueError`` naming what is wrong with an ``lr_schedule`` mapping."""
    if not isinstance(config, dict):
        raise ValueError(f"lr_schedule must be a mapping {{name, arguments, ...}}, got {config!r}")
    unknown = [k for k in config if k not in _KEYS]
    if unknown:
        raise ValueError(f"lr_schedule: unknown key(s) {unknown}; valid keys: {', '.join(_KEYS)}")
    for key in ("name", "arguments"):
        if key not in config:
            raise ValueError(f"lr_schedule needs {key!r} (mlx-lm's {{name, arguments}})")
    if config["name"] not in MLX_SCHEDULES:
        raise ValueError(
            f"lr_schedule name must be one of {', '.join(MLX_SCHEDULES)}; got {config['name']!r}"
        )
    if not isinstance(config["arguments"], (list, tuple, dict)) or not config["arguments"]:
        raise ValueError(
            f"lr_schedule arguments must be a non-empty list, got {config['arguments']!r}"
        )
    warmup = config.get("warmup", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"lr_schedule warmup must be an int >= 0, got {warmup!r}")
    init = config.get("warmup_init", 0.0)
    if isinstance(init, bool) or not isinstance(init, (int, float)):
        raise ValueError(f"lr_schedule warmup_init must be a number, got {init!r}")
    name, args = _arguments(config)
    for a in args:
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ValueError(f"lr_schedule {name} arguments must be numbers, got {a!r}")
    try:
        inspect.signature(MLX_SCHEDULES[name]).bind(*args)
        MLX_SCHEDULES[name](*args)(0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lr_schedule {name}{tuple(args)}: {e}") from None
    peak = peak_learning_rate(config)
    if not peak > 0:
        raise ValueError("lr_schedule: the first argument (the peak learning rate) must be > 0")


def peak_learning_rate(config: dict[str, Any]) -> float:
    """The schedule's first argument: the learning rate it starts (or warms up) to."""
    return float(_arguments(config)[1][0])


def from_lr_schedule(config: dict[str, Any]) -> Callable:
    """The nestedfn schedule (``step -> lr``, steps counted in optimizer updates) of mlx-lm's
    ``lr_schedule`` mapping ``config`` (checked by ``check_lr_schedule``)."""
    check_lr_schedule(config)
    name, args = _arguments(config)
    main = MLX_SCHEDULES[name](*[float(a) if i == 0 else a for i, a in enumerate(args)])
    warmup = int(config.get("warmup", 0))
    if not warmup:
        return main
    ramp = _linear(float(config.get("warmup_init", 0.0)), float(args[0]), warmup)
    return schedules.join([ramp, main], [warmup + 1])
