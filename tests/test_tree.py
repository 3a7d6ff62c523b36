"""Tests for nestedfn.tree: exact round trips, dotted paths, checked model.update.

Each way ``mlx.utils`` loses structure is pinned here next to what nestedfn does instead.
"""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

import nestedfn as nf
from nestedfn import tree as tree_mod
from nestedfn.testing import strategies as nfs
from nestedfn.tree import PathError, TreeDef, TreeMismatchError

# ---------------------------------------------------------------------------------------------
# helpers: an independent structural comparison (not nestedfn's TreeDef)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# to_flat / from_flat
# ---------------------------------------------------------------------------------------------


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


# --- every way the MLX utilities lose structure, pinned --------------------------------------


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


# ---------------------------------------------------------------------------------------------
# set_paths
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# tree_map / leaves
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# check_fits / update_module on a tiny real mlx-lm Llama with LoRA on the last 2 layers
# ---------------------------------------------------------------------------------------------


def tiny_lora_llama():
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    args = ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=4,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=64,
    )
    model = Model(args)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


@pytest.fixture
def llama():
    return tiny_lora_llama()


def test_tiny_llama_lora_only_on_last_two_layers(llama):
    tp = llama.trainable_parameters()
    with_leaves = [bool(nf.leaves(layer)) for layer in tp["model"]["layers"]]
    assert with_leaves == [False, False, True, True]
    assert "lora_a" in tp["model"]["layers"][3]["self_attn"]["q_proj"]


def test_update_module_every_value_lands(llama):
    tp = llama.trainable_parameters()
    q0 = llama.model.layers[0].self_attn.q_proj.weight
    q0_values = mx.array(q0)
    frozen = {p: v for p, v in nf.to_flat(llama.parameters()).items() if p not in nf.to_flat(tp)}
    assert "model.layers.0.self_attn.q_proj.weight" in frozen and len(frozen) > 10
    new = nf.tree_map(lambda a: a + 1.0, tp)
    assert nf.update_module(llama, new) is llama
    got = nf.to_flat(llama.trainable_parameters())
    want = nf.to_flat(new)
    assert list(got) == list(want) and len(got) > 0
    assert all(got[p] is want[p] for p in want)
    # frozen base weights untouched: the very same objects, the same values
    assert llama.model.layers[0].self_attn.q_proj.weight is q0
    assert mx.array_equal(llama.model.layers[0].self_attn.q_proj.weight, q0_values).item()
    after = nf.to_flat(llama.parameters())
    assert all(after[p] is v for p, v in frozen.items())


def test_update_module_full_parameters(llama):
    params = llama.parameters()
    new = nf.tree_map(lambda a: a * 2, params)
    nf.update_module(llama, new)
    assert all(x is y for x, y in zip(nf.leaves(llama.parameters()), nf.leaves(new)))


def test_update_module_dict_where_list_belongs(llama):
    tp = llama.trainable_parameters()
    bad = {"model": {"layers": {"3": tp["model"]["layers"][3]}}}
    with pytest.raises(TreeMismatchError, match="model.layers: dict where a list belongs"):
        nf.update_module(llama, bad)


def test_update_module_unknown_path(llama):
    bad = {"model": {"layers": [{}, {}, {}, {"self_attn": {"x_proj": {"lora_a": mx.zeros(1)}}}]}}
    with pytest.raises(TreeMismatchError, match="model.layers.3.self_attn.x_proj: unknown path"):
        nf.update_module(llama, bad)
    with pytest.raises(TreeMismatchError, match="model.layers: length 5 where the target has 4"):
        nf.update_module(llama, {"model": {"layers": [{}] * 5}})


