"""gather: the same buffers as packing.pack (its CUDA kernel runs only on a CUDA GPU)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.gather import cuda_gather_available, gather
from nestedfn.packing import pack, pack_layout
from nestedfn.tree import flatten


def _check(leaves, chunk, max_leaves=256):
    lv, td = flatten({"layers": [{"w": x} for x in leaves]})
    layout = pack_layout(lv, td, chunk, max_leaves=max_leaves)
    got, want = gather(layout, lv), pack(layout, lv)
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
