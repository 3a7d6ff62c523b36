"""Step latency of one optimizer step against its peers, all results materialised.

For each tree (LoRA of a 0.5B Qwen: 336 arrays, 4.4M params; 20 arrays of 10M params; 300
arrays of 16 floats) and each optimizer (``adam``, ``adamw``, ``lion``, ``momentum``, lr 1e-3,
float32): the median milliseconds of one step, every new parameter and state array
materialised, for

- nestedfn ``compile_step(opt)``, the default (on the CPU: the native multi-tensor step,
  ``nestedfn.fast.native``, when it is built), ``compile_step(opt, packed=True)``, and the MLX
  graph that ``compile_step`` ran before the native step (``NESTEDFN_NATIVE=0``);
- ``mlx.optimizers`` (``Adam``, ``AdamW``, ``Lion``, ``SGD(momentum=0.9)``);
- the peers, when importable (``pip install torch==2.13.0 jax optax``): torch 2.x
  ``fused=True`` and ``foreach=True`` (``Adam``, ``AdamW``, ``SGD``; torch has no Lion) and
  ``optax`` under ``jax.jit`` with the params and state donated;
- the floor: the bytes the update must move (Adam/AdamW: read p, g, m, v, write p, m, v,
  7 x 4 B per param; Lion and momentum 5 x 4 B) over the copy bandwidth measured in the run.

The contenders take turns for ``--rounds`` rounds and each median pools its rounds, so the
ratios compare like with like on a shared machine.  Beside each time: the peak resident
memory above the state during the step loop (``VmHWM`` after a reset, minus the resident
size before: one more copy of the params and moments shows as +1 state).  Then
``nested_adam`` (frequencies 1, 2, 4, tiers by depth) on the LoRA tree: the mean step over
a period against plain Adam.  ``--extra`` adds the older floors (hand-back, gather) and
nestedfn eager.

    python benchmarks/step_latency.py [--quick] [--device cpu|gpu] [--rounds N] [--trees ...]
        [--opts adam,adamw,lion,momentum] [--extra]

``--device gpu``: MLX on the GPU (on a GPU the native step does not run: ``compile_step``
takes the MLX graph; ``packed=True`` is the fast path there), torch on CUDA and JAX on its
GPU backend when they have one.  Never part of the test suite: ratios, not timed asserts.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
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
from nestedfn.optim.optimizers import adam, adamw, lion, momentum
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
# memory: peak resident set above the state, per contender
# --------------------------------------------------------------------------------------------

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS): no trim, RSS only
    _LIBC = None


def _rss_kb(field: str = "VmRSS") -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Free what can be freed, reset the resident high-water mark; the RSS now (kB)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _rss_kb()


def _peak_above(base: int | None) -> float | None:
    hwm = _rss_kb("VmHWM")
    return None if base is None or hwm is None else max(0.0, (hwm - base) / 1024)


def timed(step: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None]):
    """(ms per call, peak MB above the resident set before the timed calls)."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    if time.perf_counter() - t0 > 0.05:  # a slow contender: fewer calls, same median idea
        iters = min(iters, 6)
    base = _reset_peak()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        out.append(1e3 * (time.perf_counter() - t0))
    return out, _peak_above(base)


# --------------------------------------------------------------------------------------------
# contenders: nestedfn and mlx.optimizers
# --------------------------------------------------------------------------------------------

NF_OPTS = {
    "adam": lambda: adam(LR),
    "adamw": lambda: adamw(LR, weight_decay=0.01),
    "lion": lambda: lion(LR / 10),
    "momentum": lambda: momentum(LR, 0.9),
}
FLOOR_WORDS = {"adam": 7, "adamw": 7, "lion": 5, "momentum": 5}


def bench_nf(params, grads, opt_name: str, kind: str, iters: int, warmup: int):
    opt = NF_OPTS[opt_name]()
    import nestedfn.fast.native as native

    native._LAZY = False if kind == "eager" else None  # the kernel in the call, or by the tree
    if kind == "packed":
        fn = nf.compile_step(opt, packed=True)
        state = fn.init(params)
    else:
        fn = nf.compile_step(opt)
        if kind == "graph":  # the MLX graph compile_step ran before the native step
            fn._native = None
        state = nf.init(opt, params)
    box = [state]

    def step():
        box[0] = fn(box[0], grads)
        mx.eval(box[0].params, box[0].opt_state)

    out = timed(step, iters, warmup, mx.synchronize)
    native._LAZY = None
    return out, getattr(fn, "native_steps", 0) > 0


