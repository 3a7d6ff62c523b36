"""The run directory: what a run writes into it, and the checks before anything is written.

A run directory holds ``config.yaml`` (the resolved options), ``metrics.jsonl``, the adapters
(``adapters.safetensors``, ``adapter_config.json``), ``best/`` and ``checkpoints/``
(``RUN_FILES``), and ``.nestedfn-run.json``, the manifest that marks them as the run's
(``nestedfn.lm.manifest``: ``--force`` removes what the run wrote and refuses when anything
else is on the run's paths).  ``check_out_dir`` refuses a directory holding another run unless
told; ``kept_metrics`` is the metrics file trimmed to the checkpoint a resume starts from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE
from nestedfn.lm.config import RUN_CONFIG
from nestedfn.lm.errors import RunError
from nestedfn.lm.lock import LOCK_FILE
from nestedfn.lm.manifest import MANIFEST
from nestedfn.lm.manifest import clear_run as clear_run
from nestedfn.run.safedir import refuse_links, refuse_out

__all__ = [
    "BEST_DIR",
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "RESUMABLE",
    "RUN_FILES",
    "check_out_dir",
    "clear_run",
    "kept_metrics",
]

METRICS_FILE = "metrics.jsonl"


CHECKPOINT_DIR = "checkpoints"


BEST_DIR = "best"


RUN_FILES = (RUN_CONFIG, METRICS_FILE, ADAPTER_FILE, ADAPTER_CONFIG, CHECKPOINT_DIR, BEST_DIR)


RESUMABLE = ("steps", "save_every", "keep_last", "eval_every")


def check_out_dir(
    out: Path, resume: bool, force: bool, inputs: dict[str, str | None] | None = None
) -> None:
    """Refuse to start a run in a directory that holds one (any of ``RUN_FILES``) unless
    ``force``; ``resume`` needs one.  Other files in ``out`` are left alone.  Refused in any
    case, before anything is touched: ``out`` of ``/``, a home directory or one of the run's
    ``inputs`` (``{"model": path, "data": path}``), and a symlink on any path the run writes
    (``RUN_FILES``, the manifest, the lock, the entries of ``checkpoints/`` and ``best/``):
    the run never writes, renames or removes through one (``nestedfn.run.safedir``)."""
    if resume and force:
        raise RunError("--resume and --force contradict each other: pick one")
    why = refuse_out(out, inputs)
    if why is not None:
        raise RunError(why)
    links = refuse_links(out, (*RUN_FILES, MANIFEST, LOCK_FILE), (CHECKPOINT_DIR, BEST_DIR))
    if links:
        shown = ", ".join(str(p) for p in links[:5])
        more = f" and {len(links) - 5} more" if len(links) > 5 else ""
        raise RunError(
            f"{shown}{more}: symbolic link(s) where the run writes; a run never writes, renames "
            "or removes through one: move them away and run again"
        )
    if resume:
        if not (out / RUN_CONFIG).is_file():
            raise RunError(f"cannot resume: {out} holds no run ({RUN_CONFIG} missing)")
        return
    if out.exists() and not out.is_dir():
        raise RunError(f"output path {out} exists and is not a directory")
    found = [name for name in (*RUN_FILES, MANIFEST) if (out / name).exists()]
    if found and not force:
        raise RunError(
            f"output directory {out} already holds a run ({', '.join(found)}); pass --resume to "
            "continue it or --force to start over (removes only the run's own files)"
        )


def kept_metrics(path: Path, step: int, warn: Callable[[str], None] | None = None) -> str | None:
    """The text of ``path`` without the records past ``step`` (written after the checkpoint a
    resume starts from) and without a torn last line (a crash mid-write: the start of a JSON
    record, no NUL bytes); ``None`` when there is no such file.  Read before anything is
    written: a garbled line (a zero-filled file included) is a ``RunError`` naming it.  Train
    records missing before ``step`` (a truncated or deleted file) are reported to ``warn``,
    one line."""
    if not path.exists():
        if step > 0 and warn is not None:
            warn(f"{path} is missing: the records of steps 1-{step} are lost")
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text ({e}); fix or remove the file") from None
    keep = []
    train_steps = set()
    for n, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
            if n == len(lines) and line.startswith("{") and "\0" not in line:
                break  # the record being written when the run was killed
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
            raise RunError(f"{path}:{n}: not a metrics record; fix or remove the line")
        if rec["step"] <= step:
            keep.append(line)
            if rec.get("type") == "train":
                train_steps.add(rec["step"])
    lost = [s for s in range(1, step + 1) if s not in train_steps]
    if lost and warn is not None:
        warn(
            f"{path} lacks the records of {len(lost)} step(s) before the checkpoint (steps "
            f"{lost[0]}-{lost[-1]}): it was truncated or edited; continuing without them"
        )
    return "".join(ln + "\n" for ln in keep)
