"""The LoRA trainer: a pure training step in the middle, files and printing at the edge.

The step is pure: ``TrainState(params, opt_state, step)`` and a batch go in, a new
``TrainState`` comes out.  ``params`` is the LoRA tree only; it enters the model through
``nestedfn.tree.update_module`` (``lora.bind``) inside the loss, so the model never holds
state the trainer does not know about.

What it computes is ``mlx_lm lora``'s: mlx-lm's batches in mlx-lm's order
(``nestedfn.lm.batches`` replays its seeded draws), mlx-lm's ``default_loss`` and ``evaluate``
(``nestedfn.lm.loss``), evaluations where mlx-lm makes them (after step 0, before every
``steps_per_eval``-th iteration and before the last), report windows with mlx-lm's fields.
``train(..., training_callback=cb)`` calls ``cb.on_train_loss_report(info)`` and
``cb.on_val_loss_report(info)`` with mlx-lm's fields (``iteration``, ``train_loss``,
``learning_rate``, ``tokens_per_second``, ``trained_tokens``, ``peak_memory``, ...; ``val_loss``,
``val_time``) plus ``tier_updates``, and, where the object has them, ``on_checkpoint(info)``
(``iteration``, ``path``) and ``on_test_loss_report(info)`` (``iteration``, ``test_loss``).

Everything that decides the trajectory is a function of the ``TrainState`` and the config:

* the batch of step ``i + 1`` is ``RunBatches.train(i)`` (the data position *is* ``step``),
* gradient accumulation and the slow tiers' chunk sums live in ``opt_state`` (``accumulate``
  and ``nested`` keep them there),
* LoRA dropout draws from ``mx.random.seed(seed * 1_000_003 + step)`` (mlx-lm continues one
  stream instead: the same distribution, other draws).

So a checkpoint of the ``TrainState`` (plus the best-loss bookkeeping) is all ``--resume``
needs to continue the identical trajectory, bit for bit.

Ctrl-C (``KeyboardInterrupt``) during the loop loses nothing that was done: the loop keeps the
state and bookkeeping of the last *completed* step (its metrics written, its eval done), rank 0
writes a checkpoint of it (unless one is there already) and ``train`` raises ``Interrupted``
(a ``KeyboardInterrupt``) saying how to resume; the CLI exits with status 130 (SIGTERM is
turned into the same interrupt by the CLI, status 143).  The checkpoint named is the one a
resume takes: when the interrupt comes in a save after the checkpoint was complete, that
one.  A step that was cut off half way is simply done again on resume.  With several
processes the handler does no collective (a peer may already have left, and a barrier would wait forever): every
rank stops, rank 0 writes the checkpoint of the last step *it* completed (every completed step
is identical on all ranks), the others write nothing.  Under ``mlx.launch`` a rank blocked in a
collective sees the interrupt only when that collective returns or fails; ``mlx.launch`` may
also terminate rank 0 while it is writing, because another rank already exited non-zero: the
checkpoint is written atomically, so the run then resumes from the one before.

With several processes (``mlx.launch``) each rank reads its slice of the global batch (mlx-lm's
``comm_group`` slicing), the gradients are averaged (token-weighted, where mlx-lm takes the
plain mean over ranks) before the optimizer, and only rank 0 writes files, draws the progress
bar and calls the callback.

Faults (``benchmarks/faults.py`` runs the matrix): rank 0 holds the run directory's lock for
the whole run (``lm.lock``); a resume takes the newest checkpoint whose checksums hold and the
options it recorded (``lm.resume``); every checkpoint records the options, the bookkeeping and
the checksum of ``metrics.jsonl`` so far; ``--force`` goes by the manifest (``lm.manifest``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
import mlx.nn as nn

from nestedfn.fast.compile import compile_step
from nestedfn.lm.adapters import ADAPTER_FILE, check_adapters, save_adapters
from nestedfn.lm.batches import RunBatches, eval_due
from nestedfn.lm.config import RUN_CONFIG, TrainConfig, load_config, save_config
from nestedfn.lm.errors import RunError
from nestedfn.lm.evaluate import test_loss, valid_loss
from nestedfn.lm.lock import RunDirLock
from nestedfn.lm.lora import bind
from nestedfn.lm.loss import Loss, loss_fn, make_grad_fn
from nestedfn.lm.manifest import (
    MANIFEST,
    clean_temporaries,
    config_changed,
    input_fingerprints,
    read_manifest,
    write_manifest,
)
from nestedfn.lm.mlxlm_compat import FACE
from nestedfn.lm.prepare import Prepared, overview, prepare
from nestedfn.lm.report import Reporter
from nestedfn.lm.resume import check_resume, pick_checkpoint, set_damaged_aside, started_config
from nestedfn.lm.rundir import (
    BEST_DIR,
    CHECKPOINT_DIR,
    METRICS_FILE,
    RESUMABLE,
    check_out_dir,
    clear_run,
    kept_metrics,
)
from nestedfn.optim.core import Params, TrainState, apply_gradients
from nestedfn.run import distributed
from nestedfn.run.checkpoint import (
    CheckpointError,
    atomic_write_text,
    file_sha256,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir_name,
    step_of,
)
from nestedfn.run.safedir import SafeDir, open_append
from nestedfn.tiered.cms import _find_nested, tier_stats
from nestedfn.tree import TreeMismatchError, to_flat

__all__ = ["Interrupted", "Summary", "train"]


class Interrupted(KeyboardInterrupt):
    """Training stopped by ``KeyboardInterrupt`` (Ctrl-C) after ``step`` completed steps.

    ``checkpoint`` is the checkpoint of that step (rank 0 wrote it, or it was there already)
    and ``out`` the run, so ``train(..., resume=True)`` continues the identical trajectory;
    ``checkpoint`` is ``None`` when no step completed in a new run (nothing to resume).
    ``resume_hint`` is the command that continues it (the demo's differs)."""

    def __init__(
        self,
        out: Path,
        step: int,
        checkpoint: Path | None,
        resume_hint: str = "nestedfn train --resume {out}",
    ):
        self.out, self.step, self.checkpoint = out, step, checkpoint
        if checkpoint is None:
            msg = (
                f"interrupted before the first step completed: nothing to resume in {out} "
                "(start again with --force)"
            )
        else:
            msg = (
                f"interrupted: {step} steps done, checkpoint {checkpoint}; continue with: "
                + resume_hint.format(out=out)
            )
        super().__init__(msg)


@dataclass
class Summary:
    """What a run did, from its first step (a resumed run included): steps done, first/last
    training loss of this process's part, the evaluations ``(step, loss)``, the final
    ``TrainState`` and the model with the final adapters bound (in eval mode);
    ``resumed_at`` is the step this process started from (``None``: a new run)."""

    out: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    valid_losses: list[tuple[int, float]]
    best_valid: float | None
    tokens_per_sec: float
    stopped_early: bool
    state: TrainState
    model: nn.Module
    test_loss: float | None = None
    resumed_at: int | None = None


def _absolute(config: TrainConfig, out: Path) -> TrainConfig:
    """``config`` with absolute model, data and adapter paths and ``adapter_path`` the run
    directory, so the saved ``config.yaml`` resumes from any working directory."""
    paths = {
        k: os.path.abspath(v)
        for k in ("model", "data", "resume_adapter_file")
        if (v := getattr(config, k)) and (k != "model" or Path(v).exists())
    }
    return replace(config, **paths, adapter_path=str(out))


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_at: int | None = None,
    warn: Callable[[str], None] | None = None,
    training_callback: Any = None,
    resume_hint: str = "nestedfn train --resume {out}",
    accept_changed_inputs: bool = False,
) -> Summary:
    """Train LoRA adapters as ``config`` says, writing the run into ``out``.

    ``resume=True`` reads ``out/config.yaml`` (``overrides`` may change only ``RESUMABLE``
    options: the others would change the trajectory; the file is held against the options
    the checkpoint recorded) and continues from the newest intact checkpoint.  ``stop_at``
    ends this process's run early at that step (as an interrupt would), after writing a
    checkpoint there.  Rank 0 holds an exclusive lock on ``out`` for the whole run
    (``nestedfn.lm.lock``).  User errors raise ``RunError``/``ConfigError`` before anything in
    ``out`` is touched; ``warn`` gets one-line warnings (default: stderr).
    ``training_callback`` gets mlx-lm's reports (module docstring) on rank 0.  A resume refuses
    input files (data, model) that changed since the run started unless
    ``accept_changed_inputs`` (recorded in the manifest; ``lm.resume.check_resume``).
    """
    out = Path(out).absolute()
    warn = warn or _warn
    if stop_at is not None and (isinstance(stop_at, bool) or stop_at < 1):
        raise RunError(f"--stop-at must be a step >= 1, got {stop_at}")
    if resume and force:
        raise RunError("--resume and --force contradict each other: pick one")
    lock = RunDirLock(out).acquire() if distributed.is_main() else None
    started = False
    try:
        run, setup = _start(
            config, out, resume, force, overrides, log, warn, stop_at, accept_changed_inputs
        )
        started = True
        if distributed.is_main():
            setup()
        run.show = progress and run.main
        run.callback, run.resume_hint = training_callback, resume_hint
        return run.loop()
    finally:
        if lock is not None:
            lock.release(keep_dir=started)


