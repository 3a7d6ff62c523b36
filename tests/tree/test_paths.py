"""nestedfn.tree.paths: dotted paths spoken exactly (to_flat, from_flat, set_paths), pinned
against every way mlx.utils loses structure."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

import nestedfn as nf
from nestedfn.testing import strategies as nfs
from nestedfn.tree import PathError, TreeMismatchError
from nestedfn.tree import structure as tree_mod
from tests.tree.test_structure import assert_same, mlx_keys, snapshot


@given(nfs.trees(path_safe=True))
def test_to_flat_keys_match_mlx(tree):
    flat = nf.to_flat(tree)
    assert list(flat) == mlx_keys(tree)
    assert len(flat) == len(nf.leaves(tree))
    assert all(x is y for x, y in zip(flat.values(), nf.leaves(tree)))


@given(nfs.trees(path_safe=True, none=False))
def test_to_flat_keys_equal_mlx_tree_flatten_keys_without_none(tree):
    assert list(nf.to_flat(tree)) == [k for k, _ in tree_flatten(tree)]


def test_none_is_an_empty_node_not_a_leaf():
    tree = {"a": None, "b": [mx.zeros(1), None]}
    assert [k for k, _ in tree_flatten(tree)] == ["a", "b.0", "b.1"]  # MLX: None is a leaf
    assert list(nf.to_flat(tree)) == ["b.0"]
    assert nf.leaves(tree) == [tree["b"][0]]
    assert_same(nf.from_flat(nf.to_flat(tree), like=tree), tree)


@given(nfs.param_trees())
def test_to_flat_keys_match_mlx_on_param_trees(params):
    flat = nf.to_flat(params)
    assert list(flat) == [k for k, _ in tree_flatten(params)]
    assert all(x is y for x, y in zip(flat.values(), nf.leaves(params)))


@given(nfs.trees(path_safe=True))
def test_from_flat_like_rebuilds_exactly(tree):
    flat = nf.to_flat(tree)
    assert_same(nf.from_flat(flat, like=tree), tree)
    assert_same(nf.from_flat(flat, like=nf.flatten(tree)[1]), tree)
    assert_same(nf.from_flat(list(flat.items()), like=tree), tree)


@given(nfs.param_trees(sparse=False))
def test_from_flat_without_like_rebuilds_dense_param_trees(params):
    assert_same(nf.from_flat(nf.to_flat(params)), params)


@given(nfs.param_trees())
def test_from_flat_sparse_matches_mlx_tree_unflatten(params):
    flat = nf.to_flat(params)
    ours = nf.from_flat(flat, sparse=True)
    if not flat:  # MLX rebuilds [] from nothing (all zero keys are "integers"); we give {}
        assert ours == {} and tree_unflatten([]) == []
        return
    theirs = tree_unflatten(list(flat.items()))
    assert_same(ours, theirs)


@given(nfs.trees(path_safe=True))
def test_from_flat_like_takes_any_order_and_gives_like_order(tree):
    flat = nf.to_flat(tree)
    shuffled = list(reversed(list(flat.items())))
    assert_same(nf.from_flat(shuffled, like=tree), tree)
    assert nf.flatten(tree)[1].paths() == list(flat)


def test_treedef_paths_are_computed_once(monkeypatch):
    td = nf.flatten({"a": [mx.zeros(1), {"b": mx.zeros(1)}], "c": mx.zeros(1)})[1]
    calls = []
    real = tree_mod._collect_paths
    monkeypatch.setattr(tree_mod, "_collect_paths", lambda *a: (calls.append(a[1]), real(*a))[1])
    first = td.paths()
    n = len(calls)
    assert first == ["a.0", "a.1.b", "c"] and n > 0
    first.append("mutated")  # a fresh list each time: callers cannot corrupt the cache
    assert td.paths() == ["a.0", "a.1.b", "c"]
    assert len(calls) == n  # the second call walked nothing: cached


def test_from_flat_like_missing_and_unknown_paths():
    like = {"a": {"b": mx.zeros(1), "c": mx.zeros(1)}}
    with pytest.raises(TreeMismatchError) as e:
        nf.from_flat({"a.b": mx.zeros(1), "a.x": mx.zeros(1)}, like=like)
    assert "a.c: missing" in str(e.value) and "a.x: not a leaf path" in str(e.value)


def test_from_flat_like_path_given_twice():
    with pytest.raises(PathError, match="given twice"):
        nf.from_flat([("a", 1), ("a", 2)], like={"a": 0})


def test_digit_string_keys_mlx_turns_into_list_nestedfn_refuses_paths():
    tree = {"layers": {"0": mx.zeros(2), "1": mx.ones(2)}}
    assert isinstance(tree_unflatten(tree_flatten(tree))["layers"], list)  # MLX loses it
    with pytest.raises(PathError, match="'0' under 'layers' is a digit string"):
        nf.to_flat(tree)
    assert_same(nf.unflatten(*reversed(nf.flatten(tree))), tree)  # exact path kept


def test_empty_containers_mlx_drops_nestedfn_keeps_with_like():
    tree = {"a": {}, "b": [], "c": (), "d": None, "w": mx.zeros(1)}
    assert list(tree_unflatten(tree_flatten(tree))) == ["d", "w"]  # MLX drops a, b, c
    flat = nf.to_flat(tree)
    assert list(flat) == ["w"]
    assert_same(nf.from_flat(flat, like=tree), tree)


def test_tuples_mlx_turns_into_lists_nestedfn_keeps_with_like():
    tree = {"t": (mx.zeros(1), mx.ones(1))}
    assert isinstance(tree_unflatten(tree_flatten(tree))["t"], list)
    assert_same(nf.from_flat(nf.to_flat(tree), like=tree), tree)


def test_index_gaps_mlx_pads_nestedfn_refuses_unless_sparse():
    flat = {"layers.0.w": mx.zeros(1), "layers.2.w": mx.ones(1)}
    assert tree_unflatten(list(flat.items()))["layers"][1] == {}  # MLX pads silently
    with pytest.raises(PathError, match=r"'layers' has no entries for indices \[1\]"):
        nf.from_flat(flat)
    got = nf.from_flat(flat, sparse=True)
    assert got["layers"][1] == {} and got["layers"][2]["w"] is flat["layers.2.w"]


def test_keys_with_dots_mlx_splits_nestedfn_refuses():
    tree = {"a.b": mx.zeros(1)}
    assert tree_unflatten(tree_flatten(tree))["a"]["b"] is tree["a.b"]  # MLX splits it
    with pytest.raises(PathError, match="contains '.'"):
        nf.to_flat(tree)
    with pytest.raises(PathError, match="is empty or contains"):
        nf.to_flat({"": 1})
    with pytest.raises(PathError, match="not a str"):
        nf.to_flat({1: 1})
    with pytest.raises(PathError, match="needs a container"):
        nf.to_flat(mx.zeros(1))


def test_from_flat_mixed_indices_and_names_refused():
    with pytest.raises(PathError, match="mixes list indices and names"):
        nf.from_flat({"a.0": 1, "a.x": 2})
    with pytest.raises(PathError, match="which is a leaf"):
        nf.from_flat({"a": 1, "a.b": 2})
    with pytest.raises(PathError, match="empty segment"):
        nf.from_flat({"a..b": 1})


@given(nfs.param_trees(), st.data())
def test_set_paths_is_pure_and_shares_untouched(params, data):
    flat = nf.to_flat(params)
    chosen = (
        data.draw(st.lists(st.sampled_from(list(flat)), unique=True, max_size=4)) if flat else []
    )
    updates = {p: flat[p] + 1 for p in chosen}
    before = snapshot(params)
    out = nf.set_paths(params, updates)
    assert snapshot(params) == before  # input untouched: values, ids, structure
    out_flat = nf.to_flat(out)
    assert list(out_flat) == list(flat)
    for p, v in out_flat.items():
        assert v is (updates[p] if p in updates else flat[p])
    assert nf.flatten(out)[1] == nf.flatten(params)[1]

    # a subtree holding no updated path is shared, not copied
    def walk(a, b, prefix):
        touched = any(p == prefix or p.startswith(prefix + ".") for p in chosen) or not prefix
        if not touched:
            assert a is b, prefix
            return
        if isinstance(a, dict):
            for k in a:
                walk(a[k], b[k], f"{prefix}.{k}" if prefix else k)
        elif isinstance(a, list):
            for i in range(len(a)):
                walk(a[i], b[i], f"{prefix}.{i}" if prefix else str(i))

    walk(params, out, "")


def test_set_paths_keeps_tuples_and_namedtuples():
    class NT(NamedTuple):
        a: object
        b: object

    tree = {"x": (mx.zeros(1), NT(mx.zeros(2), None))}
    new = mx.ones(2)
    out = nf.set_paths(tree, {"x.1.0": new})  # tuple fields by index, as to_flat
    assert type(out["x"]) is tuple and type(out["x"][1]) is NT
    assert out["x"][1].a is new and out["x"][0] is tree["x"][0]


def test_set_paths_unknown_path_names_longest_prefix():
    tree = {"model": {"layers": [{"q": mx.zeros(1)}]}}
    with pytest.raises(PathError, match="longest existing prefix is 'model.layers.0'") as e:
        nf.set_paths(tree, {"model.layers.0.k": mx.zeros(1)})
    assert e.value.path == "model.layers.0.k" and e.value.prefix == "model.layers.0"
    with pytest.raises(PathError, match="'model.layers.3.q'"):
        nf.set_paths(tree, {"model.layers.3.q": mx.zeros(1)})
    with pytest.raises(PathError, match="is a leaf"):
        nf.set_paths(tree, {"model.layers.0.q.z": mx.zeros(1)})
    with pytest.raises(PathError, match="names a subtree"):
        nf.set_paths(tree, {"model.layers.0": mx.zeros(1)})


def test_set_paths_shape_and_dtype_checked_unless_check_false():
    tree = {"w": mx.zeros((2, 2))}
    with pytest.raises(TreeMismatchError, match=r"w: shape \(3, 3\) where \(2, 2\) belongs"):
        nf.set_paths(tree, {"w": mx.zeros((3, 3))})
    with pytest.raises(TreeMismatchError, match="w: dtype mlx.core.float16 where"):
        nf.set_paths(tree, {"w": mx.zeros((2, 2), dtype=mx.float16)})
    out = nf.set_paths(tree, {"w": mx.zeros((3, 3))}, check=False)
    assert out["w"].shape == (3, 3) and tree["w"].shape == (2, 2)


def test_set_paths_without_updates_returns_the_tree():
    tree = {"a": [mx.zeros(1)]}
    assert nf.set_paths(tree, {}) is tree
    leaf = mx.zeros(1)
    assert nf.set_paths(leaf, {}) is leaf
    with pytest.raises(PathError, match="unknown path 'x'"):
        nf.set_paths(leaf, {"x": mx.zeros(1)})


@pytest.mark.parametrize("flat", [[mx.zeros(1)], [("w",)], 3, [(0, mx.zeros(1))]])
def test_from_flat_of_something_else_says_what_it_takes(flat):
    like = {"w": mx.zeros(1)}
    with pytest.raises(TypeError, match="from_flat takes a dict"):
        nf.from_flat(flat, like=like)
    with pytest.raises(TypeError, match="from_flat takes a dict"):
        nf.from_flat(flat)


def test_from_flat_takes_path_leaf_pairs():
    like = {"a": mx.zeros(1), "b": [mx.zeros(2)]}
    out = nf.from_flat([("b.0", mx.ones(2)), ("a", mx.ones(1))], like=like)
    assert out["a"].tolist() == [1.0] and out["b"][0].tolist() == [1.0, 1.0]
