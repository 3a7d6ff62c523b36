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

The manifest also records the run's inputs (``input_fingerprints``): the size and SHA-256 of
the data files (``train``/``valid``/``test.jsonl``), the model's weights, configuration and
tokenizer files, and ``resume_adapter_file``; a resume refuses inputs that changed unless told
to accept them (``resume.check_resume``), and the accepted changes are recorded
(``accepted_changes``: the file, the step, the old and new fingerprints).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE
from nestedfn.lm.config import RUN_CONFIG
from nestedfn.lm.errors import RunError
from nestedfn.lm.lock import LOCK_FILE
from nestedfn.run.checkpoint import atomic_write_text
from nestedfn.run.safedir import SafeDir

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


def write_manifest(
    out: Path,
    config_sha256: list[str],
    rewriting: bool = False,
    inputs: dict[str, dict] | None = None,
    accepted: list[dict] | None = None,
) -> None:
    """Mark ``out``'s run files as written by nestedfn, with the SHA-256 of the accepted
    ``config.yaml`` (atomically).  ``inputs`` (``input_fingerprints``) and ``accepted``
    (changes accepted on resume) are recorded; when not given, the previous manifest's are
    kept."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        writer = version("nestedfn")
    except PackageNotFoundError:
        writer = "unknown"
    record = {"format": "nestedfn-run", "version": 1, "nestedfn": writer}
    record |= {"config_sha256": config_sha256, "rewriting": rewriting}
    old = read_manifest(out) or {}
    record["inputs"] = inputs if inputs is not None else old.get("inputs")
    record["accepted_changes"] = [*old.get("accepted_changes", []), *(accepted or [])]
    record["digest"] = _digest(record)
    atomic_write_text(out / MANIFEST, json.dumps(record) + "\n")


def read_manifest(out: Path) -> dict | None:
    """The manifest of ``out``, or ``None`` when it is missing or damaged (its own digest
    does not match, or a directory stands in its place).  A manifest that cannot be read
    (``EACCES``, ``EIO``) is an ``OSError`` naming it: taken for missing, it would be written
    again and the input fingerprints it holds lost unchecked."""
    try:
        record = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        UnicodeDecodeError,
        ValueError,
    ):
        return None
    ok = isinstance(record, dict) and record.get("format") == "nestedfn-run"
    ok = ok and isinstance(record.get("config_sha256"), list)
    return record if ok and record.get("digest") == _digest(record) else None


def _digest(record: dict) -> str:
    import hashlib

    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


INPUT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
)
DATA_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")
_FINGERPRINTS: dict[tuple, dict] = {}  # (path, size, mtime_ns, inode) -> fingerprint


def _fingerprint(path: Path) -> dict:
    from nestedfn.run.checkpoint import file_sha256

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = {"bytes": st.st_size, "sha256": file_sha256(path)}
    return _FINGERPRINTS[key]


def input_fingerprints(model: str | None, data: str | None, adapter: str | None) -> dict:
    """``{path: {"bytes", "sha256"}}`` of the files a run reads: the data directory's
    ``DATA_FILES``, the model directory's ``*.safetensors`` and ``INPUT_FILES``, and the
    adapter file a run starts from (a directory: its ``adapters.safetensors``).  Paths that
    are not local files (a Hugging Face id) are skipped.  SHA-256 of every byte: a file
    overwritten by another of the same size is told apart (the weights are read once more
    per start; a file seen unchanged in this process is not read again)."""
    files: list[Path] = []
    if data and Path(data).is_dir():
        files += [Path(data) / n for n in DATA_FILES if (Path(data) / n).is_file()]
    if model and Path(model).is_dir():
        m = Path(model)
        files += sorted(p for p in m.glob("*.safetensors") if p.is_file())
        files += [m / n for n in INPUT_FILES if (m / n).is_file()]
    if adapter:
        a = Path(adapter)
        a = a / ADAPTER_FILE if a.is_dir() else a
        if a.is_file():
            files.append(a)
    return {str(p.absolute()): _fingerprint(p) for p in files}


def config_changed(out: Path) -> bool | None:
    """Whether ``config.yaml`` differs from what the run wrote (``None``: cannot tell -- no
    manifest, a damaged one, or a rewrite cut off)."""
    from nestedfn.run.checkpoint import file_sha256

    record = read_manifest(out)
    if record is None or record.get("rewriting"):
        return None
    return file_sha256(out / RUN_CONFIG) not in record["config_sha256"]


def _is_tmp(p: Path | str) -> bool:
    return bool(_ATOMIC_TMP.match(Path(p).name))


def run_files(out: Path) -> tuple[list[Path], list[Path]]:
    """``(owned, unknown)`` on the run's own paths in ``out`` (see the module doc).  Entries
    are looked at with ``lstat``: a symlink is never followed, and is always unknown."""
    owned: list[Path] = []
    unknown: list[Path] = []
    try:
        d = SafeDir.open(out)
    except (FileNotFoundError, NotADirectoryError):
        return owned, unknown
    with d:
        marked = d.kind(MANIFEST) == "file"
        for name in (MANIFEST, LOCK_FILE):
            k = d.kind(name)
            if k is not None:
                (owned if k == "file" else unknown).append(out / name)
        for name in TOP_FILES:
            k = d.kind(name)
            if k is not None:
                (owned if marked and k == "file" else unknown).append(out / name)
        owned += [out / n for n in d.listdir() if _is_tmp(n) and d.kind(n) == "file"]
        k = d.kind(CHECKPOINTS)
        if k == "dir":
            with d.sub(CHECKPOINTS) as ck:
                for n in ck.listdir():
                    if ck.kind(n) == "dir" and n.startswith(".tmp-"):
                        owned.append(out / CHECKPOINTS / n)
                    elif ck.kind(n) == "dir" and _STEP.match(n) and _step_files_only(ck, n):
                        owned.append(out / CHECKPOINTS / n)
                    else:
                        unknown.append(out / CHECKPOINTS / n)
        elif k is not None:
            unknown.append(out / CHECKPOINTS)
        k = d.kind(BEST)
        if k == "dir":
            with d.sub(BEST) as best:
                for n in best.listdir():
                    ok = best.kind(n) == "file" and (
                        n in (ADAPTER_FILE, ADAPTER_CONFIG) or _is_tmp(n)
                    )
                    (owned if ok else unknown).append(out / BEST / n)
        elif k is not None:
            unknown.append(out / BEST)
    return owned, unknown


def _step_files_only(ck: SafeDir, name: str) -> bool:
    with ck.sub(name) as step:
        return all(n in _STEP_FILES and step.kind(n) == "file" for n in step.listdir())


def clear_run(out: Path) -> None:
    """Remove what a run wrote into ``out``; refuse, removing nothing, when anything on the
    run's paths is not known to be the run's (a symlink included: nothing is followed)."""
    owned, unknown = run_files(out)
    if unknown:
        shown = ", ".join(str(p.relative_to(out)) for p in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise RunError(
            f"--force removes only what a nestedfn run wrote into {out}; these are not known to "
            f"be: {shown}{more}; move them away (or delete them) and run again"
        )
    with SafeDir.open(out) as d:
        for p in owned:
            if p.name == LOCK_FILE:
                continue  # held by this process; released at the end of the run
            rel = p.relative_to(out).parts
            if len(rel) == 1:
                d.remove_tree(rel[0], missing_ok=True)
            else:
                with d.sub(rel[0]) as sub:
                    sub.remove_tree(rel[1], missing_ok=True)
        for name in (CHECKPOINTS, BEST):
            if d.kind(name) == "dir":
                with d.sub(name) as sub:
                    empty = not sub.listdir()
                if empty:
                    d.rmdir(name)


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries of atomic writes cut off by a kill, in ``out``, ``out/best``
    and ``out/checkpoints``; return them.  Only under the run's lock (no writer is alive).
    Nothing is followed: a symlink is never a temporary of ours."""
    found: list[Path] = []
    with SafeDir.open(out) as d:
        for sub, pick in (
            ("", lambda s, n: _is_tmp(n) and s.kind(n) == "file"),
            (BEST, lambda s, n: _is_tmp(n) and s.kind(n) == "file"),
            (CHECKPOINTS, lambda s, n: n.startswith(".tmp-") and s.kind(n) == "dir"),
        ):
            if sub and d.kind(sub) != "dir":
                continue
            with d.sub(sub) if sub else SafeDir.open(out) as s:
                for n in s.listdir():
                    if pick(s, n):
                        with contextlib.suppress(OSError):
                            s.remove_tree(n)
                        found.append(s.path / n)
    return found
