"""Hypothesis strategies for trees, MLX parameter trees and small ``nn.Module``s.

Fuzz your own tree code with the same inputs nestedfn's tests use::

    from hypothesis import given
    import nestedfn as nf
    from nestedfn.testing import strategies as nfs

    @given(nfs.trees())
    def test_roundtrip(tree):
        leaves, treedef = nf.flatten(tree)
        assert nf.flatten(nf.unflatten(treedef, leaves))[1] == treedef

    @given(nfs.param_trees())
    def test_paths(params):
        again = nf.from_flat(nf.to_flat(params), like=params)
        assert nf.flatten(again)[1] == nf.flatten(params)[1]

What each strategy covers, and why:

* ``trees()``: every node kind nestedfn supports (``dict``, ``OrderedDict``, ``defaultdict``,
  ``list``, ``tuple``, ``NamedTuple``, ``None``, empty containers) and the dict keys that break
  dotted paths
  (digit strings such as ``"0"``, keys containing ``"."``).  ``path_safe=True`` keeps to what a
  dotted MLX path can state (identifier-like keys, a container at the root).
* ``param_trees()``: the shape of an mlx-lm model's ``parameters()``, with a ``layers`` list,
  layers left empty (``{}``, as ``Module.update`` wants for layers without LoRA) and
  LoRA-shaped ``lora_a`` ``(in, r)`` / ``lora_b`` ``(r, out)`` leaves.
* ``mlx_arrays()``: small ``mx.array`` leaves of chosen shapes and dtypes.
* ``modules()``: small ``nn.Module``s holding a ``layers`` list of sub-modules (some with
  extra LoRA-like parameters, some without) — real targets for ``update_module``.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from hypothesis import strategies as st

__all__ = [
    "Dense",
    "LoRABlock",
    "Pair",
    "Triple",
    "TinyNet",
    "mlx_arrays",
    "modules",
    "param_trees",
    "trees",
]

#: Projections of an mlx-lm transformer block that LoRA usually adapts.
PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


class Pair(NamedTuple):
    """A two-field NamedTuple node used by ``trees()``."""

    first: Any
    second: Any


class Triple(NamedTuple):
    """A three-field NamedTuple node used by ``trees()``."""

    x: Any
    y: Any
    z: Any


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------


@st.composite
def _arrays(
    draw: st.DrawFn,
    shape: tuple[int, ...] | None,
    dtypes: Sequence[mx.Dtype],
    max_dims: int,
    max_side: int,
) -> mx.array:
    if shape is None:
        ndim = draw(st.integers(0, max_dims))
        shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    dtype = draw(st.sampled_from(list(dtypes)))
    n = math.prod(shape)
    values = draw(
        st.lists(
            st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=32),
            min_size=n,
            max_size=n,
        )
    )
    return mx.array(np.asarray(values, dtype=np.float32).reshape(shape)).astype(dtype)


def mlx_arrays(
    shape: tuple[int, ...] | None = None,
    dtypes: Sequence[mx.Dtype] = (mx.float32,),
    max_dims: int = 2,
    max_side: int = 3,
) -> st.SearchStrategy[mx.array]:
    """Small ``mx.array``s with finite values in [-4, 4].

    ``shape`` fixes the shape; otherwise up to ``max_dims`` dimensions of 1..``max_side``
    (0 dimensions gives a scalar array).  The dtype is drawn from ``dtypes``.

    Example::

        @given(nfs.mlx_arrays(shape=(2, 3), dtypes=(mx.float32, mx.bfloat16)))
        def test_shape(a):
            assert a.shape == (2, 3)
    """
    return _arrays(shape, tuple(dtypes), max_dims, max_side)


# ---------------------------------------------------------------------------------------------
# general trees
# ---------------------------------------------------------------------------------------------

_SAFE_KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
_AWKWARD_KEYS = st.sampled_from(["0", "1", "2", "10", "01", "a.b", "layers.0", ".", ""])


def trees(
    leaves: st.SearchStrategy[Any] | None = None,
    *,
    path_safe: bool = False,
    none: bool = True,
    empty: bool = True,
    tuples: bool = True,
    namedtuples: bool = True,
    dict_subclasses: bool = True,
    max_leaves: int = 12,
) -> st.SearchStrategy[Any]:
    """Arbitrary trees of ``dict``/``list``/``tuple``/``NamedTuple``/``None`` over ``leaves``.

    ``leaves`` defaults to ``mlx_arrays()`` mixed with Python ints.  Dict keys are drawn from
    identifier-like strings and, unless ``path_safe``, from keys a dotted path cannot state
    (``"0"``, ``"10"``, ``"01"``, ``"a.b"``, ``""``...).  ``path_safe=True`` also puts a
    container at the root, so that ``nf.to_flat`` accepts every example.  Some dicts are an
    ``OrderedDict`` or a ``defaultdict(list)`` (the dict subclasses ``nf.flatten`` keeps
    exactly).  ``none``, ``empty``, ``tuples``, ``namedtuples`` and ``dict_subclasses`` switch
    those node kinds off (e.g. to stay within what ``mlx.utils.tree_unflatten`` rebuilds:
    ``none=False, empty=False, tuples=False, namedtuples=False, dict_subclasses=False``).

    Example::

        @given(nfs.trees(path_safe=True))
        def test_to_flat_roundtrip(tree):
            assert nf.flatten(nf.from_flat(nf.to_flat(tree), like=tree))[1] == nf.flatten(tree)[1]
    """
    if leaves is None:
        leaves = st.one_of(mlx_arrays(), st.integers(-3, 3))
    keys = _SAFE_KEYS if path_safe else st.one_of(_SAFE_KEYS, _AWKWARD_KEYS)
    base = st.one_of(leaves, st.none()) if none else leaves
    min_size = 0 if empty else 1

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        dicts = st.dictionaries(keys, children, min_size=min_size, max_size=3)
        kinds = [st.lists(children, min_size=min_size, max_size=3), dicts]
        if dict_subclasses:
            kinds.append(dicts.map(OrderedDict))
            kinds.append(dicts.map(lambda d: defaultdict(list, d)))
        if tuples:
            kinds.append(st.lists(children, min_size=min_size, max_size=3).map(tuple))
        if namedtuples:
            kinds.append(st.builds(Pair, children, children))
            kinds.append(st.builds(Triple, children, children, children))
        return st.one_of(kinds)

    tree = st.recursive(base, extend, max_leaves=max_leaves)
    if path_safe:
        return extend(tree)
    return tree


# ---------------------------------------------------------------------------------------------
# MLX-style parameter trees
# ---------------------------------------------------------------------------------------------


@st.composite
def _param_trees(
    draw: st.DrawFn,
    min_layers: int,
    max_layers: int,
    sparse: bool,
    lora: bool,
    dtypes: Sequence[mx.Dtype],
) -> dict[str, Any]:
    hidden = draw(st.integers(2, 4))
    rank = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(list(dtypes)))

    def arr(shape: tuple[int, ...]) -> mx.array:
        return draw(mlx_arrays(shape=shape, dtypes=(dtype,)))

    layers: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(min_layers, max_layers))):
        if sparse and draw(st.booleans()):
            layers.append({})
            continue
        chosen = draw(st.lists(st.sampled_from(PROJECTIONS), min_size=1, max_size=3, unique=True))
        layer: dict[str, Any] = {}
        for group, proj in chosen:
            if lora:
                leaf = {"lora_a": arr((hidden, rank)), "lora_b": arr((rank, hidden))}
            else:
                leaf = {"weight": arr((hidden, hidden))}
            layer.setdefault(group, {})[proj] = leaf
        layers.append(layer)
    model: dict[str, Any] = {"layers": layers}
    if draw(st.booleans()):
        model = {"embed_tokens": {"weight": arr((3, hidden))}, **model}
    if draw(st.booleans()):
        model["norm"] = {"weight": arr((hidden,))}
    return {"model": model}


def param_trees(
    min_layers: int = 1,
    max_layers: int = 4,
    *,
    sparse: bool = True,
    lora: bool = True,
    dtypes: Sequence[mx.Dtype] = (mx.float32,),
) -> st.SearchStrategy[dict[str, Any]]:
    """Parameter trees shaped like an mlx-lm model's (trainable) ``parameters()``.

    ``{"model": {"embed_tokens"?: ..., "layers": [layer, ...], "norm"?: ...}}`` where each
    layer is ``{}`` (with ``sparse``: a layer without adapters, as ``Module.update`` wants) or
    a dict of 1-3 projections (``self_attn.q_proj``, ``mlp.down_proj``, ...) holding LoRA-shaped
    ``lora_a`` ``(hidden, r)`` and ``lora_b`` ``(r, hidden)`` leaves (or a ``weight`` when
    ``lora=False``).  One dtype per tree, drawn from ``dtypes``.

    Example::

        @given(nfs.param_trees(max_layers=3))
        def test_paths_match_mlx(params):
            keys = [k for k, _ in mlx.utils.tree_flatten(params)]
            assert list(nf.to_flat(params)) == keys
    """
    return _param_trees(min_layers, max_layers, sparse, lora, tuple(dtypes))


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32))


class Dense(nn.Module):
    """``nn.Linear``'s parameters (``weight`` ``(out, in)``, optional ``bias``), drawn from a
    numpy ``Generator`` so that building one never touches MLX's global random state."""

    def __init__(self, din: int, dout: int, bias: bool, rng: np.random.Generator):
        super().__init__()
        self.weight = _normal(rng, (dout, din))
        if bias:
            self.bias = _normal(rng, (dout,))

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        return y + self.bias if "bias" in self else y


