"""Interleaved A/B of ``compile_step``'s CPU step between two checkouts of nestedfn.

``python benchmarks/ab_step.py --a DIR_A --b DIR_B [--rows big:lion,big:momentum] [--rounds N]``

Each checkout runs in two long-lived worker processes (``PYTHONPATH=DIR``), each of which
builds every row's tree, optimizer and compiled step once; they are started in the order A, B,
B, A, and each side's turns alternate between its two workers, because a worker's slot alone
moved medians by 4-11% in A/A runs (same code both sides).  The driver alternates the sides
turn by turn (``--per-turn`` steps a turn, who goes first alternating), so slow drifts of a
shared machine (other jobs, thermal state) fall on both sides alike.  A step is timed as
``benchmarks/step_latency.py`` times it: the step, ``mx.eval`` of params and state, and
``mx.synchronize``.  Printed per row: median ms of each side, the B/A ratio of the medians,
and the 10th percentiles (the least disturbed steps).  Run it once with the same directory on
both sides (an A/A run) to see the noise floor of the machine before reading a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import mlx.core as mx
sys.path.insert(0, BENCH)
import step_latency as sl
import nestedfn as nf

mx.set_default_device(mx.cpu)
rows = {}
for spec in ROWS:
    tree_name, opt_name = spec.split(":")
    mx.random.seed(0)
    params = sl.TREES[tree_name][1]()
    grads = nf.tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, params)
    opt = nf.nested_adam(sl.LR, frequencies=(1, 2, 4)) if opt_name == "nested_adam" else sl.NF_OPTS[opt_name]()
    fn = nf.compile_step(opt)
    state = nf.init(opt, params)
    mx.eval(params, grads, state)
    rows[spec] = [fn, state, grads]
print("ready", flush=True)
for line in sys.stdin:
    spec, n = line.split()
    fn, state, grads = rows[spec]
    out = []
    for _ in range(int(n)):
        t0 = time.perf_counter()
        state = fn(state, grads)
        mx.eval(state.params, state.opt_state)
        mx.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    rows[spec][1] = state
    print(json.dumps(out), flush=True)
"""


def start(path: Path, rows: list[str]) -> subprocess.Popen:
    bench = str(Path(__file__).resolve().parent)
    src = f"BENCH = {bench!r}\nROWS = {rows!r}\n" + WORKER
    env = {**os.environ, "PYTHONPATH": str(path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", src],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def turn(proc: subprocess.Popen, spec: str, n: int) -> list[float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{spec} {n}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def p10(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B")
    ap.add_argument(
        "--rows",
        default="lora:adam,lora:adamw,lora:lion,lora:momentum,"
        "lora:nested_adam,big:adam,big:adamw,big:lion,big:momentum",
    )
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument(
        "--per-turn", type=int, default=4, help="steps a turn (nested_adam: its period)"
    )
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="write every time here")
    args = ap.parse_args()
    rows = args.rows.split(",")
    paths = {"A": args.a, "B": args.b}
    procs: dict[str, list[subprocess.Popen]] = {"A": [], "B": []}
    for side in "ABBA":
        procs[side].append(start(paths[side], rows))
    times: dict[str, dict[str, list[float]]] = {r: {"A": [], "B": []} for r in rows}
    for spec in rows:
        for side in "AB":
            for proc in procs[side]:
                turn(proc, spec, args.warmup)
    for k in range(args.rounds):
        for spec in rows:
            order = "AB" if k % 2 == 0 else "BA"
            for side in order:
                times[spec][side] += turn(procs[side][(k // 2) % 2], spec, args.per_turn)
    print(f"A = {args.a}\nB = {args.b}\n{args.rounds} rounds x {args.per_turn} steps a turn\n")
    print("| row | A median ms | B median ms | B/A | A p10 | B p10 | B/A p10 |")
    print("|---|---|---|---|---|---|---|")
    for spec in rows:
        a, b = times[spec]["A"], times[spec]["B"]
        ma, mb = statistics.median(a), statistics.median(b)
        print(
            f"| {spec} | {ma:.2f} | {mb:.2f} | {mb / ma:.3f} | {p10(a):.2f} | {p10(b):.2f} "
            f"| {p10(b) / p10(a):.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "times": times}))
    for p in procs["A"] + procs["B"]:
        p.kill()


if __name__ == "__main__":
    main()
