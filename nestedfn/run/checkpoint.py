"""Atomic, exact checkpoints of a ``TrainState`` plus JSON-able extras (data index, seeds, ...).

Layout of one checkpoint, ``DIR/step_00000042/``:

* ``arrays.safetensors`` -- every ``mx.array`` leaf of the flattened state
  (``nestedfn.tree.flatten`` order), key = leaf index, dtype and shape kept (bfloat16 included);
* ``meta.json`` -- format version, step, the size and SHA-256 of ``arrays.safetensors``, a JSON description of the tree structure (dict keys,
  NamedTuple type and fields, ``None``, empty containers), one descriptor per leaf (an array
  key, the value of a Python ``int``/``float``/``bool``/``str`` leaf such as a counter, or the
  exact bytes of a small numpy array such as an RNG state) and
  the caller's ``extra``, and last the SHA-256 of all of that (``digest``), so that a
  damaged ``meta.json`` is told from a good one even when it still parses.

Loading verifies both checksums first (``verify_checkpoint``): a truncated, zero-filled,
deleted or bit-flipped file is a ``CheckpointError`` naming it, never other values resumed
silently.  (Version 1 checkpoints, without checksums, are still read, unverified.)

Restoring needs ``like`` (a state of the same structure, e.g. a fresh ``init``): its structure
must equal the stored description, else ``TreeMismatchError`` naming the paths; leaves are then
put back in ``like``'s exact tree type (NamedTuple classes come from ``like``, never imported
by name).

Atomicity: everything is written into ``DIR/.tmp-step_...-PID-RANDOM/``, each file fsynced,
then the directory is renamed to ``step_...`` (a rename within one file system is atomic) and
the parent fsynced.  A crash leaves either the complete new checkpoint or none; a leftover
temporary directory is never read (``latest_checkpoint`` only sees ``step_########``) and is
removed by the next ``save_checkpoint``.  One writer per directory (rank 0).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from nestedfn.optim.core import TrainState
from nestedfn.run.safedir import SafeDir
from nestedfn.tree import TreeDef, TreeMismatchError, flatten, unflatten

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "file_sha256",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "save_safetensors",
    "verify_checkpoint",
]

FORMAT = "nestedfn-checkpoint"
VERSION = 2
_READS = (1, 2)  # versions load_checkpoint reads (1: no checksums)
ARRAYS = "arrays.safetensors"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the path."""


# ---- structure description --------------------------------------------------------------


def _key(k: Any) -> list:
    """A dict key as JSON, type-tagged so ``1`` and ``"1"`` stay different."""
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        return ["repr", repr(k)]
    return ["str" if isinstance(k, str) else "int", k]


def _describe(td: TreeDef) -> dict:
    """JSON description of a ``TreeDef`` (what ``load_checkpoint`` compares with ``like``)."""
    if td.kind == "leaf":
        return {"kind": "leaf"}
    if td.kind == "none":
        return {"kind": "none"}
    children = [_describe(c) for c in td.children]
    if td.kind == "dict":
        return {"kind": "dict", "keys": [_key(k) for k in td.meta], "children": children}
    if td.kind == "nt":
        cls = td.meta
        return {
            "kind": "namedtuple",
            "type": f"{cls.__module__}.{cls.__qualname__}",
            "fields": list(cls._fields),
            "children": children,
        }
    return {"kind": td.kind, "children": children}


def _diff(a: dict, b: dict, path: str = "") -> list[tuple[str, str]]:
    """Differences between the stored description ``a`` and ``like``'s ``b``, by path."""

    def name(d: dict) -> str:
        return d["type"] if d["kind"] == "namedtuple" else d["kind"]

    if name(a) != name(b):
        return [(path, f"checkpoint has {name(a)}, like has {name(b)}")]
    join = lambda seg: f"{path}.{seg}" if path else str(seg)  # noqa: E731
    if a["kind"] == "dict":
        ka = [k[1] for k in a["keys"]]
        kb = [k[1] for k in b["keys"]]
        if a["keys"] != b["keys"]:
            only_a = [k for k in ka if k not in kb]
            only_b = [k for k in kb if k not in ka]
            why = f"dict keys differ: only in checkpoint {only_a}, only in like {only_b}"
            if not only_a and not only_b:
                why = f"dict key order differs: {ka} vs {kb}"
            return [(path, why)]
        labels = ka
    elif "children" in a:
        if len(a["children"]) != len(b["children"]):
            return [
                (path, f"length {len(a['children'])} in checkpoint, {len(b['children'])} in like")
            ]
        labels = a.get("fields") or list(range(len(a["children"])))
    else:
        return []
    out: list[tuple[str, str]] = []
    for lab, ca, cb in zip(labels, a["children"], b["children"]):
        out += _diff(ca, cb, join(lab))
    return out