def _warn(message: str) -> None:
    print(f"nestedfn: warning: {message}", file=sys.stderr)


def _start(
    config: TrainConfig,
    out: Path,
    resume: bool,
    force: bool,
    overrides: dict[str, Any] | None,
    log: Callable[[str], None],
    warn: Callable[[str], None],
    stop_at: int | None,
    accept_changed_inputs: bool = False,
) -> tuple[_Run, Callable[[], None]]:
    """Everything checked and read before anything is written; returns the run and the
    function that writes the run directory's first files (rank 0 calls it)."""
    check_out_dir(out, resume, force, {"model": config.model, "data": config.data})
    ckpt, damaged = None, []
    if resume:
        config, ckpt, damaged = _resumed_config(out, overrides, warn)
    config = _pinned(config, out)
    inputs, accepted = _checked_inputs(out, config, ckpt, accept_changed_inputs, warn)
    prep = prepare(config)
    batches = RunBatches.for_run(prep.config, prep.train_set, prep.valid_set, prep.test_set)
    if distributed.is_main():
        log(overview(prep))
    state, extra = _load_state(prep, ckpt, stop_at)
    metrics = _kept_records(out, state, extra, warn) if resume else None
    fns = _step_fns(prep)
    _dry_run(prep, batches, state, fns)
    _check_ranks(state)
    run = _Run(prep, fns, batches, state, extra, out, log, stop_at, resumed=resume)
    run.seed_from(metrics)

    def setup() -> None:
        _write_start(out, prep.config, resume, force, damaged, metrics, (inputs, accepted))

    return run, setup


