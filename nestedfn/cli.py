"""The ``nestedfn`` command: ``lora``, ``demo``, ``train``, ``inspect``, ``plot`` (flat, like
mlx-lm).

``nestedfn lora ...`` is ``python -m mlx_lm lora ...``: mlx-lm's own parser, its config merge
and ``CONFIG_DEFAULTS`` (``--train`` off unless given; ``--test`` alone evaluates the adapters
in ``--adapter-path``), trained by nestedfn (``nestedfn.lm.fine_tune``), plus nestedfn's
``--resume``, ``--force``, ``--stop-at``.

Every ``TrainConfig`` option is also a flag of ``train``/``inspect`` (``--learning-rate``,
``--frequencies 1 2 4``, ``--tiers '{mlp: 1, .*: 0}'``...); flags override ``--config
run.yaml``.  User errors (paths, data, options, an occupied run directory) print one line on
stderr and exit with status 2, with no traceback and nothing overwritten (a bad flag value
too: one line, not the usage).  Ctrl-C during ``train``/``demo`` saves a checkpoint of the last
completed step, prints how to resume (``nestedfn train --resume RUN_DIR``) and exits with
status 130; SIGTERM (``kill``, schedulers, container stops) does the same and exits with 143.
An operating-system error (disk full, read-only file system, no permission, a path under a
regular file) is one line naming the path and the cause, status 74 (``EX_IOERR``); the
checkpoints written before it are intact and no temporary file is left.

Exit statuses: 0 done, 2 user error, 74 OS error, 130 SIGINT, 143 SIGTERM.

There is no ``bench`` command: the throughput comparison with ``mlx_lm lora`` is
``python benchmarks/train_throughput.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml

DEMO_STEPS = 150
# What the demo suggests generating: a sentence start from the dataset, whose template the
# adapters learn within DEMO_STEPS (the base model prints noise); max tokens = its bytes (the
# demo tokenizer has one token per byte).  Slots that depend on earlier words (the number that
# follows, an animal's sound) a random-weight model this small does not learn reliably.
DEMO_PROMPT = "Ada sees two cats in the farm."
DEMO_CONTINUATION = " One more comes, now there are"
EXIT_USER, EXIT_OS, EXIT_SIGINT, EXIT_SIGTERM = 2, 74, 130, 143


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (not the usage): ``nestedfn train: error:
    argument --learning-rate: invalid float value: 'abc' (see --help)``, status 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the trainer saves alike."""


_SIGNAL = {"received": signal.SIGINT}


def _on_sigterm(signum: int, frame: Any) -> None:
    _SIGNAL["received"] = signal.SIGTERM
    raise _Terminated()


def _launched() -> bool:
    """Whether a launcher (``mlx.launch``, ``mpirun``) started this process: it stops the other
    ranks with SIGTERM once one exits, so there SIGTERM keeps its default (a rank blocked in a
    collective could not run a handler)."""
    import os

    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def _os_error_line(e: OSError) -> str:
    """``PATH: cause`` of an ``OSError`` (``NotADirectoryError``, ``ENOSPC``, ``EROFS``...)."""
    why = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {why}" if e.filename is not None else why


def _yaml_value(text: str) -> Any:
    from nestedfn.lm.config import parse_yaml  # reads 1e-3 as a float, as the --config file

    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {e}") from None


