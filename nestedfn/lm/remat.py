"""Gradient checkpointing (``grad_checkpoint``), as mlx-lm does it, block by block.

mlx-lm wraps a block's ``__call__`` in ``mx.checkpoint``: the forward pass keeps only each
block's inputs, and the backward pass recomputes the block's activations from them, trading
about one more forward pass for the activation memory of all but one block.  The block's
trainable parameters are passed to the checkpointed function as explicit inputs (and put back
into the block inside it), so their gradients flow through the recomputation.

mlx-lm patches ``type(model.layers[0]).__call__``, which changes every instance of that class
in the process.  ``checkpoint_blocks(model)`` gives each block of ``model.layers`` a subclass
of its own class with the checkpointed ``__call__`` instead: the parameter paths, ``isinstance``
and every other model in the process are unchanged, and blocks of several classes (hybrid
models) are all covered.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = ["checkpoint_blocks", "is_checkpointed"]

_MARK = "_nestedfn_grad_checkpoint"
_SUBCLASSES: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    if getattr(cls, _MARK, False):
        return cls
    if cls not in _SUBCLASSES:
        call = cls.__call__

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            def inner(params: Any, *args: Any, **kwargs: Any) -> Any:
                self.update(params)
                return call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        attrs = {"__call__": __call__, _MARK: True, "__module__": cls.__module__}
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), attrs)
    return _SUBCLASSES[cls]


def checkpoint_blocks(model: nn.Module) -> int:
    """Make every block of ``model.layers`` recompute its activations in the backward pass;
    returns the number of blocks.  Idempotent."""
    blocks = list(model.layers)
    for block in blocks:
        block.__class__ = _checkpointed(type(block))
    return len(blocks)


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(type(block), _MARK, False))
