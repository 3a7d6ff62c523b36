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
(a ``KeyboardInterrupt``) saying how to resume; the CLI exits with status 130.  A step that
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
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from nestedfn import distributed
from nestedfn.checkpoint import atomic_write_text
from nestedfn.core import Optimizer, Params, Step, TrainState, apply_gradients, chain, init
from nestedfn.lm.adapters import ADAPTER_CONFIG, ADAPTER_FILE, save_adapters
from nestedfn.lm.config import (
    RUN_CONFIG,
    ConfigError,
    TrainConfig,
    is_tiered,
    load_config,
    save_config,
)
from nestedfn.lm.lora import LoraSpec, apply_lora, bind
from nestedfn.tree import flatten, tree_map, unflatten

__all__ = [
    "METRICS_FILE",
    "Interrupted",
    "RunError",
    "Summary",
    "build_optimizer",
    "build_schedule",
    "is_tiered",
    "resolve_tiers",
    "check_out_dir",
    "evaluate",
    "inspect",
    "load_run_model",
    "make_eval_fn",
    "make_grad_fn",
    "masked_cross_entropy",
    "train",
]

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
# Everything a run writes into its directory (what --force removes, and nothing else).
RUN_FILES = (RUN_CONFIG, METRICS_FILE, ADAPTER_FILE, ADAPTER_CONFIG, CHECKPOINT_DIR, BEST_DIR)
RESUMABLE = ("steps", "save_every", "keep_last", "eval_every")


class RunError(RuntimeError):
    """A problem with the user's input (paths, data, options): reported without traceback."""


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


# ---------------------------------------------------------------------------------------------
# the pure core: loss, gradients, optimizer
# ---------------------------------------------------------------------------------------------


def masked_cross_entropy(
    logits: mx.array, targets: mx.array, mask: mx.array
) -> tuple[mx.array, mx.array]:
    """``(Σ mask·CE, Σ mask)`` in float32: the summed token loss and the number of tokens."""
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.astype(mx.float32).sum(), mask.astype(mx.float32).sum()


def make_grad_fn(
    model: nn.Module, params: Params, compile: bool = True
) -> Callable[..., tuple[mx.array, mx.array, Params]]:
    """``fn(params, inputs, targets, mask) -> (mean loss, tokens, grads)`` for the LoRA tree.

    ``params`` fixes the tree structure; the model's frozen weights are constants of the
    (compiled) graph.  The global random state is an input and output of the compiled graph so
    that LoRA dropout draws what ``mx.random.seed`` set before the call.
    """
    _, td = flatten(params)

    def loss_fn(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask: mx.array):
        bind(model, unflatten(td, leaves))
        model.train(True)
        total, ntoks = masked_cross_entropy(model(inputs), targets, mask)
        return total / ntoks, ntoks

    value_and_grad = mx.value_and_grad(loss_fn)

    def step(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask: mx.array):
        (loss, ntoks), grads = value_and_grad(leaves, inputs, targets, mask)
        return loss, ntoks, grads

    if compile:
        state = [mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)

    def grad_fn(params: Params, inputs: mx.array, targets: mx.array, mask: mx.array):
        leaves, got = flatten(params)
        if got != td:
            raise ValueError("grad_fn: params are not shaped like the tree it was built for")
        loss, ntoks, grads = step(leaves, inputs, targets, mask)
        return loss, ntoks, unflatten(td, grads)

    return grad_fn


def make_eval_fn(
    model: nn.Module, params: Params, compile: bool = True
) -> Callable[..., tuple[mx.array, mx.array]]:
    """``fn(params, inputs, targets, mask) -> (Σ mask·CE, Σ mask)`` with dropout off."""
    _, td = flatten(params)

    def fn(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask: mx.array):
        bind(model, unflatten(td, leaves))
        model.train(False)
        return masked_cross_entropy(model(inputs), targets, mask)

    if compile:
        fn = mx.compile(fn)

    def eval_fn(params: Params, inputs: mx.array, targets: mx.array, mask: mx.array):
        return fn(flatten(params)[0], inputs, targets, mask)

    return eval_fn


