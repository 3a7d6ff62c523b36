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
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")

import mlx.core as mx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from step_latency import (  # noqa: E402
    NF_OPTS,
    TREES,
    bench_optax,
    bench_torch,
)

import nestedfn as nf  # noqa: E402
from nestedfn.fast import multitensor as mt  # noqa: E402
from nestedfn.tiered import nested_adam  # noqa: E402


def _timed(step, iters: int, warmup: int) -> list[float]:
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


def bench_nf(params, grads, opt, kind: str, iters: int, warmup: int, group: int | None = None):
    """(ms list, info) for nestedfn's ``kind``: default, graph, packed."""
    info: dict[str, Any] = {}
    if kind == "packed":
        fn = nf.compile_step(opt, packed=True)
        state = fn.init(params)
    elif kind == "graph":
        fn = nf.compile_step(opt, native=False)  # the MLX graph (the GPU default before)
        state = nf.init(opt, params)
    else:
        if group is not None:
            fn = mt.MultiTensorStep(opt, group=group)
        else:
            fn = nf.compile_step(opt)
        state = nf.init(opt, params)
    box = [state]

    def step():
        box[0] = fn(box[0], grads)
        mx.eval(box[0].params, box[0].opt_state)

    times = _timed(step, iters, warmup)
    if isinstance(fn, mt.MultiTensorStep):
        info = {
            "multitensor": not fn.off and fn.multitensor_steps > 0,
            "group": fn.group,
            "checks": [(repr(k), w, same) for k, w, same in fn.checks],
        }
    return times, info


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 4) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--trees", default="lora,big")
    ap.add_argument("--opts", default="adam,adamw,lion,momentum")
    ap.add_argument("--groups", default="8,16,32,64,112")
    ap.add_argument("--json", default=None)
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
    for tree in a.trees.split(","):
        title, make = TREES[tree]
        mx.random.seed(0)
        params = make()
        grads = nf.tree_map(lambda x: mx.random.normal(x.shape) * 1e-3, params)
        mx.eval(params, grads)
        rows: dict[str, Any] = {}
        for name in a.opts.split(","):
            res: dict[str, list[float]] = {}
            info: dict[str, Any] = {}
            for r in range(a.rounds):
                kinds = ["default", "graph", "packed", "torch_fused", "torch_foreach", "optax"]
                if r % 2:
                    kinds.reverse()
                for kind in kinds:
                    try:
                        if kind in ("default", "graph", "packed"):
                            t, i = bench_nf(params, grads, NF_OPTS[name](), kind, a.iters, a.warmup)
                            if i:
                                info = i
                        elif kind.startswith("torch"):
                            out = bench_torch(
                                params, grads, name, kind.split("_")[1], True, a.iters, a.warmup
                            )
                            if out is None:
                                continue
                            t = out[0]
                        else:
                            out = bench_optax(params, grads, name, True, a.iters, a.warmup)
                            if out is None:
                                continue
                            t = out[0]
                    except Exception as e:  # one contender failing must not lose the others
                        res.setdefault(kind + "_error", []).append(0.0)
                        print(f"  {tree}/{name}/{kind}: {type(e).__name__}: {e}", flush=True)
                        continue
                    res.setdefault(kind, []).extend(t)
            row = {k: _med(v) for k, v in res.items() if not k.endswith("_error")}
            row["info"] = info
            rows[name] = row
            line = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "info")
            print(f"{tree:5s} {name:9s} {line}  {info.get('checks', '')}", flush=True)
        result["trees"][tree] = {"title": title, "rows": rows}

    # nested_adam (1, 2, 4) on the LoRA tree: mean over the period vs plain Adam
    title, make = TREES["lora"]
    mx.random.seed(0)
    params = make()
    grads = nf.tree_map(lambda x: mx.random.normal(x.shape) * 1e-3, params)
    mx.eval(params, grads)
    nres: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for kind in ("nested_default", "adam_default", "nested_graph", "adam_graph"):
            opt = nested_adam(1e-3, (1, 2, 4)) if kind.startswith("nested") else NF_OPTS["adam"]()
            t, i = bench_nf(params, grads, opt, kind.split("_")[1], 4 * 10, 4)
            # the mean over periods of 4 steps
            per = [sum(t[j : j + 4]) / 4 for j in range(0, len(t) - 3, 4)]
            nres.setdefault(kind, []).extend(per)
            if i and kind == "nested_default":
                result["nested_checks"] = i
    result["nested_adam_lora"] = {k: _med(v) for k, v in nres.items()}
    print("nested_adam (1,2,4) LoRA, period mean:", result["nested_adam_lora"], flush=True)

    # leaves per launch: the default Adam step on the LoRA tree
    sweep: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for gsz in [int(x) for x in a.groups.split(",") if x]:
            try:
                t, i = bench_nf(params, grads, NF_OPTS["adam"](), "default", a.iters, 3, gsz)
                if not i.get("multitensor"):
                    print(f"  group {gsz}: the kernels did not serve ({i})", flush=True)
                    continue
            except Exception as e:
                print(f"  group {gsz}: {type(e).__name__}: {e}", flush=True)
                continue
            sweep.setdefault(str(gsz), []).extend(t)
    result["group_sweep_lora_adam"] = {k: _med(v) for k, v in sweep.items()}
    print("leaves per launch (LoRA Adam ms):", result["group_sweep_lora_adam"], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