class LoRABlock(nn.Module):
    """A block with a ``proj`` ``Dense`` and, optionally, LoRA-like ``lora_a``/``lora_b``."""

    def __init__(self, dims: int, bias: bool, rank: int | None, rng: np.random.Generator):
        super().__init__()
        self.proj = Dense(dims, dims, bias, rng)
        if rank is not None:
            self.lora_a = _normal(rng, (dims, rank))
            self.lora_b = _normal(rng, (rank, dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.proj(x)
        if "lora_a" in self:
            y = y + (x @ self.lora_a) @ self.lora_b
        return y


class TinyNet(nn.Module):
    """``layers`` (a list of ``LoRABlock``) followed by a ``head`` ``Dense`` to 2 outputs."""

    def __init__(
        self, dims: int, blocks: Sequence[tuple[bool, int | None]], rng: np.random.Generator
    ):
        super().__init__()
        self.layers = [LoRABlock(dims, bias, rank, rng) for bias, rank in blocks]
        self.head = Dense(dims, 2, True, rng)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@st.composite
def _modules(draw: st.DrawFn, min_layers: int, max_layers: int) -> TinyNet:
    dims = draw(st.integers(2, 4))
    n = draw(st.integers(min_layers, max_layers))
    blocks = [(draw(st.booleans()), draw(st.none() | st.integers(1, 2))) for _ in range(n)]
    return TinyNet(dims, blocks, np.random.default_rng(draw(st.integers(0, 2**16))))


def modules(min_layers: int = 1, max_layers: int = 3) -> st.SearchStrategy[TinyNet]:
    """Small ``TinyNet`` modules: a ``layers`` list of blocks, each with a ``proj`` ``Dense``
    (with or without bias) and, for some blocks only, LoRA-like ``lora_a``/``lora_b``
    parameters; then a ``head``.  Weights are standard normal from a numpy generator seeded
    by the example (MLX's global random state is left alone).

    Example::

        @given(nfs.modules())
        def test_update_lands(model):
            nf.update_module(model, nf.tree_map(lambda a: a + 1, model.parameters()))
    """
    return _modules(min_layers, max_layers)
