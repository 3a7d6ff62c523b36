"""nestedfn.tree.structure: flatten/unflatten are exact, TreeDef is an exact hashable structure,
tree_map keeps structure."""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from typing import NamedTuple

import mlx.core as mx
import pytest
from hypothesis import given
from mlx.utils import tree_flatten, tree_unflatten

import nestedfn as nf
from nestedfn.testing import strategies as nfs
from nestedfn.tree import TreeDef, TreeMismatchError


def assert_same(a, b, path="<root>"):
    """``a`` and ``b`` have the same node types, keys, order and the very same leaf objects."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, defaultdict):
        assert a.default_factory is b.default_factory, f"{path}: default_factory differs"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    elif a is not None:
        assert a is b, f"{path}: leaf is a different object"


def snapshot(tree):
    """An independent deep record of ``tree``: node types, keys, leaf ids and leaf values."""
    if isinstance(tree, dict):
        return ("dict", tuple((k, snapshot(v)) for k, v in tree.items()), id(tree))
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, tuple(snapshot(v) for v in tree), id(tree))
    if isinstance(tree, mx.array):
        return ("array", id(tree), tree.tolist())
    return ("leaf", id(tree), tree)


def mlx_keys(tree):
    """MLX's own dotted keys (MLX treats ``None`` as a leaf; nestedfn as an empty node)."""
    return [k for k, v in tree_flatten(tree) if v is not None]


@given(nfs.trees())
def test_unflatten_flatten_is_exact(tree):
    lv, td = nf.flatten(tree)
    assert len(lv) == td.num_leaves
    again = nf.unflatten(td, lv)
    assert_same(again, tree)
    assert nf.flatten(again)[1] == td
    assert hash(nf.flatten(again)[1]) == hash(td)


@given(nfs.trees(), nfs.trees())
def test_treedef_equal_iff_same_structure(a, b):
    ta, tb = nf.flatten(a)[1], nf.flatten(b)[1]

    def shape(t):  # independent structure signature
        if isinstance(t, dict):
            factory = getattr(t, "default_factory", None)
            return ("d", type(t), factory, tuple((k, shape(v)) for k, v in t.items()))
        if isinstance(t, tuple) and hasattr(type(t), "_fields"):
            return (type(t), tuple(shape(v) for v in t))
        if isinstance(t, (list, tuple)):
            return (type(t).__name__, tuple(shape(v) for v in t))
        return "none" if t is None else "*"

    assert (ta == tb) == (shape(a) == shape(b))
    if ta == tb:
        assert hash(ta) == hash(tb)


def test_treedef_is_a_usable_cache_key():
    t1 = {"a": [mx.zeros(2), None], "b": ()}
    t2 = {"a": [mx.ones(2), None], "b": ()}
    t3 = {"a": (mx.ones(2), None), "b": ()}
    cache = {nf.flatten(t1)[1]: "x"}
    assert cache[nf.flatten(t2)[1]] == "x"
    assert nf.flatten(t3)[1] not in cache
    assert isinstance(nf.flatten(t1)[1], TreeDef)


def test_unflatten_wrong_leaf_count_raises():
    _, td = nf.flatten({"a": 1, "b": [2, 3]})
    with pytest.raises(TreeMismatchError, match="3 leaves, got 2"):
        nf.unflatten(td, [1, 2])


def test_flatten_keeps_what_mlx_loses():
    class NT(NamedTuple):
        p: object
        q: object

    a, b, c = mx.zeros(1), mx.ones(2), mx.arange(3)
    tree = {"d": {"0": a, "1": b}, "e": {}, "l": [], "t": (c,), "n": None, "nt": NT(1, ())}
    assert_same(nf.unflatten(*reversed(nf.flatten(tree))), tree)
    # MLX: digit keys -> list, empties dropped, tuple -> list, NamedTuple -> list
    m = tree_unflatten(tree_flatten(tree))
    assert isinstance(m["d"], list) and m["d"][0] is a and m["d"][1] is b
    assert "e" not in m and "l" not in m
    assert isinstance(m["t"], list) and isinstance(m["nt"], list)


def test_ordered_and_default_dicts_round_trip_exactly():
    a, b = mx.zeros(1), mx.ones(2)
    od = OrderedDict([("z", a), ("y", [b])])
    dd = defaultdict(list, {"k": a})
    for tree in (od, dd, {"outer": [od, dd]}):
        lv, td = nf.flatten(tree)
        assert_same(nf.unflatten(td, lv), tree)
        assert_same(nf.tree_map(lambda x: x, tree), tree)
    back = nf.unflatten(*reversed(nf.flatten(dd)))
    back["new"].append(1)  # still a working defaultdict(list)
    assert back["new"] == [1]
    # the class is part of the structure: not equal to the plain-dict TreeDef
    assert nf.flatten(od)[1] != nf.flatten(dict(od))[1]
    assert nf.flatten(dd)[1] != nf.flatten(dict(dd))[1]
    assert nf.flatten(dd)[1] != nf.flatten(defaultdict(int, dd))[1]
    assert nf.flatten(od)[1] == nf.flatten(OrderedDict([("z", b), ("y", [a])]))[1]
    with pytest.raises(TreeMismatchError, match="<root>: OrderedDict vs dict"):
        nf.tree_map(lambda x, y: x, od, dict(od))
    assert repr(nf.flatten(od)[1]) == "OrderedDict({'z': *, 'y': [*]})"
    # dotted paths: from_flat(like=) and set_paths keep the class too
    assert_same(nf.from_flat(nf.to_flat({"m": od}), like={"m": od}), {"m": od})
    out = nf.set_paths({"m": od, "d": dd}, {"m.y.0": a, "d.k": b}, check=False)
    assert type(out["m"]) is OrderedDict and list(out["m"]) == ["z", "y"]
    assert out["m"]["y"][0] is a and out["m"]["z"] is a
    assert type(out["d"]) is defaultdict and out["d"].default_factory is list
    assert out["d"]["k"] is b


