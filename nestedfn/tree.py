"""Exact tree plumbing for MLX parameter trees.

A *tree* is built from ``dict`` (``str`` keys, insertion order kept; ``OrderedDict`` and
``defaultdict`` are kept as such), ``list``, ``tuple``, ``NamedTuple`` and ``None`` (an empty
node, as in JAX); anything else is a *leaf* (``mx.array``, numbers, numpy arrays).  Other
subclasses of ``dict``/``list``/``tuple`` and non-``str`` dict keys are refused (``TypeError``
naming the path) rather than silently rebuilt as something else.

Why this exists: ``mlx.utils.tree_unflatten`` guesses structure from dotted keys.  It turns
dicts with digit-string keys into lists, drops empty containers, turns tuples into lists and
pads gaps in list indices with ``{}``.  A nested ``layers`` list rebuilt the wrong way made
``model.update()`` a silent no-op in the app nestedfn replaces.  Here:

* ``flatten``/``unflatten`` are an exact inverse pair (``TreeDef`` records everything);
* ``to_flat``/``from_flat`` speak MLX's dotted paths and refuse what a path cannot say;
* ``set_paths`` replaces leaves by path, failing on unknown paths or changed shapes;
* ``check_fits``/``update_module`` make ``model.update()`` land every value or raise.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = [
    "PathError",
    "TreeDef",
    "TreeMismatchError",
    "check_fits",
    "flatten",
    "from_flat",
    "is_leaf",
    "leaves",
    "set_paths",
    "to_flat",
    "tree_map",
    "unflatten",
    "update_module",
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
    return out, td


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


# ---------------------------------------------------------------------------------------------
# dotted paths
# ---------------------------------------------------------------------------------------------


def _to_flat_into(tree: Tree, prefix: str, out: dict[str, Leaf]) -> None:
    if tree is None:
        return
    if isinstance(tree, dict):
        _refuse_module(tree)
        for k, v in tree.items():
            _to_flat_into(v, _join(prefix, _check_key(k, prefix)), out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _to_flat_into(v, _join(prefix, str(i)), out)
    else:
        out[prefix] = tree


def to_flat(tree: Tree) -> dict[str, Leaf]:
    """``{dotted path: leaf}`` with the keys and order of ``mlx.utils.tree_flatten(tree)``.

    ``None`` and empty containers hold no leaves and so give no keys (``from_flat`` with
    ``like=`` brings them back).  Dict keys that a dotted path cannot state unambiguously
    (digit strings, keys containing ``.``, empty or non-str keys) raise ``PathError``.
    """
    if is_leaf(tree):
        raise PathError("to_flat needs a container at the root, got a leaf", path="")
    out: dict[str, Leaf] = {}
    _to_flat_into(tree, "", out)
    return out


def _is_index(seg: str) -> bool:
    return seg.isdigit() and (seg == "0" or not seg.startswith("0"))


def from_flat(
    flat: Mapping[str, Leaf] | Iterable[tuple[str, Leaf]],
    like: Tree | TreeDef | None = None,
    sparse: bool = False,
) -> Tree:
    """Inverse of ``to_flat``.

    With ``like`` (a tree or a ``TreeDef``) the result has exactly ``like``'s structure, and the
    paths must be exactly ``like``'s leaf paths (``TreeMismatchError`` lists missing and unknown
    ones).  Without it, a node whose segments are all integers becomes a list; a gap in the
    indices raises ``PathError`` unless ``sparse=True``, which fills it with ``{}`` (what
    ``nn.Module.update`` expects for partly-adapted ``layers``).
    """
    items = list(flat.items()) if isinstance(flat, Mapping) else list(flat)
    if like is not None:
        td = like if isinstance(like, TreeDef) else flatten(like)[1]
        if td._paths is None:
            td.paths()
        paths = td._paths
        if len(items) == len(paths) and all(k == p for (k, _), p in zip(items, paths)):
            return _build(td, iter([v for _, v in items]))  # the usual case: to_flat's order
        given = dict(items)
        if len(given) != len(items):
            raise PathError("from_flat: a path is given twice")
        missing = [p for p in paths if p not in given]
        pset = set(paths)
        extra = [p for p in given if p not in pset]
        if missing or extra:
            problems = [(p, "missing from the flat dict") for p in missing]
            problems += [(p, "not a leaf path of `like`") for p in extra]
            raise TreeMismatchError(problems, "from_flat: paths do not match `like`")
        return _build(td, iter([given[p] for p in paths]))

    if len(items) == 1 and items[0][0] == "":
        return items[0][1]
    root: dict[str, Any] = {}
    for path, value in items:
        segs = path.split(".")
        if any(s == "" for s in segs):
            raise PathError(f"from_flat: path {path!r} has an empty segment", path=path)
        node = root
        for depth, seg in enumerate(segs[:-1]):
            child = node.get(seg)
            if child is None:
                child = node[seg] = {}
            elif not isinstance(child, dict):
                raise PathError(
                    f"from_flat: path {path!r} goes through {'.'.join(segs[: depth + 1])!r}, "
                    "which is a leaf",
                    path=path,
                )
            node = child
        last = segs[-1]
        if last in node:
            what = "given twice" if not isinstance(node[last], dict) else "also a subtree"
            raise PathError(f"from_flat: path {path!r} is {what}", path=path)
        node[last] = _Leaf(value)
    return _listify(root, "", sparse)


class _Leaf:
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _listify(node: Any, prefix: str, sparse: bool) -> Tree:
    if isinstance(node, _Leaf):
        return node.value
    keys = list(node.keys())
    idx = [_is_index(k) for k in keys]
    if keys and all(idx):
        by_int = {int(k): _listify(node[k], _join(prefix, k), sparse) for k in keys}
        n = max(by_int) + 1
        if len(by_int) != n and not sparse:
            gaps = [i for i in range(n) if i not in by_int]
            raise PathError(
                f"from_flat: list at {prefix or '<root>'!r} has no entries for indices "
                f"{gaps[:10]}; pass sparse=True to fill gaps with {{}}",
                path=prefix,
            )
        return [by_int.get(i, {}) for i in range(n)]
    if any(idx) or any(k.isdigit() for k in keys):
        raise PathError(
            f"from_flat: node {prefix or '<root>'!r} mixes list indices and names "
            f"({keys[:6]}): neither a list nor an unambiguous dict",
            path=prefix,
        )
    return {k: _listify(node[k], _join(prefix, k), sparse) for k in keys}


# ---------------------------------------------------------------------------------------------
# set_paths
# ---------------------------------------------------------------------------------------------


def _child(node: Tree, seg: str) -> Any:
    """The child of ``node`` named by path segment ``seg``; ``KeyError`` if none."""
    if isinstance(node, dict):
        return node[seg]
    if isinstance(node, (list, tuple)) and _is_index(seg):
        i = int(seg)
        if i < len(node):
            return node[i]
    raise KeyError(seg)


def _longest_prefix(tree: Tree, segs: list[str]) -> str:
    node, good = tree, []
    for s in segs:
        try:
            node = _child(node, s)
        except KeyError:
            break
        good.append(s)
    return ".".join(good)


def _leaf_problem(old: Any, new: Any) -> str | None:
    if isinstance(old, mx.array):
        if not isinstance(new, mx.array):
            return f"expected mx.array, got {type(new).__name__}"
        if old.shape != new.shape:
            return f"shape {tuple(new.shape)} where {tuple(old.shape)} belongs"
        if old.dtype != new.dtype:
            return f"dtype {new.dtype} where {old.dtype} belongs"
    return None


def set_paths(tree: Tree, updates: Mapping[str, Leaf], check: bool = True) -> Tree:
    """A new tree with the leaves at ``updates``' dotted paths replaced.

    Untouched subtrees are shared, nothing is deep-copied and ``tree`` is not modified.  An
    unknown path raises ``PathError`` naming it and its longest existing prefix; with
    ``check`` a leaf whose shape or dtype would change raises ``TreeMismatchError``.  The
    containers on the way to a replaced leaf are rebuilt with their own class (``OrderedDict``,
    ``defaultdict``, NamedTuples kept); one that cannot be rebuilt exactly (another subclass
    of ``dict``/``list``/``tuple``, an ``nn.Module``) raises ``TypeError`` naming its path.
    """
    if not updates:
        return tree  # nothing to replace: everything is shared
    grouped: dict[str, dict[str, Leaf]] = {}
    for path, value in updates.items():
        head, _, rest = path.partition(".")
        grouped.setdefault(head, {})[rest] = value
    problems: list[tuple[str, str]] = []
    out = _set(tree, grouped, "", check, problems, tree)
    if problems:
        raise TreeMismatchError(problems, "set_paths")
    return out


def _set(
    node: Tree,
    grouped: dict[str, dict[str, Leaf]],
    prefix: str,
    check: bool,
    problems: list[tuple[str, str]],
    root: Tree,
) -> Tree:
    if is_leaf(node) or node is None:
        seg = next(iter(grouped))
        bad = _join(prefix, seg)
        raise PathError(
            f"unknown path {bad!r}: {prefix!r} is a leaf"
            if is_leaf(node)
            else f"unknown path {bad!r}: {prefix!r} is None",
            path=bad,
            prefix=prefix,
        )
    replaced: dict[Any, Any] = {}
    for seg, sub in grouped.items():
        path_here = _join(prefix, seg)
        try:
            old = _child(node, seg)
        except KeyError:
            full = _join(path_here, next(iter(sub))) if "" not in sub else path_here
            longest = _longest_prefix(root, full.split("."))
            raise PathError(
                f"unknown path {full!r}: longest existing prefix is {longest or '<root>'!r}",
                path=full,
                prefix=longest,
            ) from None
        if "" in sub:
            if len(sub) > 1 or not is_leaf(old):
                raise PathError(
                    f"path {path_here!r} names a subtree, not a leaf",
                    path=path_here,
                    prefix=path_here,
                )
            new = sub[""]
            if check:
                why = _leaf_problem(old, new)
                if why:
                    problems.append((path_here, why))
            replaced[seg] = new
        else:
            regroup: dict[str, dict[str, Leaf]] = {}
            for rest, value in sub.items():
                head, _, tail = rest.partition(".")
                regroup.setdefault(head, {})[tail] = value
            replaced[seg] = _set(old, regroup, path_here, check, problems, root)
    if isinstance(node, dict):
        ctor = _dict_ctor(node)
        if ctor is None:
            return {k: (replaced[k] if k in replaced else v) for k, v in node.items()}
        if ctor is not _UNSUPPORTED:
            items = [(k, replaced[k] if k in replaced else v) for k, v in node.items()]
            return _new_dict(ctor, items)
    else:
        children = [replaced.get(str(i), v) for i, v in enumerate(node)]
        if type(node) is list:
            return children
        if type(node) is tuple:
            return tuple(children)
        if _is_namedtuple(node):
            return type(node)(*children)
    raise TypeError(f"set_paths: {_refusal(node, prefix)}")  # a container it cannot rebuild


# ---------------------------------------------------------------------------------------------
# checked model.update
# ---------------------------------------------------------------------------------------------


_PARAM_TYPES = (dict, list, mx.array)
_MISSING = object()


def _fits_quick(target: Any, tree: Any) -> bool:
    """True when ``tree`` surely fits ``target``: one lean walk, no paths, no messages.

    ``False`` only means "not sure" (a mismatch, or a case the lean walk leaves to ``_fits``:
    tuples, dict subclasses, non-array leaves, ``_``-keys); ``check_fits`` then runs the full
    diagnostic walk.  ``True`` must imply that ``_fits`` finds no problem: a key whose value
    is ``None`` must exist here as well (on a module: hold an array, a dict or a list, as
    ``parameters()`` shows it).
    """
    if type(tree) is dict:
        if not isinstance(target, dict):
            return False
        get = target.get
        for k, v in tree.items():
            c = get(k, _MISSING)
            if c is _MISSING or (type(k) is str and k.startswith("_")):
                return False
            if type(v) is mx.array:
                if type(c) is not mx.array or c.shape != v.shape or c.dtype != v.dtype:
                    return False
            elif v is None:
                if not isinstance(c, _PARAM_TYPES) and isinstance(target, nn.Module):
                    return False
            elif not _fits_quick(c, v):
                return False
        return True
    if type(tree) is list:
        if not isinstance(target, list) or len(tree) > len(target):
            return False
        for c, v in zip(target, tree):
            if type(v) is mx.array:
                if type(c) is not mx.array or c.shape != v.shape or c.dtype != v.dtype:
                    return False
            elif v is not None and not _fits_quick(c, v):
                return False
        return True
    return tree is None


def _fits(
    target: Any, tree: Any, prefix: str, problems: list[tuple[str, str]], in_module: bool
) -> None:
    """Collect every way ``tree`` does not fit ``target``.

    With ``in_module`` the target is walked as ``Module.parameters()`` would show it, without
    building that tree (the walk touches only the paths ``tree`` holds): a sub-module's keys
    that start with ``_`` or hold something other than an array, a dict or a list (a tuple)
    do not exist, and a non-parameter value in a plain dict or list of a module reads as
    ``{}``.  A ``None`` in ``tree`` checks nothing below it, but its key must exist.
    """
    if tree is None:
        return
    if in_module and not isinstance(target, _PARAM_TYPES):
        target = {}
    if isinstance(tree, dict):
        if not isinstance(target, dict):
            problems.append((prefix, f"dict where {_describe(target)} belongs"))
            return
        is_module = in_module and isinstance(target, nn.Module)
        for k, v in tree.items():
            if is_module and (not isinstance(k, str) or k.startswith("_")):
                t = _MISSING
            else:
                t = target.get(k, _MISSING)
                if is_module and not isinstance(t, _PARAM_TYPES):
                    t = _MISSING
            p = _join(prefix, str(k))
            if t is _MISSING:
                known = [
                    str(key)
                    for key, val in target.items()
                    if not is_module or (not key.startswith("_") and isinstance(val, _PARAM_TYPES))
                ]
                problems.append((p, f"unknown path (keys here: {', '.join(known[:8]) or 'none'})"))
            else:
                _fits(t, v, p, problems, in_module)
        return
    if isinstance(tree, (list, tuple)):
        if isinstance(tree, tuple) and (in_module or type(target) is not type(tree)):
            what = "a list" if in_module else _describe(target)
            problems.append((prefix, f"{type(tree).__name__} where {what} belongs"))
            return
        if isinstance(tree, list) and not isinstance(target, list):
            problems.append((prefix, f"list where {_describe(target)} belongs"))
            return
        if len(tree) > len(target) or (isinstance(tree, tuple) and len(tree) != len(target)):
            problems.append((prefix, f"length {len(tree)} where the target has {len(target)}"))
        for i, v in enumerate(tree[: len(target)]):
            _fits(target[i], v, _join(prefix, str(i)), problems, in_module)
        return
    # leaf
    if isinstance(target, mx.array):
        why = _leaf_problem(target, tree)
        if why:
            problems.append((prefix, why))
    elif not is_leaf(target):
        problems.append((prefix, f"leaf where {_describe(target)} belongs"))
    elif isinstance(tree, mx.array):
        problems.append((prefix, f"{_describe(tree)} where {_describe(target)} belongs"))
    # else: a non-array leaf (number, numpy array) where the target has one: it fits


def _describe(x: Any) -> str:
    if isinstance(x, mx.array):
        return f"an array {tuple(x.shape)} {x.dtype}"
    if isinstance(x, dict):
        return "a dict"
    if isinstance(x, list):
        return "a list"
    if x is None:
        return "None"
    name = type(x).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def check_fits(target: nn.Module | Tree, tree: Tree) -> None:
    """Raise ``TreeMismatchError`` listing every way ``tree`` does not fit ``target``.

    ``target`` is an ``nn.Module`` (checked against what its ``parameters()`` holds, walking
    only the paths ``tree`` names) or a tree.  ``tree`` may be partial: a subset of
    ``target``'s paths, with ``{}`` or ``None`` where nothing is to change (``None`` is an
    empty node: it fits any value, even an array in a list, but its key must exist, so
    ``{"nope": None}`` is an unknown path).  Every path it holds must exist with the same
    container kind (a tuple only where the target tree has a tuple of the same type and
    length; a module has none).  Where the target has an ``mx.array`` the leaf must be an
    ``mx.array`` of the same shape and dtype; where a plain target tree has another leaf (a
    number, a numpy array) any leaf but an ``mx.array`` fits (a module's parameters are all
    arrays).
    """
    if _fits_quick(target, tree):
        return
    problems: list[tuple[str, str]] = []
    _fits(target, tree, "", problems, isinstance(target, nn.Module))
    if problems:
        raise TreeMismatchError(problems, "tree does not fit the target")


def _strip_none(tree: Tree, holes: list[bool]) -> Tree:
    """``tree`` as ``Module.update`` takes it, ``None`` meaning "nothing to update here".

    ``Module.update`` rejects ``None``.  A ``None`` dict value is dropped.  A ``None`` list
    slot cannot be dropped (it keeps the indices after it in place): it becomes ``_HOLE``
    and ``holes`` gets an entry; ``_fill_holes`` then puts what belongs there.
    """
    if isinstance(tree, dict):
        return {
            k: v if type(v) is mx.array else _strip_none(v, holes)
            for k, v in tree.items()
            if v is not None
        }
    if isinstance(tree, list):
        out = [v if type(v) is mx.array else _strip_none(v, holes) for v in tree]
        if any(v is None for v in tree):
            holes.append(True)
            return [_HOLE if v is None else w for v, w in zip(tree, out)]
        return out
    return tree


class _Hole:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<nothing to update>"


_HOLE = _Hole()


def _fill_holes(tree: Tree, current: Any) -> Tree:
    """Replace each ``_HOLE`` by the module's ``current`` value there when that is an array
    (``update`` writes the very same object back: nothing changes; ``{}`` would make it raise
    "Received invalid type: dict" part way through an update), else by ``{}`` (an update of
    nothing).  ``tree`` has passed ``check_fits``: ``current`` has the containers it walks."""
    if isinstance(tree, dict):
        get = current.get if isinstance(current, dict) else _EMPTY.get
        return {k: v if type(v) is mx.array else _fill_holes(v, get(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        cur = current if isinstance(current, list) else _EMPTY_LIST
        out = []
        for i, v in enumerate(tree):
            c = cur[i] if i < len(cur) else None
            if v is _HOLE:
                out.append(c if isinstance(c, mx.array) else {})
            else:
                out.append(v if type(v) is mx.array else _fill_holes(v, c))
        return out
    return tree


_EMPTY: dict = {}
_EMPTY_LIST: list = []


def _unlanded(current: Any, tree: Any, prefix: str, out: list[tuple[str, str]]) -> None:
    if tree is None:
        return
    if isinstance(tree, dict):
        for k, v in tree.items():
            _unlanded(
                current.get(k) if isinstance(current, dict) else None, v, _join(prefix, str(k)), out
            )
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            c = current[i] if isinstance(current, list) and i < len(current) else None
            _unlanded(c, v, _join(prefix, str(i)), out)
    elif current is not tree:
        out.append((prefix, "value did not land in the module after update()"))


def _landed(current: Any, tree: Any) -> bool:
    """True when every leaf of ``tree`` is the very object at its path in ``current``."""
    if type(tree) is dict:
        if not isinstance(current, dict):
            return False
        get = current.get
        for k, v in tree.items():
            c = get(k, _MISSING)
            if type(v) is mx.array:
                if c is not v:
                    return False
            elif v is not None and not _landed(c, v):
                return False
        return True
    if type(tree) is list:
        if not isinstance(current, list) or len(tree) > len(current):
            return False
        for c, v in zip(current, tree):
            if type(v) is mx.array:
                if c is not v:
                    return False
            elif v is not None and not _landed(c, v):
                return False
        return True
    return tree is None or current is tree


def update_module(module: nn.Module, tree: Tree, verify: bool = True) -> nn.Module:
    """Checked ``module.update(tree)``: every value lands, or an error names the path.

    ``check_fits`` first (``nn.Module.update`` silently accepts a wrong shape or dtype), then
    ``module.update``, then, with ``verify``, proof that each given leaf is now the module's
    parameter at its path.  This is the only place nestedfn calls ``Module.update``.

    ``None`` anywhere in ``tree`` (a dict value, a list slot, the whole tree) means "nothing
    to update here", as ``{}`` does: that part of the module keeps its current values.  In a
    list of arrays, ``[None, new]`` leaves the first array as it is and replaces the second.
    """
    check_fits(module, tree)
    holes: list[bool] = []
    stripped = {} if tree is None else _strip_none(tree, holes)
    module.update(_fill_holes(stripped, module) if holes else stripped)
    if verify and not _landed(module, tree):
        unlanded: list[tuple[str, str]] = []
        _unlanded(module, tree, "", unlanded)  # a Module is a dict: walk it, no parameters()
        if unlanded:
            raise TreeMismatchError(unlanded, "update_module: values did not land")
    return module