def _size(text: str) -> int:
    from nestedfn.lm.mlxlm_compat import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_HELP = {
    "tiers": "'depth' (default: blocks of layers by depth) or a YAML mapping {regex: tier}, "
    "e.g. --tiers '{mlp: 1, .*: 0}' (MLP leaves in tier 1, the rest in tier 0)",
    "optimizer_args": "YAML mapping of keyword arguments, e.g. '{b2: 0.99}'",
    "lr_schedule": "YAML mapping (mlx-lm's), e.g. '{name: cosine_decay, arguments: [1e-4, 1000, "
    "1e-6], warmup: 100}'",
    "frequencies": "update period of each tier, default 1 2 4 (1: a plain optimizer)",
    "lora_keys": "module paths inside a block, default: every linear layer",
    "steps": "micro-batches to train (mlx-lm's iters)",
    "lora_layers": "fine-tune the last N blocks, -1 all; default 16 (mlx-lm's), at most the "
    "model's blocks",
    "mask_prompt": "leave prompts out of the loss (default: off, as in mlx-lm)",
    "resume_adapter_file": "start from these adapters (a fresh optimizer; --resume RUN_DIR "
    "continues a run exactly)",
    "test": "evaluate test.jsonl after training",
    "train": "train (default); --no-train --test only evaluates the adapters in --adapter-path",
    "steps_per_report": "a log line every N steps when the output is not a terminal",
    "clear_cache_threshold": "clear MLX's cache when it grows past this size (e.g. 2GB)",
}
_SKIP = ("model", "data", "adapter_path")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` option: mlx-lm's name first where it has one (``--iters``,
    ``--num-layers``, ...), nestedfn's spelling as an alias; enumerated options list their
    choices."""
    from nestedfn.lm import config as cfg
    from nestedfn.lm.config import TrainConfig
    from nestedfn.lm.mlxlm_compat import FACE

    choices = {
        "optimizer": cfg.OPTIMIZERS,
        "schedule": cfg.SCHEDULES,
        "tier_order": cfg.TIER_ORDERS,
        "tier_reduce": cfg.TIER_REDUCES,
        "fine_tune_type": cfg.FINE_TUNE_TYPES,
    }
    hints = typing.get_type_hints(TrainConfig)
    group = p.add_argument_group("training options (override --config)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        names = [n.replace("_", "-") for n in dict.fromkeys([FACE.get(f.name, f.name), f.name])]
        flags = ["--" + n for n in names]
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = _HELP.get(f.name, "")
        if "default" not in text:
            text = f"{text}{'; ' if text else ''}default {default!r}"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        if kind is not bool and f.name not in choices:
            kw["metavar"] = names[0].upper().replace("-", "_")
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "frequencies":
            group.add_argument(*flags, type=int, nargs="+", **kw)
        elif f.name == "lora_keys":
            group.add_argument(*flags, nargs="+", **kw)
        elif f.name in ("tiers", "optimizer_args", "lr_schedule"):
            group.add_argument(*flags, type=_yaml_value, **{**kw, "metavar": "YAML"})
        elif f.name == "clear_cache_threshold":
            group.add_argument(*flags, type=_size, **{**kw, "metavar": "SIZE"})
        elif kind is int or f.name in ("decay_steps", "test_batches", "lora_layers"):
            group.add_argument(*flags, type=int, **kw)
        elif kind is float:
            group.add_argument(*flags, type=float, **kw)
        else:
            group.add_argument(*flags, type=str, choices=choices.get(f.name), **kw)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from nestedfn.lm.config import TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _config(args: argparse.Namespace) -> Any:
    from nestedfn.lm.config import TrainConfig, is_tiered, load_config, resolve, untiered_reason

    base = load_config(args.config, optimizer=args.optimizer) if args.config else TrainConfig()
    overrides = _overrides(args)
    config = resolve(base, overrides)
    ignored = [k for k in ("tiers", "tier_order", "tier_reduce") if k in overrides]
    if ignored and not is_tiered(config):
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise _UsageError(f"{flags} would be ignored: {untiered_reason(config)}")
    return config


DEFAULT_OUT = "adapters"  # mlx-lm's default adapter_path


def _train(args: argparse.Namespace) -> int:
    from nestedfn.lm.api import fine_tune
    from nestedfn.lm.mlxlm_compat import warn_reporting
    from nestedfn.run import distributed

    warn_reporting([k for k in ("report_to", "project_name") if getattr(args, k) is not None])
    distributed.set_connect_timeout(args.connect_timeout)
    if isinstance(args.resume, str) and args.out and Path(args.resume) != Path(args.out):
        raise _UsageError(
            f"--resume {args.resume} and --adapter-path/--out {args.out} name different runs"
        )
    if args.resume:
        if args.config:
            raise _UsageError("--config cannot be combined with --resume (the run keeps its own)")
        out = args.resume if isinstance(args.resume, str) else args.out
        if out is None:
            raise _UsageError("--resume needs the run: --resume RUN_DIR")
        summary = fine_tune(
            out=out, resume=True, stop_at=args.stop_at,
            accept_changed_inputs=args.accept_changed_inputs, **_overrides(args),
        )  # fmt: skip
    else:
        config = _config(args)
        out = args.out or config.adapter_path or DEFAULT_OUT
        if not config.train:
            return _test_only(config, out)
        summary = fine_tune(config, out=out, force=args.force, stop_at=args.stop_at)
    _report(summary)
    return 0


def _test_only(config: Any, out: str) -> int:
    """``train: false`` + ``test: true`` (mlx-lm's ``--test`` without ``--train``): the test
    loss of the adapters in ``out``."""
    from nestedfn.lm.testset import test_adapters

    loss = test_adapters(config, out)
    print(_test_line(loss))
    return 0


def _test_line(loss: float) -> str:
    import math

    ppl = math.exp(loss) if loss < 700 else float("inf")
    return f"Test loss {loss:.3f}, Test ppl {ppl:.3f}."


def _report(summary: Any) -> None:
    """The run's summary lines, printed by rank 0 only (every rank has the same numbers): the
    whole run's, a resumed one included."""
    from nestedfn.run import distributed

    if not distributed.is_main():
        return
    if summary.resumed_at is not None:
        print(f"resumed at step {summary.resumed_at}; the lines below cover the whole run")
    if summary.first_loss is not None:
        print(f"train loss {summary.first_loss:.3f} -> {summary.last_loss:.3f}")
    if summary.valid_losses:
        (s0, v0), (s1, v1) = summary.valid_losses[0], summary.valid_losses[-1]
        line = f"valid loss {v0:.3f} (after step {s0})"
        if len(summary.valid_losses) > 1:
            line += f" -> {v1:.3f} (after step {s1}), best {summary.best_valid:.3f}"
        print(line)
        if s1 == summary.steps - 1:
            print("(as in mlx-lm, the last evaluation comes before the last step)")
        elif s1 != summary.steps:
            print(f"no evaluation at the stop (step {summary.steps})")
    if summary.tokens_per_sec:
        print(f"{summary.tokens_per_sec:,.0f} tokens/s over {summary.steps} steps")
    if summary.stopped_early:
        print("stopped early: the valid loss stopped improving")
    if summary.test_loss is not None:
        print(_test_line(summary.test_loss))


def _demo(args: argparse.Namespace) -> int:
    from nestedfn.lm.config import TrainConfig
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset
    from nestedfn.lm.errors import RunError
    from nestedfn.lm.rundir import check_out_dir
    from nestedfn.lm.trainer import train

    out = Path(args.out or Path("nestedfn-runs") / time.strftime("demo-%Y%m%d-%H%M%S")).absolute()
    try:
        check_out_dir(out, resume=False, force=args.force)
    except RunError:
        if not out.is_dir():
            raise
        raise _UsageError(
            f"{out} already holds a run (an earlier demo?): `nestedfn demo --out {out} --force` "
            f"starts the demo again; `nestedfn train --resume {out}` continues that run"
        ) from None
    print(f"nestedfn demo: a tiny Llama with random weights, templated sentences, into {out}")
    model_dir = build_demo_model(out / "model", seed=0)
    data_dir = write_demo_dataset(out / "data", seed=0)
    steps = args.steps if args.steps is not None else DEMO_STEPS
    config = TrainConfig(
        model=str(model_dir),
        data=str(data_dir),
        steps=steps,
        batch_size=8,
        max_seq_len=96,
        lora_rank=8,
        lora_scale=20.0,
        optimizer="nested_adam",
        learning_rate=2e-3,
        frequencies=[1, 2, 4],
        warmup_steps=0,
        eval_every=max(steps // 3, 1),
        eval_batches=4,
        save_every=max(steps // 2, 1),
    )
    hint = "nestedfn train --resume {out} (the demo itself starts again with --force)"
    summary = train(config, out, force=args.force, resume_hint=hint)
    _report(summary)
    print(
        f"next: nestedfn plot {out}\n      python -m mlx_lm generate --model {model_dir} "
        f"--adapter-path {out} --ignore-chat-template --max-tokens "
        f'{len(DEMO_CONTINUATION.encode())} --prompt "{DEMO_PROMPT}"\n'
        + (
            f"      (prints {DEMO_CONTINUATION!r}: the dataset's template, learned)"
            if steps >= DEMO_STEPS
            else f"      (after {DEMO_STEPS} steps it prints {DEMO_CONTINUATION!r}; "
            f"{steps} may be too few)"
        )
    )
    return 0


def _lora_parser() -> argparse.ArgumentParser:
    """``mlx_lm.lora``'s own parser (its flags, choices and help), its errors one line, with
    nestedfn's optimizers among ``--optimizer``'s choices and nestedfn's run flags added."""
    from mlx_lm.lora import build_parser as mlx_lm_parser

    from nestedfn.lm.config import OPTIMIZERS

    parser = mlx_lm_parser()
    parser.prog = "nestedfn lora"
    parser.description = (
        "python -m mlx_lm lora's command line, trained by nestedfn: the same options, defaults "
        "and numbers (--train off unless given; --test alone evaluates --adapter-path)"
    )
    parser.error = _Parser.error.__get__(parser)  # type: ignore[method-assign]
    for action in parser._actions:
        if action.dest == "optimizer":
            action.choices = list(OPTIMIZERS)
    parser.add_argument("--resume", action="store_true", help="nestedfn: continue the run")
    parser.add_argument("--force", action="store_true", help="nestedfn: replace a run there")
    parser.add_argument("--stop-at", type=int, default=None, help="nestedfn: stop at this step")
    return parser


def _lora_options(args: dict[str, Any]) -> dict[str, Any]:
    """``python -m mlx_lm lora``'s merge: the flags given, then the config file's keys for the
    rest, then mlx-lm's ``CONFIG_DEFAULTS``."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    from nestedfn.lm.config import ConfigError, parse_yaml

    path = args.pop("config")
    if path:
        try:
            data = parse_yaml(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of options")
        for k, v in data.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args.pop("config", None)
    return args


def _lora(argv: list[str]) -> int:
    """``nestedfn lora ...``: ``python -m mlx_lm lora ...``'s meaning (module docstring)."""
    from nestedfn.lm.api import fine_tune
    from nestedfn.lm.config import from_mapping

    args = vars(_lora_parser().parse_args(argv))
    resume, force, stop_at = args.pop("resume"), args.pop("force"), args.pop("stop_at")
    source = args["config"] or "command line"
    given = {k: v for k, v in args.items() if v is not None and k != "config"}
    config = from_mapping(_lora_options(args), source)
    out = config.adapter_path if config.adapter_path is not None else DEFAULT_OUT
    if resume:
        from nestedfn.lm.mlxlm_compat import normalize

        # the run names its model and data (absolute paths); the rest is held against the run
        skip = ("train", "model", "data", "adapter_path")
        keep = {k: v for k, v in normalize(given, "command line").items() if k not in skip}
        summary = fine_tune(out=out, resume=True, stop_at=stop_at, **keep)
    elif config.test and not config.train:
        return _test_only(config, out)
    else:
        hint = "nestedfn lora --resume --adapter-path {out}"
        summary = fine_tune(config, out=out, force=force, stop_at=stop_at, resume_hint=hint)
    _report(summary)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from nestedfn.lm.prepare import inspect

    config = _config(args)
    config = dataclasses.replace(config, model=args.model or config.model)
    print(inspect(config))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from nestedfn.lm.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


class _UsageError(Exception):
    pass


def _add_train_parser(sub: Any) -> None:
    """``nestedfn train``: its run flags, then one flag per ``TrainConfig`` option."""
    train = sub.add_parser("train", help="fine-tune LoRA adapters of an mlx-lm model")
    train.add_argument("--model", help="mlx-lm model directory")
    train.add_argument(
        "--data", help="directory with train.jsonl and valid.jsonl (and test.jsonl for --test)"
    )
    train.add_argument(
        "--adapter-path",
        "--out",
        dest="out",
        metavar="RUN_DIR",
        help=f"run directory: adapters (mlx-lm format), checkpoints, metrics; default {DEFAULT_OUT}",
    )
    train.add_argument(
        "-c",
        "--config",
        help="YAML file of training options (mlx-lm's lora config keys, and nestedfn's)",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (default --out) from its latest checkpoint",
    )
    train.add_argument("--force", action="store_true", help="replace a run in --out")
    for flag in ("--report-to", "--project-name"):
        train.add_argument(flag, default=None, help="mlx-lm's; ignored with a warning (offline)")
    train.add_argument(
        "--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step"
    )
    train.add_argument(
        "--accept-changed-inputs", action="store_true",
        help="--resume even though data or model files changed (recorded in the run)",
    )  # fmt: skip
    train.add_argument(
        "--connect-timeout", type=float, default=300.0, metavar="SECONDS",
        help="under mlx.launch: how long to wait for the other processes (0: forever)",
    )  # fmt: skip
    _add_config_flags(train)
    train.set_defaults(fn=_train)


def _version() -> str:
    """The installed distribution's version (the one ``pip`` reports)."""
    try:
        return importlib.metadata.version("nestedfn")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nestedfn", description="Nested Learning optimizers for MLX: LoRA fine-tuning."
    )
    parser.add_argument("--version", action="version", version=f"nestedfn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "lora",
        help="python -m mlx_lm lora's command line and meaning (nestedfn lora --help)",
        add_help=False,
    )

    demo = sub.add_parser("demo", help="train the built-in tiny model on built-in data")
    demo.add_argument("--out", help="run directory (default nestedfn-runs/demo-TIME)")
    demo.add_argument("--steps", type=int, default=None, help=f"default {DEMO_STEPS}")
    demo.add_argument("--force", action="store_true", help="replace a run in --out")
    demo.set_defaults(fn=_demo)

    _add_train_parser(sub)

    insp = sub.add_parser("inspect", help="print the tier table a run would start from")
    insp.add_argument("--model", help="mlx-lm model directory")
    insp.add_argument("--data", help="optional data directory")
    insp.add_argument("-c", "--config", help="YAML file of training options")
    _add_config_flags(insp)
    insp.set_defaults(fn=_inspect)

    plot = sub.add_parser("plot", help="PNG of a run's loss curves and tier updates")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/training.png)")
    plot.set_defaults(fn=_plot)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that an unknown option names the nearest valid one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        from nestedfn.lm.mlxlm_compat import closest

        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        valid = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        flags = [x for x in extra if x.startswith("-")]
        hint = closest(flags[0].split("=")[0], valid) if flags else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself (not a caller in-process): its own streams
        from nestedfn.lm import console

        console.install()  # output is not the run: a closed stdout never stops training
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["demo"], ["lora"]) and not _launched():
        _SIGNAL["received"] = signal.SIGINT
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:  # Ctrl-C or SIGTERM while the modules load (seconds): no traceback either
        parser = build_parser()
        if argv[:1] == ["lora"]:  # mlx-lm's own parser reads the rest
            args = argparse.Namespace(command="lora", fn=lambda _: _lora(argv[1:]))
        else:
            args = _parse(parser, argv)
        from nestedfn.lm.config import ConfigError
        from nestedfn.lm.data import DataError
        from nestedfn.lm.errors import RunError
        from nestedfn.lm.trainer import Interrupted
        from nestedfn.run import distributed
    except KeyboardInterrupt:
        term = _SIGNAL["received"] == signal.SIGTERM
        print(f"nestedfn: {'terminated (SIGTERM)' if term else 'interrupted'}", file=sys.stderr)
        return EXIT_SIGTERM if term else EXIT_SIGINT
    if args.command not in ("train", "demo", "lora"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return int(args.fn(args))
    except (RunError, ConfigError, DataError, _UsageError, distributed.ConnectError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"nestedfn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER
    except OSError as e:  # disk full, read-only, permissions: the path and the cause
        message = " ".join(_os_error_line(e).split())
        print(f"nestedfn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_OS
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: in the loop, the last step done is saved
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the message
        term = _SIGNAL["received"] == signal.SIGTERM
        what = "terminated (SIGTERM)" if term else "interrupted"
        message = str(e) if isinstance(e, Interrupted) else what
        if term:
            message = message.replace("interrupted", what, 1)
        if distributed.is_main() or not isinstance(e, Interrupted):
            print(f"nestedfn {args.command}: {message}", file=sys.stderr)
        return EXIT_SIGTERM if term else EXIT_SIGINT


def entry() -> None:
    """The ``nestedfn`` command: ``main`` and its exit status.  Once ``main`` has returned
    (every file written), SIGTERM and SIGINT get their default actions back, so a signal
    during interpreter shutdown ends the process quietly instead of raising into an
    ``atexit`` callback and printing a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:  # a signal in the instant after main's own handling ended
        code = EXIT_SIGTERM if _SIGNAL["received"] == signal.SIGTERM else EXIT_SIGINT
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)


if __name__ == "__main__":
    entry()
