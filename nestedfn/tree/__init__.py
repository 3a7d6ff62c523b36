"""The ground floor: exact tree plumbing for MLX parameter trees.  Imports nothing above it.

- ``structure``: what a tree is, ``TreeDef``, ``flatten``/``unflatten``, ``leaves``,
  ``tree_map`` and the shared errors ``PathError``/``TreeMismatchError``;
- ``paths``: MLX's dotted paths (``to_flat``, ``from_flat``, ``set_paths``);
- ``module``: the checked ``model.update()`` (``check_fits``, ``update_module``);
- ``codegen``: straight-line leaf getters and builders for one structure (used by the fast
  steps; internal).
"""

from nestedfn.tree.module import check_fits, update_module
from nestedfn.tree.paths import from_flat, set_paths, to_flat
from nestedfn.tree.structure import (
    PathError,
    TreeDef,
    TreeDepthError,
    TreeMismatchError,
    flatten,
    is_leaf,
    leaves,
    tree_map,
    unflatten,
)

__all__ = [
    "PathError",
    "TreeDef",
    "TreeDepthError",
    "TreeMismatchError",
    "check_fits",
    "flatten",
    "from_flat",
    "is_leaf",
    "leaves",
    "set_paths",
    "to_flat",
    "tree_map",
    "unflatten",
    "update_module",
]
