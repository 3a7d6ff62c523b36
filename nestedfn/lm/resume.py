"""What ``--resume`` starts from, checked: an intact checkpoint and the options the run began with.

``pick_checkpoint`` verifies the checkpoints newest first (``verify_checkpoint``: the
checksums in ``meta.json``) and takes the newest intact one; each damaged one on the way is
one warning line naming the file, and with none intact the ``RunError`` names every damaged
file.  (A ``step_########`` directory is only ever made by renaming a complete one, so a
directory without ``meta.json`` is damage too.)

Every checkpoint records the options the run was started with (``extra["config"]``).
``started_config`` holds ``config.yaml`` against them: an option missing from the file (a
truncated or edited file) or changed, other than the ``RESUMABLE`` ones, is a ``RunError``
naming it; otherwise the run continues with the recorded options and the file's
``RESUMABLE`` ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from nestedfn.lm.config import ConfigError, TrainConfig, parse_yaml
from nestedfn.lm.errors import RunError
from nestedfn.run.checkpoint import CheckpointError, verify_checkpoint

__all__ = ["check_resume", "pick_checkpoint", "set_damaged_aside", "started_config"]

_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def _step_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def pick_checkpoint(directory: Path, warn: Callable[[str], None]) -> tuple[Path, dict, list[Path]]:
    """``(checkpoint, its meta, the damaged newer ones)``: the newest intact checkpoint."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(_step_dirs(directory)):
        try:
            meta = verify_checkpoint(path)
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged:
            warn(f"checkpoint {bad} is damaged ({why}); resuming from {path} instead")
        return path, meta, [p for p, _ in damaged]
    if damaged:
        raise RunError(
            f"cannot resume: no intact checkpoint in {directory}: "
            + "; ".join(why for _, why in damaged)
        )
    raise RunError(f"cannot resume: no checkpoint in {directory}")


def set_damaged_aside(damaged: list[Path]) -> None:
    """Rename damaged checkpoints ``damaged-step_...`` (kept for a look, never read again)."""
    from nestedfn.run.safedir import SafeDir

    for p in damaged:
        with SafeDir.open(p.parent, follow=False) as d:
            target, n = f"damaged-{p.name}", 1
            while d.kind(target) is not None:
                target, n = f"damaged-{p.name}.{n}", n + 1
            d.rename(p.name, target)


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))


def started_config(
    config_file: Path, saved: TrainConfig, meta: dict, resumable: tuple, edited: bool | None
) -> TrainConfig:
    """The options to resume with: ``meta``'s recorded ones, checked against ``config_file``
    (read as ``saved``), with the file's ``resumable`` options.  ``edited``: the file differs
    from what the run wrote (``manifest.config_changed``); then its ``resumable`` options
    must equal the recorded ones too (they change by flags, never behind the run's back).
    Checkpoints of a version that recorded none give ``saved``."""
    started = meta.get("extra", {}).get("config")
    if not isinstance(started, dict):
        return saved
    try:
        raw = parse_yaml(config_file.read_text(encoding="utf-8"))
    except Exception as e:  # load_config read it a moment ago; anything now is damage
        raise RunError(f"{config_file}: unreadable ({e})") from None
    from nestedfn.lm.mlxlm_compat import FACE, NormalizeError, normalize, to_face

    raw = raw if isinstance(raw, dict) else {}
    names = [f.name for f in fields(TrainConfig)]
    try:  # the file's keys as TrainConfig fields (it may use mlx-lm's names)
        present = set(normalize(raw, str(config_file)))
        expected = set(normalize(to_face(started), "the checkpoint"))
    except NormalizeError as e:
        raise RunError(str(e)) from None
    missing = [FACE.get(n, n) for n in names if n in expected and n not in present]
    if missing:
        raise RunError(
            f"{config_file} lacks option(s) {', '.join(missing)} that the run was started with "
            "(a truncated or edited file); restore it (the checkpoints record the options)"
        )
    current = _norm(saved.to_dict())
    held = [n for n in names if n in started and (edited or n not in resumable)]
    changed = [n for n in held if current[n] != started[n]]
    if changed:
        n = changed[0]
        raise RunError(
            f"{config_file}: {FACE.get(n, n)} is {current[n]!r} but the run was started with "
            f"{started[n]!r}"
            + (f" (also changed: {', '.join(changed[1:])})" if changed[1:] else "")
            + f"; only {', '.join(resumable)} may change on resume, by their flags"
        )
    values = {n: started[n] for n in names if n in started}
    values.update({n: getattr(saved, n) for n in resumable})
    try:
        return TrainConfig(**values)
    except (ConfigError, TypeError) as e:
        raise RunError(f"the options recorded in the checkpoint are unreadable ({e})") from None


def check_resume(
    out: Path, config: TrainConfig, step: int, accept_changed_inputs: bool
) -> tuple[dict, list[dict]]:
    """Before a resume touches anything: ``steps`` must not be below the checkpoint's
    ``step`` (the run would stop at once and its ``config.yaml`` say fewer steps than it
    did), and the inputs must be those the run recorded (``manifest.input_fingerprints``):
    a changed, missing or new input file is a ``RunError`` naming it, unless
    ``accept_changed_inputs``.  Returns the current fingerprints and the accepted changes
    (to record); a run that recorded none (an older version) gets them recorded now."""
    from nestedfn.lm.manifest import input_fingerprints, read_manifest

    if config.steps < step:
        raise RunError(
            f"steps (--iters/--steps) {config.steps} is below the step {step} the run's "
            f"checkpoint is at: {out} has done {step} steps; pass a larger value to continue it"
        )
    current = input_fingerprints(config.model, config.data, config.resume_adapter_file)
    recorded = (read_manifest(out) or {}).get("inputs")
    if not isinstance(recorded, dict):
        return current, []
    changes = []
    for path in sorted(set(recorded) | set(current)):
        old, new = recorded.get(path), current.get(path)
        if old != new:
            changes.append({"file": path, "step": step, "was": old, "now": new})
    if changes and not accept_changed_inputs:
        c = changes[0]
        if c["now"] is None:
            why = "is missing"
        elif c["was"] is None:
            why = "is new"
        elif c["was"]["bytes"] != c["now"]["bytes"]:
            why = f"changed ({c['was']['bytes']} -> {c['now']['bytes']} bytes)"
        else:
            why = "changed (same size, other content)"
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise RunError(
            f"cannot resume: input {c['file']} {why} since the run started{more}; the run would "
            "not continue the same trajectory. Restore it, or pass --accept-changed-inputs "
            "(the change is recorded in the run)"
        )
    return current, changes
