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
from itertools import chain
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


def _literal(key: Any) -> str | None:
    """``key`` as a Python literal (a constant of the code, not a name to look up) for a
    ``str`` or ``int``, else None."""
    return repr(key) if type(key) in (str, int) else None


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
    anyway (an identity test, an attribute such as ``.shape``), one test fewer per leaf.

    Dict keys are checked by one comparison, in C, of every dict's keys chained in walk
    order against ``td``'s, not by a ``tuple(d) == keys`` per dict (half the walk's time on
    a LoRA tree).  It is exact because every expected key is also looked up (a missing one
    raises ``KeyError``: None): each dict then holds at least its keys, so equal chains mean
    equal counts, hence no extra key in any dict, and the same order in each."""
    if not _simple(td):
        return _general_getter(td)
    consts: dict[str, Any] = {}
    lines: list[str] = []
    leaves: list[str] = []
    counter = [0]
    dicts: list[str] = []  # the dict nodes' variables, in walk order
    dict_keys: list[Any] = []  # their keys, chained in the same order

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
            lines.append(f"if _type({var}) is not _dict: return None")
            dicts.append(var)
            dict_keys.extend(node.meta)
            keys = [_literal(k) or const(k) for k in node.meta]
        elif kind == "list":
            lines.append(
                f"if _type({var}) is not _list or len({var}) != {len(node.children)}: return None"
            )
            keys = [str(i) for i in range(len(node.children))]
        else:
            cls = tuple if kind == "tuple" else node.meta
            lines.append(
                f"if _type({var}) is not {const(cls)} or len({var}) != {len(node.children)}: "
                "return None"
            )
            keys = [str(i) for i in range(len(node.children))]
        for key, child in zip(keys, node.children):
            counter[0] += 1
            sub = f"v{counter[0]}"
            lines.append(f"{sub} = {var}[{key}]")
            walk(child, sub)

    walk(td, "t")
    if dicts:
        lines.append(f"if [*_chain({', '.join(dicts)})] != {const(dict_keys)}: return None")
    body = "\n        ".join(lines + [f"return [{', '.join(leaves)}]"])
    head = "def get(t, _type=type, _dict=dict, _list=list):"  # builtins as fast locals
    src = f"{head}\n    try:\n        {body}\n    except KeyError:\n        return None\n"
    scope: dict[str, Any] = {"_NODES": (dict, list, tuple), "_chain": chain, **consts}
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
            items = (f"{_literal(k) or const(k)}: {p}" for k, p in zip(node.meta, parts))
            return "{" + ", ".join(items) + "}"  # all literal keys: one BUILD_CONST_KEY_MAP
        if kind == "list":
            return "[" + ", ".join(parts) + "]"
        if kind == "tuple":
            return "(" + "".join(p + ", " for p in parts) + ")"
        return f"{const(node.meta)}(" + ", ".join(parts) + ")"

    src = f"def build(L):\n    return {expr(td)}\n"
    scope: dict[str, Any] = dict(consts)
    exec(compile(src, "<nestedfn.tree.codegen.tree_builder>", "exec"), scope)
    return scope["build"]
