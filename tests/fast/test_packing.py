"""packing: flat buffers round-trip exactly; optimizer states map between layouts."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedfn.fast.packing import (
    NotPackableError,
    pack,
    pack_layout,
    pack_state,
    plan_state,
    unpack,
    unpack_state,
)
from nestedfn.tree import flatten, tree_map, unflatten

_DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}


@settings(max_examples=30)
@given(
    shapes=st.lists(
        st.tuples(
            st.lists(st.integers(1, 4), min_size=0, max_size=3), st.sampled_from(list(_DTYPES))
        ),
        min_size=1,
        max_size=8,
    ),
    chunk=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip_keeps_values_dtypes_and_groups(shapes, chunk, seed):
    rng = np.random.default_rng(seed)
    leaves = [
        mx.array(rng.standard_normal(tuple(s)).astype(np.float32)).astype(_DTYPES[d])
        for s, d in shapes
    ]
    tree = {"layers": [{"w": x} for x in leaves]}
    lv, td = flatten(tree)
    layout = pack_layout(lv, td, chunk)
    bufs = pack(layout, lv)
    # every leaf in exactly one buffer; a buffer holds one dtype and one trailing shape (0-d
    # and 1-D leaves share ()), its leaves' rows stacked, sized as recorded
    assert sorted(i for b in layout.buffers for i in b) == list(range(len(lv)))
    for buf, idx, size, shape in zip(bufs, layout.buffers, layout.sizes, layout.buffer_shapes):
        assert tuple(buf.shape) == shape and buf.size == size == sum(lv[i].size for i in idx)
        assert {lv[i].dtype for i in idx} == {buf.dtype}
        assert {tuple(lv[i].shape[1:]) for i in idx} == {shape[1:]}
        assert shape[0] == sum(lv[i].shape[0] if lv[i].ndim else 1 for i in idx)
        # a buffer closes as soon as it reaches chunk elements
        assert sum(lv[i].size for i in idx[:-1]) < chunk
        # the leaves are blocks of the buffer's flat memory at the recorded offsets
        flat = np.array(buf.astype(mx.float32)).reshape(-1)
        for i, off in zip(idx, layout.offsets[layout.buffers.index(idx)]):
            want = np.array(lv[i].astype(mx.float32)).reshape(-1)
            np.testing.assert_array_equal(flat[off : off + lv[i].size], want)
    back = unflatten(td, unpack(layout, bufs))
    for a, b in zip(flatten(back)[0], lv):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(
            np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        )


def test_pack_refuses_mixed_dtypes_in_one_buffer_and_non_arrays():
    lv, td = flatten({"a": mx.ones((2,)), "b": mx.ones((3,))})
    layout = pack_layout(lv, td, 100)
    with pytest.raises(NotPackableError, match="'b'"):
        pack(layout, [mx.ones((2,)), mx.ones((3,), dtype=mx.float16)])
    with pytest.raises(NotPackableError, match="'b'"):
        pack_layout([mx.ones((2,)), 3.0], td)


class _S(NamedTuple):
    count: mx.array
    mu: object
    nu: object


def test_state_plan_packs_params_shaped_parts_and_passes_scalars():
    params = {"x": [mx.arange(3).astype(mx.float32), mx.ones((2, 2))], "y": mx.zeros((1,))}
    lv, ptd = flatten(params)
    # x0 (3,) and y (1,) share the trailing shape (); x1 (2, 2) has (2,)
    layout = pack_layout(lv, ptd, 5)
    assert layout.buffers == ((0, 2), (1,))
    assert layout.buffer_shapes == ((4,), (2, 2))

    def init(p):
        return (_S(mx.array(0), tree_map(lambda a: a * 2, p), tree_map(lambda a: a + 1, p)), ())

    tree_state = init(params)
    bufs = pack(layout, lv)
    s_leaves, s_td = flatten(tree_state)
    plan = plan_state(s_td, flatten(init(bufs))[1], ptd, flatten(bufs)[1])
    assert plan.segments == (("copy", 1, -1), ("pack", 3, -1), ("pack", 3, -1))
    packed = pack_state(plan, layout, s_leaves)
    assert len(packed) == 1 + 2 + 2
    np.testing.assert_array_equal(np.array(packed[1]), [0, 2, 4, 0])  # mu of x0, y
    np.testing.assert_array_equal(np.array(packed[2]), [[2, 2], [2, 2]])  # mu of x1
    back = unpack_state(plan, layout, packed)
    for a, b in zip(back, s_leaves):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_state_plan_refuses_state_not_elementwise_over_params():
    params = {"a": mx.ones((2,)), "b": mx.ones((3,))}
    lv, ptd = flatten(params)
    bufs = pack(pack_layout(lv, ptd, 100), lv)

    def init(p):  # a per-leaf statistic keyed by name: meaningless on buffers
        if isinstance(p, dict):
            return {k: mx.zeros(()) for k in p}
        return [mx.zeros(()) for _ in p]

    # a dict of scalars looks like params to a structure-only match: the shapes refuse it
    s_leaves, s_td = flatten(init(params))
    layout = pack_layout(lv, ptd, 100)
    plan = plan_state(s_td, flatten(init(bufs))[1], ptd, flatten(bufs)[1])
    with pytest.raises(NotPackableError, match="'a'"):
        pack_state(plan, layout, s_leaves)

    def init2(p):  # state whose structure differs between the layouts
        return {"n": mx.zeros(())} if isinstance(p, dict) else [mx.zeros(())]

    with pytest.raises(NotPackableError, match="not elementwise"):
        plan_state(flatten(init2(params))[1], flatten(init2(bufs))[1], ptd, flatten(bufs)[1])


def test_groups_never_share_a_buffer_and_restrict_gives_a_groups_own_layout():
    leaves = [mx.full((2, 3), float(i)) for i in range(6)]
    lv, td = flatten({"layers": leaves})
    labels = (0, 1, 0, 2, 1, 0)
    layout = pack_layout(lv, td, 100, groups=labels)
    for idx, g in zip(layout.buffers, layout.groups):
        assert {labels[i] for i in idx} == {g}
    assert sorted(i for b in layout.buffers for i in b) == list(range(6))
    bufs = pack(layout, lv)
    for g in (0, 1, 2):
        idx = tuple(i for i, lab in enumerate(labels) if lab == g)
        sub_td = flatten([lv[i] for i in idx])[1]
        sub = layout.restrict(idx, sub_td)
        mine = [b for b, lab in zip(bufs, layout.groups) if lab == g]
        back = unpack(sub, mine)  # the group's leaves, in order, from its own buffers
        assert [float(x[0, 0]) for x in back] == [float(i) for i in idx]
        np.testing.assert_array_equal(np.array(pack(sub, [lv[i] for i in idx])[0]), mine[0])
    mixed = pack_layout(lv, td, 100)  # one buffer holds every leaf: a group cannot be cut out
    with pytest.raises(NotPackableError, match="two groups"):
        mixed.restrict((0, 2), td)
    with pytest.raises(ValueError, match="6 leaves"):
        pack_layout(lv, td, 100, groups=(0, 1))
