"""Where each parameter sits in the model's own block order (``model.layers``).

mlx-lm models expose their transformer blocks as ``model.layers``, and mlx-lm's tuner (LoRA on
the last ``num_layers`` blocks, gradient checkpointing) counts blocks in that list's order.
Usually the list is one attribute (``model.layers.N``), but some architectures assemble it from
several (``afm7``: ``model.layers + model.kv_reuse_layers``; others slice a pipeline stage),
and a parameter's path then does not say its depth: ``model.kv_reuse_layers.0`` is block
``len(model.layers)`` of the list, not block 0.  ``block_depths`` finds each block's path by
identity among the model's modules, so the tiers by depth follow the block order the model
itself uses.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from nestedfn.tree import to_flat

__all__ = ["block_depths", "block_paths"]


def block_paths(model: nn.Module) -> list[str]:
    """The module path of each block of ``model.layers``, in that list's order."""
    where = {id(m): name for name, m in model.named_modules()}
    paths = []
    for i, block in enumerate(model.layers):
        if id(block) not in where:
            raise ValueError(f"block {i} of model.layers is not a submodule of the model")
        paths.append(where[id(block)])
    return paths


def block_depths(model: nn.Module, params: Any) -> dict[str, int]:
    """``{leaf path: index in model.layers}`` for the leaves of ``params`` (a tree shaped like
    the model's parameters) that sit inside a block; leaves outside every block are left out."""
    prefixes = {p + ".": i for i, p in enumerate(block_paths(model))}
    out: dict[str, int] = {}
    for path in to_flat(params):
        hits = [(len(pre), i) for pre, i in prefixes.items() if path.startswith(pre)]
        if hits:
            out[path] = max(hits)[1]  # the innermost block holding it
    return out
