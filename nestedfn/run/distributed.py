"""Data-parallel helpers over MLX's own distributed engine (``mx.distributed``).

Processes are started by ``mlx.launch`` (ring, MPI, NCCL or JACCL backends); every rank runs
the same program on its own shard of each global batch, and gradients are averaged before the
optimizer, so every rank applies the identical update and the parameters stay identical.

On one process everything here is a no-op: no backend is initialised (``mx.distributed.init``
is only called when the environment shows a launcher started us), ``world_size()`` is 1,
``rank()`` is 0 and the collectives return their input unchanged (the same objects).

Why a flat buffer: a LoRA gradient is hundreds of small arrays (336 for the demo-sized
adapters), and one collective per array pays per-call latency hundreds of times.  Here the
leaves of each dtype are concatenated into one buffer, reduced with one ``all_sum`` and split
back, which is exact (summation is elementwise) and keeps the tree structure exact too
(``nestedfn.tree.flatten``/``unflatten``, unlike ``mlx.utils.tree_unflatten``).

Every function is traceable by ``mx.compile`` (rank and world size are Python ints fixed for
the life of the process).  Trees passed to a collective must have the same structure, shapes
and dtypes on every rank: a mismatch is not detected by the backend (the ring sums buffers of
different lengths into garbage), so call ``check_identical`` once at start-up.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from typing import Any

import mlx.core as mx
import numpy as np

from nestedfn.tree import flatten, to_flat, unflatten

__all__ = [
    "ConnectError",
    "DivergenceError",
    "all_sum",
    "average_gradients",
    "barrier",
    "broadcast_params",
    "check_identical",
    "connect_timeout",
    "is_launched",
    "is_main",
    "rank",
    "world",
    "world_size",
]

Tree = Any
Group = mx.distributed.Group

# Environment variables that a launcher sets in every process it starts:
# mlx.launch (ring, jaccl, nccl) sets MLX_RANK; mpirun sets OMPI_* (Open MPI) or PMI_* (MPICH).
_LAUNCH_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

_WORLD: Group | None = None
_WORLD_READY = False

DEFAULT_CONNECT_TIMEOUT = 300.0
_CONNECT_TIMEOUT = [DEFAULT_CONNECT_TIMEOUT]


class ConnectError(RuntimeError):
    """A launched process that cannot join its peers (``world()``)."""


class DivergenceError(RuntimeError):
    """Ranks that must hold identical trees do not; ``paths`` lists the leaves that differ."""

    def __init__(self, message: str, paths: list[str]):
        super().__init__(message)
        self.paths = paths


def _launched_size() -> int | None:
    """The world size a launcher announced in the environment, ``None`` if not launched.

    ``mlx.launch -n 1`` exports an *empty* ``MLX_HOSTFILE`` on which ``mx.distributed.init``
    fails with a JSON parse error; we read it as a world of one instead.
    """
    env = os.environ
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    if "MLX_RANK" not in env:
        return None
    hostfile = env.get("MLX_HOSTFILE")
    if hostfile:  # ring backend: a JSON list with one entry per rank (empty for one rank)
        try:
            with open(hostfile) as f:
                text = f.read().strip()
        except OSError as e:
            raise RuntimeError(f"MLX_HOSTFILE={hostfile!r} cannot be read: {e}") from e
        if not text:
            return 1
        try:
            return len(json.loads(text))
        except ValueError as e:
            raise RuntimeError(f"MLX_HOSTFILE={hostfile!r} is not valid JSON: {e}") from e
    devices = env.get("MLX_IBV_DEVICES")  # jaccl: one row of RDMA devices per rank
    if devices and os.path.exists(devices):
        with open(devices) as f:
            return len(json.load(f))
    return 2  # launched by an unknown mlx.launch backend: let init() find the size


def is_launched() -> bool:
    """True when a launcher (``mlx.launch``, ``mpirun``) started more than one process."""
    size = _launched_size()
    return size is not None and size > 1


# The watchdog of ``world()``: a separate process (MLX's ``init`` holds the GIL while it
# waits, so no thread of ours could run) that stops its parent when the wait is over.
_WATCHDOG = """
import os, signal, sys, time
pid, limit, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
end = time.monotonic() + limit
while time.monotonic() < end:
    if os.getppid() != pid:
        sys.exit(0)
    time.sleep(min(0.2, max(end - time.monotonic(), 0.0)))
