"""gather: the same buffers as packing.pack (its CUDA kernel runs only on a CUDA GPU)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.fast.gather import cuda_gather_available, gather
from nestedfn.fast.packing import NotPackableError, pack, pack_layout
from nestedfn.tree import flatten


def _check(leaves, chunk, max_leaves=256, streams=None):
    lv, td = flatten({"layers": [{"w": x} for x in leaves]})
    layout = pack_layout(lv, td, chunk, max_leaves=max_leaves)
    per_buffer = None if streams is None else [streams[b % 2] for b in range(len(layout.buffers))]
    got, want = gather(layout, lv, streams=per_buffer), pack(layout, lv)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(
            np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))
        )
    return layout


def test_gather_equals_pack_on_the_default_device():
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (7,), (1,), (300, 9), (2, 2, 2)] * 7
    leaves = [mx.array(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    layout = _check(leaves, 1 << 20)
    assert len(layout.buffers) == 4  # trailing shapes (5,), () for (7,) and (1,), (9,), (2, 2)
    _check(leaves, 50)
    layout = _check(leaves, 1 << 20, max_leaves=4)  # buffers close at max_leaves leaves
    assert max(len(b) for b in layout.buffers) == 4
    _check([x.astype(mx.bfloat16) for x in leaves], 1 << 20)


def test_gather_on_per_buffer_cpu_streams_equals_pack():
    # the packed step gathers each buffer on its CPU thread's stream
    rng = np.random.default_rng(2)
    shapes = [(4, 3), (6,), (9, 3), ()] * 9
    leaves = [mx.array(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    old = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
        layout = _check(leaves, 20, streams=streams)
        assert len(layout.buffers) > 2  # both streams copy something
    finally:
        mx.set_default_device(old)


def test_gather_refuses_mixed_dtypes_in_one_buffer():
    lv, td = flatten({"a": mx.zeros((2, 3)), "b": mx.zeros((4, 3))})
    layout = pack_layout(lv, td, 1 << 20)
    assert len(layout.buffers) == 1
    with pytest.raises(NotPackableError, match=r"'b'.*shares a buffer with 'a'"):
        gather(layout, [lv[0], lv[1].astype(mx.float16)])


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the CUDA kernel needs a CUDA GPU")
def test_gather_kernel_on_cuda():
    rng = np.random.default_rng(1)
    leaves = [mx.array(rng.standard_normal((i % 13 + 1, 8)).astype(np.float32)) for i in range(300)]
    old = mx.default_device()
    mx.set_default_device(mx.gpu)
    try:
        assert cuda_gather_available()
        _check(leaves, 1 << 26)
        _check([x.astype(mx.bfloat16) for x in leaves], 1 << 26, max_leaves=100)
    finally:
        mx.set_default_device(old)


def test_gather_refuses_leaves_that_do_not_fill_the_layouts_buffer():
    # the caller promises the layout's shapes; a leaf with extra rows is still caught per
    # buffer instead of giving a buffer of another shape
    lv, td = flatten({"a": mx.zeros((2, 3)), "b": mx.zeros((4, 3))})
    layout = pack_layout(lv, td, 1 << 20)
    with pytest.raises(NotPackableError, match=r"came out \(7, 3\).*says \(6, 3\)"):
        gather(layout, [mx.zeros((3, 3)), lv[1]], dtypes_checked=True)


def test_the_cuda_kernels_size_check_holds_each_leaf_to_its_slot():
    # the CUDA kernel copies each slot's size whatever the leaf holds; the check before it
    # refuses a leaf too small (read past its end) or too large (silently cut), on any device
    from nestedfn.fast.gather import _check_kernel_sizes

    ends = (0, 6, 18)  # leaves of (2, 3) and (4, 3) in a (6, 3) buffer
    _check_kernel_sizes(0, [mx.zeros((2, 3)), mx.zeros((4, 3))], ends, (6, 3))
    with pytest.raises(NotPackableError, match=r"came out \(7, 3\).*says \(6, 3\)"):
        _check_kernel_sizes(0, [mx.zeros((3, 3)), mx.zeros((4, 3))], ends, (6, 3))
    with pytest.raises(NotPackableError, match=r"came out \(6, 3\).*says \(6, 3\)"):
        _check_kernel_sizes(0, [mx.zeros((1, 3)), mx.zeros((5, 3))], ends, (6, 3))
