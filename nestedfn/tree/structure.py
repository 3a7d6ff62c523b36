"""Tree structure: what a tree is, its exact ``TreeDef``, and ``flatten``/``unflatten``.

A *tree* is built from ``dict`` (``str`` keys, insertion order kept; ``OrderedDict`` and
``defaultdict`` are kept as such), ``list``, ``tuple``, ``NamedTuple`` and ``None`` (an empty
node, as in JAX); anything else is a *leaf* (``mx.array``, numbers, numpy arrays).  Other
subclasses of ``dict``/``list``/``tuple`` and non-``str`` dict keys are refused (``TypeError``
naming the path) rather than silently rebuilt as something else.

Why this exists: ``mlx.utils.tree_unflatten`` guesses structure from dotted keys.  It turns
dicts with digit-string keys into lists, drops empty containers, turns tuples into lists and
pads gaps in list indices with ``{}``; a ``layers`` list rebuilt the wrong way makes
``model.update()`` a silent no-op.  Here ``flatten``/``unflatten``
are an exact inverse pair: ``TreeDef`` records everything (node kinds, keys in order, dict
classes, NamedTuple classes), is hashable, and two trees fit together exactly when their
``TreeDef``s are equal.  The errors shared by the whole package (``PathError``,
``TreeMismatchError``) live here too, with the path-segment rules (``_check_key``) that
``TreeDef.paths`` and ``nestedfn.tree.paths`` both follow.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import mlx.nn as nn

__all__ = [
    "PathError",
    "TreeDef",
    "TreeMismatchError",
    "flatten",
    "is_leaf",
    "leaves",
    "tree_map",
    "unflatten",
]

Tree = Any
Leaf = Any


class PathError(LookupError):
    """A dotted path that names nothing in the tree (or cannot be written as a path)."""

    def __init__(self, message: str, path: str | None = None, prefix: str | None = None):
        super().__init__(message)
        self.path = path
        self.prefix = prefix

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0])


class TreeMismatchError(ValueError):
    """Two trees that should fit together do not; ``problems`` lists every ``(path, why)``."""

    def __init__(self, problems: list[tuple[str, str]], what: str = "tree does not fit"):
        self.problems = problems
        lines = [f"{what}: {len(problems)} problem(s)"]
        lines += [f"  {p or '<root>'}: {why}" for p, why in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
        super().__init__("\n".join(lines))


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def is_leaf(x: Any) -> bool:
    """True for anything that is not a container node (``dict``, ``list``, ``tuple``, ``None``)."""
    return not (x is None or isinstance(x, (dict, list, tuple)))


# ---------------------------------------------------------------------------------------------
# TreeDef: exact, hashable structure
# ---------------------------------------------------------------------------------------------

_LEAF, _NONE, _DICT, _LIST, _TUPLE, _NAMEDTUPLE = "leaf", "none", "dict", "list", "tuple", "nt"


class TreeDef:
    """The structure of a tree without its leaves: hashable, comparable, exact.

    ``kind`` is one of ``leaf``, ``none``, ``dict``, ``list``, ``tuple``, ``nt`` (NamedTuple);
    ``meta`` holds dict keys (in order) or the NamedTuple class; ``children`` the sub-defs.
    ``ctor`` is ``None`` except on a ``dict`` node whose class is not ``dict``: there it is
    ``(OrderedDict,)`` or ``(defaultdict, default_factory)``, and ``ctor[0](*ctor[1:])`` is an
    empty container of the exact class that ``unflatten`` fills in key order.  (It is kept out
    of ``meta`` so that ``meta`` is the keys on every ``dict`` node.)  ``ctor`` takes part in
    equality and hashing: an ``OrderedDict`` node never equals a ``dict`` node.
    """

    __slots__ = ("kind", "meta", "children", "ctor", "num_leaves", "_hash", "_paths")

    def __init__(
        self, kind: str, meta: Any, children: tuple[TreeDef, ...], ctor: tuple | None = None
    ):
        self.kind = kind
        self.meta = meta
        self.children = children
        self.ctor = ctor
        self.num_leaves = 1 if kind == _LEAF else sum(c.num_leaves for c in children)
        self._hash = hash((kind, meta, children) if ctor is None else (kind, meta, children, ctor))
        self._paths: tuple[str, ...] | None = None

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, TreeDef) or self._hash != other._hash:
            return False
        return (
            self.kind == other.kind
            and self.meta == other.meta
            and self.ctor == other.ctor
            and self.children == other.children
        )

    def __repr__(self) -> str:
        if self.kind == _LEAF:
            return "*"
        if self.kind == _NONE:
            return "None"
        inner = ", ".join(repr(c) for c in self.children)
        if self.kind == _DICT:
            inner = ", ".join(f"{k!r}: {c!r}" for k, c in zip(self.meta, self.children))
            if self.ctor is None:
                return "{" + inner + "}"
            args = "".join(f"{_name(a)}, " for a in self.ctor[1:])
            return f"{self.ctor[0].__name__}({args}{{{inner}}})"
        if self.kind == _LIST:
            return "[" + inner + "]"
        if self.kind == _TUPLE:
            return "(" + inner + ("," if len(self.children) == 1 else "") + ")"
        return f"{self.meta.__name__}({inner})"

    def paths(self) -> list[str]:
        """Dotted paths of the leaves, in leaf order (the keys ``to_flat`` would produce).

        Computed once per ``TreeDef`` (it is immutable) and cached.
        """
        if self._paths is None:
            out: list[str] = []
            _collect_paths(self, "", out)
            self._paths = tuple(out)
        return list(self._paths)


_LEAF_DEF = TreeDef(_LEAF, None, ())
_NONE_DEF = TreeDef(_NONE, None, ())


def _collect_paths(td: TreeDef, prefix: str, out: list[str]) -> None:
    if td.kind == _LEAF:
        out.append(prefix)
        return
    if td.kind == _DICT:
        for k, c in zip(td.meta, td.children):
            _collect_paths(c, _join(prefix, _check_key(k, prefix)), out)
    else:
        for i, c in enumerate(td.children):
            _collect_paths(c, _join(prefix, str(i)), out)


def _join(prefix: str, seg: str) -> str:
    return f"{prefix}.{seg}" if prefix else seg


def _check_key(key: Any, prefix: str) -> str:
    """A dict key must be a plain segment for a dotted path to mean one thing."""
    where = f" under {prefix!r}" if prefix else " at the root"
    if not isinstance(key, str):
        raise PathError(
            f"dict key {key!r}{where} is not a str: it cannot be a dotted path segment; "
            "use flatten/unflatten for such trees",
            path=prefix,
        )
    if key == "" or "." in key:
        raise PathError(
            f"dict key {key!r}{where} is empty or contains '.': its dotted path would be "
            "ambiguous; use flatten/unflatten for such trees",
            path=prefix,
        )
    if key.isdigit():
        raise PathError(
            f"dict key {key!r}{where} is a digit string: as a dotted path it reads as a list "
            "index (mlx.utils.tree_unflatten turns such dicts into lists); use "
            "flatten/unflatten for such trees",
            path=prefix,
        )
    return key


# ---------------------------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------------------------


def _refuse_module(tree: Any) -> None:
    """An ``nn.Module`` is a ``dict`` subclass that also holds non-parameters (tuples, private
    lists); read as a plain dict it would not round-trip.  Ask for its ``parameters()``."""
    if type(tree) is not dict and isinstance(tree, nn.Module):
        raise TypeError(_module_refusal(tree, ""))


def _module_refusal(tree: nn.Module, path: str) -> str:
    where = f" at {path!r}" if path else ""
    return (
        f"got an nn.Module ({type(tree).__name__}){where} where a tree belongs: pass "
        "module.parameters() (or trainable_parameters()); update_module puts a tree back"
    )


_UNSUPPORTED = object()


def _dict_ctor(d: dict) -> Any:
    """``TreeDef.ctor`` for dict ``d``: ``None`` (plain ``dict``), ``(OrderedDict,)``,
    ``(defaultdict, factory)``, or ``_UNSUPPORTED`` for any other dict subclass (its
    constructor and extra state are unknown, so it cannot be rebuilt exactly)."""
    t = type(d)
    if t is dict:
        return None
    if t is OrderedDict:
        return (OrderedDict,)
    if t is defaultdict:
        return (defaultdict, d.default_factory)
    return _UNSUPPORTED


def _new_dict(ctor: tuple, items: Iterable[tuple[Any, Any]]) -> dict:
    d = ctor[0](*ctor[1:])
    d.update(items)
    return d


def _name(x: Any) -> str:
    return getattr(x, "__qualname__", None) or repr(x)


class _Refused(Exception):
    """Raised by the lean ``flatten`` walk; ``flatten`` then finds the path and says why."""


def _refusal(node: Any, path: str) -> str | None:
    """Why ``flatten`` refuses the node ``node`` itself (not its children), or ``None``."""
    where = repr(path) if path else "the root"
    if isinstance(node, nn.Module):
        return _module_refusal(node, path)
    if isinstance(node, dict):
        if _dict_ctor(node) is _UNSUPPORTED:
            return (
                f"{where} is a {type(node).__name__}, a dict subclass that cannot be rebuilt "
                "exactly (supported: dict, OrderedDict, defaultdict); convert it, e.g. dict(x)"
            )
        for k in node:
            if not isinstance(k, str):
                return (
                    f"dict key {k!r} ({type(k).__name__}) at {where} is not a str: tree dict "
                    "keys must be str (1, 1.0 and True are one key to a dict and would be "
                    "confused)"
                )
        return None
    if isinstance(node, list) and type(node) is not list:
        return (
            f"{where} is a {type(node).__name__}, a list subclass that cannot be rebuilt "
            "exactly; convert it with list(x)"
        )
    if isinstance(node, tuple) and type(node) is not tuple and not _is_namedtuple(node):
        return (
            f"{where} is a {type(node).__name__}, a tuple subclass that is not a NamedTuple "
            "and cannot be rebuilt exactly; convert it with tuple(x)"
        )
    return None


def _raise_refusal(tree: Any, path: str) -> None:
    """Raise ``TypeError`` for the first refused node of ``tree`` (depth first)."""
    why = _refusal(tree, path)
    if why:
        raise TypeError(f"flatten: {why}")
    if isinstance(tree, dict):
        for k, v in tree.items():
            _raise_refusal(v, _join(path, str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _raise_refusal(v, _join(path, str(i)))


def _flatten_into(tree: Tree, out: list[Leaf]) -> TreeDef:
    t = type(tree)
    if t is dict:
        keys = tuple(tree)
        try:
            "".join(keys)  # the cheapest proof that every key is a str (C speed)
        except TypeError:
            raise _Refused from None
        return TreeDef(_DICT, keys, tuple(_flatten_into(tree[k], out) for k in keys))
    if t is list:
        return TreeDef(_LIST, None, tuple(_flatten_into(c, out) for c in tree))
    if t is tuple:
        return TreeDef(_TUPLE, None, tuple(_flatten_into(c, out) for c in tree))
    if tree is None:
        return _NONE_DEF
    if isinstance(tree, (dict, list, tuple)):
        return _flatten_subclass(tree, out)
    out.append(tree)
    return _LEAF_DEF


def _flatten_subclass(tree: Any, out: list[Leaf]) -> TreeDef:
    if _is_namedtuple(tree):
        return TreeDef(_NAMEDTUPLE, type(tree), tuple(_flatten_into(c, out) for c in tree))
    ctor = _dict_ctor(tree) if isinstance(tree, dict) else _UNSUPPORTED
    if ctor is _UNSUPPORTED:
        raise _Refused
    keys = tuple(tree)
    try:
        "".join(keys)
    except TypeError:
        raise _Refused from None
    return TreeDef(_DICT, keys, tuple(_flatten_into(tree[k], out) for k in keys), ctor)


def flatten(tree: Tree) -> tuple[list[Leaf], TreeDef]:
    """Split ``tree`` into its leaves (depth first, dict insertion order) and its structure.

    ``OrderedDict`` and ``defaultdict`` (with its ``default_factory``) are recorded as such
    and come back from ``unflatten`` as such.  ``TypeError`` naming the path for what would
    not come back exactly: another subclass of ``dict``/``list``/``tuple`` (NamedTuples
    excepted), a dict key that is not a ``str``, an ``nn.Module`` (flatten its
    ``parameters()`` instead).
    """
    out: list[Leaf] = []
    try:
        td = _flatten_into(tree, out)
    except _Refused:
        _raise_refusal(tree, "")
        raise AssertionError("flatten refused a tree without finding why") from None
    except RecursionError:
        raise TreeDepthError(tree_depth(tree), "flatten") from None
    return out, td


class TreeDepthError(ValueError):
    """A tree nested deeper than the tree functions' recursion allows; names the depth.

    The tree functions recurse (about two Python frames per level), so the depth they take
    is about half of ``sys.getrecursionlimit()`` (some 450 levels by default) -- far beyond
    any model's parameters (a few levels); deeper trees are refused with this one error
    instead of a ``RecursionError`` from wherever the limit struck."""

    def __init__(self, depth: int, where: str):
        import sys

        self.depth = depth
        super().__init__(
            f"{where}: the tree is nested {depth} levels deep, deeper than the tree functions "
            f"take under Python's recursion limit ({sys.getrecursionlimit()}, about two frames "
            "a level); flatten part of it into a dict of dotted paths"
        )


def tree_depth(tree: Tree) -> int:
    """The number of container levels above the deepest leaf (iterative: any depth; a
    subtree shared twice is measured once; a container holding itself is a ``ValueError``)."""

    def kids(node: Any) -> Any:
        if isinstance(node, dict):
            return node.values()
        return node if isinstance(node, (list, tuple)) else ()

    def is_node(x: Any) -> bool:
        return isinstance(x, (dict, list, tuple))

    memo: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        node, done = stack.pop()
        if not is_node(node):
            continue
        key = id(node)
        if done:
            on_path.discard(key)
            memo[key] = 1 + max((memo[id(c)] for c in kids(node) if is_node(c)), default=0)
            continue
        if key in memo:
            continue
        if key in on_path:
            raise ValueError("the tree contains itself (a container inside its own subtree)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in kids(node) if is_node(c) and id(c) not in memo)
    return memo.get(id(tree), 0)


def _build(td: TreeDef, it: Any) -> Tree:
    k = td.kind
    if k == _LEAF:
        return next(it)
    if k == _NONE:
        return None
    if k == _DICT:
        if td.ctor is None:
            return {key: _build(c, it) for key, c in zip(td.meta, td.children)}
        return _new_dict(td.ctor, [(key, _build(c, it)) for key, c in zip(td.meta, td.children)])
    if k == _LIST:
        return [_build(c, it) for c in td.children]
    if k == _TUPLE:
        return tuple(_build(c, it) for c in td.children)
    return td.meta(*[_build(c, it) for c in td.children])


def unflatten(treedef: TreeDef, leaves: Iterable[Leaf]) -> Tree:
    """Rebuild the tree ``treedef`` describes from ``leaves``: the exact inverse of ``flatten``."""
    leaves = list(leaves)
    if len(leaves) != treedef.num_leaves:
        raise TreeMismatchError(
            [("", f"treedef has {treedef.num_leaves} leaves, got {len(leaves)}")],
            "unflatten",
        )
    return _build(treedef, iter(leaves))


def leaves(tree: Tree) -> list[Leaf]:
    """The leaves of ``tree`` in ``flatten`` order."""
    return flatten(tree)[0]


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to ``tree`` and trees of the same structure; keep the structure.

    Raises ``TreeMismatchError`` naming the first differing path when structures differ.
    """
    lv, td = flatten(tree)
    if not rest:
        return _build(td, iter([fn(x) for x in lv]))
    others = []
    for r in rest:
        rl, rtd = flatten(r)
        if rtd != td:
            raise TreeMismatchError(_structure_diff(td, rtd), "tree_map: structures differ")
        others.append(rl)
    return _build(td, iter([fn(*xs) for xs in zip(lv, *others)]))


