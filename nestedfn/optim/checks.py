"""The gradients must be shaped like the parameters: checked once per tree signature.

``params + update`` broadcasts in MLX, so gradients of shape ``(3, 4)`` on a parameter of
shape ``(1, 4)`` would silently give a ``(3, 4)`` parameter, and ``(4,)`` on ``(1, 4)`` would
be accepted.  ``check_grads`` refuses a grads tree whose structure or leaf shapes differ from
the params, naming every path with both shapes (``TreeMismatchError``).

Dtypes may differ (bfloat16 gradients on float32 parameters are normal; each parameter keeps
its dtype through ``apply_updates``); the packed step additionally refuses gradients that are
not floating point (``NotPackableError`` naming the dtype).

Cost: the signature that passed last is kept with a straight-line leaf getter for its
structure (``nestedfn.tree.codegen``), so the usual call (the same trees every step) is two
generated walks and a comparison of the shapes, about 0.1 ms on a 336-array LoRA tree
(``benchmarks/grads_check.py``); other signatures are looked up in a table of those that passed
(``TreeDef`` of both and every leaf's shape), and compared leaf by leaf only when new.  The
compiled steps call it only when they build a graph (their graph cache is keyed by the same
signature), so their steady state pays nothing.
"""

from __future__ import annotations

import operator
from typing import Any

from nestedfn.tree.codegen import leaf_getter
from nestedfn.tree.structure import TreeDef, TreeMismatchError, _structure_diff, flatten

__all__ = ["check_grads", "check_grads_leaves", "grads_problems"]

_CHECKED: dict[Any, None] = {}  # signatures that passed; bounded (a dict keeps insertion order)
_MAX_CHECKED = 4096
_LAST: list[Any] = [None]  # (leaf getter, shapes) of the signature that passed last
_SHAPE = operator.attrgetter("shape")


def _shape(x: Any) -> tuple[int, ...] | None:
    s = getattr(x, "shape", None)
    return None if s is None else tuple(s)


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
    key = (p_td, g_td, tuple(map(_shape, p_leaves)), tuple(map(_shape, g_leaves)))
    if key in _CHECKED:
        return
    problems = grads_problems(p_leaves, p_td, g_leaves, g_td)
    if problems:
        raise TreeMismatchError(problems, f"{what}: grads shaped unlike params")
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = None


def check_grads(params: Any, grads: Any, what: str = "apply_gradients") -> None:
    """Raise ``TreeMismatchError`` naming each path where ``grads`` differs from ``params`` in
    structure or leaf shape (both shapes given); a signature that passed once is not
    compared again."""
    last = _LAST[0]
    if last is not None:
        get, shapes = last
        p_leaves, g_leaves = get(params), get(grads)
        if p_leaves is not None and g_leaves is not None:
            try:
                if list(map(_SHAPE, p_leaves)) == shapes == list(map(_SHAPE, g_leaves)):
                    return
            except AttributeError:  # a leaf that is not an array: the general path
                pass
    p_leaves, p_td = flatten(params)
    g_leaves, g_td = flatten(grads)
    check_grads_leaves(p_leaves, p_td, g_leaves, g_td, what)
    try:
        _LAST[0] = (leaf_getter(p_td), list(map(_SHAPE, p_leaves)))
    except AttributeError:
        _LAST[0] = None