def test_update_module_wrong_shape_and_dtype(llama):
    a = llama.model.layers[3].self_attn.q_proj.lora_a
    path = "model.layers.3.self_attn.q_proj.lora_a"
    wrong_shape = nf.from_flat({path: mx.zeros((a.shape[0] + 1, a.shape[1]))}, sparse=True)
    with pytest.raises(TreeMismatchError, match=rf"{path}: shape \(33, 4\) where \(32, 4\)"):
        nf.update_module(llama, wrong_shape)
    wrong_dtype = nf.from_flat({path: a.astype(mx.float16)}, sparse=True)
    with pytest.raises(TreeMismatchError, match=rf"{path}: dtype mlx.core.float16"):
        nf.update_module(llama, wrong_dtype)
    not_array = nf.from_flat({path: 1.0}, sparse=True)
    with pytest.raises(TreeMismatchError, match=rf"{path}: expected mx.array, got float"):
        nf.update_module(llama, not_array)
    assert llama.model.layers[3].self_attn.q_proj.lora_a is a  # nothing applied


def test_check_fits_lists_every_problem(llama):
    tp = llama.trainable_parameters()
    bad = nf.tree_map(lambda a: a, tp)
    bad["model"]["layers"][2]["self_attn"]["q_proj"]["lora_a"] = mx.zeros((1, 1))
    bad["model"]["layers"][3]["mlp"] = {"nope": mx.zeros(1)}
    with pytest.raises(TreeMismatchError) as e:
        nf.check_fits(llama, bad)
    assert len(e.value.problems) == 2
    assert [p for p, _ in e.value.problems] == [
        "model.layers.2.self_attn.q_proj.lora_a",
        "model.layers.3.mlp.nope",
    ]


def test_module_update_accepts_wrong_shape_update_module_refuses():
    lin = nn.Linear(2, 2)
    lin.update({"weight": mx.zeros((3, 3))})  # MLX itself: silently accepted
    assert lin.weight.shape == (3, 3)
    lin = nn.Linear(2, 2)
    w = lin.weight
    with pytest.raises(TreeMismatchError, match=r"weight: shape \(3, 3\) where \(2, 2\)"):
        nf.update_module(lin, {"weight": mx.zeros((3, 3))})
    assert lin.weight is w


def test_regression_flat_dotted_lora_updates_change_the_model(llama):
    """The seed app's failure: flat ``model.layers.N...lora_a`` updates must land."""
    flat = nf.to_flat(llama.trainable_parameters())
    lora_a = {p: v + 1.0 for p, v in flat.items() if p.endswith("lora_a")}
    assert sorted({p.split(".")[2] for p in lora_a}) == ["2", "3"]
    before = {p: mx.array(v) for p, v in flat.items()}

    nf.update_module(llama, nf.from_flat(lora_a, sparse=True))
    after = nf.to_flat(llama.trainable_parameters())
    for p in flat:
        changed = not mx.array_equal(after[p], before[p]).item()
        assert changed == (p in lora_a), p
    for p in lora_a:
        assert after[p] is lora_a[p]
        assert mx.allclose(after[p], before[p] + 1.0).item()


def test_regression_naive_digit_key_dict_is_a_silent_no_op_in_mlx(llama):
    """The naive path: nest the dotted keys by hand (``layers`` becomes a dict keyed "2", "3").

    ``Module.update(strict=False)`` then changes nothing and says nothing; nestedfn refuses
    the same tree, naming the path."""
    flat = nf.to_flat(llama.trainable_parameters())
    lora_a = {p: v + 1.0 for p, v in flat.items() if p.endswith("lora_a")}
    naive: dict = {}
    for p, v in lora_a.items():
        node = naive
        *head, last = p.split(".")
        for s in head:
            node = node.setdefault(s, {})
        node[last] = v
    assert isinstance(naive["model"]["layers"], dict)

    llama.update(naive, strict=False)
    after = nf.to_flat(llama.trainable_parameters())
    assert all(after[p] is flat[p] for p in flat)  # nothing changed, no error
    with pytest.raises(ValueError, match='does not have parameter named "2"'):
        llama.update(naive)  # strict: an error, but it does not say where
    with pytest.raises(TreeMismatchError, match="model.layers: dict where a list belongs"):
        nf.update_module(llama, naive)


