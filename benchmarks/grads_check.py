"""What the grads-shape check (``nestedfn.optim.checks``) costs per step on a LoRA tree.

Run: ``python benchmarks/grads_check.py [--iters 200]``

The tree is the LoRA of a 0.5B Qwen (24 blocks x 7 projections x ``lora_a``/``lora_b``: 336
arrays, rank 8), as in ``benchmarks/tree_overhead.py``.  Timed: ``check_grads`` on a signature
already seen (what every eager ``apply_gradients`` pays), the first check of a new signature
(what a compiled step pays once, when it builds a graph), and for scale one eager
``apply_gradients`` of Adam without the check.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

import nestedfn as nf
from nestedfn.optim import checks, core

HIDDEN, INTER, KV, RANK, LAYERS = 896, 4864, 128, 8, 24
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV)}
PROJ |= {"o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER)}
PROJ |= {"down_proj": (INTER, HIDDEN)}


def lora_tree() -> dict:
    def block() -> dict:
        return {
            k: {"lora_a": mx.zeros((i, RANK)), "lora_b": mx.zeros((RANK, o))}
            for k, (i, o) in PROJ.items()
        }

    return {"model": {"layers": [block() for _ in range(LAYERS)]}}


def median_us(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    params, grads = lora_tree(), lora_tree()
    mx.eval(params, grads)
    checks.check_grads(params, grads)
    seen = median_us(lambda: checks.check_grads(params, grads), args.iters)

    def fresh() -> None:
        checks._CHECKED.clear()
        checks._LAST[0] = None
        checks.check_grads(params, grads)

    first = median_us(fresh, args.iters)
    opt = nf.adam(1e-3)
    state = nf.init(opt, params)
    real = core.check_grads
    core.check_grads = lambda *a, **k: None
    try:
        eager = median_us(
            lambda: mx.eval(nf.apply_gradients(opt, state, grads).params), max(args.iters // 10, 5)
        )
    finally:
        core.check_grads = real
    n = len(nf.to_flat(params))
    print(f"LoRA tree, {n} arrays: check of a seen signature {seen:.0f} us/step")
    print(f"first check of a new signature {first:.0f} us (once per graph in compile_step)")
    print(f"eager Adam apply_gradients without the check: {eager / 1000:.1f} ms/step")
    print(f"added cost on the eager step: {100 * seen / eager:.2f}%")


if __name__ == "__main__":
    main()