sys.stderr.write(message + "\\n")
sys.stderr.flush()
os.kill(pid, signal.SIGTERM)
time.sleep(3)
if os.getppid() == pid:
    os.kill(pid, signal.SIGKILL)
"""


def peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another process of the launch left
    (MLX's ``[ring] connection to a peer was lost``, or a backend's like error)."""
    if not isinstance(e, RuntimeError) or world_size() <= 1:
        return False
    text = str(e).lower()
    backend = text.startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]"))
    return backend or any(w in text for w in ("peer", "connection", "socket", "recv", "send"))


def connect_timeout() -> float:
    """Seconds ``world()`` waits for the peers (default 300; 0 waits forever): set by
    ``set_connect_timeout`` (the CLI's ``--connect-timeout``)."""
    return _CONNECT_TIMEOUT[0]


def set_connect_timeout(seconds: float) -> None:
    """How long the first ``world()`` waits for the peers, in seconds (0: forever); a
    ``ConnectError`` (one line at the CLI) naming the value when it is not a finite number
    >= 0."""
    import math

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ConnectError(f"connect timeout must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConnectError(f"connect timeout must be a finite number >= 0, got {seconds!r}")
    _CONNECT_TIMEOUT[0] = float(seconds)


def _init_within(limit: float) -> Group:
    """``mx.distributed.init(strict=True)``, the process stopped (SIGTERM, after a message on
    stderr) if it has not returned within ``limit`` seconds.

    The ring backend's listening side (rank 0 of two) otherwise waits forever for a peer that
    never starts, and the call cannot be interrupted from Python (it holds the GIL), so a
    watchdog process does it.  The connecting side gives up by itself after about 30 s."""
    import subprocess
    import sys

    watchdog = None
    if limit > 0:
        size = _launched_size()
        message = (
            f"nestedfn: this process (rank {os.environ.get('MLX_RANK', '?')} of {size}) could "
            f"not connect to its peers within {limit:g} s; stopping it (are all the processes "
            "started? --connect-timeout sets the wait, 0 waits forever)"
        )
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(limit), message],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    try:
        return mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ConnectError(f"this process could not join its peers: {e}") from e
    finally:
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()


def world() -> Group | None:
    """The global group of all launched processes, or ``None`` on a single process.

    Initialised once, on first use, with ``mx.distributed.init(strict=True)``: a launched
    process that cannot join its peers stops instead of silently training alone (and then
    writing files as a second "rank 0"): ``ConnectError`` when the backend gives up (the ring's
    connecting side after about 30 s), and, for a side that would wait forever (the ring's
    listening rank 0 when a peer never starts), the process is terminated with a message on
    stderr after ``connect_timeout()`` seconds (``set_connect_timeout``, the CLI's
    ``--connect-timeout``; default 300).
    """
    global _WORLD, _WORLD_READY
    if not _WORLD_READY:
        if is_launched():
            group = _init_within(connect_timeout())
            _WORLD = group if group.size() > 1 else None
        _WORLD_READY = True
    return _WORLD


def _resolve(group: Group | None) -> Group | None:
    group = world() if group is None else group
    return group if group is not None and group.size() > 1 else None


def world_size(group: Group | None = None) -> int:
    """Number of processes in ``group`` (default: the global world); 1 when not launched."""
    g = _resolve(group)
    return 1 if g is None else g.size()


def rank(group: Group | None = None) -> int:
    """This process's index in ``group`` (default: the global world); 0 when not launched."""
    g = _resolve(group)
    return 0 if g is None else g.rank()


def is_main(group: Group | None = None) -> bool:
    """True on rank 0: the one process that writes files and prints progress."""
    return rank(group) == 0


def barrier(group: Group | None = None) -> None:
    """Return only when every rank has called it (a one-element ``all_sum``); no-op alone.

    Use it to order file-system effects across ranks, e.g. every rank checks (or reads) the
    run directory, *then* rank 0 writes into it, so no rank sees a half-written run.
    """
    g = _resolve(group)
    if g is not None:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,), dtype=mx.float32), group=g, stream=mx.cpu))


