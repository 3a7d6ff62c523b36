"""The run directory: what a run writes into it, and the checks before anything is written.

A run directory holds ``config.yaml`` (the resolved options), ``metrics.jsonl``, the adapters
(``adapters.safetensors``, ``adapter_config.json``), ``best/`` and ``checkpoints/``
(``RUN_FILES``: what ``--force`` removes, and nothing else).  ``check_out_dir`` refuses a
directory holding another run unless told; ``kept_metrics`` is the metrics file trimmed to the
checkpoint a resume starts from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE
from nestedfn.lm.config import RUN_CONFIG
from nestedfn.lm.errors import RunError

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


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to start a run in a directory that holds one (any of ``RUN_FILES``) unless
    ``force``; ``resume`` needs one.  Other files in ``out`` are left alone."""
    if resume and force:
        raise RunError("--resume and --force contradict each other: pick one")
    if resume:
        if not (out / RUN_CONFIG).is_file():
            raise RunError(f"cannot resume: {out} holds no run ({RUN_CONFIG} missing)")
        return
    if out.exists() and not out.is_dir():
        raise RunError(f"output path {out} exists and is not a directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not force:
        raise RunError(
            f"output directory {out} already holds a run ({', '.join(found)}); pass --resume to "
            "continue it or --force to start over (removes only the run's own files)"
        )


def clear_run(out: Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def kept_metrics(path: Path, step: int) -> str | None:
    """The text of ``path`` without the records past ``step`` (written after the checkpoint a
    resume starts from) and without a torn last line (a crash mid-write); ``None`` when there is
    no such file.  Read before anything is written: a garbled line is a ``RunError``."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for n, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
            if n == len(lines):
                break  # the record being written when the run was killed
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
            raise RunError(f"{path}:{n}: not a metrics record; fix or remove the line")
        if rec["step"] <= step:
            keep.append(line)
    return "".join(ln + "\n" for ln in keep)
