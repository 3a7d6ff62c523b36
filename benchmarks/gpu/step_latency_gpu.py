"""Step latency on a GPU: nestedfn's default ``compile_step`` (the multi-tensor kernels of
``nestedfn.fast.multitensor``) beside the MLX graph it replaces, ``compile_step(packed=True)``,
torch ``fused=True``/``foreach=True`` and optax under ``jax.jit`` (donated), in one process on
one card, taking turns for ``--rounds`` rounds (medians pool the rounds).

Trees and optimizers are ``benchmarks/step_latency.py``'s (LoRA of a 0.5B Qwen: 336 arrays,
4.4M params; 20 arrays of 10M params; lr 1e-3, float32).  Then ``nested_adam`` (1, 2, 4) on
the LoRA tree: the mean step over a period against plain Adam, and the leaves-per-launch sweep
of the default Adam step.  Writes ``--json`` (per tree and optimizer: each contender's median
ms, the card).  Not a test; the ratios are what to read.

    python benchmarks/gpu/step_latency_gpu.py [--rounds 3] [--iters 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from itertools import accumulate
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")

import mlx.core as mx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from step_latency import NF_OPTS, TREES, time_loop  # noqa: E402

import nestedfn as nf  # noqa: E402
from nestedfn.fast import multitensor as mt  # noqa: E402
from nestedfn.tiered import nested_adam  # noqa: E402


def make_nf(params, grads, opt, kind: str, group: int | None = None):
    """(step, info) for nestedfn's ``kind``: default, graph (the MLX graph, the GPU default
    before), packed; ``group`` sets the multi-tensor step's leaves per launch."""
    if kind == "packed":
        fn = nf.compile_step(opt, packed=True)
        state = fn.init(params)
    elif kind == "graph":
        fn = nf.compile_step(opt, native=False)
        state = nf.init(opt, params)
    elif group is not None:
        fn = mt.MultiTensorStep(opt, group=group)
        state = nf.init(opt, params)
    else:
        fn = nf.compile_step(opt)
        state = nf.init(opt, params)
    box = [state]

    def step():
        box[0] = fn(box[0], grads)
        mx.eval(box[0].params, box[0].opt_state)

    def info() -> dict[str, Any]:
        if not isinstance(fn, mt.MultiTensorStep):
            return {}
        return {
            "multitensor": not fn.off and fn.multitensor_steps > 0,
            "group": fn.group,
            "checks": [(repr(k), w, same) for k, w, same in fn.checks],
        }

    return step, info


def make_torch(params, grads, name: str, impl: str):
    import numpy as np
    import torch
    from mlx.utils import tree_flatten

    ps = [torch.tensor(np.array(x), device="cuda") for _, x in tree_flatten(params)]
    for p, (_, g) in zip(ps, tree_flatten(grads)):
        p.grad = torch.tensor(np.array(g), device="cuda")
    kw = {impl: True}
    if name == "adam":
        opt = torch.optim.Adam(ps, lr=1e-3, **kw)
    elif name == "adamw":
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw)
    elif name == "momentum":
        opt = torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **kw)
    else:
        return None  # no Lion in torch

    def step():
        opt.step()
        torch.cuda.synchronize()

    return step, dict


