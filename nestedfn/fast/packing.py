"""Packing: a parameter tree as a few flat buffers, and optimizer states to match.

Why: an optimizer step over a tree of hundreds of small arrays (a LoRA adapter: 336 arrays)
costs hundreds of kernel dispatches per operation, and dispatch, not arithmetic, dominates.
An *elementwise* optimizer (Adam, SGD, momentum, Lion, ...) computes the same numbers on the
concatenation of the leaves as on the leaves one by one, so the step can run on a handful of
flat buffers instead.

A ``PackLayout`` records how: leaves of one dtype and one trailing shape (``shape[1:]``;
0-d and 1-D leaves share the trailing shape ``()``), in ``flatten`` order, are concatenated
along their first axis into buffers of about ``chunk_size`` elements.  A leaf is never split,
so every leaf is a contiguous block of rows of one buffer (elements ``offset`` to
``offset + size`` of its flat memory), and ``unpack`` returns the leaves as zero-copy views
made by one ``split`` per buffer.  Grouping by trailing shape is what makes the views free
of reshapes: a LoRA adapter's 336 leaves come back from 4 ``split`` primitives instead of
2 splits and 336 reshapes, and on a GPU every primitive costs microseconds to schedule.

``StatePlan`` maps an optimizer state built on the tree (``opt.init(params)``) to the state
built on the buffers (``opt.init(buffers)``): every sub-tree shaped like params becomes the
list of buffers; everything else (scalar counters, ...) passes through unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.tree import TreeDef

__all__ = [
    "NotPackableError",
    "PackLayout",
    "StatePlan",
    "check_buffer_leaves",
    "concat_buffer",
    "default_chunk",
    "pack",
    "pack_layout",
    "pack_state",
    "plan_state",
    "unpack",
    "unpack_state",
]

CPU_CHUNK = 1 << 19  # elements per buffer on the CPU (2 MB of float32)
GPU_CHUNK = 1 << 26  # on a GPU: one buffer per dtype for any adapter-sized tree


def default_chunk() -> int:
    """Buffer size for the default device.

    On the CPU, buffers of a few MB stay in glibc's heap once its dynamic mmap threshold has
    risen past them (after the first frees), so a step's fresh outputs reuse heap pages
    instead of page-faulting new ones, while there are few enough of them that the per-buffer
    Python work stays small.  The LoRA tree's packed Adam step (2-core
    CPU, two runs of alternating rounds) took 24.4-28.8 ms with buffers of 2^18 elements,
    21.4-21.7 ms with 2^19, 23.6-23.9 ms with 2^20, and 75.6 ms with 2^23 (one buffer per
    trailing shape).  On a GPU every buffer is one kernel launch, so fewer is better.
    """
    return CPU_CHUNK if mx.default_device() == mx.cpu else GPU_CHUNK


class NotPackableError(ValueError):
    """The tree or optimizer state cannot be expressed over packed buffers."""


class PackLayout(NamedTuple):
    """How the leaves of one params structure pack into flat buffers.

    treedef: the params structure.  shapes/dtypes: per leaf.  buffers: per buffer, the leaf
    indices it holds (one dtype, one trailing shape, ``flatten`` order).  offsets: per
    buffer, each leaf's first element.  sizes: per buffer, its number of elements.
    buffer_shapes: per buffer, its shape ``(rows, *trailing)``.  cuts: per buffer, the row
    where each leaf but the first starts (``mx.split``'s indices).  scalars: the 0-d leaves
    (a row of one element in their buffer, reshaped by ``unpack``).  groups: per buffer, the
    group its leaves belong to (``pack_layout``'s ``groups``; 0 without them).
    """

    treedef: TreeDef
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    buffers: tuple[tuple[int, ...], ...]
    offsets: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    buffer_shapes: tuple[tuple[int, ...], ...]
    cuts: tuple[tuple[int, ...], ...]
    scalars: tuple[int, ...]
    groups: tuple[int, ...]

    def restrict(self, leaf_idx: tuple[int, ...], treedef: TreeDef) -> PackLayout:
        """The layout of the leaves ``leaf_idx`` alone (renumbered ``0..``, structure
        ``treedef``): the buffers holding them, which must hold nothing else."""
        local = {g: i for i, g in enumerate(leaf_idx)}
        keep = []
        for b, idx in enumerate(self.buffers):
            inside = [i in local for i in idx]
            if any(inside) != all(inside):
                raise NotPackableError(
                    "packed state: a buffer holds leaves of two groups; pack_layout's groups "
                    "must separate them"
                )
            if all(inside):
                keep.append(b)
        if sum(len(self.buffers[b]) for b in keep) != len(leaf_idx):
            raise NotPackableError("packed state: a group's leaves are not all in the layout")
        return PackLayout(
            treedef,
            tuple(self.shapes[g] for g in leaf_idx),
            tuple(self.dtypes[g] for g in leaf_idx),
            tuple(tuple(local[i] for i in self.buffers[b]) for b in keep),
            tuple(self.offsets[b] for b in keep),
            tuple(self.sizes[b] for b in keep),
            tuple(self.buffer_shapes[b] for b in keep),
            tuple(self.cuts[b] for b in keep),
            tuple(local[i] for i in self.scalars if i in local),
            tuple(self.groups[b] for b in keep),
        )


def _rows(shape: tuple[int, ...]) -> int:
    """How many rows of its buffer a leaf of ``shape`` takes (a 0-d leaf: one)."""
    return shape[0] if shape else 1


def pack_layout(
    leaves: list[mx.array],
    treedef: TreeDef,
    chunk_size: int | None = None,
    max_leaves: int = 256,
    groups: tuple[int, ...] | None = None,
) -> PackLayout:
    """Group ``leaves`` by ``groups`` (a label per leaf, e.g. its tier; none: one group),
    dtype and trailing shape (first-seen order) and cut each group into buffers that close as
    soon as they reach ``chunk_size`` elements (``default_chunk()`` when ``None``) or
    ``max_leaves`` leaves (what one gather kernel takes, ``nestedfn.fast.gather``)."""
    if chunk_size is None:
        chunk_size = default_chunk()
    if chunk_size < 1:
        raise ValueError(f"pack_layout: chunk_size must be >= 1, got {chunk_size}")
    if groups is not None and len(groups) != len(leaves):
        raise ValueError(f"pack_layout: {len(groups)} group labels for {len(leaves)} leaves")
    paths = None
    by_key: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if not isinstance(x, mx.array):
            paths = paths or treedef.paths()
            raise NotPackableError(
                f"pack: leaf {paths[i]!r} is a {type(x).__name__}, not an mx.array"
            )
        label = 0 if groups is None else groups[i]
        by_key.setdefault((label, x.dtype, tuple(x.shape[1:])), []).append(i)
    buffers, offsets, sizes, shapes, cuts, labels = [], [], [], [], [], []

    def close(cur: list[int], offs: list[int], n: int, starts: list[int], key: tuple) -> None:
        label, _, trailing = key
        labels.append(label)
        buffers.append(tuple(cur))
        offsets.append(tuple(offs))
        sizes.append(n)
        shapes.append((starts[-1], *trailing))
        cuts.append(tuple(starts[1:-1]))

    for key, idx in by_key.items():
        cur: list[int] = []
        offs: list[int] = []
        starts = [0]  # row of each leaf's start, then the total
        n = 0
        for i in idx:
            cur.append(i)
            offs.append(n)
            n += leaves[i].size
            starts.append(starts[-1] + _rows(tuple(leaves[i].shape)))
            if n >= chunk_size or len(cur) >= max_leaves:
                close(cur, offs, n, starts, key)
                cur, offs, starts, n = [], [], [0], 0
        if cur:
            close(cur, offs, n, starts, key)
    return PackLayout(
        treedef,
        tuple(tuple(x.shape) for x in leaves),
        tuple(x.dtype for x in leaves),
        tuple(buffers),
        tuple(offsets),
        tuple(sizes),
        tuple(shapes),
        tuple(cuts),
        tuple(i for i, x in enumerate(leaves) if x.ndim == 0),
        tuple(labels),
    )


def check_buffer_leaves(
    layout: PackLayout, idx: tuple[int, ...], parts: list[mx.array], who: str, shapes: bool = True
) -> None:
    """Refuse the leaves ``parts`` (positions ``idx``) of one buffer unless they share a dtype
    and (with ``shapes``) have the layout's shapes: ``NotPackableError`` names the leaf and
    the one it shares the buffer with."""
    dt = parts[0].dtype
    for i, p in zip(idx, parts):
        if p.dtype != dt or (shapes and tuple(p.shape) != layout.shapes[i]):
            paths = layout.treedef.paths()
            raise NotPackableError(
                f"{who}: leaf {paths[i]!r} is {p.dtype} {tuple(p.shape)}; the params leaf is "
                f"{layout.shapes[i]}, and it shares a buffer with {paths[idx[0]]!r}, which is "
                f"{dt} (one dtype per buffer)"
            )


def pack(layout: PackLayout, leaves: list[mx.array]) -> list[mx.array]:
    """Concatenate ``leaves`` (shaped like the layout's params, any one dtype per buffer) into
    the layout's buffers.  A leaf shaped unlike its params leaf, or mixed dtypes inside one
    buffer (``concatenate`` would silently promote them), raise ``NotPackableError``."""
    out = []
    for b, idx in enumerate(layout.buffers):
        check_buffer_leaves(layout, idx, [leaves[i] for i in idx], "pack")
        out.append(concat_buffer(layout, b, leaves))
    return out


def concat_buffer(layout: PackLayout, b: int, leaves: list[mx.array]) -> mx.array:
    """Buffer ``b`` of the layout: its leaves concatenated along their rows, unchecked (the
    caller has checked shapes and dtypes: ``concatenate`` would promote mixed dtypes)."""
    rows = [leaves[i] if leaves[i].ndim else leaves[i].reshape(1) for i in layout.buffers[b]]
    return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)


def unpack(layout: PackLayout, buffers: list[mx.array]) -> list[mx.array]:
    """The leaves (in ``flatten`` order) as views of ``buffers``: one ``split`` along the rows
    per buffer (a single primitive, however many leaves), a reshape only for 0-d leaves; no
    copies."""
    out: list[Any] = [None] * len(layout.shapes)
    for buf, idx, cuts in zip(buffers, layout.buffers, layout.cuts):
        pieces = mx.split(buf, cuts, axis=0) if cuts else [buf]
        for i, piece in zip(idx, pieces):
            out[i] = piece
    for i in layout.scalars:
        out[i] = out[i].reshape(())
    return out


class StatePlan(NamedTuple):
    """Segments over the flattened tree state: ``("copy", n, -1)`` passes ``n`` leaves
    through, ``("pack", n, -1)`` is a params-shaped sub-tree of ``n`` leaves that becomes the
    buffers, ``("pack", n, j)`` the sub-tree of subset ``j`` (its leaves ``subsets[j]`` of
    params) that becomes that subset's buffers.  ``packed_treedef`` is the structure of the
    packed state."""

    segments: tuple[tuple[str, int, int], ...]
    packed_treedef: TreeDef
    subsets: tuple[tuple[tuple[int, ...], TreeDef], ...] = ()

    def layout_for(self, layout: PackLayout, j: int) -> PackLayout:
        """The layout segment ``("pack", n, j)`` packs with."""
        if j < 0:
            return layout
        idx, treedef = self.subsets[j]
        return layout.restrict(idx, treedef)


def plan_state(
    tree_td: TreeDef,
    packed_td: TreeDef,
    params_td: TreeDef,
    buffers_td: TreeDef,
    subsets: tuple[tuple[TreeDef, TreeDef, tuple[int, ...]], ...] = (),
) -> StatePlan:
    """Match ``opt.init(params)``'s structure against ``opt.init(buffers)``'s.

    Where the first has a params-shaped node and the second the buffers' list, that sub-tree
    packs; so does a node shaped like a subset's params sub-tree where the second has that
    subset's buffers (``subsets``: per subset, the two structures and the params leaves it
    holds; ``nested``'s tiers).  Elsewhere both must have the same node kinds, keys and
    leaves, or the optimizer's state is not elementwise over params and ``NotPackableError``
    names the path.
    """
    segments: list[tuple[str, int, int]] = []

    def emit(kind: str, n: int, j: int = -1) -> None:
        if kind == "copy" and segments and segments[-1][0] == "copy":
            segments[-1] = ("copy", segments[-1][1] + n, -1)
        elif n or kind == "pack":
            segments.append((kind, n, j))

    def walk(a: TreeDef, b: TreeDef, path: str) -> None:
        if a == params_td and b == buffers_td:
            emit("pack", a.num_leaves)
            return
        hits = [j for j, (sa, sb, _) in enumerate(subsets) if a == sa and b == sb]
        if len(hits) > 1:
            raise NotPackableError(
                f"packed state: at {path or '<root>'!r} the state matches several groups"
            )
        if hits:
            emit("pack", a.num_leaves, hits[0])
            return
        if a.kind == "leaf" and b.kind == "leaf":
            emit("copy", 1)
            return
        if a.kind != b.kind or a.meta != b.meta or len(a.children) != len(b.children):
            raise NotPackableError(
                f"packed state: at {path or '<root>'!r} the optimizer state over params is "
                f"{a!r}, over packed buffers {b!r}; its state is not elementwise over params"
            )
        keys = a.meta if a.kind == "dict" else range(len(a.children))
        for k, ca, cb in zip(keys, a.children, b.children):
            walk(ca, cb, f"{path}.{k}" if path else str(k))

    walk(tree_td, packed_td, "")
    return StatePlan(tuple(segments), packed_td, tuple((idx, sa) for sa, _, idx in subsets))


def pack_state(plan: StatePlan, layout: PackLayout, leaves: list[Any]) -> list[Any]:
    """Tree-layout state leaves -> packed-state leaves (``plan`` from ``plan_state``)."""
    out: list[Any] = []
    pos = 0
    for kind, n, j in plan.segments:
        if kind == "copy":
            out.extend(leaves[pos : pos + n])
        else:
            out.extend(pack(plan.layout_for(layout, j), leaves[pos : pos + n]))
        pos += n
    return out


def unpack_state(plan: StatePlan, layout: PackLayout, packed: list[Any]) -> list[Any]:
    """Packed-state leaves -> tree-layout state leaves (params-shaped parts as views)."""
    out: list[Any] = []
    pos = 0
    for kind, n, j in plan.segments:
        if kind == "copy":
            out.extend(packed[pos : pos + n])
            pos += n
        else:
            sub = plan.layout_for(layout, j)
            nb = len(sub.buffers)
            out.extend(unpack(sub, packed[pos : pos + nb]))
            pos += nb
    return out