def bench_mlx(params, grads, opt_name: str, iters: int, warmup: int):
    make = {
        "adam": lambda: mlx_optim.Adam(learning_rate=LR, bias_correction=True),
        "adamw": lambda: mlx_optim.AdamW(learning_rate=LR, weight_decay=0.01),
        "lion": lambda: mlx_optim.Lion(learning_rate=LR / 10),
        "momentum": lambda: mlx_optim.SGD(learning_rate=LR, momentum=0.9),
    }[opt_name]
    opt = make()
    opt.init(params)
    box = [params]

    def step():
        box[0] = opt.apply_gradients(grads, box[0])
        mx.eval(box[0], opt.state)

    return timed(step, iters, warmup, mx.synchronize)


# --------------------------------------------------------------------------------------------
# peers: torch (fused, foreach) and optax under jax.jit (donated)
# --------------------------------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _import_optax():
    try:
        import jax
        import optax
    except ImportError:
        return None
    return jax, optax


def bench_torch(params, grads, opt_name: str, impl: str, gpu: bool, iters: int, warmup: int):
    torch = _import_torch()
    import numpy as np

    dev = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    if gpu and dev == "cpu":
        return None
    ps = [torch.tensor(np.array(x), device=dev) for _, x in tree_flatten(params)]
    for p, (_, g) in zip(ps, tree_flatten(grads)):
        p.grad = torch.tensor(np.array(g), device=dev)
    kw = {impl: True}
    try:
        if opt_name == "adam":
            opt = torch.optim.Adam(ps, lr=LR, **kw)
        elif opt_name == "adamw":
            opt = torch.optim.AdamW(ps, lr=LR, weight_decay=0.01, **kw)
        elif opt_name == "momentum":
            opt = torch.optim.SGD(ps, lr=LR, momentum=0.9, **kw)
        else:
            return None  # no Lion in torch
        opt.step()
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this optimizer here
        return None
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return timed(opt.step, iters, warmup, sync)