# ---- leaves -------------------------------------------------------------------------------


def _encode_leaves(leaves: list, paths: list[str]) -> tuple[dict[str, mx.array], list[dict]]:
    arrays: dict[str, mx.array] = {}
    descs: list[dict] = []
    for i, (x, path) in enumerate(zip(leaves, paths)):
        if isinstance(x, mx.array):
            if x.dtype == mx.float64:  # safetensors (MLX's writer) has no float64
                raise CheckpointError(
                    f"leaf {path or '<root>'!r} is a float64 mx.array, which a checkpoint "
                    "(safetensors) cannot hold; cast it (float32) or keep it as a numpy array"
                )
            arrays[str(i)] = x
            descs.append({"kind": "array", "key": str(i)})
        elif isinstance(x, (np.ndarray, np.generic)) and np.asarray(x).dtype.kind in "biufc":
            # exact bytes in the JSON (numpy dtypes such as float64 are not all MLX's)
            a = np.array(x, order="C")  # keeps 0-d shapes
            descs.append(
                {
                    "kind": "numpy",
                    "dtype": a.dtype.str,
                    "shape": list(a.shape),
                    "data": base64.b64encode(a.tobytes()).decode("ascii"),
                    "scalar": isinstance(x, np.generic),
                }
            )
        elif isinstance(x, (bool, int, float, str)):
            descs.append({"kind": type(x).__name__, "value": x})
        else:
            raise CheckpointError(
                f"leaf {path or '<root>'!r} is a {type(x).__name__}: a checkpoint holds "
                "mx.array, numpy arrays and Python bool/int/float/str leaves"
            )
    return arrays, descs


def _leaf_kind(x: Any) -> str:
    if isinstance(x, mx.array):
        return "array"
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    return type(x).__name__


def _decode_leaf(desc: dict, arrays: dict[str, mx.array], like: Any, path: str, where: Path):
    """The stored leaf, checked against ``like``'s leaf (kind, and shape/dtype of arrays)."""
    kind = desc["kind"]
    if kind != _leaf_kind(like):
        raise TreeMismatchError(
            [(path, f"checkpoint leaf is {kind}, like's is {_leaf_kind(like)}")],
            f"checkpoint {where} does not fit `like`",
        )
    if kind == "numpy":
        a = np.frombuffer(base64.b64decode(desc["data"]), dtype=np.dtype(desc["dtype"]))
        a = a.reshape(desc["shape"]).copy()
        ref = np.asarray(like)
    elif kind == "array":
        try:
            a = arrays[desc["key"]]
        except KeyError:
            raise CheckpointError(f"{where}: array {desc['key']} ({path}) missing") from None
        ref = like
    else:
        return desc["value"]
    if a.shape != ref.shape or a.dtype != ref.dtype:
        raise TreeMismatchError(
            [
                (
                    path,
                    f"checkpoint has {a.dtype}{list(a.shape)}, like has {ref.dtype}{list(ref.shape)}",
                )
            ],
            f"checkpoint {where} does not fit `like`",
        )
    return a[()] if desc.get("scalar") else a


# ---- files --------------------------------------------------------------------------------


def atomic_write(path: Path | str, write: Callable[[str], None], suffix: str = "") -> Path:
    """Replace ``path`` all at once: ``write(tmp)`` fills a new file next to it (named
    ``.NAME.PID-RANDOM{suffix}``), which is fsynced and renamed over ``path``, then the
    directory is fsynced (``SafeDir.write_atomic``: never through a symlink, a symlink at
    ``path`` is replaced, not written through).  A reader (or a crash) sees the old file or the
    new one, never a part.  The file gets the permissions ``open(path, "w")`` would give
    (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.  Returns ``path``."""
    path = Path(path)
    with SafeDir.open(path.parent) as d:
        d.write_atomic(path.name, write, suffix)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """``atomic_write`` of ``text`` (UTF-8)."""
    path = Path(path)
    with SafeDir.open(path.parent) as d:
        d.write_atomic(path.name, text.encode("utf-8"))
    return path


