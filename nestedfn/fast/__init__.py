"""Fast steps: ``compile_step`` and the packed representation behind it.  Stands on
``nestedfn.optim`` and ``nestedfn.tree`` (a tiered optimizer is reached only through the
``Optimizer.pack_groups`` protocol, never imported).

- ``compile``: ``compile_step(opt)``, the one place that picks how a step runs: the native
  C++ kernel on the CPU (``native``), generated multi-tensor kernels on a GPU
  (``multitensor``: CUDA, and Metal checked at run time), else ``apply_gradients`` under
  ``mx.compile``, one graph per structure and phase;
- ``packed_step``: ``compile_step(opt, packed=True)``, the optimizer over a few flat buffers;
- ``resident``: ``resident_step(opt, loss_fn, params)``, a training step (forward, backward,
  optimizer) in one graph over params that stay in the packed buffers;
- ``packing``: the ``PackLayout`` of a tree as flat buffers, and states to match;
- ``gather``: reading every leaf into its buffer (a CUDA kernel, or one copy per buffer).
"""

from nestedfn.fast.compile import CompiledStep, compile_step
from nestedfn.fast.packed_step import PackedCompiledStep, PackedState
from nestedfn.fast.packing import NotPackableError
from nestedfn.fast.resident import ResidentState, ResidentStep, resident_step

__all__ = [
    "CompiledStep",
    "NotPackableError",
    "PackedCompiledStep",
    "PackedState",
    "ResidentState",
    "ResidentStep",
    "compile_step",
    "resident_step",
]