def _structure_diff(a: TreeDef, b: TreeDef, prefix: str = "") -> list[tuple[str, str]]:
    """Human-readable differences between two structures (paths use str() of keys)."""
    if a.kind != b.kind or a.ctor != b.ctor or (a.kind == _NAMEDTUPLE and a.meta is not b.meta):
        return [(prefix, f"{_kind_name(a)} vs {_kind_name(b)}")]
    problems: list[tuple[str, str]] = []
    if a.kind == _DICT:
        bk = dict(zip(b.meta, b.children))
        ak = dict(zip(a.meta, a.children))
        for k in a.meta:
            if k not in bk:
                problems.append((_join(prefix, str(k)), "missing in the second tree"))
            else:
                problems += _structure_diff(ak[k], bk[k], _join(prefix, str(k)))
        for k in b.meta:
            if k not in ak:
                problems.append((_join(prefix, str(k)), "missing in the first tree"))
        if not problems and a.meta != b.meta:
            problems.append((prefix, f"dict key order differs: {list(a.meta)} vs {list(b.meta)}"))
    elif a.kind in (_LIST, _TUPLE, _NAMEDTUPLE):
        if len(a.children) != len(b.children):
            problems.append((prefix, f"length {len(a.children)} vs {len(b.children)}"))
        for i, (ca, cb) in enumerate(zip(a.children, b.children)):
            problems += _structure_diff(ca, cb, _join(prefix, str(i)))
    return problems


def _kind_name(td: TreeDef) -> str:
    if td.kind == _NAMEDTUPLE:
        return td.meta.__name__
    if td.ctor is not None:
        args = ", ".join(_name(a) for a in td.ctor[1:])
        return f"{td.ctor[0].__name__}({args})" if args else td.ctor[0].__name__
    return {"leaf": "leaf", "none": "None", "dict": "dict", "list": "list", "tuple": "tuple"}[
        td.kind
    ]