def make_optax(params, grads, name: str):
    import jax
    import numpy as np
    import optax
    from mlx.utils import tree_map

    tx = {
        "adam": lambda: optax.adam(1e-3),
        "adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
        "lion": lambda: optax.lion(1e-4),
        "momentum": lambda: optax.sgd(1e-3, momentum=0.9),
    }[name]()
    dev = jax.devices("gpu")[0]
    to = lambda t: jax.device_put(tree_map(lambda x: np.array(x), t), dev)  # noqa: E731
    p, g = to(params), to(grads)
    box = [p, tx.init(p)]

    def upd(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    fn = jax.jit(upd, donate_argnums=(0, 1))

    def step():
        box[0], box[1] = fn(box[0], box[1], g)
        jax.block_until_ready(box)

    return step, dict


def race(makers: dict[str, Any], rounds: int, iters: int, warmup: int, tag: str):
    """Build every contender once, warm it, then take turns; medians pool the rounds."""
    steps: dict[str, Any] = {}
    for key, make in makers.items():
        try:
            made = make()
            if made is None:
                continue
            for _ in range(warmup):
                made[0]()
            mx.synchronize()
            steps[key] = made
        except Exception as e:  # one contender failing must not lose the others
            print(f"  {tag}/{key}: {type(e).__name__}: {e}", flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for key in order:
            try:
                times[key] += time_loop(steps[key][0], iters, warmup=0)
            except Exception as e:
                print(f"  {tag}/{key}: {type(e).__name__}: {e}", flush=True)
    info = {k: v[1]() for k, v in steps.items()}
    return {k: _med(v) for k, v in times.items() if v}, {k: i for k, i in info.items() if i}


def host_split(params, grads, kind: str, iters: int) -> dict[str, float]:
    """Median ms of the step's call alone (graph building and launch bookkeeping on the host)
    and of the ``mx.eval`` that follows it, for ``kind`` (``make_nf``'s) Adam."""
    import time

    opt = NF_OPTS["adam"]()
    fn = nf.compile_step(opt, packed=kind == "packed")
    state = fn.init(params) if kind == "packed" else nf.init(opt, params)
    call, ev = [], []
    for it in range(iters + 5):
        mx.synchronize()
        t0 = time.perf_counter()
        state = fn(state, grads)
        t1 = time.perf_counter()
        mx.eval(state.params, state.opt_state)
        mx.synchronize()
        if it >= 5:
            call.append(1e3 * (t1 - t0))
            ev.append(1e3 * (time.perf_counter() - t1))
    return {"call": _med(call), "eval": _med(ev)}


def views_floor(params, iters: int, kinds: int = 3) -> dict[str, float]:
    """A lower bound of any step that returns its state in the tree layout, in MLX: one
    elementwise op per kind over a flat buffer of the tree's size (``kinds``: Adam's params,
    m, v), split into one view per leaf, then ``mx.eval`` of the views; median ms of the call
    and of its eval.  No optimizer arithmetic: what the arrays alone cost on this backend."""
    import time

    sizes = [x.size for x in nf.flatten(params)[0]]
    cuts = list(accumulate(sizes))[:-1]
    bufs = [mx.zeros((sum(sizes),)) for _ in range(kinds)]
    mx.eval(bufs)
    call, ev = [], []
    for it in range(iters + 5):
        mx.synchronize()
        t0 = time.perf_counter()
        bufs = [b + 1.0 for b in bufs]
        views = [v for b in bufs for v in mx.split(b, cuts)]
        t1 = time.perf_counter()
        mx.eval(views)
        mx.synchronize()
        if it >= 5:
            call.append(1e3 * (t1 - t0))
            ev.append(1e3 * (time.perf_counter() - t1))
    return {"call": _med(call), "eval": _med(ev), "arrays": len(views)}


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 4) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--trees", default="lora,big")
    ap.add_argument("--opts", default="adam,adamw,lion,momentum")
    ap.add_argument("--groups", default="16,32,64")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--mlx-peers-for",
        default="adam,adamw,lion,momentum",
        help="optimizers also timed as the MLX graph and packed=True (slow to build)",
    )
    ap.add_argument("--nested-graph", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="gpu", help="cpu: a smoke run of the script only")
    a = ap.parse_args()
    mx.set_default_device(mx.gpu if a.device == "gpu" else mx.cpu)
    card = "unknown"
    try:
        import torch

        card = torch.cuda.get_device_name(0)
    except Exception:
        pass
    print(f"MLX {mx.__version__} on {mx.default_device()}, card {card}", flush=True)
    result: dict[str, Any] = {"card": card, "mlx": mx.__version__, "trees": {}}
    R, N, W = a.rounds, a.iters, a.warmup
    for tree in a.trees.split(","):
        title, make = TREES[tree]
        mx.random.seed(0)
        params = make()
        grads = nf.tree_map(lambda x: mx.random.normal(x.shape) * 1e-3, params)
        mx.eval(params, grads)
        rows: dict[str, Any] = {}
        for name in a.opts.split(","):
            o = NF_OPTS[name]
            makers = {
                "default": lambda o=o, p=params, g=grads: make_nf(p, g, o(), "default"),
                "graph": lambda o=o, p=params, g=grads: make_nf(p, g, o(), "graph"),
                "packed": lambda o=o, p=params, g=grads: make_nf(p, g, o(), "packed"),
                "torch_fused": lambda n=name, p=params, g=grads: make_torch(p, g, n, "fused"),
                "torch_foreach": lambda n=name, p=params, g=grads: make_torch(p, g, n, "foreach"),
                "optax": lambda n=name, p=params, g=grads: make_optax(p, g, n),
            }
            if name not in a.mlx_peers_for.split(","):
                del makers["graph"], makers["packed"]
            row, info = race(makers, R, N, W, f"{tree}/{name}")
            row["info"] = info.get("default", {})
            rows[name] = row
            line = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "info")
            print(f"{tree:5s} {name:9s} {line}  {row['info']}", flush=True)
        result["trees"][tree] = {"title": title, "rows": rows}

    # nested_adam (1, 2, 4) on the LoRA tree: the mean step over its period vs plain Adam
    mx.random.seed(0)
    params = TREES["lora"][1]()
    grads = nf.tree_map(lambda x: mx.random.normal(x.shape) * 1e-3, params)
    mx.eval(params, grads)
    split = {k: host_split(params, grads, k, N) for k in ("default", "packed")}
    split["views_floor"] = views_floor(params, N)
    result["host_split_lora_adam"] = split
    print("LoRA Adam, ms of the call / of its eval:", split, flush=True)
    makers = {
        "nested_adam_default": lambda: make_nf(params, grads, nested_adam(1e-3, (1, 2, 4)), "d"),
        "adam_default": lambda: make_nf(params, grads, NF_OPTS["adam"](), "default"),
        "nested_adam_graph": lambda: make_nf(params, grads, nested_adam(1e-3, (1, 2, 4)), "graph"),
        "adam_graph": lambda: make_nf(params, grads, NF_OPTS["adam"](), "graph"),
    }
    if not a.nested_graph:
        del makers["nested_adam_graph"], makers["adam_graph"]
    # iters a multiple of the period (4), warm-up too: every median pools whole periods
    row, info = race(makers, R, 4 * (N // 4), 4, "nested")
    result["nested_adam_lora"] = row
    result["nested_checks"] = info.get("nested_adam_default", {})
    print("nested_adam (1,2,4) LoRA, mean over periods:", row, flush=True)

    if a.json:  # written now too: the sweep below may be cut off by a time limit
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    # the launch layout of the default Adam step on the LoRA tree: leaves per launch
    makers = {}
    for gsz in [int(x) for x in a.groups.split(",") if x]:
        makers[f"group {gsz}"] = lambda g=gsz: make_nf(params, grads, NF_OPTS["adam"](), "d", g)
    row, info = race(makers, R, N, W, "sweep")
    result["launch_sweep_lora_adam"] = row
    print("launch layout (LoRA Adam ms):", row, flush=True)
    print("served:", {k: i.get("multitensor") for k, i in info.items()}, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
