"""The LoRA trainer: a pure training step in the middle, files and printing at the edge.

The step is pure: ``TrainState(params, opt_state, step)`` and a batch go in, a new
``TrainState`` comes out.  ``params`` is the LoRA tree only; it enters the model through
``nestedfn.tree.update_module`` (``lora.bind``) inside the loss, so the model never holds
state the trainer does not know about.  The loss is mlx-lm's: the mean cross entropy over the
target tokens the mask selects (``Σ mask·CE / Σ mask``).

Everything that decides the trajectory is a function of the ``TrainState`` and the config:

* the batch of micro-step ``i`` is ``data.batch_at(train, i, ...)`` (the data position *is*
  ``step``),
* gradient accumulation and the slow tiers' chunk sums live in ``opt_state`` (``accumulate``
  and ``nested`` keep them there),
* LoRA dropout draws from ``mx.random.seed(hash(seed, step))``.

So a checkpoint of the ``TrainState`` (plus the best-loss bookkeeping) is all ``--resume``
needs to continue the identical trajectory, bit for bit.

Ctrl-C (``KeyboardInterrupt``) during the loop loses nothing that was done: the loop keeps the
state and bookkeeping of the last *completed* step (its metrics written, its eval done), rank 0
writes a checkpoint of it (unless one is there already) and ``train`` raises ``Interrupted``
(a ``KeyboardInterrupt``) saying how to resume; the CLI exits with status 130 (SIGTERM is
turned into the same interrupt by the CLI, status 143).  The checkpoint named is the one a
resume takes: when the interrupt comes in a save after the checkpoint was complete, that one.  A step that
was cut off half way is simply done again on resume.  With several processes the handler
does no collective (a peer may already have left, and a barrier would wait forever): every
rank stops, rank 0 writes the checkpoint of the last step *it* completed (every completed step
is identical on all ranks), the others write nothing.  Under ``mlx.launch`` a rank blocked in a
collective sees the interrupt only when that collective returns or fails; ``mlx.launch`` may
also terminate rank 0 while it is writing, because another rank already exited non-zero: the
checkpoint is written atomically, so the run then resumes from the one before.

With several processes (``mlx.launch``) each rank reads its slice of the global batch, the
gradients are averaged (token-weighted) before the optimizer, and only rank 0 writes files or
draws the progress bar.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from nestedfn.lm.adapters import ADAPTER_FILE, check_adapters, save_adapters
from nestedfn.lm.config import RUN_CONFIG, TrainConfig, load_config, save_config
from nestedfn.lm.errors import RunError
from nestedfn.lm.evaluate import evaluate
from nestedfn.lm.lock import RunDirLock
from nestedfn.lm.lora import bind
from nestedfn.lm.loss import make_eval_fn, make_grad_fn
from nestedfn.lm.manifest import (
    MANIFEST,
    clean_temporaries,
    config_changed,
    read_manifest,
    write_manifest,
)
from nestedfn.lm.prepare import Prepared, overview, prepare
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
from nestedfn.run.checkpoint import atomic_write_text, file_sha256
from nestedfn.run.safedir import open_append

__all__ = ["Interrupted", "Summary", "train"]


class Interrupted(KeyboardInterrupt):
    """Training stopped by ``KeyboardInterrupt`` (Ctrl-C) after ``step`` completed steps.

    ``checkpoint`` is the checkpoint of that step (rank 0 wrote it, or it was there already)
    and ``out`` the run, so ``train(..., resume=True)`` continues the identical trajectory;
    ``checkpoint`` is ``None`` when no step completed in a new run (nothing to resume)."""

    def __init__(self, out: Path, step: int, checkpoint: Path | None):
        self.out, self.step, self.checkpoint = out, step, checkpoint
        if checkpoint is None:
            msg = (
                f"interrupted before the first step completed: nothing to resume in {out} "
                "(start again with --force)"
            )
        else:
            msg = (
                f"interrupted: {step} steps done, checkpoint {checkpoint}; continue with: "
                f"nestedfn train --resume {out}"
            )
        super().__init__(msg)


@dataclass
class Summary:
    """What a run did: steps done, first/last training loss of this process's part, evals,
    the final ``TrainState`` and the model with the final adapters bound (in eval mode)."""

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


def _tier_updates(opt_state: Any) -> list[int] | None:
    from nestedfn.tiered.cms import _find_nested, tier_stats

    if _find_nested(opt_state) is None:
        return None
    return [t.updates for t in tier_stats(opt_state)]


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
    accept_changed_inputs: bool = False,
) -> Summary:
    """Train LoRA adapters as ``config`` says, writing the run into ``out``.

    ``resume=True`` reads ``out/config.yaml`` (``overrides`` may change only ``RESUMABLE``
    options: the others would change the trajectory; the file is held against the options
    the checkpoint recorded) and continues from the newest intact checkpoint.  ``stop_at``
    ends this process's run early at that step (as an interrupt would), after writing a
    checkpoint there.  Rank 0 holds an exclusive lock on ``out`` for the whole run
    (``nestedfn.lm.lock``).  User errors raise ``RunError``/``ConfigError`` before anything in
    ``out`` is touched; ``warn`` gets one-line warnings (default: stderr).  A resume refuses
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
        prep, fns, state, extra, setup = _start(
            config, out, resume, force, overrides, log, warn, stop_at, accept_changed_inputs
        )
        started = True
        if distributed.is_main():
            setup()
        return _loop(
            prep, fns, state, extra, out, progress and distributed.is_main(), log, resume, stop_at
        )
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
) -> tuple[Prepared, _StepFns, TrainState, dict, Callable[[], None]]:
    """Everything checked and read before anything is written; returns the run's start and
    the function that writes the run directory's first files (rank 0 calls it)."""
    from nestedfn.lm.manifest import input_fingerprints
    from nestedfn.lm.resume import check_resume, pick_checkpoint, set_damaged_aside, started_config
    from nestedfn.run.checkpoint import CheckpointError, load_checkpoint
    from nestedfn.tree import TreeMismatchError

    check_out_dir(out, resume, force, {"model": config.model, "data": config.data})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    overrides.pop("adapter_path", None)  # names the run, which is `out`
    ckpt, damaged = None, []
    if resume:
        saved = load_config(out / RUN_CONFIG)
        changed = {k: v for k, v in overrides.items() if getattr(saved, k) != v}
        bad = [k for k in changed if k not in RESUMABLE]
        if bad:
            from nestedfn.lm.mlxlm_compat import FACE

            def names(keys: Any) -> str:
                return ", ".join(FACE.get(k, k) for k in keys)

            raise RunError(
                f"cannot change {names(bad)} when resuming {out} (the run's options are "
                f"in {out / RUN_CONFIG}); only {names(RESUMABLE)} may change"
            )
        ckpt, meta, damaged = pick_checkpoint(out / CHECKPOINT_DIR, warn)
        edited = config_changed(out)
        config = started_config(out / RUN_CONFIG, saved, meta, RESUMABLE, edited)
        config = replace(config, **changed)
        inputs, accepted = check_resume(out, config, int(meta["step"]), accept_changed_inputs)
        for c in accepted:
            warn(f"input {c['file']} changed since the run started; accepted (recorded)")
        for where in (out, out / BEST_DIR):
            problem = check_adapters(where)
            if problem is not None:
                warn(
                    f"{problem}; it is rewritten at the next save (best/: at the next better eval)"
                )
        if read_manifest(out) is None:
            warn(f"{out / MANIFEST} is missing or damaged; it is written again")
    config = _absolute(config, out)
    if not resume:
        inputs = input_fingerprints(config.model, config.data, config.resume_adapter_file)
        accepted: list[dict] = []
    if config.schedule == "cosine" and config.decay_steps is None:
        # pin the horizon so that a resume with more steps keeps the same schedule
        config = replace(config, decay_steps=max(config.steps // config.grad_accumulation, 1))
    try:
        json.dumps(config.to_dict(), allow_nan=False)  # every checkpoint records it
    except (TypeError, ValueError) as e:
        raise RunError(f"the options cannot be recorded in a checkpoint ({e})") from None
    prep = prepare(config)
    if distributed.is_main():
        log(overview(prep))
    state, extra = prep.state, {"best_loss": None, "best_step": None, "bad_evals": 0}
    if ckpt is not None:
        try:
            state, saved_extra = load_checkpoint(ckpt, like=state)
        except CheckpointError as e:
            raise RunError(f"cannot resume: {e}") from None
        except TreeMismatchError as e:
            msg = " ".join(str(e).split())
            raise RunError(f"cannot resume: {msg}; the model or LoRA options differ") from None
        extra.update({k: v for k, v in saved_extra.items() if k != "config"})
        if stop_at is not None and stop_at <= int(state.step):
            raise RunError(
                f"--stop-at {stop_at} is not past the checkpoint's step {int(state.step)}"
            )
    metrics = None
    if resume:
        recorded = extra.get("metrics_sha256")
        metrics = kept_metrics(
            out / METRICS_FILE, int(state.step), warn if recorded is None else None
        )
        if metrics is None and recorded is not None:
            warn(
                f"{out / METRICS_FILE} is missing: the records up to step {int(state.step)} are lost"
            )
        elif recorded is not None and hashlib.sha256(metrics.encode()).hexdigest() != recorded:
            raise RunError(
                f"{out / METRICS_FILE} differs from what the run wrote up to step "
                f"{int(state.step)} (damaged or edited); restore it, or move it away to continue "
                "without its records"
            )
    fns = _step_fns(prep)
    _dry_run(prep, state, fns)
    # Every rank has checked and read `out` before rank 0 writes into it (no rank may see a
    # half-written run), and all ranks start from a bit-identical state (parameters and
    # optimizer state: with --resume across machines each reads its own copy of the run).
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

    def setup() -> None:
        # all atomic: an interrupted resume leaves the old files (and a manifest that accepts
        # the old config.yaml or says it was being rewritten)
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
        write_manifest(out, [file_sha256(out / RUN_CONFIG)], inputs=inputs, accepted=accepted)
        if metrics is not None:
            atomic_write_text(out / METRICS_FILE, metrics)

    return prep, fns, state, extra, setup


@dataclass
class _StepFns:
    grad: Callable[..., tuple[mx.array, mx.array, Params]]
    eval: Callable[..., tuple[mx.array, mx.array]]
    step: Callable[[TrainState, Params], TrainState]


def _step_fns(prep: Prepared) -> _StepFns:
    from nestedfn.fast.compile import compile_step

    c = prep.config
    step = compile_step(prep.opt) if c.compile else lambda s, g: apply_gradients(prep.opt, s, g)
    return _StepFns(
        make_grad_fn(prep.model, prep.params, c.compile),
        make_eval_fn(prep.model, prep.params, c.compile),
        step,
    )


def _dry_run(prep: Prepared, state: TrainState, fns: _StepFns) -> None:
    """The run's first training step (loss, gradients, optimizer update) on this rank's part of
    its first batch, the result thrown away: whatever the model, data and options first fail
    on fails here, before anything in the run directory is touched (and the graphs it traces
    are the ones the loop reuses).  No collective: it is local to each rank."""
    from nestedfn.lm.data import batch_at

    c = prep.config
    rank, world = distributed.rank(), distributed.world_size()
    try:
        batch = batch_at(
            prep.train_set, int(state.step), c.batch_size, c.seed, c.max_seq_len, rank, world
        )
        loss, _, grads = fns.grad(state.params, *batch)
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
    from nestedfn.tree import to_flat

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


def _newest_step(directory: Path) -> int | None:
    from nestedfn.run.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(directory)
    return None if ckpt is None else int(ckpt.name.split("_")[1])


def _last_ckpt(out: Path) -> str:
    """What is true of the run's checkpoints, for a message that stops the run."""
    from nestedfn.run.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out / CHECKPOINT_DIR)
    if ckpt is None:
        return f"no checkpoint was written in {out} (none was due yet)"
    return f"the last checkpoint is {ckpt}"


def _save(prep: Prepared, state: TrainState, extra: dict, out: Path, keep: int) -> None:
    from nestedfn.run.checkpoint import prune_checkpoints, save_checkpoint

    n_blocks = len(prep.model.layers)
    info = {"optimizer": prep.config.optimizer, "step": int(state.step)}
    record = {**extra, "config": prep.config.to_dict()}  # what a resume is held against
    save_checkpoint(out / CHECKPOINT_DIR, state, record, int(state.step))
    prune_checkpoints(out / CHECKPOINT_DIR, keep)
    save_adapters(out, state.params, prep.spec, n_blocks, extra=info)


def _interrupt_save(
    prep: Prepared,
    done: TrainState,
    extra: dict,
    out: Path,
    nothing_done: bool,
    main: bool,
    bar: Any,
) -> tuple[int, Path | None]:
    """The step and checkpoint an interrupt leaves (rank 0 writes it unless it is there)."""
    from nestedfn.run.checkpoint import step_dir_name

    step = int(done.step)
    on_disk = _newest_step(out / CHECKPOINT_DIR)
    if on_disk is not None and on_disk >= step:
        # the step was saved (the interrupt came in the save, after the checkpoint): that
        # is the checkpoint a resume takes
        return on_disk, out / CHECKPOINT_DIR / step_dir_name(on_disk)
    if nothing_done:
        return step, None  # a new run started again does exactly what this one would have
    if main:
        bar.close()
        _save(prep, done, extra, out, prep.config.keep_last)
    return step, out / CHECKPOINT_DIR / step_dir_name(step)


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


def _loop(
    prep: Prepared,
    fns: _StepFns,
    state: TrainState,
    extra: dict,
    out: Path,
    show: bool,
    log: Callable[[str], None],
    resumed: bool,
    stop_at: int | None,
) -> Summary:
    from nestedfn.lm.data import batch_at

    c = prep.config
    from nestedfn.lm.report import Reporter

    main = distributed.is_main()
    rank, world = distributed.rank(), distributed.world_size()
    grad_fn, eval_fn, step_fn = fns.grad, fns.eval, fns.step
    metrics = open_append(out / METRICS_FILE) if main else None  # never through a symlink
    # the SHA-256 of the metrics file so far, recorded with every checkpoint (``extra``)
    written = hashlib.sha256((out / METRICS_FILE).read_bytes() if main else b"")
    end = c.steps if stop_at is None else min(stop_at, c.steps)
    first = last = None
    valid: list[tuple[int, float]] = []
    stopped = False
    total_tokens, total_time = 0.0, 0.0

    def write(record: dict) -> None:
        if metrics is not None:
            line = json.dumps(_finite(record), allow_nan=False) + "\n"
            metrics.write(line)
            written.update(line.encode())
            extra["metrics_sha256"] = written.hexdigest()
            metrics.flush()

    def run_eval(step: int) -> None:
        nonlocal stopped
        loss = evaluate(eval_fn, state.params, prep.valid_set, c)
        if not math.isfinite(loss):
            write({"type": "eval", "step": step, "valid_loss": None, "nonfinite": str(loss)})
            raise RunError(f"the validation loss became {loss} at step {step}; {_last_ckpt(out)}")
        valid.append((step, loss))
        write({"type": "eval", "step": step, "valid_loss": loss})
        best = extra["best_loss"]
        if best is None or loss < best:
            extra.update(best_loss=loss, best_step=step, bad_evals=0)
            if main:
                info = {"optimizer": c.optimizer, "step": step, "valid_loss": loss}
                save_adapters(out / BEST_DIR, state.params, prep.spec, len(prep.model.layers), info)
        else:
            extra["bad_evals"] += 1
            if c.early_stopping and extra["bad_evals"] >= c.early_stopping:
                stopped = True
        bar.message(f"step {step}: valid loss {loss:.4f}")

    bar = Reporter(c.steps, int(state.step), c.steps_per_report, show, log)
    started = time.perf_counter()
    # The last completed step (state and bookkeeping): what an interrupt saves, unless a
    # checkpoint of it (or of a later step whose save was cut off after the checkpoint) is on
    # disk already.
    done, done_extra, nothing_done = state, dict(extra), not resumed
    try:
        if not resumed and int(state.step) == 0 and c.eval_every:
            run_eval(0)
            done_extra, nothing_done = dict(extra), False
        while int(state.step) < end and not stopped:
            i = int(state.step)
            tic = time.perf_counter()
            inputs, targets, mask = batch_at(
                prep.train_set, i, c.batch_size, c.seed, c.max_seq_len, rank, world
            )
            mx.random.seed(c.seed * 1_000_003 + i)
            loss, ntoks, grads = grad_fn(state.params, inputs, targets, mask)
            if world > 1:
                grads = distributed.average_gradients(grads, weight=ntoks)
                loss, ntoks = distributed.all_sum([loss * ntoks, ntoks])
                loss = loss / ntoks
            state = step_fn(state, grads)
            mx.eval(state.params, state.opt_state, loss, ntoks)
            dt = time.perf_counter() - tic
            loss_f, tokens = float(loss.item()), float(ntoks.item())
            if not math.isfinite(loss_f):
                raise RunError(
                    f"the training loss became {loss_f} at step {i + 1}; lower the learning "
                    f"rate or set grad_clip; {_last_ckpt(out)}"
                )
            first = loss_f if first is None else first
            last = loss_f
            total_tokens, total_time = total_tokens + tokens, total_time + dt
            step = int(state.step)
            tiers = _tier_updates(state.opt_state)
            lr = float(prep.schedule(i // c.grad_accumulation))
            peak = mx.get_peak_memory() / 1e9
            write(
                {
                    "type": "train",
                    "step": step,
                    "loss": loss_f,
                    "lr": lr,
                    "tokens": tokens,
                    "tier_updates": tiers,
                    "time": dt,
                    "elapsed": time.perf_counter() - started,
                    "peak_memory_gb": peak,
                }
            )
            bar.step(step, loss_f, lr, tokens, dt, peak, tiers)
            if c.clear_cache_threshold and mx.get_cache_memory() > c.clear_cache_threshold:
                mx.clear_cache()
            if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
                run_eval(step)
            if step % max(c.save_every, 1) == 0 and c.save_every and main and step != end:
                _save(prep, state, extra, out, c.keep_last)
            done, done_extra, nothing_done = state, dict(extra), False
        if main:
            _save(prep, state, extra, out, c.keep_last)
        test_loss = None
        if c.test and (int(state.step) == c.steps or stopped):
            test_loss = evaluate(eval_fn, state.params, prep.test_set, c, c.test_batches)
            write({"type": "test", "step": int(state.step), "test_loss": test_loss})
    except (KeyboardInterrupt, RuntimeError) as exc:
        # No collective here (see the module docstring): rank 0 saves what it completed.  A
        # collective that failed because a peer left (its Ctrl-C came first) is this rank's
        # interrupt too; its own may still be pending and strike anywhere before the guard,
        # so the save is retried under it (the guard drops a pending one).
        if isinstance(exc, RuntimeError) and not distributed.peer_lost(exc):
            raise
        step, ckpt = int(done.step), None
        for _ in range(3):
            try:
                with _signals_held():
                    step, ckpt = _interrupt_save(
                        prep, done, done_extra, out, nothing_done, main, bar
                    )
                break
            except KeyboardInterrupt:
                continue
        raise Interrupted(out, step, ckpt) from None
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    summary = Summary(
        out=out,
        steps=int(state.step),
        first_loss=first,
        last_loss=last,
        valid_losses=valid,
        best_valid=extra["best_loss"],
        tokens_per_sec=total_tokens / total_time if total_time else 0.0,
        stopped_early=stopped,
        state=state,
        model=bind(prep.model, state.params).train(False),
        test_loss=test_loss,
    )
    if main:
        log(
            f"wrote the run to {out}: adapters {out / ADAPTER_FILE} (mlx-lm format), best "
            f"adapters in {out / BEST_DIR}, checkpoints in {out / CHECKPOINT_DIR}, metrics "
            f"{out / METRICS_FILE}"
        )
    return summary