def test_update_module_none_entries_are_skipped(llama):
    tp = llama.trainable_parameters()
    q = tp["model"]["layers"][3]["self_attn"]["q_proj"]
    new_a = q["lora_a"] + 1
    tree = {"model": {"layers": [None, None, None, {"self_attn": {"q_proj": {"lora_a": new_a}}}]}}
    nf.update_module(llama, tree)
    assert llama.model.layers[3].self_attn.q_proj.lora_a is new_a


class _ArrayLists(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = mx.zeros(2)
        self.ws = [mx.zeros(2), mx.zeros(2)]
        self.grid = [[mx.zeros(1), mx.zeros(1)], [mx.zeros(1)]]
        self.blocks = [nn.Linear(2, 2), nn.Linear(2, 2)]


def test_update_module_none_slot_in_a_list_of_arrays_changes_nothing_there():
    m = _ArrayLists()
    ws, grid = list(m.ws), [list(r) for r in m.grid]
    b0 = m.blocks[0].weight
    new_a, new_w, new_g, new_b = mx.ones(2), mx.full((2,), 5.0), mx.ones(1), mx.ones((2, 2))
    tree = {
        "a": new_a,
        "ws": [None, new_w],
        "grid": [[new_g, None], None],
        "blocks": [None, {"weight": new_b}],
    }
    nf.check_fits(m, tree)
    nf.check_fits(m.parameters(), tree)
    assert nf.update_module(m, tree) is m
    assert m.a is new_a
    assert m.ws[0] is ws[0] and m.ws[1] is new_w
    assert m.grid[0][0] is new_g and m.grid[0][1] is grid[0][1] and m.grid[1][0] is grid[1][0]
    assert m.blocks[0].weight is b0 and m.blocks[1].weight is new_b
    assert len(m.ws) == 2 and len(m.grid) == 2 and len(m.grid[0]) == 2
    # every slot None: nothing changes at all
    before = nf.to_flat(m.parameters())
    nf.update_module(m, {"ws": [None, None], "grid": [[None, None], [None]]})
    assert all(v is before[p] for p, v in nf.to_flat(m.parameters()).items())


def test_update_module_with_nothing_to_update(llama):
    before = nf.to_flat(llama.parameters())
    assert nf.update_module(llama, None) is llama
    assert nf.update_module(llama, {"model": {"layers": [{}, None, {}, {}]}}) is llama
    assert all(v is before[p] for p, v in nf.to_flat(llama.parameters()).items())


def test_update_module_verify_catches_values_that_did_not_land():
    class Sneaky(nn.Module):
        """A module whose update() drops everything: verify must notice."""

        def __init__(self):
            super().__init__()
            self.w = mx.zeros(2)

        def update(self, parameters, strict=True):
            return self

    m = Sneaky()
    with pytest.raises(TreeMismatchError, match="w: value did not land"):
        nf.update_module(m, {"w": mx.ones(2)})
    nf.update_module(m, {"w": mx.ones(2)}, verify=False)  # unchecked: no proof asked for


# ---------------------------------------------------------------------------------------------
# check_fits: every corruption refused, at its path, on random modules
# ---------------------------------------------------------------------------------------------

CORRUPTIONS = [
    "shape",
    "dtype",
    "not_array",
    "unknown_key",
    "dict_for_list",
    "tuple_for_list",
    "long_list",
    "none",
]


def _copy_containers(tree):
    if isinstance(tree, dict):
        return {k: _copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_containers(v) for v in tree]
    return tree


def _node(tree, path):
    for s in path.split(".") if path else []:
        tree = tree[int(s)] if isinstance(tree, list) else tree[s]
    return tree


@given(nfs.modules(), st.sampled_from(CORRUPTIONS), st.data())
def test_check_fits_refuses_every_corruption_at_its_path(model, how, data):
    params = model.parameters()
    flat = nf.to_flat(params)
    path = data.draw(st.sampled_from(list(flat)))
    leaf = flat[path]
    tree, bad = _copy_containers(params), path
    if how == "shape":
        tree = nf.set_paths(params, {path: mx.zeros((*leaf.shape, 1))}, check=False)
    elif how == "dtype":
        tree = nf.set_paths(params, {path: leaf.astype(mx.float16)}, check=False)
    elif how == "not_array":
        tree = nf.set_paths(params, {path: 1.0}, check=False)
    elif how == "unknown_key":
        parent = path.rpartition(".")[0]
        _node(tree, parent)["nope"] = mx.zeros(1)
        bad = f"{parent}.nope"
    elif how == "dict_for_list":
        tree["layers"] = {str(i): v for i, v in enumerate(tree["layers"])}
        bad = "layers"
    elif how == "tuple_for_list":
        tree["layers"] = tuple(tree["layers"])
        bad = "layers"
    elif how == "long_list":
        tree["layers"].append({})
        bad = "layers"
    before = {p: v for p, v in flat.items()}
    if how == "none":
        nf.check_fits(model, tree)
        nf.check_fits(params, tree)  # a Module and its parameters() tree agree
        return
    for target in (model, params):
        with pytest.raises(TreeMismatchError) as e:
            nf.check_fits(target, tree)
        assert [p for p, _ in e.value.problems] == [bad]
    with pytest.raises(TreeMismatchError):
        nf.update_module(model, tree)
    assert all(v is before[p] for p, v in nf.to_flat(model.parameters()).items())  # untouched


@given(nfs.modules(), st.data())
def test_partial_sparse_updates_fit_and_land(model, data):
    flat = nf.to_flat(model.parameters())
    chosen = data.draw(st.lists(st.sampled_from(list(flat)), unique=True, min_size=1))
    updates = {p: flat[p] * 2 for p in chosen}
    nf.update_module(model, nf.from_flat(updates, sparse=True))
    after = nf.to_flat(model.parameters())
    assert list(after) == list(flat)
    for p in flat:
        assert after[p] is updates.get(p, flat[p])


class _Odd(nn.Module):
    """A module with what ``parameters()`` hides or shows as ``{}``."""

    def __init__(self):
        super().__init__()
        self.w = mx.zeros(2)
        self._hidden = [mx.zeros(2)]  # private: not a parameter
        self.cfg = {"n": 3, "w": mx.zeros(1)}  # "n" reads as {} in parameters()
        self.sizes = [1, 2]  # reads as [{}, {}]
        self.t = (mx.zeros(1),)  # tuples are not parameters


def test_check_fits_on_a_module_follows_parameters_semantics():
    m = _Odd()
    assert m.parameters() == {"w": m.w, "cfg": {"n": {}, "w": m.cfg["w"]}, "sizes": [{}, {}]}
    for bad, where in [
        ({"_hidden": [mx.ones(2)]}, "_hidden"),
        ({"t": [mx.ones(1)]}, "t"),
        ({"name": mx.ones(1)}, "name"),
        ({"cfg": {"n": mx.ones(1)}}, "cfg.n"),
        ({"sizes": [mx.ones(1)]}, "sizes.0"),
    ]:
        for target in (m, m.parameters()):
            with pytest.raises(TreeMismatchError) as e:
                nf.check_fits(target, bad)
            assert [p for p, _ in e.value.problems] == [where]
    ok = {"cfg": {"n": {}, "w": mx.ones(1)}, "sizes": [{}, None]}
    nf.check_fits(m.parameters(), ok)
    nf.update_module(m, ok)
    assert m.cfg["w"] is ok["cfg"]["w"] and m.cfg["n"] == 3 and m.sizes == [1, 2]


def test_check_fits_on_plain_trees_with_tuples():
    class NT(NamedTuple):
        a: object

    target = {"t": (mx.zeros(2), mx.zeros(1)), "n": NT(mx.zeros(1))}
    nf.check_fits(target, {"t": (mx.ones(2), None), "n": NT(mx.ones(1))})
    with pytest.raises(TreeMismatchError, match="t: list where a tuple belongs"):
        nf.check_fits(target, {"t": [mx.ones(2), None]})
    with pytest.raises(TreeMismatchError, match="t: length 1 where the target has 2"):
        nf.check_fits(target, {"t": (mx.ones(2),)})
    with pytest.raises(TreeMismatchError, match="n: tuple where a NT belongs"):
        nf.check_fits(target, {"n": (mx.ones(1),)})
    with pytest.raises(TreeMismatchError, match="<root>: leaf where a dict belongs"):
        nf.check_fits(target, mx.ones(1))


def test_check_fits_plain_tree_number_leaves_fit_number_leaves():
    nf.check_fits({"a": 1}, {"a": 1})
    target = {"lr": 0.1, "count": 3, "h": [np.zeros(3), "name"], "w": mx.zeros(2)}
    nf.check_fits(target, {"lr": 0.2, "count": 4, "h": [np.ones(2), None], "w": mx.ones(2)})
    nf.check_fits(target, target)
    with pytest.raises(TreeMismatchError, match=r"count: an array \(1,\) mlx.core.float32 where"):
        nf.check_fits(target, {"count": mx.ones(1)})
    with pytest.raises(TreeMismatchError, match="w: expected mx.array, got int"):
        nf.check_fits(target, {"w": 1})
    with pytest.raises(TreeMismatchError, match="a: leaf where a dict belongs"):
        nf.check_fits({"a": {"b": 1}}, {"a": 1})
    with pytest.raises(TreeMismatchError, match="a.b: dict where an int belongs"):
        nf.check_fits({"a": {"b": 1}}, {"a": {"b": {}}})
    # a module's parameters are arrays: a number where parameters() shows {} does not fit
    m = _Odd()
    assert m.parameters()["cfg"]["n"] == {}
    with pytest.raises(TreeMismatchError, match="cfg.n: leaf where a dict belongs"):
        nf.check_fits(m, {"cfg": {"n": 4}})


@pytest.mark.parametrize(
    "tree, bad",
    [
        ({"w": None}, []),
        ({"t": None}, ["t"]),  # a tuple attribute: not in parameters()
        ({"nope": None}, ["nope"]),
        ({"_hidden": None}, ["_hidden"]),
        ({"w": mx.ones(2), "t": None}, ["t"]),
        ({"cfg": {"n": None, "w": None}}, []),
        ({"cfg": {"zz": None}}, ["cfg.zz"]),
        ({"sizes": [None, None]}, []),
        (None, []),
    ],
)
def test_check_fits_none_values_need_an_existing_key_in_both_walks(tree, bad):
    m = _Odd()

    # independent expectation: a key holding None must be a key of parameters() at its place
    def unknown(params, t, prefix=""):
        out = []
        for k, v in (t or {}).items():
            p = f"{prefix}.{k}" if prefix else k
            if k not in params:
                out.append(p)
            elif isinstance(v, dict):
                out += unknown(params[k], v, p)
        return out

    assert unknown(m.parameters(), tree) == bad
    for target in (m, m.parameters()):
        if bad:
            with pytest.raises(TreeMismatchError) as e:
                nf.check_fits(target, tree)
            assert [p for p, _ in e.value.problems] == bad
        else:
            nf.check_fits(target, tree)
        # both walks agree: the lean one says "fits" exactly where the full one finds nothing
        problems: list = []
        tree_mod._fits(target, tree, "", problems, isinstance(target, nn.Module))
        assert [p for p, _ in problems] == bad
        assert tree_mod._fits_quick(target, tree) == (not bad)


def test_modules_are_not_trees():
    lin = nn.Linear(2, 2)
    for fn in (nf.flatten, nf.to_flat, nf.leaves, lambda t: nf.tree_map(lambda a: a, t)):
        with pytest.raises(TypeError, match="pass module.parameters()"):
            fn({"inner": lin})


def test_set_paths_without_updates_returns_the_tree():
    tree = {"a": [mx.zeros(1)]}
    assert nf.set_paths(tree, {}) is tree
    leaf = mx.zeros(1)
    assert nf.set_paths(leaf, {}) is leaf
    with pytest.raises(PathError, match="unknown path 'x'"):
        nf.set_paths(leaf, {"x": mx.zeros(1)})