def save_safetensors(path: Path | str, arrays: dict[str, mx.array], metadata: Any = None) -> None:
    """``mx.save_safetensors``, with MLX's write failure (a ``RuntimeError`` such as ``[write]
    Unable to write N bytes``, naming no file) raised as the ``OSError`` it is, naming
    ``path`` (``ENOSPC`` when the file system is full)."""
    try:
        if metadata is None:
            mx.save_safetensors(str(path), arrays)
        else:
            mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as e:
        raise _write_failure(Path(path), e) from None


def _write_failure(path: Path, e: RuntimeError) -> OSError:
    try:
        full = shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({e})", str(path))


def _write_file(d: SafeDir, name: str, fill: Callable[[Any], None]) -> None:
    """Create ``name`` in ``d`` (``O_EXCL | O_NOFOLLOW``), ``fill`` the file object, fsync."""
    fd = d.open_fd(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # MLX's write failure names no file
        raise _write_failure(d.path / name, e) from None
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(d.path / name)) from None


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of the file at ``path`` (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path | str) -> int:
    """The step of the checkpoint directory ``path`` (``step_dir_name``'s inverse)."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory (step_########)")
    return int(m.group(1))


def save_checkpoint(directory: Path | str, state: TrainState, extra: dict, step: int) -> Path:
    """Write ``directory/step_{step:08d}`` atomically and return its path.

    ``state`` is any tree (normally a ``TrainState``); ``extra`` must be JSON-able (checked
    before anything is written).  An existing checkpoint of the same step is replaced (the new
    one is complete on disk before the old one is moved away).
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    directory = Path(directory)
    leaves, td = flatten(state)
    arrays, descs = _encode_leaves(leaves, _paths(td))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "structure": _describe(td),
        "leaves": descs,
        "extra": extra,
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint extra is not JSON-able: {e}") from e

    with SafeDir.open(directory, create=True, follow=False) as d:
        _clean_temporaries(d)
        final = step_dir_name(step)
        tmp_name = f"{_TMP_PREFIX}{final}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            d.mkdir(tmp_name)
        except OSError as e:  # EACCES, EROFS...: the directory is the cause, not our temporary
            raise OSError(e.errno, e.strerror, str(directory)) from None
        old = None
        try:
            mx.eval(list(arrays.values()))
            with d.sub(tmp_name) as tmp:
                _write_file(tmp, ARRAYS, lambda f: mx.save_safetensors(f, arrays))
                st = tmp.lstat(ARRAYS)
                assert st is not None
                digest = hashlib.sha256(tmp.read_bytes(ARRAYS)).hexdigest()
                meta["files"] = {ARRAYS: {"bytes": st.st_size, "sha256": digest}}
                meta["digest"] = _meta_digest(meta)
                # last: its presence marks a complete directory
                text = json.dumps(meta, indent=1).encode("utf-8")
                _write_file(tmp, META, lambda f: f.write(text))
                tmp.fsync()
            if d.kind(final) is not None:
                old = f"{_TMP_PREFIX}old-{final}-{uuid.uuid4().hex[:8]}"
                d.rename(final, old)
            d.rename(tmp_name, final)
            d.fsync()
        except BaseException:
            with contextlib.suppress(OSError):
                d.remove_tree(tmp_name, missing_ok=True)
            raise
        if old is not None:
            with contextlib.suppress(OSError):
                d.remove_tree(old)
    return directory / final


def _paths(td: TreeDef, prefix: str = "") -> list[str]:
    """Leaf paths for messages: dict keys, NamedTuple field names, sequence indices."""
    if td.kind == "leaf":
        return [prefix]
    if td.kind == "dict":
        labels = [str(k) for k in td.meta]
    elif td.kind == "nt":
        labels = list(td.meta._fields)
    else:
        labels = [str(i) for i in range(len(td.children))]
    out: list[str] = []
    for lab, c in zip(labels, td.children):
        out += _paths(c, f"{prefix}.{lab}" if prefix else lab)
    return out