def _resumed_config(
    out: Path, overrides: dict[str, Any] | None, warn: Callable[[str], None]
) -> tuple[TrainConfig, Path, list[Path]]:
    """The options of the run in ``out`` (those its checkpoint recorded), with the
    ``RESUMABLE`` ``overrides``; the checkpoint to resume and the damaged ones to set aside."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    overrides.pop("adapter_path", None)  # names the run, which is `out`
    saved = load_config(out / RUN_CONFIG)
    changed = {k: v for k, v in overrides.items() if getattr(saved, k) != v}
    bad = [k for k in changed if k not in RESUMABLE]
    if bad:

        def names(keys: Any) -> str:
            return ", ".join(FACE.get(k, k) for k in keys)

        raise RunError(
            f"cannot change {names(bad)} when resuming {out} (the run's options are "
            f"in {out / RUN_CONFIG}); only {names(RESUMABLE)} may change"
        )
    ckpt, meta, damaged = pick_checkpoint(out / CHECKPOINT_DIR, warn)
    config = started_config(out / RUN_CONFIG, saved, meta, RESUMABLE, config_changed(out))
    for where in (out, out / BEST_DIR):
        problem = check_adapters(where)
        if problem is not None:
            warn(f"{problem}; it is rewritten at the next save (best/: at the next better eval)")
    if read_manifest(out) is None:
        warn(f"{out / MANIFEST} is missing or damaged; it is written again")
    return replace(config, **changed), ckpt, damaged


def _checked_inputs(
    out: Path,
    config: TrainConfig,
    ckpt: Path | None,
    accept: bool,
    warn: Callable[[str], None],
) -> tuple[dict, list[dict]]:
    """The fingerprints (size, SHA-256) of the run's inputs; a resume holds them against those
    the run recorded (``check_resume``: a changed one is refused unless ``accept``, and an
    accepted change is returned to be recorded)."""
    if ckpt is None:
        return input_fingerprints(config.model, config.data, config.resume_adapter_file), []
    inputs, accepted = check_resume(out, config, step_of(ckpt), accept)
    for change in accepted:
        warn(f"input {change['file']} changed since the run started; accepted (recorded)")
    return inputs, accepted


def _pinned(config: TrainConfig, out: Path) -> TrainConfig:
    """``config`` as the run records it: absolute paths, the cosine horizon pinned (a resume
    with more steps keeps the same schedule), and checked to be recordable."""
    config = _absolute(config, out)
    if config.schedule == "cosine" and config.decay_steps is None:
        config = replace(config, decay_steps=max(config.steps // config.grad_accumulation, 1))
    try:
        json.dumps(config.to_dict(), allow_nan=False)  # every checkpoint records it
    except (TypeError, ValueError) as e:
        raise RunError(f"the options cannot be recorded in a checkpoint ({e})") from None
    return config


def _load_state(
    prep: Prepared, ckpt: Path | None, stop_at: int | None
) -> tuple[TrainState, dict[str, Any]]:
    """The start: the prepared state, or the checkpoint's state and bookkeeping."""
    state, extra = prep.state, {"best_loss": None, "best_step": None, "bad_evals": 0}
    if ckpt is None:
        return state, extra
    try:
        state, saved_extra = load_checkpoint(ckpt, like=state)
    except CheckpointError as e:
        raise RunError(f"cannot resume: {e}") from None
    except TreeMismatchError as e:
        msg = " ".join(str(e).split())
        raise RunError(f"cannot resume: {msg}; the model or LoRA options differ") from None
    extra.update({k: v for k, v in saved_extra.items() if k != "config"})
    if stop_at is not None and stop_at <= int(state.step):
        raise RunError(f"--stop-at {stop_at} is not past the checkpoint's step {int(state.step)}")
    return state, extra


