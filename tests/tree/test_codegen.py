"""treecode: generated leaf extraction and rebuild agree with flatten/unflatten exactly."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import mlx.core as mx
from hypothesis import given

import nestedfn as nf
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
