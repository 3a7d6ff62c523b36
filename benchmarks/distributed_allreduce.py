"""Gradient averaging over 2+ processes: one flat all_sum per dtype vs one all_sum per leaf.

Run (ring backend over loopback, 2 local processes):

    mlx.launch -n 2 python benchmarks/distributed_allreduce.py [--iters 30] [--dtype float32]

The tree is LoRA-shaped: 24 layers x 7 projections (q, k, v, o, gate, up, down) x (lora_a,
lora_b), rank 8, Qwen2.5-0.5B dimensions: 336 arrays, about 4.4M parameters.  Rank 0 prints
the median milliseconds per call of each method, interleaved in one run, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.nn.utils import average_gradients as mlx_average_gradients

import nestedfn.run.distributed as dist

HIDDEN, INTER, KV, RANK, LAYERS = 896, 4864, 128, 8, 24
PROJ = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}


def lora_tree(dtype: mx.Dtype, seed: int) -> dict:
    mx.random.seed(seed)
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, (din, dout) in PROJ.items():
            layer[name] = {
                "lora_a": mx.random.normal((din, RANK)).astype(dtype),
                "lora_b": mx.random.normal((RANK, dout)).astype(dtype),
            }
        layers.append(layer)
    return {"model": {"layers": layers}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    grads = lora_tree(dtype, seed=dist.rank())
    n_arrays = sum(len(layer) * 2 for layer in grads["model"]["layers"])
    n_params = sum(
        p["lora_a"].size + p["lora_b"].size
        for layer in grads["model"]["layers"]
        for p in layer.values()
    )
    group = dist.world()
    methods = {
        "flat (nestedfn, one all_sum per dtype)": lambda: dist.average_gradients(grads),
        "per leaf (nestedfn fused=False)": lambda: dist.average_gradients(grads, fused=False),
        "mlx.nn.utils.average_gradients (32 MiB buckets)": lambda: mlx_average_gradients(
            grads, group
        ),
        "floor: one all_sum of one buffer of that size": lambda: mx.distributed.all_sum(
            mx.zeros((n_params,), dtype=dtype), group=group
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(args.iters + 3):  # interleaved; the first 3 rounds are warm-up
        for name, fn in methods.items():
            mx.eval(grads)
            t = time.perf_counter()
            mx.eval(fn())
            if i >= 3:
                times[name].append(time.perf_counter() - t)
    if dist.is_main():
        print(
            f"world {dist.world_size()}, {n_arrays} arrays, {n_params / 1e6:.2f}M params, "
            f"{args.dtype}, median of {args.iters}"
        )
        base = statistics.median(times[next(iter(times))])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:50s} {med * 1e3:8.2f} ms  ({med / base:.2f}x flat)")


if __name__ == "__main__":
    main()