# ---------------------------------------------------------------------------------------------
# Collectives on trees


def _leaf_paths(tree: Tree) -> list[str]:
    """Dotted paths of the leaves (for error messages), or ``#i`` where a path cannot say it."""
    try:
        return list(to_flat(tree))
    except Exception:  # keys that a dotted path cannot express: fall back to leaf indices
        return [f"#{i}" for i in range(len(flatten(tree)[0]))]


def _check_arrays(leaves: list[Any], tree: Tree, what: str, floating: bool = False) -> None:
    for i, x in enumerate(leaves):
        bad = None
        if not isinstance(x, mx.array):
            bad = f"is a {type(x).__name__}, not an mx.array"
        elif floating and not mx.issubdtype(x.dtype, mx.floating):
            bad = f"has dtype {x.dtype}; only floating gradients can be averaged"
        if bad:
            raise TypeError(f"{what}: leaf {_leaf_paths(tree)[i]!r} {bad}")


def _wide(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype a gradient travels and is summed in: float32 for the half-precision ones (so
    a weight or a sum beyond float16's 65504, or a weight bfloat16 would round, stays exact
    enough), else its own."""
    return mx.float32 if dtype in (mx.float16, mx.bfloat16) else dtype


def _by_dtype(leaves: list[mx.array], widen: bool = False) -> dict[mx.Dtype, list[int]]:
    """Leaf indices per dtype (with ``widen``, per ``_wide`` dtype), in first-seen order."""
    groups: dict[mx.Dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(_wide(x.dtype) if widen else x.dtype, []).append(i)
    return groups


def _concat(leaves: list[mx.array], idx: list[int]) -> mx.array:
    parts = [leaves[i].reshape(-1) for i in idx]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def _split(buf: mx.array, leaves: list[mx.array], idx: list[int]) -> Iterable[mx.array]:
    if len(idx) == 1:
        return [buf.reshape(leaves[idx[0]].shape)]
    offsets, total = [], 0
    for i in idx[:-1]:
        total += leaves[i].size
        offsets.append(total)
    return (p.reshape(leaves[i].shape) for p, i in zip(mx.split(buf, offsets), idx))


def _reduce_buffers(
    leaves: list[mx.array], group: Group, scale: mx.array | None = None, widen: bool = False
) -> list[tuple[list[int], mx.array]]:
    """``(leaf indices, summed flat buffer)`` per dtype: one ``all_sum`` per dtype.

    With ``widen`` the half-precision leaves join the float32 buffer (``_wide``), so the sum
    happens in float32 (and the buffer comes back float32: cast the parts back).  With
    ``scale`` (float32) each buffer is multiplied by it, in the buffer's dtype, before the sum:
    one op per dtype, not one per leaf (hundreds of small ops cost more than the communication
    on a CPU).
    """
    out = []
    for dtype, idx in _by_dtype(leaves, widen).items():
        buf = _concat(leaves, idx)
        if buf.dtype != dtype:
            buf = buf.astype(dtype)
        if scale is not None:
            buf = buf * scale.astype(dtype)
        out.append((idx, mx.distributed.all_sum(buf, group=group)))
    return out


def _unflatten_buffers(
    treedef: Any, leaves: list[mx.array], buffers: list[tuple[list[int], mx.array]]
) -> Tree:
    out: list[mx.array] = list(leaves)
    for idx, buf in buffers:
        for i, part in zip(idx, _split(buf, leaves, idx)):
            out[i] = part if part.dtype == leaves[i].dtype else part.astype(leaves[i].dtype)
    return unflatten(treedef, out)


def all_sum(tree: Tree, group: Group | None = None, *, fused: bool = True) -> Tree:
    """Elementwise sum of ``tree`` over all processes: ``Σ_r tree_r`` (same structure, dtypes).

    Use it for metrics (loss sums, token counts) as well as gradients.  With ``fused`` (the
    default) the leaves of each dtype travel in one flat buffer and one ``all_sum``;
    ``fused=False`` issues one ``all_sum`` per leaf (kept for benchmarks).
    On one process returns ``tree`` itself.
    """
    g = _resolve(group)
    if g is None:
        return tree
    leaves, treedef = flatten(tree)
    if not leaves:
        return tree
    _check_arrays(leaves, tree, "all_sum")
    if not fused:
        return unflatten(treedef, [mx.distributed.all_sum(x, group=g) for x in leaves])
    return _unflatten_buffers(treedef, leaves, _reduce_buffers(leaves, g))


def average_gradients(
    grads: Tree,
    group: Group | None = None,
    *,
    weight: float | mx.array | None = None,
    fused: bool = True,
) -> Tree:
    """Average a gradient tree over all processes, so every rank applies the same update.

    Without ``weight``: ``ḡ = (1/N) Σ_r g_r``, right when every rank's gradient is a mean over
    the same number of examples/tokens.

    With ``weight`` (this rank's token count, say): ``ḡ = Σ_r w_r g_r / Σ_r w_r``.  If ``g_r``
    is rank r's per-token mean gradient and ``w_r`` its token count, this is exactly the
    per-token mean gradient of the whole global batch, i.e. what one process would compute on
    it, even when padding leaves the ranks with different token counts.  The weight rides as
    one extra float32 element in the float32 buffer.

    float16 and bfloat16 leaves are scaled, summed and divided in float32 (they travel in the
    float32 buffer, twice their size) and cast back once at the end: a weight is never rounded
    to the gradient's dtype (bfloat16 would round 511 to 512) and neither ``w_r g_r`` nor the
    sum can overflow float16's 65504 when the average does not.  So one ``all_sum`` carries
    every float16/bfloat16/float32 leaf (float64 has its own).

    ``fused=False`` issues one ``all_sum`` per leaf instead (about 10x slower on the 336-leaf
    LoRA tree over 2 ranks here; kept for ``benchmarks/distributed_allreduce.py``).

    The leaves must be floating ``mx.array`` s (a clear ``TypeError`` names the path
    otherwise, on one process too); dtypes are kept.  On one process returns ``grads`` itself
    (the same objects).
    """
    leaves, treedef = flatten(grads)
    # Checked on one process too, so a bad tree fails on a laptop, not first on the cluster.
    _check_arrays(leaves, grads, "average_gradients", floating=True)
    g = _resolve(group)
    if g is None or not leaves:
        return grads
    n = g.size()
    if weight is None:
        if not fused:
            return unflatten(
                treedef,
                [
                    (mx.distributed.all_sum(x.astype(_wide(x.dtype)), group=g) / n).astype(x.dtype)
                    for x in leaves
                ],
            )
        buffers = _reduce_buffers(leaves, g, widen=True)
        return _unflatten_buffers(treedef, leaves, [(i, b / n) for i, b in buffers])
    if isinstance(weight, mx.array):
        w = weight.astype(mx.float32).reshape(())
    else:
        w = mx.array(float(weight), dtype=mx.float32)
    if not fused:
        total = mx.distributed.all_sum(w, group=g)
        out = []
        for x in leaves:
            wide = _wide(x.dtype)
            s = mx.distributed.all_sum(x.astype(wide) * w.astype(wide), group=g)
            out.append((s / total.astype(wide)).astype(x.dtype))
        return unflatten(treedef, out)
    # A trailing float32 one becomes w after the scaling, so Σ_r w_r arrives in the same sum.
    extended = [*leaves, mx.ones((), dtype=mx.float32)]
    buffers = _reduce_buffers(extended, g, scale=w, widen=True)
    last = len(leaves)
    total = next(b for i, b in buffers if i[-1] == last)[-1]
    averaged = []
    for idx, buf in buffers:
        if idx[-1] == last:  # drop the weight's slot
            idx, buf = idx[:-1], buf[:-1]
        if idx:
            averaged.append((idx, buf / total.astype(buf.dtype)))
    return _unflatten_buffers(treedef, leaves, averaged)


def broadcast_params(tree: Tree, group: Group | None = None, root: int = 0) -> Tree:
    """Every rank gets ``root``'s values of ``tree``, bit for bit (structure must match).

    Done with one ``all_gather`` per dtype over the flat buffer, keeping root's slice (exact,
    NaNs and signed zeros included; costs ``world_size`` times the tree in transit).  Use it
    at start-up when ranks could have initialised differently.  On one process returns
    ``tree`` itself.
    """
    g = _resolve(group)
    if g is None:
        return tree
    if not 0 <= root < g.size():
        raise ValueError(f"broadcast_params: root={root} is not a rank of a world of {g.size()}")
    leaves, treedef = flatten(tree)
    if not leaves:
        return tree
    _check_arrays(leaves, tree, "broadcast_params")
    out: list[mx.array] = list(leaves)
    for idx in _by_dtype(leaves).values():
        buf = _concat(leaves, idx)
        gathered = mx.distributed.all_gather(buf, group=g)
        mine = gathered[root * buf.size : (root + 1) * buf.size]
        for i, part in zip(idx, _split(mine, leaves, idx)):
            out[i] = part
    return unflatten(treedef, out)


_BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def _signature(tree: Tree) -> int:
    """A process-independent checksum of structure, paths, shapes and dtypes (crc32); for a
    leaf that is not an ``mx.array`` its type."""
    leaves, treedef = flatten(tree)
    text = (
        repr(treedef)
        + "|"
        + ";".join(
            f"{x.shape}:{x.dtype}" if isinstance(x, mx.array) else type(x).__name__ for x in leaves
        )
    )
    return zlib.crc32(text.encode())


def _checksum(x: Any) -> int:
    """crc32 of the value of a leaf that is not an ``mx.array`` (a counter, a numpy array)."""
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        return zlib.crc32(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    return zlib.crc32(f"{type(x).__name__}:{x!r}".encode())


def check_identical(tree: Tree, group: Group | None = None, what: str = "params") -> None:
    """Raise ``DivergenceError`` unless every rank holds a bit-identical ``tree``.

    First the structure (a checksum of paths, shapes and dtypes: the collectives above would
    silently mis-sum trees that differ), then the values: the bits of every ``mx.array`` leaf
    are reduced with ``all_max`` and ``all_min`` and must agree, which needs no gather; other
    leaves (Python numbers, strings, numpy arrays: a ``TrainState``'s step, counters in an
    optimizer state) are compared by a checksum of their value.  The message names the leaves
    that differ.  On one process this does nothing (there is nothing to compare).
    """
    g = _resolve(group)
    if g is None:
        return
    leaves, _ = flatten(tree)
    sig = mx.array([_signature(tree)], dtype=mx.uint32)
    lo, hi = mx.distributed.all_min(sig, group=g), mx.distributed.all_max(sig, group=g)
    if lo.item() != hi.item():
        raise DivergenceError(
            f"{what}: rank {g.rank()} of {g.size()} sees a tree whose structure, shapes or "
            "dtypes differ from another rank's (same program and config on every rank?)",
            [],
        )
    order: list[int] = []
    flags: list[mx.array] = []
    at = [i for i, x in enumerate(leaves) if isinstance(x, mx.array)]
    arrays = [leaves[i] for i in at]
    for idx in _by_dtype(arrays).values():
        buf = _concat(arrays, idx)
        bits = buf.view(_BITS[buf.dtype.size])
        neq = mx.distributed.all_max(bits, group=g) != mx.distributed.all_min(bits, group=g)
        order += [at[j] for j in idx]
        flags += [part.any() for part in _split(neq, arrays, idx)]
    others = [i for i, x in enumerate(leaves) if not isinstance(x, mx.array)]
    if others:
        sums = mx.array([_checksum(leaves[i]) for i in others], dtype=mx.uint32)
        neq = mx.distributed.all_max(sums, group=g) != mx.distributed.all_min(sums, group=g)
        order += others
        flags += list(neq)
    differs = mx.stack(flags).tolist() if flags else []
    differ = sorted(i for i, d in zip(order, differs) if d)
    if differ:
        paths = [_leaf_paths(tree)[i] for i in differ]
        shown = ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
        raise DivergenceError(
            f"{what}: {len(paths)} leaf/leaves differ across the {g.size()} ranks: {shown}", paths
        )
