"""Step latency of one Adam step, all results materialised, on three trees.

For each tree: the median milliseconds of one step (``mx.eval`` of every new parameter and
state array, then ``mx.synchronize``) for nestedfn eager ``apply_gradients``, nestedfn
``compile_step``, nestedfn ``compile_step(packed=True)``, ``mlx.optimizers.Adam`` and a plain
``tree_map`` Adam under ``mx.compile``; plus each one's ratio to ``mlx.optimizers.Adam`` and to
the memory floor (7 x 4 bytes per float32 parameter -- read p, m, v, g, write p, m, v -- over
the copy bandwidth measured in the same run).  The "hand-back floor" is what MLX charges for
the least a step returning a fresh params tree can do: one elementwise op over the packed
buffers and every leaf handed back as a view, evaluated (per-array bookkeeping).  The
"gather + hand-back floor" adds reading every param and gradient leaf into those buffers (no
optimizer, no checks), on one stream: on a GPU, the least any step that takes and returns
trees costs in MLX, which bounds the packed step there; on the CPU the packed step splits the
same work over its threads, so it is not a floor there.

Then ``nested_adam`` with frequencies (1, 2, 4) on the LoRA tree (tiers by depth), with
``compile_step`` and with ``compile_step(packed=True)`` (tier by tier on flat buffers): the mean
step over one full period against plain ``adam`` compiled, and the cost of a tier-0-only step
against a step where every tier updates.

    python benchmarks/step_latency.py [--quick] [--device cpu|gpu] [--rounds N]

Never part of the test suite: ratios measured in one run, not timed assertions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as mlx_optim
from mlx.utils import tree_flatten, tree_map

import nestedfn as nf
from nestedfn.fast.gather import gather
from nestedfn.fast.packing import pack, pack_layout, unpack
from nestedfn.optim.optimizers import adam
from nestedfn.tiered import nested_adam, tier_stats

LR = 1e-3


# --------------------------------------------------------------------------------------------
# trees
# --------------------------------------------------------------------------------------------


def lora_tree() -> dict:
    """LoRA (rank 8) of a 0.5B Qwen: 24 layers x q,k,v,o,gate,up,down; hidden 896,
    intermediate 4864, kv dim 128: 336 arrays, 4,399,104 parameters (mlx-lm's paths)."""
    hidden, inter, kv, r = 896, 4864, 128, 8
    dims = {
        "self_attn": {
            "q_proj": (hidden, hidden),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden),
        },
        "mlp": {
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        },
    }
    layers = []
    for _ in range(24):
        layer = {}
        for block, projs in dims.items():
            layer[block] = {
                name: {
                    "lora_a": mx.random.normal((i, r)) * 0.01,
                    "lora_b": mx.random.normal((r, o)) * 0.01,
                }
                for name, (i, o) in projs.items()
            }
        layers.append(layer)
    return {"model": {"layers": layers}}


def big_tree() -> dict:
    """10M parameters in 20 arrays of 1000 x 500."""
    return {"blocks": [{"w": mx.random.normal((1000, 500))} for _ in range(20)]}


def tiny_tree() -> dict:
    """300 arrays of 16 floats."""
    return {"layers": [{"w": mx.random.normal((16,))} for _ in range(300)]}


TREES: dict[str, tuple[str, Callable[[], dict]]] = {
    "lora": ("LoRA of a 0.5B Qwen: 336 arrays, 4.4M params", lora_tree),
    "big": ("20 arrays, 10M params", big_tree),
    "tiny": ("300 arrays of 16 floats", tiny_tree),
}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def _arrays(tree: Any) -> list[mx.array]:
    return [x for x in nf.leaves(tree) if isinstance(x, mx.array)]


