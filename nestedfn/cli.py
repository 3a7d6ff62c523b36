"""The ``nestedfn`` command (placeholder until the trainer lands: shows the tree layer)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import mlx.core as mx

    import nestedfn as nf

    params = {"model": {"layers": [{"lora_a": mx.zeros((4, 2))}, {}, {"lora_a": mx.ones((4, 2))}]}}
    flat = nf.to_flat(params)
    print("flat paths:", list(flat))
    back = nf.from_flat(flat, like=params)
    print("round trip exact:", nf.flatten(back)[1] == nf.flatten(params)[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nestedfn")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demo")
    demo.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
