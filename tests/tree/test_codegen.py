"""nestedfn.tree.codegen: generated leaf extraction and rebuild equal flatten/unflatten."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import mlx.core as mx
from hypothesis import given, settings
from hypothesis import strategies as st

import nestedfn as nf
import nestedfn.fast.native as native
from nestedfn.optim.core import TrainState
from nestedfn.testing import strategies as nfs
from nestedfn.tree.codegen import leaf_getter, tree_builder


class _P(NamedTuple):
    a: object
    b: object


class _Q(NamedTuple):
    a: object
    b: object


@given(nfs.trees())
def test_getter_and_builder_equal_flatten_and_unflatten(tree):
    leaves, td = nf.flatten(tree)
    got = leaf_getter(td)(tree)
    assert got is not None and len(got) == len(leaves)
    assert all(a is b for a, b in zip(got, leaves))
    rebuilt = tree_builder(td)(leaves)
    again, td2 = nf.flatten(rebuilt)
    assert td2 == td and all(a is b for a, b in zip(again, leaves))


def _base():
    x, y = mx.zeros((2,)), mx.ones((3,))
    return {"layers": [{"w": x, "b": None}, {"w": y}], "t": (x, _P(x, y))}


def test_getter_refuses_every_structural_difference():
    get = leaf_getter(nf.flatten(_base())[1])
    assert get(_base()) is not None
    x = mx.zeros((2,))
    variants = {
        "extra key": lambda t: t["layers"][1].update(v=x),
        "missing key": lambda t: t["layers"][1].pop("w"),
        "key order": lambda t: t.update(layers=t.pop("layers")),
        "list longer": lambda t: t["layers"].append({}),
        "list as tuple": lambda t: t.update(layers=tuple(t["layers"])),
        "tuple as list": lambda t: t.update(t=list(t["t"])),
        "other NamedTuple": lambda t: t.update(t=(x, _Q(x, x))),
        "None where a leaf was": lambda t: t["layers"][0].update(w=None),
        "leaf where None was": lambda t: t["layers"][0].update(b=x),
        "dict where a leaf was": lambda t: t["layers"][0].update(w={"z": x}),
        "NamedTuple where a leaf was": lambda t: t["layers"][1].update(w=_P(x, x)),
        "OrderedDict where a dict was": lambda t: t.update(layers=[OrderedDict(w=x), {"w": x}]),
    }
    for name, mutate in variants.items():
        tree = _base()
        mutate(tree)
        assert get(tree) is None, name


def test_ordered_dicts_use_the_general_path_and_stay_exact():
    tree = OrderedDict(b=mx.ones((1,)), a=[mx.zeros((2,))])
    leaves, td = nf.flatten(tree)
    assert all(a is b for a, b in zip(leaf_getter(td)(tree), leaves))
    rebuilt = tree_builder(td)(leaves)
    assert type(rebuilt) is OrderedDict and list(rebuilt) == ["b", "a"]
    assert leaf_getter(td)(dict(tree)) is None


def test_unchecked_leaves_return_nodes_in_leaf_positions_for_the_caller_to_check():
    tree = {"a": mx.zeros((1,)), "b": [mx.ones((2,))]}
    td = nf.flatten(tree)[1]
    odd = {"a": {"x": 1}, "b": [None]}
    assert leaf_getter(td)(odd) is None
    assert leaf_getter(td, check_leaves=False)(odd) == [{"x": 1}, None]
    assert leaf_getter(td, check_leaves=False)({"a": 1, "b": (2,)}) is None  # nodes still checked


# -- the native step's walk: unchecked leaves (``nestedfn.fast.native._walkers``) ----------


@settings(max_examples=60, deadline=None)
@given(tree=nfs.trees(nfs.mlx_arrays(max_dims=2, max_side=3), max_leaves=12))
def test_unchecked_walk_equals_flatten_and_unflatten(tree):
    """Its leaves are ``flatten``'s, its build is ``unflatten`` (same structure, the very same
    leaf objects), and a tree of any other structure gives None."""
    leaves, td = nf.flatten(tree)
    get, build = native._walkers(td)
    got = get(tree)
    assert got is not None and len(got) == len(leaves)
    assert all(a is b for a, b in zip(got, leaves))
    rebuilt = build(list(leaves))
    assert nf.flatten(rebuilt)[1] == td
    assert all(a is b for a, b in zip(nf.flatten(rebuilt)[0], leaves))
    for other in _other_structures(tree):
        assert get(other) is None


def _other_structures(tree):
    """Trees one change away from ``tree`` at its root: a key renamed, a key dropped, keys
    reordered, a tuple for a list, an element dropped.  (What stands in a leaf's place is not
    tested: the native step's kernel refuses anything but an array.)"""
    if isinstance(tree, dict) and type(tree) is dict:
        for k in tree:
            yield {**{j: v for j, v in tree.items() if j != k}, f"{k}_x": tree[k]}
            yield {j: v for j, v in tree.items() if j != k}
            break
        if len(tree) > 1:
            yield dict(reversed(list(tree.items())))
    elif isinstance(tree, list):
        yield tuple(tree)
        if tree:
            yield tree[:-1]


def test_unchecked_walk_of_named_tuples_none_and_equal_but_distinct_keys():
    arr = {"alpha": mx.zeros(2), "b": None, "c": [mx.ones(1), (mx.zeros(1),)]}
    tree = TrainState(arr, (), 0)
    leaves, td = nf.flatten(tree)
    get, build = native._walkers(td)
    assert [id(x) for x in get(tree)] == [id(x) for x in leaves]
    key, alpha = "".join(["al", "pha"]), "alpha"
    assert key == alpha and key is not alpha  # equal, another object
    same = TrainState({key: arr["alpha"], "b": None, "c": arr["c"]}, (), 0)
    assert get(same) is not None
    assert get(tuple(tree)) is None  # a plain tuple is not the NamedTuple
    assert get(TrainState({"alpha": mx.zeros(2), "b": 0, "c": arr["c"]}, (), 0)) is None
    back = build(list(leaves))
    assert type(back) is TrainState and back.params["b"] is None and back.step is leaves[-1]


@given(
    keys=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=8, unique=True),
    data=st.data(),
)
def test_keys_moved_between_dicts_are_refused(keys, data):
    """The keys are checked as one chain over all dicts; the same chain cut into dicts at
    other places is another structure, and the getter says so (None) exactly when
    ``flatten`` does."""

    def tree(cuts):
        bounds = [0, *sorted(cuts), len(keys)]
        return [{k: mx.zeros((1,)) for k in keys[a:b]} for a, b in zip(bounds, bounds[1:])]

    cut = st.lists(st.integers(0, len(keys)), min_size=2, max_size=2)
    a, b = tree(data.draw(cut)), tree(data.draw(cut))
    td = nf.flatten(a)[1]
    leaves, td_b = nf.flatten(b)
    for check in (True, False):
        got = leaf_getter(td, check_leaves=check)(b)
        if td_b == td:
            assert got is not None and all(x is y for x, y in zip(got, leaves))
        else:
            assert got is None