def _kept_records(out: Path, state: TrainState, extra: dict, warn: Callable[[str], None]) -> Any:
    """The metrics a resume keeps (those up to the checkpoint's step), held against the
    checksum the checkpoint recorded."""
    step = int(state.step)
    recorded = extra.get("metrics_sha256")
    metrics = kept_metrics(out / METRICS_FILE, step, warn if recorded is None else None)
    if metrics is None and recorded is not None:
        warn(f"{out / METRICS_FILE} is missing: the records up to step {step} are lost")
    elif recorded is not None and hashlib.sha256(metrics.encode()).hexdigest() != recorded:
        raise RunError(
            f"{out / METRICS_FILE} differs from what the run wrote up to step {step} (damaged "
            "or edited); restore it, or move it away to continue without its records"
        )
    return metrics


def _check_ranks(state: TrainState) -> None:
    """Every rank has checked and read ``out`` before rank 0 writes into it (no rank may see a
    half-written run), and all ranks start from a bit-identical state (with --resume across
    machines each reads its own copy of the run)."""
    distributed.barrier()
    try:
        distributed.check_identical(
            {"params": state.params, "opt_state": state.opt_state, "step": state.step},
            what="the training state at the start",
        )
    except distributed.DivergenceError as e:
        raise RunError(
            f"{e}; every process must start from the same model, options and seed (and, with "
            "--resume, the same checkpoint)"
        ) from None


