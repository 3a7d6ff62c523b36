"""``fine_tune``: the trainer from Python, as ``mlx_lm lora`` is from its command line.

mlx-lm's Python entry is ``mlx_lm.tuner.trainer.train(model, optimizer, ..., training_callback)``
with a ``TrainingCallback`` whose ``on_train_loss_report(info)`` and ``on_val_loss_report(info)``
receive the reports.  nestedfn's takes what ``nestedfn train``/``nestedfn lora`` take, a config
(a ``TrainConfig``, a mapping or a YAML path, in mlx-lm's key names or nestedfn's) and/or the
same keys as keyword arguments, and the same callback object::

    class Log(nestedfn.lm.TrainingCallback):
        def on_train_loss_report(self, info):  # iteration, train_loss, learning_rate, ...
            tracker.log(info)

    summary = nestedfn.lm.fine_tune("lora.yaml", iters=200, training_callback=Log())

The command line is a thin shell over this function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nestedfn.lm.config import TrainConfig, from_mapping, load_config, resolve
from nestedfn.lm.errors import RunError
from nestedfn.lm.trainer import Summary, train

__all__ = ["DEFAULT_OUT", "TrainingCallback", "fine_tune"]

DEFAULT_OUT = "adapters"  # mlx-lm's default adapter_path


class TrainingCallback:
    """mlx-lm's ``TrainingCallback`` (``on_train_loss_report``, ``on_val_loss_report``, with
    mlx-lm's fields plus ``tier_updates``/``best_val_loss``), and nestedfn's two more:
    ``on_checkpoint`` (``iteration``, ``path``) and ``on_test_loss_report`` (``iteration``,
    ``test_loss``).  Any object with some of these methods works (an mlx-lm callback too)."""

    def on_train_loss_report(self, train_info: dict) -> None:
        """A report window ended: ``iteration``, ``train_loss``, ``learning_rate``,
        ``iterations_per_second``, ``tokens_per_second``, ``trained_tokens``, ``peak_memory``,
        ``tier_updates``."""

    def on_val_loss_report(self, val_info: dict) -> None:
        """An evaluation: ``iteration`` (steps done), ``val_loss``, ``val_time``,
        ``best_val_loss``."""

    def on_checkpoint(self, info: dict) -> None:
        """A checkpoint was written: ``iteration``, ``path``."""

    def on_test_loss_report(self, info: dict) -> None:
        """The test loss after training: ``iteration``, ``test_loss``."""


def as_config(config: TrainConfig | Mapping[str, Any] | str | Path | None, **options: Any) -> Any:
    """A ``TrainConfig`` from a config (object, mapping or YAML path; ``None``: the defaults)
    with ``options`` (mlx-lm's key names or nestedfn's) on top."""
    if isinstance(config, TrainConfig):
        base = config
    elif isinstance(config, (str, Path)):
        base = load_config(config, optimizer=options.pop("optimizer", None))
    elif config is None or isinstance(config, Mapping):
        return from_mapping({**(config or {}), **options}, "fine_tune")
    else:
        raise TypeError(f"config must be a TrainConfig, a mapping or a path, got {config!r}")
    return resolve(base, options) if options else base


def fine_tune(
    config: TrainConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    training_callback: Any = None,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume_hint: str = "nestedfn train --resume {out}",
    accept_changed_inputs: bool = False,
    **options: Any,
) -> Summary:
    """Train as ``config`` and ``options`` say (``as_config``), into ``out`` (default the
    config's ``adapter_path``, else mlx-lm's ``adapters``), reporting to ``training_callback``.

    ``resume=True`` continues the run in ``out`` (its own options; ``options`` may change only
    those a resume may change, such as ``iters``); ``force`` replaces a run there; ``stop_at``
    stops (with a checkpoint) at that step; ``resume_hint`` is the command an interrupt names;
    ``accept_changed_inputs`` lets a resume go on with data or model files that changed since
    the run started (recorded in its manifest).  Returns the run's ``Summary``; user errors raise
    ``RunError``/``ConfigError`` before anything is written."""
    if resume:
        if out is None:
            raise RunError("fine_tune(resume=True) needs out: the run directory")
        return train(
            TrainConfig(), out, resume=True, overrides=options, progress=progress, log=log,
            stop_at=stop_at, training_callback=training_callback, resume_hint=resume_hint,
            accept_changed_inputs=accept_changed_inputs,
        )  # fmt: skip
    cfg = as_config(config, **options)
    if not cfg.train:
        raise RunError(
            "train: false evaluates adapters only: call nestedfn.lm.test_adapters(config, "
            "adapter_path)"
        )
    where = out or cfg.adapter_path or DEFAULT_OUT
    return train(
        cfg, where, force=force, progress=progress, log=log, stop_at=stop_at,
        training_callback=training_callback, resume_hint=resume_hint,
    )  # fmt: skip
