"""``inject_hyperparams``: hyperparameters that live in the optimizer state (optax's answer to a
learning rate baked into a compiled graph).

``inject_hyperparams(factory)(learning_rate=1e-3, b1=0.9, ...)`` builds ``factory(**hp)``
afresh inside every update, with each float hyperparameter read from the state as a float32
``mx.array``.  A compiled step (``compile_step``) then takes them as inputs, not constants::

    state.opt_state = InjectHyperparamsState(hyperparams={"learning_rate": array(1e-3)},
                                             inner_state=...)
    state = set_hyperparams(state, learning_rate=3e-4)   # same graph, new value

A hyperparameter given as a schedule (a callable of the step) is evaluated at each update's
step and its value stored in the state (so it can be read back, e.g. for logging).  Other
values (ints such as ``ns_steps``, bools, dtypes, masks) and the names in ``static_args`` are
passed to ``factory`` as they are: the graph depends on them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.checks import BY_NAME, FINITE, check_value, checked_schedule
from nestedfn.optim.core import Optimizer, OptState, Params, Step, TrainState

__all__ = ["InjectHyperparamsState", "inject_hyperparams", "set_hyperparams"]


class InjectHyperparamsState(NamedTuple):
    """``hyperparams``: name -> float32 scalar array (the value of the last update for a
    schedule); ``inner_state``: the state of the optimizer ``factory`` builds."""

    hyperparams: dict
    inner_state: Any


def _injectable(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return True
    return isinstance(value, mx.array) and value.ndim == 0


def inject_hyperparams(
    factory: Callable[..., Optimizer], static_args: Iterable[str] = ()
) -> Callable[..., Optimizer]:
    """``factory`` with its float hyperparameters (and schedules) held in the state: the
    returned function takes ``factory``'s arguments and gives an ``Optimizer`` whose state is
    an ``InjectHyperparamsState``; change them with ``set_hyperparams`` between steps."""
    static_names = set(static_args)
    signature = inspect.signature(factory)

    def build(*args: Any, **kwargs: Any) -> Optimizer:
        bound = signature.bind(*args, **kwargs)
        values = dict(bound.arguments)
        domains = getattr(factory, "domains", {})
        who = getattr(factory, "__name__", "inject_hyperparams")
        for k, v in values.items():  # the factory's own checks, on the values as given
            if k in domains and not (callable(v) and not isinstance(v, mx.array)):
                check_value(who, k, v, domains[k])
        static = {
            k: v
            for k, v in values.items()
            if k in static_names or not (_injectable(v) or callable(v))
        }
        numeric = {k: v for k, v in values.items() if k not in static and _injectable(v)}
        schedules = {
            k: checked_schedule(v, who, k)
            for k, v in values.items()
            if k not in static and k not in numeric
        }

        def current(hp: dict) -> Optimizer:
            return factory(**static, **hp)

        def read_schedules(step: Step) -> dict:
            return {k: mx.array(s(step), dtype=mx.float32) for k, s in schedules.items()}

        def initial() -> dict:
            hp = {k: mx.array(v, dtype=mx.float32) for k, v in numeric.items()}
            hp.update(read_schedules(0))
            return hp

        probe = current(initial())

        def init_fn(params: Params) -> OptState:
            hp = initial()
            return InjectHyperparamsState(hp, current(hp).init(params))

        def update_fn(grads: Any, state: OptState, params: Params, step: Step) -> Any:
            if not isinstance(state, InjectHyperparamsState) or set(state.hyperparams) != set(
                numeric
            ) | set(schedules):
                raise ValueError(
                    "inject_hyperparams: expected an InjectHyperparamsState holding "
                    f"{sorted(set(numeric) | set(schedules))}, got {state!r}"
                )
            hp = {**state.hyperparams, **read_schedules(step)}
            updates, inner = current(hp).update(grads, state.inner_state, params, step)
            return updates, InjectHyperparamsState(hp, inner)

        return Optimizer(init_fn, update_fn, probe.period, probe.phase_key, None)

    return build


def _find(state: Any) -> InjectHyperparamsState | None:
    if isinstance(state, InjectHyperparamsState):
        return state
    if isinstance(state, (list, tuple)):
        for child in state:
            found = _find(child)
            if found is not None:
                return found
    return None


def set_hyperparams(state: TrainState | InjectHyperparamsState, **values: float) -> Any:
    """``state`` (a ``TrainState`` whose ``opt_state`` is, or a chain/tuple holding, an
    ``InjectHyperparamsState``, or that state itself) with ``values`` replacing those
    hyperparameters, as float32 scalars (the compiled graph is reused).  An unknown name is
    an error naming the known ones; a value outside its domain (``checks.BY_NAME``: finite,
    ``b1``/``b2`` in [0, 1], ``eps`` > 0, ...) a ``TypeError``/``ValueError`` naming it."""
    if isinstance(state, TrainState):
        return state._replace(opt_state=set_hyperparams(state.opt_state, **values))
    if isinstance(state, InjectHyperparamsState):
        unknown = sorted(set(values) - set(state.hyperparams))
        if unknown:
            raise KeyError(
                f"set_hyperparams: {unknown} are not injected hyperparameters; known: "
                f"{sorted(state.hyperparams)}"
            )
        for k, v in values.items():
            check_value("set_hyperparams", k, v, BY_NAME.get(k, FINITE))
        hp = dict(state.hyperparams)
        hp.update({k: mx.array(v, dtype=mx.float32) for k, v in values.items()})
        return state._replace(hyperparams=hp)
    if isinstance(state, tuple) and _find(state) is not None:
        done = False
        out = []
        for child in state:
            if not done and _find(child) is not None:
                child, done = set_hyperparams(child, **values), True
            out.append(child)
        return type(state)(*out) if hasattr(type(state), "_fields") else tuple(out)
    raise ValueError("set_hyperparams: the state holds no InjectHyperparamsState")