def _check_writable(out: Path) -> None:
    """Every directory of ``out`` that the run writes or empties (``out``, ``checkpoints/``,
    ``best/``, each checkpoint that pruning or ``--force`` removes) takes a new entry, or an
    ``OSError`` names it now (exit 74): a read-only ``checkpoints/`` found at the first save
    would cost every step done before it.  A directory not made yet is made later, in one
    that passed."""
    if not out.is_dir():
        return
    with SafeDir.open(out) as d:
        d.check_writable()
        for name in (CHECKPOINT_DIR, BEST_DIR):
            if d.kind(name) != "dir":
                continue
            with d.sub(name) as sub:
                sub.check_writable()
                for entry in sub.listdir():
                    if sub.kind(entry) == "dir":
                        with sub.sub(entry) as step:
                            step.check_writable()


def _write_start(
    out: Path,
    config: TrainConfig,
    resume: bool,
    force: bool,
    damaged: list[Path],
    metrics: str | None,
    fingerprints: tuple[dict, list[dict]],
) -> None:
    """The run directory's first files, all atomic: an interrupted resume leaves the old files
    (and a manifest that accepts the old config.yaml or says it was being rewritten)."""
    _check_writable(out)
    if resume:
        clean_temporaries(out)
        set_damaged_aside(damaged)
        write_manifest(out, [file_sha256(out / RUN_CONFIG)], rewriting=True)
    else:
        if force:
            clear_run(out)
        else:
            clean_temporaries(out)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, [], rewriting=True)
    save_config(config, out)
    inputs, accepted = fingerprints
    write_manifest(out, [file_sha256(out / RUN_CONFIG)], inputs=inputs, accepted=accepted)
    if metrics is not None:
        atomic_write_text(out / METRICS_FILE, metrics)


@dataclass
class _StepFns:
    grad: Callable[..., tuple[mx.array, mx.array, Params]]
    step: Callable[[TrainState, Params], TrainState]
    loss: Loss


def _step_fns(prep: Prepared) -> _StepFns:
    c = prep.config
    step = compile_step(prep.opt) if c.compile else lambda s, g: apply_gradients(prep.opt, s, g)
    loss = loss_fn(c.pad_target)
    return _StepFns(make_grad_fn(prep.model, prep.params, c.compile, loss), step, loss)


def _dry_run(prep: Prepared, batches: RunBatches, state: TrainState, fns: _StepFns) -> None:
    """The run's first training step (loss, gradients, optimizer update) on this rank's part of
    its first batch, the result thrown away: whatever the model, data and options first fail
    on fails here, before anything in the run directory is touched (and the graphs it traces
    are the ones the loop reuses).  No collective: it is local to each rank."""
    c = prep.config
    try:
        loss, _, grads = fns.grad(state.params, *batches.train(min(int(state.step), c.steps - 1)))
        new = fns.step(state, grads)
        mx.eval(loss, new.params, new.opt_state)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        hint = ""
        if c.compile and "function transformations" in str(e):
            hint = "; the model's forward cannot run compiled: pass --no-compile"
        message = " ".join(str(e).split())
        raise RunError(
            f"the first training step fails ({type(e).__name__}: {message}){hint}; nothing was "
            "written"
        ) from None
    if not math.isfinite(float(loss.item())):
        raise RunError(
            f"the first training step gives a loss of {float(loss.item())}: the model's weights "
            "or the data hold NaN/Inf; nothing was written"
        )
    for path, x in to_flat(new.params).items():
        if not bool(mx.all(mx.isfinite(x)).item()):
            raise RunError(
                f"the first training step makes {path} non-finite (learning_rate "
                f"{c.learning_rate:g} too large?); nothing was written"
            )


def _finite(record: dict) -> dict:
    """``record`` with non-finite floats as ``null`` (``metrics.jsonl`` stays JSON)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def _last_ckpt(out: Path) -> str:
    """What is true of the run's checkpoints, for a message that stops the run."""
    ckpt = latest_checkpoint(out / CHECKPOINT_DIR)
    if ckpt is None:
        return f"no checkpoint was written in {out} (none was due yet)"
    return f"the last checkpoint is {ckpt}"