def _clean_temporaries(d: SafeDir) -> None:
    for name in d.listdir():
        if name.startswith(_TMP_PREFIX) and d.kind(name) == "dir":
            with contextlib.suppress(OSError):
                d.remove_tree(name)


def list_checkpoints(directory: Path | str) -> list[Path]:
    """Complete checkpoints in ``directory`` (``step_########`` with ``meta.json``), by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and not p.is_symlink() and (p / META).is_file() and not (p / META).is_symlink():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path | str) -> Path | None:
    """The complete checkpoint with the highest step, or ``None`` when there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def verify_checkpoint(path: Path | str) -> dict:
    """The metadata of checkpoint directory ``path`` once its files are proved intact: the
    ``meta.json`` digest and the size and SHA-256 of ``arrays.safetensors``.  A missing,
    truncated, zero-filled or altered file is a ``CheckpointError`` naming it."""
    path = Path(path)
    meta_file = path / META
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (no such directory)")
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} is missing: not a complete checkpoint")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file} is damaged (not JSON: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is damaged (not a JSON object)")
    if meta.get("format") != FORMAT or meta.get("version") not in _READS:
        raise CheckpointError(
            f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')!r}, "
            f"expected {FORMAT!r} v{VERSION}"
        )
    if meta["version"] >= 2:
        if meta.get("digest") != _meta_digest(meta):
            raise CheckpointError(f"{meta_file} is damaged (its checksum does not match)")
        for name, want in meta["files"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing")
            size = f.stat().st_size
            if size != want["bytes"]:
                raise CheckpointError(
                    f"{f} is damaged ({size} bytes, {want['bytes']} were written)"
                )
            if file_sha256(f) != want["sha256"]:
                raise CheckpointError(f"{f} is damaged (its SHA-256 does not match)")
    elif (
        any(d.get("kind") == "array" for d in meta.get("leaves", []))
        and not (path / ARRAYS).is_file()
    ):
        raise CheckpointError(f"{path / ARRAYS} is missing")
    return meta


def load_checkpoint(path: Path | str, like: Any) -> tuple[Any, dict]:
    """Restore ``(state, extra)`` from checkpoint directory ``path``.

    The files are verified first (``verify_checkpoint``: ``CheckpointError`` naming a damaged
    file).  ``like`` gives the exact structure and tree types; a structure, leaf-kind, shape or
    dtype difference raises ``TreeMismatchError`` naming the paths.  Arrays come back with their
    stored dtypes; Python int/float/bool/str leaves come back as such.
    """
    path = Path(path)
    meta = verify_checkpoint(path)
    like_leaves, like_td = flatten(like)
    problems = _diff(meta["structure"], _describe(like_td))
    if problems:
        raise TreeMismatchError(problems, f"checkpoint {path} does not fit `like`")
    descs = meta["leaves"]
    if len(descs) != len(like_leaves):
        raise CheckpointError(
            f"{path / META}: {len(descs)} leaf records for {len(like_leaves)} leaves"
        )
    try:
        arrays = mx.load(str(path / ARRAYS)) if any(d["kind"] == "array" for d in descs) else {}
    except (RuntimeError, ValueError) as e:  # only a version-1 checkpoint gets here damaged
        raise CheckpointError(f"{path / ARRAYS} is damaged ({e})") from None
    paths = _paths(like_td)
    leaves = [_decode_leaf(d, arrays, x, p, path) for d, x, p in zip(descs, like_leaves, paths)]
    return unflatten(like_td, leaves), meta["extra"]


def prune_checkpoints(
    directory: Path | str, keep_last: int, protect: tuple[Path | str, ...] = ()
) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (and never those in ``protect``,
    e.g. the best one); return the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    keep = {Path(p).resolve() for p in protect}
    found = list_checkpoints(directory)
    removed = []
    with SafeDir.open(directory, follow=False) as d:
        for p in found[:-keep_last]:
            if p.resolve() not in keep:
                d.remove_tree(p.name)
                removed.append(p)
    return removed
