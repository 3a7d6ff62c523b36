"""The checked ``model.update()``: every value lands, or an error names the path.

``mlx.nn.Module.update`` accepts a value of the wrong shape and silently ignores one whose
path the module does not have (a dict where a list belongs, a misspelt key), so a training
loop built on it can train nothing without a word.  ``check_fits`` lists every path
that does not fit a module or tree (missing, list vs dict, shape, dtype); ``update_module``
checks, updates, and (``verify=True``) reads the values back to prove they landed.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from nestedfn.tree.paths import _leaf_problem
from nestedfn.tree.structure import Tree, TreeMismatchError, _join, is_leaf

__all__ = ["check_fits", "update_module"]

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