def build_schedule(config: TrainConfig) -> Callable[[Step], Any]:
    """The learning rate per optimizer update: linear warmup over ``warmup_steps`` from 0,
    then constant or cosine decay to ``min_lr_ratio * learning_rate`` at ``decay_steps``
    (default: the run's number of updates)."""
    from nestedfn import schedules

    lr = float(config.learning_rate)
    if config.schedule == "cosine":
        decay = config.decay_steps or max(config.steps // config.grad_accumulation, 1)
        if decay <= config.warmup_steps:
            raise ConfigError(
                f"decay_steps ({decay}) must exceed warmup_steps ({config.warmup_steps})"
            )
        return schedules.warmup_cosine(
            lr, config.warmup_steps, decay, end_value=lr * config.min_lr_ratio
        )
    if config.warmup_steps:
        return schedules.linear_warmup(lr, config.warmup_steps)
    return schedules.constant(lr)


def _scale_by_schedule(schedule: Callable[[Step], Any]) -> Optimizer:
    """Multiply updates by ``schedule(step)`` (non-negative, so ``-0.0`` stays ``-0.0`` and
    leaves of inactive tiers stay bit-identical)."""

    def update_fn(updates: Any, state: tuple, params: Params, step: Step) -> Any:
        lr = schedule(step)
        return tree_map(lambda u: u * lr, updates), state

    return Optimizer(lambda params: (), update_fn)


def resolve_tiers(config: TrainConfig, params: Params) -> Params:
    """The tree of tier indices for ``params``: ``by_depth`` for ``tiers: depth``, else
    ``by_pattern`` of the ``{regex: tier}`` mapping.  Raises ``ValueError`` when a tier would be
    empty or a pattern matches nothing."""
    from nestedfn.tiers import by_depth, by_pattern

    if config.tiers == "depth":
        return by_depth(params, len(config.frequencies), config.tier_order)
    labels = by_pattern({str(k): int(v) for k, v in config.tiers.items()}, params=params)
    used = {int(x) for x in flatten(labels)[0]}
    n = len(config.frequencies)
    empty = [k for k in range(n) if k not in used]
    if empty or max(used) >= n:
        raise ValueError(
            f"tiers {dict(config.tiers)} give tiers {sorted(used)} but frequencies "
            f"{list(config.frequencies)} need exactly tiers 0..{n - 1}; empty: {empty}"
        )
    return labels


def build_optimizer(
    config: TrainConfig, schedule: Callable[[Step], Any], tiers: Params | None
) -> Optimizer:
    """The optimizer a config describes, outermost first: ``accumulate`` (when
    ``grad_accumulation > 1``), ``clip_by_global_norm`` (when ``grad_clip > 0``), then the
    optimizer, in ``tiers`` (from ``resolve_tiers``; ``None`` when not ``is_tiered``).  Tiered
    optimizers run with learning rate 1 inside the tiers and their updates are scaled by
    ``schedule`` at the global update count, so warmup and decay count updates for every tier
    (as ``nested_adam`` does)."""
    from nestedfn import combinators, optimizers, transforms
    from nestedfn.nested import multiscale_momentum, nested, nested_adam

    name, kw = config.optimizer, dict(config.optimizer_args)
    freqs = tuple(config.frequencies)
    if name in ("nested_adam", "adamw", "lion", "muon") and config.weight_decay:
        kw.setdefault("weight_decay", config.weight_decay)
    if name == "nested_adam":
        if tiers is None:
            raise ValueError("nested_adam needs tiers (more than one frequency)")
        opt = nested_adam(schedule, frequencies=freqs, tiers=tiers, reduce=config.tier_reduce, **kw)
    elif name == "multiscale_momentum":
        opt = multiscale_momentum(schedule, **kw)
    elif tiers is not None:
        inner = getattr(optimizers, name)(1.0, **kw)
        opt = chain(nested(inner, tiers, freqs, config.tier_reduce), _scale_by_schedule(schedule))
    else:
        opt = getattr(optimizers, name)(schedule, **kw)
    if config.grad_clip:
        opt = chain(transforms.clip_by_global_norm(float(config.grad_clip)), opt)
    if config.grad_accumulation > 1:
        opt = combinators.accumulate(opt, config.grad_accumulation)
    return opt


# ---------------------------------------------------------------------------------------------
# loading, checked before anything is written
# ---------------------------------------------------------------------------------------------


def load_run_model(model_path: str | Path | None) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` of a local model directory; a missing path is a ``RunError`` (never a
    Hugging Face download attempt)."""
    if not model_path:
        raise RunError("no model given: pass --model PATH (an mlx-lm model directory)")
    path = Path(model_path)
    if not path.is_dir():
        raise RunError(f"model path {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise RunError(f"model path {path} holds no config.json: not an mlx-lm model directory")
    import mlx_lm

    try:
        return mlx_lm.load(str(path))
    except Exception as e:  # mlx-lm raises many kinds; the user needs the path and the reason
        raise RunError(f"could not load the model in {path}: {type(e).__name__}: {e}") from e


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


def _clear_run(out: Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclass
class _Prepared:
    config: TrainConfig
    model: nn.Module
    train_set: Any
    valid_set: Any
    spec: LoraSpec
    params: Params
    opt: Optimizer
    schedule: Callable[[Step], Any]
    state: TrainState
    tiers: Params | None


def _prepare(config: TrainConfig, need_data: bool = True) -> _Prepared:
    from nestedfn.lm.data import DataError, load_dataset
    from nestedfn.lm.lora import LoraError

    model, tokenizer = load_run_model(config.model)
    train_set = valid_set = None
    if need_data or config.data:
        if not config.data:
            raise RunError("no data given: pass --data DIR (with train.jsonl and valid.jsonl)")
        data = Path(config.data)
        if not data.is_dir():
            raise RunError(f"data directory {data} does not exist")
        try:
            train_set = load_dataset(data, "train", tokenizer, config.max_seq_len)
            valid_set = load_dataset(data, "valid", tokenizer, config.max_seq_len)
        except DataError as e:
            raise RunError(str(e)) from None
    world = distributed.world_size()
    if config.batch_size % world:
        raise RunError(f"batch_size {config.batch_size} is not a multiple of {world} processes")
    keys = tuple(config.lora_keys) if config.lora_keys is not None else None
    spec = LoraSpec(
        config.lora_rank, config.lora_scale, config.lora_dropout, config.lora_layers, keys
    )
    try:
        params = apply_lora(model, spec, seed=config.seed)
    except LoraError as e:
        raise RunError(str(e)) from None
    try:
        tiers = resolve_tiers(config, params) if is_tiered(config) else None
        schedule = build_schedule(config)
        opt = build_optimizer(config, schedule, tiers)
        state = init(opt, params)
    except (ValueError, TypeError, KeyError) as e:
        raise RunError(f"optimizer {config.optimizer!r}: {e}") from None
    return _Prepared(config, model, train_set, valid_set, spec, params, opt, schedule, state, tiers)


def _overview(prep: _Prepared) -> str:
    from nestedfn.tiers import describe
    from nestedfn.tree import to_flat

    c = prep.config
    flat = to_flat(prep.params)
    n_blocks = len(prep.model.layers)
    lora_blocks = n_blocks if c.lora_layers == -1 else c.lora_layers
    size = sum(int(x.size) for x in flat.values())
    lines = [
        f"model {c.model}: {n_blocks} blocks; LoRA rank {c.lora_rank} on the last "
        f"{lora_blocks}: {len(flat)} arrays, {size:,} trainable parameters",
        f"optimizer {c.optimizer}, learning rate {c.learning_rate:g} ({c.schedule}, warmup "
        f"{c.warmup_steps}), batch {c.batch_size} x accumulation {c.grad_accumulation}",
    ]
    if prep.train_set is not None:
        lines.insert(
            1,
            f"data {c.data}: {len(prep.train_set)} train / {len(prep.valid_set)} valid examples "
            f"({prep.train_set.format})",
        )
    if prep.tiers is not None:
        lines.append(describe(prep.tiers, prep.params, list(c.frequencies)))
    return "\n".join(lines)


def inspect(config: TrainConfig) -> str:
    """The tier table and model summary a run with ``config`` would start from (model, data,
    LoRA and optimizer all loaded and checked; nothing written)."""
    return _overview(_prepare(config, need_data=False))


# ---------------------------------------------------------------------------------------------
# the loop and its side effects
# ---------------------------------------------------------------------------------------------


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


def evaluate(eval_fn: Callable, params: Params, dataset: Any, config: TrainConfig) -> float:
    """Mean token loss over the first ``eval_batches`` batches of ``dataset`` (the same
    batches every time; all of them with -1), summed over processes."""
    from nestedfn.lm.data import batch_at

    n = -(-len(dataset) // config.batch_size)
    if config.eval_batches != -1:
        n = min(n, config.eval_batches)
    rank, world = distributed.rank(), distributed.world_size()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    for i in range(n):
        batch = batch_at(
            dataset, i, config.batch_size, config.seed, config.max_seq_len, rank, world
        )
        s, t = eval_fn(params, *batch)
        total, ntoks = total + s, ntoks + t
    if world > 1:
        total, ntoks = distributed.all_sum([total, ntoks])
    return float((total / ntoks).item())


def _tier_updates(opt_state: Any) -> list[int] | None:
    from nestedfn.nested import _find_nested, tier_stats

    if _find_nested(opt_state) is None:
        return None
    return [t.updates for t in tier_stats(opt_state)]


def _kept_metrics(path: Path, step: int) -> str | None:
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


def _bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


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
) -> Summary:
    """Train LoRA adapters as ``config`` says, writing the run into ``out``.

    ``resume=True`` reads ``out/config.yaml`` (``overrides`` may change only ``RESUMABLE``
    options: the others would change the trajectory) and continues from the latest
    checkpoint.  ``stop_at`` ends this process's run early at that step (as an interrupt
    would), after writing a checkpoint there.  User errors raise ``RunError``/``ConfigError``
    before anything in ``out`` is touched.
    """
    from nestedfn.checkpoint import latest_checkpoint, load_checkpoint

    out = Path(out)
    check_out_dir(out, resume, force)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if resume:
        saved = load_config(out / RUN_CONFIG)
        changed = {k: v for k, v in overrides.items() if getattr(saved, k) != v}
        bad = [k for k in changed if k not in RESUMABLE]
        if bad:
            raise RunError(
                f"cannot change {', '.join(bad)} when resuming {out} (the run's options are "
                f"in {out / RUN_CONFIG}); only {', '.join(RESUMABLE)} may change"
            )
        config = replace(saved, **changed)
    if config.schedule == "cosine" and config.decay_steps is None:
        # pin the horizon so that a resume with more steps keeps the same schedule
        config = replace(config, decay_steps=max(config.steps // config.grad_accumulation, 1))
    prep = _prepare(config)
    if distributed.is_main():
        log(_overview(prep))
    state, extra = prep.state, {"best_loss": None, "best_step": None, "bad_evals": 0}
    if resume:
        ckpt = latest_checkpoint(out / CHECKPOINT_DIR)
        if ckpt is None:
            raise RunError(f"cannot resume: no checkpoint in {out / CHECKPOINT_DIR}")
        state, saved_extra = load_checkpoint(ckpt, like=state)
        extra.update(saved_extra)
    metrics = _kept_metrics(out / METRICS_FILE, int(state.step)) if resume else None
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
    main = distributed.is_main()
    if main:
        if not resume:
            if force:
                _clear_run(out)
            out.mkdir(parents=True, exist_ok=True)
        save_config(config, out)  # both atomic: an interrupted resume leaves the old files
        if metrics is not None:
            atomic_write_text(out / METRICS_FILE, metrics)
    return _loop(prep, fns, state, extra, out, progress and main, log, resume, stop_at)


@dataclass
class _StepFns:
    grad: Callable[..., tuple[mx.array, mx.array, Params]]
    eval: Callable[..., tuple[mx.array, mx.array]]
    step: Callable[[TrainState, Params], TrainState]


def _step_fns(prep: _Prepared) -> _StepFns:
    from nestedfn.compile import compile_step

    c = prep.config
    step = compile_step(prep.opt) if c.compile else lambda s, g: apply_gradients(prep.opt, s, g)
    return _StepFns(
        make_grad_fn(prep.model, prep.params, c.compile),
        make_eval_fn(prep.model, prep.params, c.compile),
        step,
    )


def _dry_run(prep: _Prepared, state: TrainState, fns: _StepFns) -> None:
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
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise RunError(
            f"the first training step fails ({type(e).__name__}: {e}); nothing was written"
        ) from None


def _save(prep: _Prepared, state: TrainState, extra: dict, out: Path, keep: int) -> None:
    from nestedfn.checkpoint import prune_checkpoints, save_checkpoint

    n_blocks = len(prep.model.layers)
    info = {"optimizer": prep.config.optimizer, "step": int(state.step)}
    save_checkpoint(out / CHECKPOINT_DIR, state, dict(extra), int(state.step))
    prune_checkpoints(out / CHECKPOINT_DIR, keep)
    save_adapters(out, state.params, prep.spec, n_blocks, extra=info)


def _loop(
    prep: _Prepared,
    fns: _StepFns,
    state: TrainState,
    extra: dict,
    out: Path,
    show: bool,
    log: Callable[[str], None],
    resumed: bool,
    stop_at: int | None,
) -> Summary:
    from nestedfn.checkpoint import step_dir_name
    from nestedfn.lm.data import batch_at

    c = prep.config
    main = distributed.is_main()
    rank, world = distributed.rank(), distributed.world_size()
    grad_fn, eval_fn, step_fn = fns.grad, fns.eval, fns.step
    metrics = open(out / METRICS_FILE, "a") if main else None  # noqa: SIM115
    end = c.steps if stop_at is None else min(stop_at, c.steps)
    first = last = None
    valid: list[tuple[int, float]] = []
    stopped = False
    window_tokens, window_time, total_tokens, total_time = 0.0, 0.0, 0.0, 0.0

    def write(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def run_eval(step: int) -> None:
        nonlocal stopped
        loss = evaluate(eval_fn, state.params, prep.valid_set, c)
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
        if show:
            bar.write(f"step {step}: valid loss {loss:.4f}")

    bar = _bar(c.steps, int(state.step), show)
    started = time.perf_counter()
    # The last completed step (state and bookkeeping), what an interrupt saves, and the step
    # whose checkpoint is on disk (the one resumed from; none yet in a new run).
    done, done_extra, nothing_done = state, dict(extra), not resumed
    saved: int | None = int(state.step) if resumed else None
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
                    f"rate or set grad_clip (the last checkpoint in {out / CHECKPOINT_DIR} is "
                    "intact)"
                )
            first = loss_f if first is None else first
            last = loss_f
            window_tokens, window_time = window_tokens + tokens, window_time + dt
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
            if show:
                tps = window_tokens / window_time if window_time else 0.0
                post = f"loss {loss_f:.3f}  tok/s {tps:,.0f}  peak {peak:.2f} GB"
                if tiers is not None:
                    post += "  tier updates " + "/".join(map(str, tiers))
                bar.set_postfix_str(post, refresh=False)
                bar.update(1)
                if step % 10 == 0:
                    window_tokens = window_time = 0.0
            if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
                run_eval(step)
            if step % max(c.save_every, 1) == 0 and c.save_every and main and step != end:
                _save(prep, state, extra, out, c.keep_last)
                saved = step
            done, done_extra, nothing_done = state, dict(extra), False
        if main:
            _save(prep, state, extra, out, c.keep_last)
    except KeyboardInterrupt:
        # No collective here (see the module docstring): rank 0 saves what it completed.
        step = int(done.step)
        if step == saved:
            ckpt = out / CHECKPOINT_DIR / step_dir_name(step)
        elif nothing_done:
            ckpt = None  # a new run started again does exactly what this one would have
        else:
            ckpt = out / CHECKPOINT_DIR / step_dir_name(step)
            if main:
                bar.close()
                _save(prep, done, done_extra, out, c.keep_last)
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
    )
    if main:
        log(
            f"wrote the run to {out}: adapters {out / ADAPTER_FILE} (mlx-lm format), best "
            f"adapters in {out / BEST_DIR}, checkpoints in {out / CHECKPOINT_DIR}, metrics "
            f"{out / METRICS_FILE}"
        )
    return summary
