"""nestedfn.tree.module: the checked model.update (check_fits, update_module) on a tiny real
mlx-lm Llama with LoRA, and every corruption refused at its path on random modules."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nestedfn as nf
from nestedfn.testing import strategies as nfs
from nestedfn.tree import TreeMismatchError
from nestedfn.tree import module as tree_mod
from tests.tiny_models import tiny_llama

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


def tiny_lora_llama():
    return tiny_llama(lora_layers=2)


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
