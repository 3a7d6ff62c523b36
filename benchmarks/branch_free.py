"""Cost of the branch-free nested step (one graph for every step, ``mx.where`` on the step)
against ``compile_step``'s per-phase graphs, for ``nested_adam`` (frequencies 1, 2, 4, tiers
by depth) on the LoRA tree of ``step_latency.py`` (336 arrays, 4.4M parameters).

The branch-free step is what ``as_mlx_optimizer`` runs inside mlx-lm's trainer: the optimizer
state is captured by ``mx.compile`` and the step is a traced array, so every tier's Adam runs at
every step and ``mx.where`` keeps the results of the active ones.  The contenders alternate for
``--rounds`` rounds of one period (4 steps) x ``--iters`` periods; the report is the median
milliseconds per step, averaged over the period, and the ratio branch-free / per-phase.

    python benchmarks/branch_free.py [--device cpu|gpu] [--rounds N] [--iters N]

Never part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).parent))

from step_latency import lora_tree  # noqa: E402

import nestedfn as nf  # noqa: E402

PERIOD = 4


def per_phase(params, grads):
    opt = nf.nested_adam(1e-3)
    step = nf.compile_step(opt, native=False)  # MLX graphs, like the branch-free one
    state = nf.init(opt, params)

    def run():
        nonlocal state
        state = step(state, grads)
        return [state.params, state.opt_state]

    return run


def branch_free(params, grads):
    wrapper = nf.as_mlx_optimizer(nf.nested_adam(1e-3))
    holder = nn.Module()
    for k, v in params.items():
        setattr(holder, k, v)
    wrapper.init(holder.parameters())
    captured = [holder.state, wrapper.state]

    def body(g):
        wrapper.update(holder, g)

    compiled = mx.compile(body, inputs=captured, outputs=captured)

    def run():
        compiled(grads)
        return captured

    return run


def timed(run, iters: int) -> float:
    """Mean ms per step over ``iters`` periods of ``PERIOD`` steps, each step evaluated."""
    t0 = time.perf_counter()
    for _ in range(iters * PERIOD):
        mx.eval(run())
    return (time.perf_counter() - t0) * 1e3 / (iters * PERIOD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5, help="periods per round")
    a = ap.parse_args()
    if a.device:
        mx.set_default_device(mx.cpu if a.device == "cpu" else mx.gpu)
    params = lora_tree()
    grads = nf.tree_map(lambda p: mx.full(p.shape, 1e-3, p.dtype), params)
    mx.eval(params, grads)
    runs = {"compile_step (per-phase graphs)": per_phase(params, grads),
            "branch-free (one graph)": branch_free(params, grads)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():
        timed(run, 1)  # trace every graph
    for _ in range(a.rounds):
        for k, run in runs.items():
            times[k].append(timed(run, a.iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device: {mx.default_device()}, nested_adam (1, 2, 4) on the LoRA tree")
    for k, v in med.items():
        print(f"{k:34s} {v:8.2f} ms/step (period mean)")
    a_, b_ = med.values()
    print(f"branch-free / per-phase: {b_ / a_:.2f}x")


if __name__ == "__main__":
    main()