def bench_optax(params, grads, opt_name: str, gpu: bool, iters: int, warmup: int):
    jax, optax = _import_optax()
    import numpy as np

    backend = "gpu" if gpu else "cpu"
    try:
        dev = jax.devices(backend)[0]
    except RuntimeError:
        return None
    tx = {
        "adam": lambda: optax.adam(LR),
        "adamw": lambda: optax.adamw(LR, weight_decay=0.01),
        "lion": lambda: optax.lion(LR / 10),
        "momentum": lambda: optax.sgd(LR, momentum=0.9),
    }[opt_name]()
    to = lambda t: jax.device_put(tree_map(lambda x: np.array(x), t), dev)  # noqa: E731
    p, g = to(params), to(grads)
    s = tx.init(p)

    def upd(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    fn = jax.jit(upd, donate_argnums=(0, 1))
    box = [p, s]

    def step():
        box[0], box[1] = fn(box[0], box[1], g)
        jax.block_until_ready(box)

    return timed(step, iters, warmup, lambda: None)


# --------------------------------------------------------------------------------------------
# --extra: the older floors and nestedfn eager (Adam)
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

COLUMNS = [
    ("torch_fused", "torch fused"),
    ("torch_foreach", "torch foreach"),
    ("optax", "optax, jax.jit (donated)"),
    ("default", "**nestedfn compile_step** (default)"),
    ("eager", "nestedfn, native kernel in the call"),
    ("packed", "nestedfn packed=True"),
    ("graph", "nestedfn MLX graph (NESTEDFN_NATIVE=0)"),
    ("mlx", "mlx.optimizers"),
]
PEERS = ("torch_fused", "torch_foreach", "optax")


def _fmt(ms_mb: tuple[float, float | None] | None) -> str:
    if ms_mb is None:
        return "-"
    ms, mb = ms_mb
    return f"{ms:.2f}" + ("" if mb is None else f" ({mb:.0f} MB)")


def contenders(params, grads, opt_name, gpu, iters, warmup, torch, jo) -> dict:
    """Name -> a zero-argument run of that contender on this tree and optimizer."""
    runs = {
        key: (lambda key=key: bench_nf(params, grads, opt_name, key, iters, warmup))
        for key in ("default", "eager", "packed", "graph")
    }
    runs["mlx"] = lambda: bench_mlx(params, grads, opt_name, iters, warmup)
    if torch is not None:
        for impl in ("fused", "foreach"):
            runs[f"torch_{impl}"] = lambda impl=impl: bench_torch(
                params, grads, opt_name, impl, gpu, iters, warmup
            )
    if jo is not None:
        runs["optax"] = lambda: bench_optax(params, grads, opt_name, gpu, iters, warmup)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default=None)
    ap.add_argument("--trees", default="lora,big,tiny", help="comma list of lora,big,tiny")
    ap.add_argument("--opts", default="adam,adamw,lion,momentum")
    ap.add_argument("--extra", action="store_true", help="older floors and nestedfn eager")
    ap.add_argument("--no-nested", action="store_true", help="skip the nested_adam table")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="turns each contender takes, medians pool them (default 3; 1 with --quick)",
    )
    args = ap.parse_args()
    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    gpu = mx.default_device() != mx.cpu
    iters, warmup = (5, 2) if args.quick else (20, 5)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    torch, jo = _import_torch(), _import_optax()
    from nestedfn.fast.native import native_module

    dev = mx.default_device()
    print(
        f"# step latency: mlx {mx.__version__}, device {dev}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
        f"{torch.__version__ if torch else 'absent'}, jax/optax "
        f"{jo[0].__version__ + '/' + jo[1].__version__ if jo else 'absent'}; nestedfn native "
        f"step {'built' if native_module() is not None else 'absent'}"
    )
    bw_n = 1 << 22 if dev == mx.cpu else 1 << 26
    bw = copy_bandwidth(bw_n, 10 if args.quick else 30)
    print(
        f"copy bandwidth (y = x + 1 on {bw_n} float32): {bw / 1e9:.1f} GB/s; "
        f"{args.rounds} rounds x {iters} iters\n"
    )
    opts = args.opts.split(",")
    head = "| tree | optimizer | floor | " + " | ".join(c for _, c in COLUMNS)
    head += " | default / best peer | default / floor |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    lora = None
    for name in args.trees.split(","):
        title, make = TREES[name]
        params = make()
        grads = tree_map(lambda x: mx.random.normal(x.shape) * 1e-2, params)
        mx.eval(params, grads)
        n = sum(x.size for _, x in tree_flatten(params))
        for opt_name in opts:
            res: dict[str, list[float]] = {}
            mem: dict[str, float | None] = {}
            native = False
            for _ in range(args.rounds):
                # the copy bandwidth in every round, the best one kept: a busy spell must not
                # lower the floor
                bw = max(bw, copy_bandwidth(bw_n, 10))
                runs = contenders(params, grads, opt_name, gpu, iters, warmup, torch, jo)
                for key, run in runs.items():
                    out = run()
                    if key in ("default", "eager", "packed", "graph"):
                        out, used = out
                        native = native or (key == "default" and used)
                    if out is None:
                        continue
                    times, mb = out
                    res.setdefault(key, []).extend(times)
                    mem[key] = mb if mem.get(key) is None else max(mem[key], mb or 0.0)
            floor = FLOOR_WORDS[opt_name] * 4 * n / bw * 1e3
            med = {k: statistics.median(v) for k, v in res.items()}
            if name == "lora" and opt_name == "adam":
                lora = (params, grads, med["default"])
            cells = [_fmt((med[k], mem.get(k)) if k in med else None) for k, _ in COLUMNS]
            peers = [med[k] for k in PEERS if k in med]
            best = f"{med['default'] / min(peers):.2f}x" if peers else "-"
            how = " (native)" if native else ""
            rows.append(
                f"| {title} | {opt_name}{how} | {floor:.2f} | "
                + " | ".join(cells)
                + f" | {best} | {med['default'] / floor:.2f}x |"
            )
            print(
                f"done {name}/{opt_name}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
                + f"; floor {floor:.2f}",
                flush=True,
            )
        if args.extra:
            res = {}
            for _ in range(args.rounds):
                _add(res, "eager", bench_nestedfn(params, grads, "eager", iters, warmup))
                _add(res, "handback", bench_handback(params, iters, warmup))
                _add(res, "gather_floor", bench_gather_floor(params, grads, iters, warmup))
                _add(res, "tree_map", bench_tree_map_compiled(params, grads, iters, warmup))
            print(
                f"extra {name} (Adam): "
                + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in res.items())
            )

    print(f"\nbest copy bandwidth of the run: {bw / 1e9:.1f} GB/s (the floors use the best so far)")
    print("\nMedian ms per step (peak MB above the state), all results materialised:\n")
    print("\n".join(rows))

    if lora is not None and not args.no_nested:
        params, grads, adam_ms = lora
        print("\nnested_adam (1, 2, 4) on the LoRA tree, tiers by depth:\n")
        print("| step | period mean ms | vs plain Adam (default) | tier-0-only / all-tiers |")
        print("|---|---|---|---|")
        for packed in (False, True):
            nb = bench_nested(
                params, grads, 3 if args.quick else 10, warmup_periods=2, packed=packed
            )
            how = "compile_step(packed=True)" if packed else "compile_step (default)"
            print(
                f"| {how} | {nb['mean']:.2f} | {nb['mean'] / adam_ms:.2f}x ({adam_ms:.2f} ms) "
                f"| {nb['tier0_only'] / nb['all']:.2f}x |"
            )


if __name__ == "__main__":
    main()
