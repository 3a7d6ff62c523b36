"""Dotted paths: MLX's ``"model.layers.0.lora_a"`` keys, spoken exactly.

``to_flat``/``from_flat`` convert between a tree and ``mlx.utils.tree_flatten``'s dotted keys,
refusing what a dotted path cannot say (digit-string dict keys, keys holding ``.``, index gaps)
instead of guessing as ``mlx.utils.tree_unflatten`` does (its guesses can rebuild a ``layers``
list as another structure).  ``set_paths`` replaces leaves by path
without mutating its input, failing on unknown paths or changed shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import mlx.core as mx

from nestedfn.tree.structure import (
    _UNSUPPORTED,
    Leaf,
    PathError,
    Tree,
    TreeDef,
    TreeMismatchError,
    _build,
    _check_key,
    _dict_ctor,
    _is_namedtuple,
    _join,
    _new_dict,
    _refusal,
    _refuse_module,
    flatten,
    is_leaf,
)

__all__ = ["from_flat", "set_paths", "to_flat"]

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
    try:
        _to_flat_into(tree, "", out)
    except RecursionError:
        from nestedfn.tree.structure import TreeDepthError, tree_depth

        raise TreeDepthError(tree_depth(tree), "to_flat") from None
    return out


def _is_index(seg: str) -> bool:
    return seg.isdigit() and (seg == "0" or not seg.startswith("0"))


def _check_shapes(paths: list[str], values: list[Any], like_leaves: list[Any]) -> None:
    """``TreeMismatchError`` naming every path whose value's shape differs from ``like``'s."""
    problems = []
    for p, v, ref in zip(paths, values, like_leaves):
        vs, rs = getattr(v, "shape", None), getattr(ref, "shape", None)
        if rs is not None and (vs is None or tuple(vs) != tuple(rs)):
            got = type(v).__name__ if vs is None else f"shape {tuple(vs)}"
            problems.append((p, f"{got} where `like` has shape {tuple(rs)}"))
    if problems:
        raise TreeMismatchError(problems, "from_flat: leaves shaped unlike `like`")


def from_flat(
    flat: Mapping[str, Leaf] | Iterable[tuple[str, Leaf]],
    like: Tree | TreeDef | None = None,
    sparse: bool = False,
) -> Tree:
    """Inverse of ``to_flat``.

    With ``like`` (a tree or a ``TreeDef``) the result has exactly ``like``'s structure, and the
    paths must be exactly ``like``'s leaf paths (``TreeMismatchError`` lists missing and unknown
    ones); when ``like`` is a tree, a leaf whose shape differs from ``like``'s leaf at that
    path is a ``TreeMismatchError`` naming the path and both shapes.  Without it, a node whose segments are all integers becomes a list; a gap in the
    indices raises ``PathError`` unless ``sparse=True``, which fills it with ``{}`` (what
    ``nn.Module.update`` expects for partly-adapted ``layers``).
    """
    items = list(flat.items()) if isinstance(flat, Mapping) else _pairs(flat)
    if like is not None:
        if isinstance(like, TreeDef):
            td, like_leaves = like, None
        else:
            like_leaves, td = flatten(like)
        if td._paths is None:
            td.paths()
        paths = td._paths
        if len(items) == len(paths) and all(k == p for (k, _), p in zip(items, paths)):
            if like_leaves is not None:
                _check_shapes(paths, [v for _, v in items], like_leaves)
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
        values = [given[p] for p in paths]
        if like_leaves is not None:
            _check_shapes(paths, values, like_leaves)
        return _build(td, iter(values))

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


def _pairs(flat: Any) -> list[tuple[str, Leaf]]:
    """The ``(path, leaf)`` pairs of a non-mapping ``flat``; anything else is a ``TypeError``
    saying what ``from_flat`` takes."""
    want = "from_flat takes a dict {dotted path: leaf} (what to_flat gives) or (path, leaf) pairs"
    try:
        items = list(flat)
    except TypeError:
        raise TypeError(f"{want}, got a {type(flat).__name__}") from None
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{want}, got a {type(flat).__name__} whose item {i} is {item!r:.80}")
    return items


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