@contextlib.contextmanager
def _signals_held() -> Any:
    """SIGINT and SIGTERM ignored while the interrupt's checkpoint is written: Ctrl-C often
    arrives twice (a terminal's process group and a launcher forwarding it, or a second press),
    and a second interrupt inside the save would leave the run with no checkpoint of the steps
    it completed.  The handlers in force before are restored after (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


class _Metrics:
    """``metrics.jsonl``, appended one JSON record per line (rank 0 only: elsewhere a sink),
    with the SHA-256 of the whole file so far (recorded with every checkpoint)."""

    def __init__(self, path: Path, main: bool):
        self.file: TextIO | None = open_append(path) if main else None  # never through a symlink
        self.sha = hashlib.sha256(path.read_bytes() if main else b"")

    def write(self, record: dict) -> str:
        """Append ``record``; return the file's new checksum."""
        if self.file is not None:
            line = json.dumps(_finite(record), allow_nan=False) + "\n"
            self.file.write(line)
            self.sha.update(line.encode())
            self.file.flush()
        return self.sha.hexdigest()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class _Run:
    """One process's run, from the first step to the summary: the loop, one step, the
    evaluation, the reports, the saves and the interrupt, each a method."""

    prep: Prepared
    fns: _StepFns
    batches: RunBatches
    state: TrainState
    extra: dict
    out: Path
    log: Callable[[str], None]
    stop_at: int | None
    resumed: bool
    show: bool = False
    callback: Any = None
    resume_hint: str = ""
    main: bool = field(default_factory=distributed.is_main)
    first: float | None = None
    last: float | None = None
    valid: list[tuple[int, float]] = field(default_factory=list)
    stopped: bool = False
    tokens: float = 0.0
    seconds: float = 0.0
    tiered: bool = False  # whether the state holds tiers (set by loop(): fixed for a run)
    test: float | None = None
    resumed_at: int | None = None
    # set by loop(): the metrics file, the reporter, the last completed step and bookkeeping
    metrics: Any = None
    bar: Any = None
    done: Any = None
    done_extra: dict = field(default_factory=dict)
    nothing_done: bool = True
    started: float = 0.0

    def seed_from(self, metrics: str | None) -> None:
        """A resumed run's summary covers the whole run: its kept records come first."""
        if not self.resumed:
            return
        self.resumed_at = int(self.state.step)
        for line in (metrics or "").splitlines():
            rec = json.loads(line)
            if rec.get("type") == "train" and rec.get("loss") is not None:
                self.first = rec["loss"] if self.first is None else self.first
                self.last = rec["loss"]
                self.tokens += rec.get("tokens") or 0.0
                self.seconds += rec.get("time") or 0.0
            elif rec.get("type") == "eval" and rec.get("valid_loss") is not None:
                self.valid.append((rec["step"], rec["valid_loss"]))

    @property
    def config(self) -> TrainConfig:
        return self.prep.config

    def loop(self) -> Summary:
        c = self.config
        self.metrics = _Metrics(self.out / METRICS_FILE, self.main)
        self.tiered = _find_nested(self.state.opt_state) is not None
        self.bar = Reporter(
            c.steps, int(self.state.step), c.steps_per_report, self.show, self.log,
            trained_tokens=self.tokens,
        )  # fmt: skip
        end = c.steps if self.stop_at is None else min(self.stop_at, c.steps)
        # The last completed step (state and bookkeeping): what an interrupt saves, unless a
        # checkpoint of it (or of a later step whose save was cut off after the checkpoint)
        # is on disk already.
        self.done, self.done_extra, self.nothing_done = self.state, dict(self.extra), True
        self.started = time.perf_counter()
        try:
            try:
                self.steps(end)
            except (KeyboardInterrupt, RuntimeError) as exc:
                # a collective that failed because a peer left (its Ctrl-C came first) is this
                # rank's interrupt too
                if isinstance(exc, RuntimeError) and not distributed.peer_lost(exc):
                    raise
                self.interrupted()
        except KeyboardInterrupt as late:
            if isinstance(late, Interrupted):
                raise
            # This rank's own Ctrl-C, pending while it was blocked in a collective that then
            # failed (a peer had left): Python runs the handler at its next check, which can
            # fall in the handler above, before the save -- the save is done here instead.
            self.interrupted()
        finally:
            self.bar.close()
            self.metrics.close()
        return self.summary()

    def steps(self, end: int) -> None:
        """The steps up to ``end`` (each one's eval and checkpoint when due), then the last
        save and the test loss; each completed step is marked done (what an interrupt saves)."""
        c = self.config
        if self.resumed:
            self.nothing_done = False
        elif self.evaluate_if_due(0):
            self.mark_done()
        while int(self.state.step) < end and not self.stopped:
            self.one_step()
            step = int(self.state.step)
            self.evaluate_if_due(step)
            if c.save_every and step % c.save_every == 0 and step != end:
                self.save(self.state, self.extra)
            self.mark_done()
        self.finish()

    def mark_done(self) -> None:
        self.done, self.done_extra, self.nothing_done = self.state, dict(self.extra), False

    def write(self, record: dict) -> None:
        self.extra["metrics_sha256"] = self.metrics.write(record)

    def report(self, method: str, info: dict) -> None:
        """``training_callback.method(info)`` on rank 0, where the callback has it."""
        fn = getattr(self.callback, method, None)
        if fn is not None and self.main:
            fn(info)

    def one_step(self) -> None:
        """Step ``i + 1``: its batch, loss and gradients (averaged over processes, token
        weighted), the optimizer update, its record and report."""
        c, i = self.config, int(self.state.step)
        world = distributed.world_size()
        tic = time.perf_counter()
        batch = self.batches.train(i)
        mx.random.seed(c.seed * 1_000_003 + i)
        loss, ntoks, grads = self.fns.grad(self.state.params, *batch)
        if world > 1:
            grads = distributed.average_gradients(grads, weight=ntoks)
            loss, ntoks = distributed.all_sum([loss * ntoks, ntoks])
            loss = loss / ntoks
        self.state = self.fns.step(self.state, grads)
        mx.eval(self.state.params, self.state.opt_state, loss, ntoks)
        dt = time.perf_counter() - tic
        loss_f, tokens = float(loss.item()), float(ntoks.item())
        if not math.isfinite(loss_f):
            raise RunError(
                f"the training loss became {loss_f} at step {i + 1}; lower the learning "
                f"rate or set grad_clip; {_last_ckpt(self.out)}"
            )
        self.first = loss_f if self.first is None else self.first
        self.last = loss_f
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + dt
        self.record_step(i, loss_f, tokens, dt)
        if c.clear_cache_threshold and mx.get_cache_memory() > c.clear_cache_threshold:
            mx.clear_cache()

    def record_step(self, i: int, loss: float, tokens: float, dt: float) -> None:
        step, c = i + 1, self.config
        tiers = [t.updates for t in tier_stats(self.state.opt_state)] if self.tiered else None
        lr = float(self.prep.schedule(i // c.grad_accumulation))
        peak = mx.get_peak_memory() / 1e9
        record = {"type": "train", "step": step, "loss": loss, "lr": lr, "tokens": tokens}
        elapsed = time.perf_counter() - self.started
        record.update(tier_updates=tiers, time=dt, elapsed=elapsed, peak_memory_gb=peak)
        self.write(record)
        info = self.bar.step(step, loss, lr, tokens, dt, peak, tiers)
        if info is not None:
            self.report("on_train_loss_report", info)

    def evaluate_if_due(self, done: int) -> bool:
        """mlx-lm's evaluation after ``done`` steps, where it makes one; the best adapters and
        early stopping follow it."""
        c = self.config
        if not eval_due(done, c.steps, c.eval_every):
            return False
        tic = time.perf_counter()
        loss = valid_loss(self.prep.model, self.state.params, self.batches, done, c, self.fns.loss)
        if not math.isfinite(loss):
            self.write({"type": "eval", "step": done, "valid_loss": None, "nonfinite": str(loss)})
            raise RunError(
                f"the validation loss became {loss} at step {done}; {_last_ckpt(self.out)}"
            )
        self.valid.append((done, loss))
        self.write({"type": "eval", "step": done, "valid_loss": loss})
        self.track_best(done, loss)
        self.bar.message(f"step {done}: valid loss {loss:.4f}")
        info = {"iteration": done, "val_loss": loss, "val_time": time.perf_counter() - tic}
        self.report("on_val_loss_report", {**info, "best_val_loss": self.extra["best_loss"]})
        return True

    def track_best(self, done: int, loss: float) -> None:
        c, best = self.config, self.extra["best_loss"]
        if best is None or loss < best:
            self.extra.update(best_loss=loss, best_step=done, bad_evals=0)
            if self.main:
                info = {"optimizer": c.optimizer, "step": done, "valid_loss": loss}
                blocks = len(self.prep.model.layers)
                save_adapters(self.out / BEST_DIR, self.state.params, self.prep.spec, blocks, info)
        else:
            self.extra["bad_evals"] += 1
            if c.early_stopping and self.extra["bad_evals"] >= c.early_stopping:
                self.stopped = True

    def save(self, state: TrainState, extra: dict) -> None:
        """A checkpoint of ``state`` and the adapters (rank 0)."""
        if not self.main:
            return
        c, step = self.config, int(state.step)
        record = {**extra, "config": c.to_dict()}  # what a resume is held against
        path = save_checkpoint(self.out / CHECKPOINT_DIR, state, record, step)
        prune_checkpoints(self.out / CHECKPOINT_DIR, c.keep_last)
        info = {"optimizer": c.optimizer, "step": step}
        save_adapters(self.out, state.params, self.prep.spec, len(self.prep.model.layers), info)
        self.report("on_checkpoint", {"iteration": step, "path": path})

    def finish(self) -> None:
        """The last save, then the test loss (a run that reached its end or stopped early)."""
        c = self.config
        self.save(self.state, self.extra)
        if c.test and (int(self.state.step) == c.steps or self.stopped):
            model, params = self.prep.model, self.state.params
            self.test = test_loss(model, params, self.batches, c, self.fns.loss)
            step = int(self.state.step)
            self.write({"type": "test", "step": step, "test_loss": self.test})
            self.report("on_test_loss_report", {"iteration": step, "test_loss": self.test})

    def interrupted(self) -> None:
        """Save the last completed step (rank 0, no collective: see the module docstring) and
        raise ``Interrupted`` naming the checkpoint a resume takes.  This rank's own Ctrl-C may
        still be pending after a peer's and strike before the signals are held: the save is
        then tried again under the guard (which drops a pending one)."""
        step, ckpt = int(self.done.step), None
        for _ in range(3):
            try:
                with _signals_held():
                    step, ckpt = self.interrupt_save()
                break
            except KeyboardInterrupt:
                continue
        raise Interrupted(self.out, step, ckpt, self.resume_hint) from None

    def interrupt_save(self) -> tuple[int, Path | None]:
        """The step and checkpoint an interrupt leaves (rank 0 writes it unless it is there)."""
        step = int(self.done.step)
        newest = latest_checkpoint(self.out / CHECKPOINT_DIR)
        on_disk = None if newest is None else step_of(newest)
        if on_disk is not None and on_disk >= step:
            # the step was saved (the interrupt came in the save, after the checkpoint): that
            # is the checkpoint a resume takes
            step = on_disk
            ckpt: Path | None = self.out / CHECKPOINT_DIR / step_dir_name(step)
        elif self.nothing_done:
            ckpt = None  # a new run started again does exactly what this one would have
        else:
            ckpt = self.out / CHECKPOINT_DIR / step_dir_name(step)
            if self.main:
                self.bar.close()
                self.save(self.done, self.done_extra)
        return step, ckpt

    def summary(self) -> Summary:
        if self.main:
            out = self.out
            self.log(
                f"wrote the run to {out}: adapters {out / ADAPTER_FILE} (mlx-lm format), best "
                f"adapters in {out / BEST_DIR}, checkpoints in {out / CHECKPOINT_DIR}, metrics "
                f"{out / METRICS_FILE}"
            )
        return Summary(
            out=self.out,
            steps=int(self.state.step),
            first_loss=self.first,
            last_loss=self.last,
            valid_losses=self.valid,
            best_valid=self.extra["best_loss"],
            tokens_per_sec=self.tokens / self.seconds if self.seconds else 0.0,
            stopped_early=self.stopped,
            state=self.state,
            model=bind(self.prep.model, self.state.params).train(False),
            test_loss=self.test,
            resumed_at=self.resumed_at,
        )
