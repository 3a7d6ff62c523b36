"""The Hypothesis strategies in nestedfn.testing.strategies produce what they promise.

Coverage claims ("across examples some tree has X") are checked with ``find``, which searches
for an example with the property and fails the test if none exists.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import mlx.core as mx
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

import nestedfn as nf
from nestedfn.testing import strategies as nfs
from nestedfn.tree import PathError

# generate only: find() then returns the first example found instead of shrinking it
FIND = settings(max_examples=2000, database=None, derandomize=True, phases=[Phase.generate])


def nodes(tree):
    """Every node of ``tree`` (containers and leaves), depth first; independent of nestedfn."""
    yield tree
    if isinstance(tree, dict):
        for v in tree.values():
            yield from nodes(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from nodes(v)


def dict_keys(tree):
    return [k for n in nodes(tree) if isinstance(n, dict) for k in n]


# ---------------------------------------------------------------------------------------------
# mlx_arrays
# ---------------------------------------------------------------------------------------------


@given(nfs.mlx_arrays(shape=(2, 3), dtypes=(mx.float32, mx.bfloat16)))
def test_mlx_arrays_fixed_shape_and_dtypes(a):
    assert isinstance(a, mx.array) and a.shape == (2, 3)
    assert a.dtype in (mx.float32, mx.bfloat16)
    assert mx.all(mx.abs(a.astype(mx.float32)) <= 4).item()


@given(nfs.mlx_arrays(max_dims=3, max_side=2))
def test_mlx_arrays_bounded_shapes(a):
    assert a.ndim <= 3 and all(1 <= d <= 2 for d in a.shape)
    assert mx.all(mx.isfinite(a)).item()


def test_mlx_arrays_covers_scalars_and_dtypes():
    find(nfs.mlx_arrays(), lambda a: a.ndim == 0, settings=FIND)
    find(
        nfs.mlx_arrays(dtypes=(mx.float32, mx.float16)),
        lambda a: a.dtype == mx.float16,
        settings=FIND,
    )


# ---------------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what",
    [
        lambda t: any(k.isdigit() for k in dict_keys(t)),  # digit-string keys
        lambda t: any("." in k for k in dict_keys(t)),  # keys containing '.'
        lambda t: any(n is None for n in nodes(t)),
        lambda t: any(isinstance(n, dict) and not n for n in nodes(t)),
        lambda t: any(isinstance(n, list) and not n for n in nodes(t)),
        lambda t: any(type(n) is tuple and not n for n in nodes(t)),
        lambda t: any(type(n) in (nfs.Pair, nfs.Triple) for n in nodes(t)),
        lambda t: any(isinstance(n, mx.array) for n in nodes(t)),
        lambda t: any(type(n) is OrderedDict and n for n in nodes(t)),
        lambda t: any(type(n) is defaultdict and n.default_factory is list for n in nodes(t)),
    ],
    ids=[
        "digit-keys",
        "dotted-keys",
        "none",
        "empty-dict",
        "empty-list",
        "empty-tuple",
        "namedtuple",
        "array-leaf",
        "ordered-dict",
        "defaultdict",
    ],
)
def test_trees_cover_every_node_kind(what):
    find(nfs.trees(), what, settings=FIND)


@given(nfs.trees(path_safe=True))
def test_path_safe_trees_are_accepted_by_to_flat(tree):
    assert isinstance(tree, (dict, list, tuple))
    for k in dict_keys(tree):
        assert k and "." not in k and not k.isdigit()
    nf.to_flat(tree)  # must not raise


@given(nfs.trees(none=False, empty=False, tuples=False, namedtuples=False, dict_subclasses=False))
def test_trees_switches_turn_node_kinds_off(tree):
    for n in nodes(tree):
        assert n is not None and not isinstance(n, tuple)
        if isinstance(n, (dict, list)):
            assert type(n) in (dict, list) and len(n) > 0


def test_unsafe_trees_do_reach_path_errors():
    find(nfs.trees(), lambda t: _raises_path_error(t), settings=FIND)


def _raises_path_error(tree):
    try:
        nf.to_flat(tree)
    except PathError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# param_trees
# ---------------------------------------------------------------------------------------------


@given(nfs.param_trees(min_layers=2, max_layers=3))
def test_param_trees_shape(params):
    layers = params["model"]["layers"]
    assert isinstance(layers, list) and 2 <= len(layers) <= 3
    for k, v in tree_flatten(params):
        seg = k.split(".")
        assert isinstance(v, mx.array)
        if seg[1] == "layers":
            assert seg[3] in ("self_attn", "mlp") and seg[5] in ("lora_a", "lora_b")
    for layer in layers:
        for group in layer.values():
            for proj in group.values():
                a, b = proj["lora_a"], proj["lora_b"]
                assert a.shape[1] == b.shape[0] and a.shape[0] == b.shape[1]  # (h, r), (r, h)


def test_param_trees_contain_sparse_and_adapted_layers():
    find(
        nfs.param_trees(),
        lambda p: {} in p["model"]["layers"] and any(p["model"]["layers"]),
        settings=FIND,
    )


@given(nfs.param_trees(sparse=False, lora=False))
def test_param_trees_dense_weights(params):
    assert all(layer for layer in params["model"]["layers"])
    assert all(k.endswith("weight") for k, _ in tree_flatten(params))


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------


@given(nfs.modules())
def test_modules_round_trip_and_update(model):
    params = model.parameters()
    flat = nf.to_flat(params)
    assert list(flat) == [k for k, _ in tree_flatten(params)]
    rebuilt = nf.from_flat(flat, like=params)
    assert nf.flatten(rebuilt)[1] == nf.flatten(params)[1]
    new = nf.tree_map(lambda a: a + 1.0, rebuilt)
    nf.update_module(model, new)
    got = nf.to_flat(model.parameters())
    for p, v in nf.to_flat(new).items():
        assert got[p] is v
        assert mx.allclose(v, flat[p] + 1.0).item()
    x = mx.ones((1, model.layers[0].proj.weight.shape[1]))
    assert model(x).shape == (1, 2)


def test_modules_have_layers_with_and_without_lora():
    def mixed(m):
        has = ["lora_a" in layer for layer in m.layers]
        return any(has) and not all(has)

    find(nfs.modules(min_layers=2), mixed, settings=FIND)


@given(st.data())
def test_modules_leave_mlx_global_random_state_alone(data):
    mx.random.seed(7)
    want = mx.random.normal((3,))
    mx.random.seed(7)
    m = data.draw(nfs.modules())
    assert mx.array_equal(mx.random.normal((3,)), want).item()
    assert all(mx.all(mx.isfinite(v)).item() for v in nf.leaves(m.parameters()))