def time_loop(step: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``step`` (which must materialise its results)."""
    for _ in range(warmup):
        step()
    mx.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        mx.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _add(res: dict[str, list[float]], key: str, times: list[float]) -> None:
    res.setdefault(key, []).extend(times)


def copy_bandwidth(n: int, iters: int) -> float:
    """Bytes per second read + written by ``y = x + 1`` on ``n`` float32."""
    x = mx.random.normal((n,))
    mx.eval(x)
    ms = statistics.median(time_loop(lambda: mx.eval(x + 1.0), iters, 3))
    return 2 * 4 * n / (ms / 1e3)


# --------------------------------------------------------------------------------------------
# the contenders
# --------------------------------------------------------------------------------------------


def bench_nestedfn(params, grads, kind: str, iters: int, warmup: int) -> list[float]:
    opt = adam(LR)
    state = nf.init(opt, params)
    if kind == "eager":

        def fn(s, g):
            return nf.apply_gradients(opt, s, g)

    elif kind == "compiled":
        fn = nf.compile_step(opt)
    elif kind == "packed1":
        fn = nf.compile_step(opt, packed=True, threads=1)
    else:
        fn = nf.compile_step(opt, packed=True)
    box = [state]

    def step():
        box[0] = fn(box[0], grads)
        mx.eval(box[0].params, box[0].opt_state)

    return time_loop(step, iters, warmup)


def bench_mlx_adam(params, grads, iters: int, warmup: int) -> list[float]:
    opt = mlx_optim.Adam(learning_rate=LR, bias_correction=True)
    opt.init(params)
    box = [params]

    def step():
        box[0] = opt.apply_gradients(grads, box[0])
        mx.eval(box[0], opt.state)

    return time_loop(step, iters, warmup)


def bench_tree_map_compiled(params, grads, iters: int, warmup: int) -> list[float]:
    b1, b2, eps = 0.9, 0.999, 1e-8

    @mx.compile
    def step_fn(p, m, v, g, t):
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1 = 1 - b1**t
        c2 = 1 - b2**t
        p = tree_map(lambda p, m, v: p - LR * (m / c1) / (mx.sqrt(v / c2) + eps), p, m, v)
        return p, m, v

    box = [params, tree_map(mx.zeros_like, params), tree_map(mx.zeros_like, params), 0]

    def step():
        p, m, v, t = box
        p, m, v = step_fn(p, m, v, grads, mx.array(t + 1, dtype=mx.float32))
        box[:] = [p, m, v, t + 1]
        mx.eval(p, m, v)

    return time_loop(step, iters, warmup)


def bench_handback(params, iters: int, warmup: int) -> list[float]:
    """The least any step that hands back a params tree of fresh arrays costs in MLX: one
    elementwise op over the packed buffers, then every leaf as a view (``unpack``), all
    evaluated.  On a GPU this per-array bookkeeping, not arithmetic, bounds the packed step."""
    lv, td = nf.flatten(params)
    layout = pack_layout(lv, td)
    bufs = pack(layout, lv)
    mx.eval(bufs)

    def step():
        mx.eval(unpack(layout, [b * 1.0 for b in bufs]))

    return time_loop(step, iters, warmup)


def bench_gather_floor(params, grads, iters: int, warmup: int) -> list[float]:
    """What a step that reads every param and gradient leaf and hands back a fresh params
    tree costs in MLX on one stream: both trees gathered into the packed buffers (one kernel
    per buffer on CUDA), one elementwise op, every leaf handed back as a view, evaluated.  No
    optimizer and no Python checks: on a GPU this, not the arithmetic, bounds any step that
    takes and returns trees (on the CPU, threads can split it)."""
    lv, td = nf.flatten(params)
    gl = nf.flatten(grads)[0]
    layout = pack_layout(lv, td)

    def step():
        p_bufs = gather(layout, lv, dtypes_checked=True)
        g_bufs = gather(layout, gl, dtypes_checked=True)
        mx.eval(unpack(layout, [p + g for p, g in zip(p_bufs, g_bufs)]))

    return time_loop(step, iters, warmup)


def bench_nested(
    params, grads, periods: int, warmup_periods: int, packed: bool = False
) -> dict[str, float]:
    """Per phase of nested_adam((1, 2, 4)) compiled (``packed``: tier by tier on flat
    buffers); returns ms for the period mean, the tier-0-only step, the all-tiers step and
    the parameter share of tier 0."""
    opt = nested_adam(LR, frequencies=(1, 2, 4))
    fn = nf.compile_step(opt, packed=packed)
    state = fn.init(params) if packed else nf.init(opt, params)
    period = opt.period
    by_phase: dict[int, list[float]] = {k: [] for k in range(period)}
    for it in range((warmup_periods + periods) * period):
        phase = state.step % period
        t0 = time.perf_counter()
        state = fn(state, grads)
        mx.eval(state.params, state.opt_state)
        mx.synchronize()
        if it >= warmup_periods * period:
            by_phase[phase].append(1e3 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in by_phase.items()}
    stats = tier_stats(state.opt_state)
    total = sum(s.parameters for s in stats)
    return {
        "period": period,
        "mean": sum(med.values()) / period,
        "tier0_only": med[0],  # step 0 of a period: only frequency-1 tiers update
        "all": med[period - 1],  # last step of a period: every tier updates
        "tier0_share": stats[0].parameters / total,
        "graphs": fn.graphs_built,
        "phases": med,
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default=None)
    ap.add_argument("--trees", default="lora,big,tiny", help="comma list of lora,big,tiny")
    ap.add_argument("--no-eager", action="store_true", help="skip nestedfn eager (slow)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="turns each contender takes, medians pool them (default 3; 1 with --quick)",
    )
    args = ap.parse_args()
    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    iters, warmup = (5, 2) if args.quick else (20, 5)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    dev = mx.default_device()
    print(
        f"# step latency: mlx {mx.__version__}, device {dev}, {platform.processor() or platform.machine()}"
    )
    bw_n = 1 << 22 if dev == mx.cpu else 1 << 26
    bw = copy_bandwidth(bw_n, 10 if args.quick else 30)
    print(
        f"copy bandwidth (y = x + 1 on {bw_n} float32): {bw / 1e9:.1f} GB/s; "
        f"{args.rounds} rounds x {iters} iters\n"
    )

    header = (
        "| tree | floor | hand-back floor | gather + hand-back floor | nestedfn eager "
        "| nestedfn compile_step "
        "| nestedfn compile_step(packed) | packed, threads=1 | mlx.optimizers.Adam "
        "| tree_map Adam, mx.compile |"
    )
    rows_ms = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    rows_ratio = [
        header.replace("| floor | hand-back floor | gather + hand-back floor ", ""),
        "|---|---|---|---|---|---|---|",
    ]
    lora_compiled = None
    for name in args.trees.split(","):
        title, make = TREES[name]
        params = make()
        grads = tree_map(lambda x: mx.random.normal(x.shape) * 1e-2, params)
        mx.eval(params, grads)
        n = sum(x.size for _, x in tree_flatten(params))
        floor = 7 * 4 * n / bw * 1e3
        res: dict[str, list[float]] = {}
        # the contenders take turns, round after round, and each one's median is over all of
        # its rounds: a shared machine's slow spells then fall on every contender alike
        for _ in range(args.rounds):
            if not args.no_eager:
                _add(res, "eager", bench_nestedfn(params, grads, "eager", iters, warmup))
            _add(res, "compiled", bench_nestedfn(params, grads, "compiled", iters, warmup))
            _add(res, "packed", bench_nestedfn(params, grads, "packed", iters, warmup))
            if dev == mx.cpu:  # on a GPU the packed step uses one stream anyway
                _add(res, "packed1", bench_nestedfn(params, grads, "packed1", iters, warmup))
            _add(res, "mlx", bench_mlx_adam(params, grads, iters, warmup))
            _add(res, "handback", bench_handback(params, iters, warmup))
            _add(res, "gather_floor", bench_gather_floor(params, grads, iters, warmup))
            _add(res, "tree_map", bench_tree_map_compiled(params, grads, iters, warmup))
        med = {k: statistics.median(v) for k, v in res.items()}
        if name == "lora":
            lora_compiled = (params, grads, med["compiled"], med["packed"])
        keys = ["eager", "compiled", "packed", "packed1", "mlx", "tree_map"]
        cells = [f"{med[k]:.2f}" if k in med else "-" for k in keys]
        rows_ms.append(
            f"| {title} | {floor:.2f} | {med['handback']:.2f} | {med['gather_floor']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
        ratio = [
            f"{med[k] / med['mlx']:.2f}x / {med[k] / floor:.1f}x" if k in med else "-" for k in keys
        ]
        rows_ratio.append(f"| {title} | " + " | ".join(ratio) + " |")
        print(f"done {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()), flush=True)

    print("\nMedian ms per Adam step (all results materialised):\n")
    print("\n".join(rows_ms))
    print("\nRatio to mlx.optimizers.Adam / ratio to the memory floor (lower is faster):\n")
    print("\n".join(rows_ratio))

    if lora_compiled is not None:
        params, grads, adam_ms, packed_ms = lora_compiled
        for packed, base, base_name in (
            (False, adam_ms, "adam compile_step"),
            (True, packed_ms, "adam compile_step(packed)"),
        ):
            nb = bench_nested(
                params, grads, 3 if args.quick else 10, warmup_periods=2, packed=packed
            )
            how = "compile_step(packed=True)" if packed else "compile_step"
            print(f"\nnested_adam (1, 2, 4) on the LoRA tree, tiers by depth, {how}:\n")
            print("| | ms | ratio |")
            print("|---|---|---|")
            print(
                f"| mean step over one period ({nb['period']} steps, {nb['graphs']} graphs) "
                f"| {nb['mean']:.2f} | {nb['mean'] / base:.2f}x {base_name} ({base:.2f} ms) |"
            )
            print(
                f"| tier-0-only step (tier 0 holds {100 * nb['tier0_share']:.0f}% of params) "
                f"| {nb['tier0_only']:.2f} | {nb['tier0_only'] / nb['all']:.2f}x the "
                "all-tiers step |"
            )
            print(f"| all-tiers step | {nb['all']:.2f} | 1.00x |")
            print(
                "\nper phase (step % period -> ms): "
                + ", ".join(f"{k}: {v:.2f}" for k, v in nb["phases"].items())
            )


if __name__ == "__main__":
    main()
