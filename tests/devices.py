"""What a test may expect of two computations of the same float32 math on the default device.

On the CPU, MLX rounds each operation once, eagerly or compiled, so two graphs of the same math
agree bit for bit.  On a GPU each compiled graph fuses its own kernels (multiply-adds
contracted into FMAs, reductions ordered by the launch), so two different graphs of the same
math agree to float32 rounding only: a few ulps, compounded over the steps a test runs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

ON_CPU = mx.default_device() == mx.cpu
GPU_RTOL, GPU_ATOL = 2e-5, 1e-6  # float32 rounding compounded over tens of steps


def assert_same_math(got: mx.array, want: mx.array) -> None:
    """Bit for bit on the CPU; within float32 rounding (``GPU_RTOL``, ``GPU_ATOL``) on a GPU."""
    if ON_CPU:
        np.testing.assert_array_equal(np.array(got), np.array(want))
    else:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=GPU_RTOL, atol=GPU_ATOL)