class _MyDict(dict):
    pass


class _MyList(list):
    pass


class _MyTuple(tuple):
    pass


def test_other_container_subclasses_are_refused_naming_the_path():
    x = mx.zeros(1)
    for sub, want in [
        (_MyDict(w=x), "'a.1.b' is a _MyDict, a dict subclass"),
        (_MyList([x]), "'a.1.b' is a _MyList, a list subclass"),
        (_MyTuple((x,)), "'a.1.b' is a _MyTuple, a tuple subclass that is not a NamedTuple"),
        (OrderedDict(c=_MyList()), "'a.1.b.c' is a _MyList"),  # inside a supported subclass
    ]:
        tree = {"a": [None, {"b": sub}]}
        with pytest.raises(TypeError, match=re.escape(want)):
            nf.flatten(tree)
        with pytest.raises(TypeError, match=re.escape(want)):
            nf.tree_map(lambda v: v, tree)
    with pytest.raises(TypeError, match="the root is a _MyList"):
        nf.flatten(_MyList())
    # set_paths would rebuild them as plain containers: refused too
    with pytest.raises(TypeError, match="set_paths: 'a' is a _MyList"):
        nf.set_paths({"a": _MyList([x])}, {"a.0": x})
    with pytest.raises(TypeError, match="set_paths: 'a' is a _MyDict"):
        nf.set_paths({"a": _MyDict(w=x)}, {"a.w": x})


def test_non_str_dict_keys_are_refused():
    x = mx.zeros(1)
    # as dict keys 1 == True (== 1.0): their TreeDefs could not tell them apart
    assert {1: "a"} == {True: "a"}
    for tree, key in [({1: x}, "1 (int)"), ({True: x}, "True (bool)"), ({(0,): x}, "(0,) (tuple)")]:
        with pytest.raises(TypeError, match=re.escape(f"dict key {key} at the root is not a str")):
            nf.flatten(tree)
    with pytest.raises(TypeError, match=r"dict key 2 \(int\) at 'a\.0' is not a str"):
        nf.flatten({"a": [OrderedDict([("ok", x), (2, x)])]})


def test_tree_map_keeps_structure_and_refuses_mismatch():
    class NT(NamedTuple):
        a: object
        b: object

    tree = {"x": (1, NT(2, None)), "y": [3]}
    out = nf.tree_map(lambda v: v * 10, tree)
    assert out == {"x": (10, NT(20, None)), "y": [30]} and type(out["x"][1]) is NT
    assert nf.tree_map(lambda a, b: a + b, tree, tree)["y"] == [6]
    with pytest.raises(TreeMismatchError, match="x: tuple vs list"):
        nf.tree_map(lambda a, b: a, tree, {"x": [1, NT(2, None)], "y": [3]})
    assert nf.leaves(tree) == [1, 2, 3]


# ---- deep trees: one clear error naming the depth (issue 23) ------------------------------


@pytest.mark.parametrize("depth", [2000, 5000])
@pytest.mark.parametrize("wrap", [lambda t: {"a": t}, lambda t: [t], lambda t: (t, 1)])
def test_a_tree_too_deep_is_one_error_naming_its_depth(depth, wrap):
    import mlx.core as mx

    import nestedfn as nf
    from nestedfn.tree import flatten, to_flat, tree_map
    from nestedfn.tree.structure import TreeDepthError

    t = mx.zeros(2)
    for _ in range(depth):
        t = wrap(t)
    calls = {
        "flatten": lambda: flatten(t),
        "to_flat": lambda: to_flat(t),
        "tree_map": lambda: tree_map(lambda x: x, t),
        "init": lambda: nf.init(nf.adam(1e-3), t),
    }
    for name, call in calls.items():
        with pytest.raises(TreeDepthError, match=f"nested {depth} levels deep") as e:
            call()
        assert e.value.depth == depth, name


def test_tree_depth_counts_levels_and_refuses_cycles():
    from nestedfn.tree.structure import tree_depth

    shared = {"x": [1, 2]}
    assert tree_depth({"a": shared, "b": (shared, {"c": shared})}) == 5
    assert tree_depth(3) == 0 and tree_depth([]) == 1
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        tree_depth(loop)


def test_a_moderately_deep_tree_still_works():
    from nestedfn.tree import flatten, unflatten

    t: object = 1.0
    for _ in range(200):
        t = {"a": t}
    leaves, td = flatten(t)
    assert leaves == [1.0] and unflatten(td, [2.0]) is not None
