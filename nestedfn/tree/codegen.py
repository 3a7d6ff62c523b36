"""Straight-line code for one tree structure: leaf extraction and rebuild without recursion.

A training step walks the same structure every call; for a fixed ``TreeDef`` the walk is
written out once as plain Python (a chain of subscripts and type checks, one literal
expression for the rebuild) and compiled with ``exec``, a fraction of the recursive
``flatten``/``unflatten``.  The fast steps (``nestedfn.fast``) and the step checks
(``nestedfn.optim.checks``) walk their trees with these.

- ``leaf_getter(td)(tree)``: the leaves of ``tree`` in ``flatten`` order when ``tree`` has
  exactly the structure ``td`` (node types, dict keys in order, lengths, NamedTuple classes),
  else ``None`` (callers then take the general path, which gives the full error).
- ``tree_builder(td)(leaves)``: ``unflatten(td, leaves)`` for exactly ``td.num_leaves`` leaves.

Both are cached per ``TreeDef``.  Structures too deep for one Python expression, or holding an
``OrderedDict``/``defaultdict``, get the general functions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from nestedfn.tree.structure import TreeDef, flatten, unflatten

__all__ = ["leaf_getter", "tree_builder"]

_MAX_DEPTH = 60  # nesting of one generated expression; CPython's parser allows about 200


def _depth(td: TreeDef) -> int:
    return 1 + max((_depth(c) for c in td.children), default=0)


def _simple(td: TreeDef) -> bool:
    """Shallow enough for one expression, and no dict node of another class (``OrderedDict``,
    ``defaultdict``: ``TreeDef.ctor``), which the generated code does not rebuild."""

    def plain(node: TreeDef) -> bool:
        return node.ctor is None and all(plain(c) for c in node.children)

    return _depth(td) <= _MAX_DEPTH and plain(td)


def _namer(consts: dict[str, Any]) -> Callable[[Any], str]:
    """``const(value)``: a fresh name bound to ``value`` in ``consts`` (the code's scope)."""

    def const(value: Any) -> str:
        consts[f"_c{len(consts)}"] = value
        return f"_c{len(consts) - 1}"

    return const


def _general_getter(td: TreeDef) -> Callable[[Any], list | None]:
    def get(tree: Any) -> list | None:
        try:
            leaves, got = flatten(tree)
        except TypeError:
            return None
        return leaves if got == td else None

    return get


@lru_cache(maxsize=256)
def leaf_getter(td: TreeDef, check_leaves: bool = True) -> Callable[[Any], list | None]:
    """A function ``tree -> leaves | None`` specialised to the structure ``td``.

    With ``check_leaves=False`` a node (dict, list, tuple, None) in a leaf position is
    returned as a "leaf" instead of refused: for callers that check every leaf themselves
    anyway (an identity test, an attribute such as ``.shape``), one test fewer per leaf."""
    if not _simple(td):
        return _general_getter(td)
    consts: dict[str, Any] = {}
    lines: list[str] = []
    leaves: list[str] = []
    counter = [0]

    const = _namer(consts)

    def walk(node: TreeDef, var: str) -> None:
        kind = node.kind
        if kind == "leaf":
            if check_leaves:
                lines.append(f"if {var} is None or isinstance({var}, _NODES): return None")
            leaves.append(var)
            return
        if kind == "none":
            lines.append(f"if {var} is not None: return None")
            return
        if kind == "dict":
            lines.append(
                f"if type({var}) is not dict or tuple({var}) != {const(tuple(node.meta))}: "
                "return None"
            )
            keys = [const(k) for k in node.meta]
        elif kind == "list":
            lines.append(
                f"if type({var}) is not list or len({var}) != {len(node.children)}: return None"
            )
            keys = [str(i) for i in range(len(node.children))]
        else:
            cls = tuple if kind == "tuple" else node.meta
            lines.append(
                f"if type({var}) is not {const(cls)} or len({var}) != {len(node.children)}: "
                "return None"
            )
            keys = [str(i) for i in range(len(node.children))]
        for key, child in zip(keys, node.children):
            counter[0] += 1
            sub = f"v{counter[0]}"
            lines.append(f"{sub} = {var}[{key}]")
            walk(child, sub)

    walk(td, "t")
    body = "\n    ".join(lines + [f"return [{', '.join(leaves)}]"])
    src = f"def get(t):\n    {body}\n"
    scope: dict[str, Any] = {"_NODES": (dict, list, tuple), **consts}
    exec(compile(src, "<nestedfn.tree.codegen.leaf_getter>", "exec"), scope)
    return scope["get"]


@lru_cache(maxsize=256)
def tree_builder(td: TreeDef) -> Callable[[list], Any]:
    """A function ``leaves -> tree`` specialised to the structure ``td`` (no length check:
    the caller passes exactly ``td.num_leaves`` leaves)."""
    if not _simple(td):
        return lambda leaves: unflatten(td, leaves)
    consts: dict[str, Any] = {}
    pos = [0]

    const = _namer(consts)

    def expr(node: TreeDef) -> str:
        kind = node.kind
        if kind == "leaf":
            pos[0] += 1
            return f"L[{pos[0] - 1}]"
        if kind == "none":
            return "None"
        parts = [expr(c) for c in node.children]
        if kind == "dict":
            return "{" + ", ".join(f"{const(k)}: {p}" for k, p in zip(node.meta, parts)) + "}"
        if kind == "list":
            return "[" + ", ".join(parts) + "]"
        if kind == "tuple":
            return "(" + "".join(p + ", " for p in parts) + ")"
        return f"{const(node.meta)}(" + ", ".join(parts) + ")"

    src = f"def build(L):\n    return {expr(td)}\n"
    scope: dict[str, Any] = dict(consts)
    exec(compile(src, "<nestedfn.tree.codegen.tree_builder>", "exec"), scope)
    return scope["build"]
