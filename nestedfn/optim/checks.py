"""The gradients must be shaped like the parameters: checked once per tree signature.

``params + update`` broadcasts in MLX, so gradients of shape ``(3, 4)`` on a parameter of
shape ``(1, 4)`` would silently give a ``(3, 4)`` parameter, and ``(4,)`` on ``(1, 4)`` would
be accepted.  ``check_grads`` refuses a grads tree whose structure or leaf shapes differ from
the params, naming every path with both shapes (``TreeMismatchError``).

Dtypes may differ (bfloat16 gradients on float32 parameters are normal; each parameter keeps
its dtype through ``apply_updates``), except that a complex gradient on a real parameter is a
``TypeError`` naming the path and dtype (casting ``p + g`` back to ``p``'s dtype would drop
the imaginary part silently); the packed step additionally refuses gradients that are not
floating point (``NotPackableError`` naming the dtype).

Cost: the signature that passed last is kept with a straight-line leaf getter for its
structure (``nestedfn.tree.codegen``), so the usual call (the same trees every step) is two
generated walks and a comparison of the shapes and dtypes, about 0.1 ms on a 336-array LoRA tree
(``benchmarks/grads_check.py``); other signatures are looked up in a table of those that passed
(``TreeDef`` of both and every leaf's shape and dtype), and compared leaf by leaf only when new.  The
compiled steps call it only when they build a graph (their graph cache is keyed by the same
signature), so their steady state pays nothing.

Argument domains (declared where the value is born): ``declare(b1=UNIT_OPEN, eps=POSITIVE,
learning_rate=LEARNING_RATE, ...)`` on a constructor checks those arguments on every call,
raising ``TypeError`` (not a number, a bool, a string...) or ``ValueError`` (NaN, inf, out of
range) that names the function, the argument and the value.  A 0-d ``mx.array`` (what
``inject_hyperparams`` passes, possibly traced) is accepted as it is: its value was checked
where it was set (``inject_hyperparams``, ``set_hyperparams`` use ``check_value``).  A
learning-rate schedule is wrapped (``checked_schedule``): its value must be a scalar (a
size-1 array is made 0-d; any other shape is a ``TypeError`` at the first evaluation of
every graph, since shapes are static) and, outside ``mx.compile``, finite.
``check_float_params`` refuses integer and complex parameters naming the path: the
optimizers' arithmetic is real floating point (an integer parameter would truncate every
update, a complex one would lose its imaginary part).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from nestedfn.tree.codegen import leaf_getter
from nestedfn.tree.structure import TreeDef, TreeMismatchError, _structure_diff, flatten

__all__ = [
    "FINITE",
    "LEARNING_RATE",
    "NONNEGATIVE",
    "NONNEGATIVE_INT",
    "POSITIVE",
    "POSITIVE_INT",
    "UNIT",
    "UNIT_OPEN",
    "Domain",
    "check_float_params",
    "check_grads",
    "check_grads_leaves",
    "check_value",
    "checked_schedule",
    "declare",
    "grads_problems",
]


class Domain(NamedTuple):
    """The values an argument may take: ``text`` for messages, ``ok`` on a finite number,
    ``integer`` (an ``int``, not a float), ``schedule`` (a callable of the step allowed)."""

    text: str
    ok: Callable[[Any], bool]
    integer: bool = False
    schedule: bool = False


FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger magnitudes are inf where steps compute
FINITE = Domain("a finite number", lambda v: True)
NONNEGATIVE = Domain("a finite number >= 0", lambda v: v >= 0)
POSITIVE = Domain("a finite number > 0", lambda v: v > 0)
UNIT = Domain("a number in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN = Domain("a number in [0, 1)", lambda v: 0 <= v < 1)
POSITIVE_INT = Domain("an int >= 1", lambda v: v >= 1, integer=True)
NONNEGATIVE_INT = Domain("an int >= 0", lambda v: v >= 0, integer=True)
LEARNING_RATE = Domain(
    "a finite number >= 0 or a schedule (a callable of the step)", lambda v: v >= 0, schedule=True
)

# what ``set_hyperparams`` holds a new value of a hyperparameter to, by name (the loosest
# domain any optimizer of the library gives that name); other names: finite
BY_NAME = {
    "learning_rate": NONNEGATIVE,
    "b1": UNIT,
    "b2": UNIT,
    "decay": UNIT,
    "beta": UNIT,
    "eps": POSITIVE,
    "weight_decay": NONNEGATIVE,
}


def check_value(who: str, name: str, value: Any, domain: Domain = FINITE) -> Any:
    """``value`` if it lies in ``domain`` (a learning-rate schedule comes back wrapped by
    ``checked_schedule``), else ``TypeError``/``ValueError`` naming ``who``, ``name`` and the
    value."""
    if domain.schedule and callable(value) and not isinstance(value, mx.array):
        return checked_schedule(value, who, name)
    if isinstance(value, mx.array):
        if value.ndim == 0 and not domain.integer:
            return value  # injected (maybe traced): checked where it was set
        raise TypeError(
            f"{who}: {name} must be {domain.text}, got an array of shape {tuple(value.shape)}"
        )
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        value = value.item()
    if domain.integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{who}: {name} must be {domain.text}, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{who}: {name} must be {domain.text}, got {value!r} ({type(value).__name__})"
        )
    if not domain.integer and math.isfinite(value) and abs(value) > FLOAT32_MAX:
        # the step computes in float32, where this value is not a finite number
        raise ValueError(
            f"{who}: {name} must be {domain.text}, got {value!r}: beyond float32's range "
            f"(|x| <= {FLOAT32_MAX:.6g}), where the step computes"
        )
    if not math.isfinite(value) or not domain.ok(value):
        raise ValueError(f"{who}: {name} must be {domain.text}, got {value!r}")
    return value


def declare(**domains: Domain) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a constructor so that its arguments ``domains`` names are checked on every
    call (``check_value``); the domains are kept as ``fn.domains``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        missing = set(domains) - set(sig.parameters)
        assert not missing, f"{fn.__name__} has no argument(s) {missing}"

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            for name, domain in domains.items():
                if name in bound.arguments:
                    bound.arguments[name] = check_value(
                        fn.__name__, name, bound.arguments[name], domain
                    )
                else:
                    check_value(fn.__name__, name, sig.parameters[name].default, domain)
            return fn(*bound.args, **bound.kwargs)

        checked.domains = domains  # type: ignore[attr-defined]
        return checked

    return wrap


def checked_schedule(fn: Callable[[Any], Any], who: str, name: str = "learning_rate") -> Any:
    """``fn`` (a schedule ``step -> value``) whose every value is held to be a scalar: an
    array of one element comes back 0-d, any other shape is a ``TypeError`` (a schedule's
    value multiplies every leaf: a shape would broadcast into the parameters).  Outside
    ``mx.compile`` the value must be finite too (an array's value is read once)."""
    if getattr(fn, "_nestedfn_checked", False):
        return fn
    seen = [False]

    @functools.wraps(fn)
    def schedule(step: Any) -> Any:
        v = fn(step)
        at = "(traced)" if isinstance(step, mx.array) else step
        if isinstance(v, mx.array):
            if v.size != 1:
                raise TypeError(
                    f"{who}: the {name} schedule gave an array of shape {tuple(v.shape)} at step "
                    f"{at}; it must give a scalar"
                )
            if v.ndim:
                v = v.reshape(())
            if not isinstance(step, mx.array) and not seen[0]:
                seen[0] = True
                check_value(who, f"{name} (the schedule's value at step {at})", v.item())
            return v
        if isinstance(v, np.ndarray) and v.size == 1:
            v = v.reshape(()).item()
        return check_value(who, f"{name} (the schedule's value at step {at})", v)

    schedule._nestedfn_checked = True  # type: ignore[attr-defined]
    return schedule


def check_float_params(params: Any, who: str) -> None:
    """Refuse parameters that are not real floating point (see the module doc), naming the
    first such path and its dtype."""
    leaves, td = flatten(params)
    for path, x in zip(td.paths(), leaves):
        if isinstance(x, mx.array) and not mx.issubdtype(x.dtype, mx.floating):
            raise TypeError(
                f"{who}: parameter {path or '<root>'} is {x.dtype}; the optimizers need real "
                "floating-point parameters (an integer one would truncate every update, a "
                "complex one lose its imaginary part): cast it, or keep it out of the tree"
            )


_CHECKED: dict[Any, None] = {}  # signatures that passed; bounded (a dict keeps insertion order)
_MAX_CHECKED = 4096
_LAST: list[Any] = [None]  # (leaf getter, params' and grads' (shape, dtype)) that passed last
_SIG = operator.attrgetter("shape", "dtype")


def _shape(x: Any) -> tuple[int, ...] | None:
    s = getattr(x, "shape", None)
    return None if s is None else tuple(s)


def _dtype(x: Any) -> Any:
    return getattr(x, "dtype", None)


def _check_complex_grads(
    p_leaves: list[Any], p_td: TreeDef, g_leaves: list[Any], what: str
) -> None:
    """Refuse a complex gradient on a real parameter, naming the first path and its dtype:
    ``p + u`` would be complex, and casting it back to the parameter's dtype drops the
    imaginary part without a word."""
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
        gd = _dtype(g)
        if gd is not None and mx.issubdtype(gd, mx.complexfloating):
            pd = _dtype(p)
            if pd is None or not mx.issubdtype(pd, mx.complexfloating):
                path = p_td.paths()[i]
                raise TypeError(
                    f"{what}: the gradient of {path or '<root>'} is {gd} but the parameter is "
                    f"{pd if pd is not None else type(p).__name__}; its imaginary part would be "
                    "lost: take the real part (or the gradient of a real loss)"
                )


def grads_problems(
    p_leaves: list[Any], p_td: TreeDef, g_leaves: list[Any], g_td: TreeDef
) -> list[tuple[str, str]]:
    """Every ``(path, why)`` where the grads differ from the params in structure or shape."""
    if p_td != g_td:
        return [
            (path, why.replace("the first tree", "params").replace("the second tree", "grads"))
            for path, why in _structure_diff(p_td, g_td)
        ] or [("", "params and grads differ in structure")]
    problems = []
    for path, p, g in zip(p_td.paths(), p_leaves, g_leaves):
        ps, gs = _shape(p), _shape(g)
        if ps is not None and gs != ps:
            got = f"{type(g).__name__}" if gs is None else f"shape {gs}"
            problems.append((path, f"grads {got} vs params shape {ps}"))
    return problems


def check_grads_leaves(
    p_leaves: list[Any], p_td: TreeDef, g_leaves: list[Any], g_td: TreeDef, what: str
) -> None:
    """``check_grads`` on already flattened trees."""
    key = (
        p_td,
        g_td,
        tuple(map(_shape, p_leaves)),
        tuple(map(_shape, g_leaves)),
        tuple(map(_dtype, p_leaves)),
        tuple(map(_dtype, g_leaves)),
    )
    if key in _CHECKED:
        return
    problems = grads_problems(p_leaves, p_td, g_leaves, g_td)
    if problems:
        raise TreeMismatchError(problems, f"{what}: grads shaped unlike params")
    _check_complex_grads(p_leaves, p_td, g_leaves, what)
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = None


def check_grads(params: Any, grads: Any, what: str = "apply_gradients") -> None:
    """Raise ``TreeMismatchError`` naming each path where ``grads`` differs from ``params`` in
    structure or leaf shape (both shapes given), ``TypeError`` naming a complex gradient on a
    real parameter; a signature (structure, shapes, dtypes) that passed once is not compared
    again."""
    last = _LAST[0]
    if last is not None:
        get, p_sigs, g_sigs = last
        p_leaves, g_leaves = get(params), get(grads)
        if p_leaves is not None and g_leaves is not None:
            try:
                if list(map(_SIG, p_leaves)) == p_sigs and list(map(_SIG, g_leaves)) == g_sigs:
                    return
            except AttributeError:  # a leaf that is not an array: the general path
                pass
    p_leaves, p_td = flatten(params)
    g_leaves, g_td = flatten(grads)
    check_grads_leaves(p_leaves, p_td, g_leaves, g_td, what)
    try:
        _LAST[0] = (leaf_getter(p_td), list(map(_SIG, p_leaves)), list(map(_SIG, g_leaves)))
    except AttributeError:
        _LAST[0] = None
