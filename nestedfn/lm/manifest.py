"""What a run wrote into its directory, so that ``--force`` removes that and nothing else.

A new run writes ``.nestedfn-run.json`` first (``write_manifest``): it marks the run files
in that directory as nestedfn's, and holds the SHA-256 of the ``config.yaml`` the run wrote
(``config_sha256``; while a resume rewrites the file, both the old and the new one, marked
``rewriting``), so that a resume can tell a ``config.yaml`` changed behind its back
(``config_changed``).  ``run_files(out)`` sorts what is on the run's own paths:

* owned: the manifest, the lock file, ``config.yaml``, ``metrics.jsonl``, the adapters --
  but only when the manifest is there (a ``config.yaml`` the user keeps next to their runs
  is not the run's); in ``checkpoints/`` the ``step_########`` directories holding only
  ``arrays.safetensors``/``meta.json``, moved-away damaged ones and ``.tmp-`` directories;
  in ``best/`` the adapter files; everywhere the temporaries of an atomic write cut off by a
  kill (``.adapters.safetensors.PID-RANDOM.safetensors``, ``.config.yaml.PID-RANDOM``);
* unknown: anything else in ``checkpoints/`` or ``best/``, and the run file names when no
  manifest says a run wrote them.

``clear_run`` refuses (``RunError`` listing them) while anything is unknown, and removes
nothing then; files elsewhere in the directory are never looked at.
``clean_temporaries`` removes the stale temporaries only (resume does it, under the lock).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE
from nestedfn.lm.config import RUN_CONFIG
from nestedfn.lm.errors import RunError
from nestedfn.lm.lock import LOCK_FILE
from nestedfn.run.checkpoint import atomic_write_text

__all__ = [
    "MANIFEST",
    "clean_temporaries",
    "clear_run",
    "config_changed",
    "read_manifest",
    "run_files",
    "write_manifest",
]

MANIFEST = ".nestedfn-run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS, BEST = "checkpoints", "best"
TOP_FILES = (RUN_CONFIG, METRICS, ADAPTER_FILE, ADAPTER_CONFIG)
_NAMES = "|".join(re.escape(n) for n in (*TOP_FILES, MANIFEST))
_ATOMIC_TMP = re.compile(rf"^\.(?:{_NAMES})\.\d+-[0-9a-f]{{8}}(?:\.safetensors)?$")
_STEP = re.compile(r"^(?:damaged-)?step_\d{8,}$")
_STEP_FILES = {"arrays.safetensors", "meta.json"}


def write_manifest(out: Path, config_sha256: list[str], rewriting: bool = False) -> None:
    """Mark ``out``'s run files as written by nestedfn, with the SHA-256 of the accepted
    ``config.yaml`` (atomically)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        writer = version("nestedfn")
    except PackageNotFoundError:
        writer = "unknown"
    record = {"format": "nestedfn-run", "version": 1, "nestedfn": writer}
    record |= {"config_sha256": config_sha256, "rewriting": rewriting}
    record["digest"] = _digest(record)
    atomic_write_text(out / MANIFEST, json.dumps(record) + "\n")


def read_manifest(out: Path) -> dict | None:
    """The manifest of ``out``, or ``None`` when it is missing or damaged (its own digest
    does not match)."""
    try:
        record = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("format") == "nestedfn-run"
    ok = ok and isinstance(record.get("config_sha256"), list)
    return record if ok and record.get("digest") == _digest(record) else None


def _digest(record: dict) -> str:
    import hashlib

    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def config_changed(out: Path) -> bool | None:
    """Whether ``config.yaml`` differs from what the run wrote (``None``: cannot tell -- no
    manifest, a damaged one, or a rewrite cut off)."""
    from nestedfn.run.checkpoint import file_sha256

    record = read_manifest(out)
    if record is None or record.get("rewriting"):
        return None
    return file_sha256(out / RUN_CONFIG) not in record["config_sha256"]


def _is_tmp(p: Path) -> bool:
    return bool(_ATOMIC_TMP.match(p.name))


def run_files(out: Path) -> tuple[list[Path], list[Path]]:
    """``(owned, unknown)`` on the run's own paths in ``out`` (see the module doc)."""
    owned: list[Path] = []
    unknown: list[Path] = []
    marked = (out / MANIFEST).is_file()
    for name in (MANIFEST, LOCK_FILE):
        if (out / name).exists():
            owned.append(out / name)
    for name in TOP_FILES:
        p = out / name
        if p.exists() or p.is_symlink():
            (owned if marked and p.is_file() else unknown).append(p)
    owned += [p for p in sorted(out.iterdir()) if _is_tmp(p)] if out.is_dir() else []
    ck = out / CHECKPOINTS
    if ck.is_dir():
        for p in sorted(ck.iterdir()):
            if p.is_dir() and not p.is_symlink() and p.name.startswith(".tmp-"):
                owned.append(p)
            elif (
                p.is_dir()
                and not p.is_symlink()
                and _STEP.match(p.name)
                and {c.name for c in p.iterdir()} <= _STEP_FILES
            ):
                owned.append(p)
            else:
                unknown.append(p)
    elif ck.exists() or ck.is_symlink():
        unknown.append(ck)
    best = out / BEST
    if best.is_dir():
        for p in sorted(best.iterdir()):
            ok = p.is_file() and (p.name in (ADAPTER_FILE, ADAPTER_CONFIG) or _is_tmp(p))
            (owned if ok else unknown).append(p)
    elif best.exists() or best.is_symlink():
        unknown.append(best)
    return owned, unknown


def clear_run(out: Path) -> None:
    """Remove what a run wrote into ``out``; refuse, removing nothing, when anything on the
    run's paths is not known to be the run's."""
    owned, unknown = run_files(out)
    if unknown:
        shown = ", ".join(str(p.relative_to(out)) for p in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise RunError(
            f"--force removes only what a nestedfn run wrote into {out}; these are not known to "
            f"be: {shown}{more}; move them away (or delete them) and run again"
        )
    for p in owned:
        if p.name == LOCK_FILE:
            continue  # held by this process; released at the end of the run
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    for d in (out / CHECKPOINTS, out / BEST):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries of atomic writes cut off by a kill, in ``out``, ``out/best``
    and ``out/checkpoints``; return them.  Only under the run's lock (no writer is alive)."""
    found = [p for d in (out, out / BEST) if d.is_dir() for p in d.iterdir() if _is_tmp(p)]
    ck = out / CHECKPOINTS
    if ck.is_dir():
        found += [p for p in ck.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found
