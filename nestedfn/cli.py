"""The ``nestedfn`` command: ``demo``, ``train``, ``inspect``, ``plot`` (flat, like mlx-lm).

Every ``TrainConfig`` option is also a flag of ``train``/``inspect`` (``--learning-rate``,
``--frequencies 1 2 4``, ``--tiers '{mlp: 1, .*: 0}'``...); flags override ``--config
run.yaml``.  User errors (paths, data, options, an occupied run directory) print one line on
stderr and exit with status 2, with no traceback and nothing overwritten.  Ctrl-C during
``train``/``demo`` saves a checkpoint of the last completed step, prints how to resume
(``nestedfn train --resume RUN_DIR``) and exits with status 130.

There is no ``bench`` command: the throughput comparison with ``mlx_lm lora`` is
``python benchmarks/train_throughput.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml

DEMO_STEPS = 150


def _yaml_value(text: str) -> Any:
    from nestedfn.lm.config import parse_yaml  # reads 1e-3 as a float, as the --config file

    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {e}") from None


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from nestedfn.lm.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    group = p.add_argument_group("training options (override --config)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_default = f"default {f.default!r}" if f.default is not dataclasses.MISSING else ""
        if f.name in ("model", "data"):
            continue
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "frequencies":
            group.add_argument(flag, type=int, nargs="+", default=None, help="default 1 2 4")
        elif f.name == "lora_keys":
            group.add_argument(flag, nargs="+", default=None, help="default: every linear")
        elif f.name in ("tiers", "optimizer_args"):
            group.add_argument(flag, type=_yaml_value, default=None, help="YAML value")
        elif kind is int or f.name == "decay_steps":
            group.add_argument(flag, type=int, default=None, help=help_default)
        elif kind is float:
            group.add_argument(flag, type=float, default=None, help=help_default)
        else:
            group.add_argument(flag, type=str, default=None, help=help_default)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from nestedfn.lm.config import TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _config(args: argparse.Namespace) -> Any:
    from nestedfn.lm.config import TrainConfig, is_tiered, load_config, resolve, untiered_reason

    base = load_config(args.config) if args.config else TrainConfig()
    overrides = _overrides(args)
    config = resolve(base, overrides)
    ignored = [k for k in ("tiers", "tier_order", "tier_reduce") if k in overrides]
    if ignored and not is_tiered(config):
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise _UsageError(f"{flags} would be ignored: {untiered_reason(config)}")
    return config


def _train(args: argparse.Namespace) -> int:
    from nestedfn.lm.trainer import train

    out = args.out or (args.resume if isinstance(args.resume, str) else None)
    if out is None:
        raise _UsageError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    if isinstance(args.resume, str) and args.out and Path(args.resume) != Path(args.out):
        raise _UsageError(f"--resume {args.resume} and --out {args.out} name different runs")
    resume = bool(args.resume)
    if resume:
        if args.config:
            raise _UsageError("--config cannot be combined with --resume (the run keeps its own)")
        from nestedfn.lm.config import TrainConfig

        config, overrides = TrainConfig(), _overrides(args)
    else:
        config, overrides = _config(args), None
    summary = train(
        config, out, resume=resume, force=args.force, overrides=overrides, stop_at=args.stop_at
    )
    _report(summary)
    return 0


def _report(summary: Any) -> None:
    """The run's summary lines, printed by rank 0 only (every rank has the same numbers)."""
    from nestedfn.run import distributed

    if not distributed.is_main():
        return
    if summary.first_loss is not None:
        print(f"train loss {summary.first_loss:.3f} -> {summary.last_loss:.3f}")
    if summary.valid_losses:
        v0, v1 = summary.valid_losses[0][1], summary.valid_losses[-1][1]
        print(f"valid loss {v0:.3f} -> {v1:.3f} (best {summary.best_valid:.3f})")
    if summary.tokens_per_sec:
        print(f"{summary.tokens_per_sec:,.0f} tokens/s over {summary.steps} steps")
    if summary.stopped_early:
        print("stopped early: the valid loss stopped improving")


def _demo(args: argparse.Namespace) -> int:
    from nestedfn.lm.config import TrainConfig
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset
    from nestedfn.lm.rundir import check_out_dir
    from nestedfn.lm.trainer import train

    out = Path(args.out or Path("nestedfn-runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    check_out_dir(out, resume=False, force=args.force)
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
    summary = train(config, out, force=args.force)
    _report(summary)
    print(
        f"next: nestedfn plot {out}\n      python -m mlx_lm generate --model {model_dir} "
        f'--adapter-path {out} --ignore-chat-template --prompt "Ada has a blue cat. The cat says"'
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestedfn", description="Nested Learning optimizers for MLX: LoRA fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the built-in tiny model on built-in data")
    demo.add_argument("--out", help="run directory (default nestedfn-runs/demo-TIME)")
    demo.add_argument("--steps", type=int, default=None, help=f"default {DEMO_STEPS}")
    demo.add_argument("--force", action="store_true", help="replace a run in --out")
    demo.set_defaults(fn=_demo)

    train = sub.add_parser("train", help="fine-tune LoRA adapters of an mlx-lm model")
    train.add_argument("--model", help="mlx-lm model directory")
    train.add_argument("--data", help="directory with train.jsonl and valid.jsonl")
    train.add_argument("--out", help="run directory")
    train.add_argument("--config", help="YAML file of training options")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (default --out) from its latest checkpoint",
    )
    train.add_argument("--force", action="store_true", help="replace a run in --out")
    train.add_argument(
        "--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step"
    )
    _add_config_flags(train)
    train.set_defaults(fn=_train)

    insp = sub.add_parser("inspect", help="print the tier table a run would start from")
    insp.add_argument("--model", help="mlx-lm model directory")
    insp.add_argument("--data", help="optional data directory")
    insp.add_argument("--config", help="YAML file of training options")
    _add_config_flags(insp)
    insp.set_defaults(fn=_inspect)

    plot = sub.add_parser("plot", help="PNG of a run's loss curves and tier updates")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/training.png)")
    plot.set_defaults(fn=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nestedfn.lm.config import ConfigError
    from nestedfn.lm.data import DataError
    from nestedfn.lm.errors import RunError
    from nestedfn.lm.trainer import Interrupted
    from nestedfn.run import distributed

    try:
        return int(args.fn(args))
    except (RunError, ConfigError, DataError, _UsageError, distributed.ConnectError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"nestedfn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as e:  # Ctrl-C in the training loop: the last step done is saved
        if distributed.is_main():
            print(f"nestedfn {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"nestedfn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
