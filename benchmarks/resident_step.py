"""A whole training step (forward, backward, Adam) on the LoRA tree, four ways, side by side.

The tree is ``benchmarks/step_latency.py``'s LoRA of a 0.5B Qwen (336 arrays, 4.4M float32
parameters); the loss is tiny next to the optimizer, so what is timed is what a step costs
around it.  ``--loss quadratic`` (default): ``0.5 * w * sum(p^2)`` over every leaf (``w`` the
batch, a scalar array), gradients ``w * p``; ``--loss lora``: every projection's LoRA path
``mean((x @ lora_a) @ lora_b)`` on a batch row ``x`` (the reads a LoRA forward makes).  Each
contender materialises its loss and every new parameter and state array per step (``mx.eval``
then ``mx.synchronize``; ``torch.cuda.synchronize`` for torch on CUDA):

* ``usual``: ``mx.compile(mx.value_and_grad(loss))`` on the tree, then ``nf.compile_step(adam)``;
* ``packed``: the same gradients, then ``nf.compile_step(adam, packed=True)``;
* ``resident``: ``nf.resident_step(adam, loss, params)``: one graph, params kept in buffers;
* ``torch fused`` / ``torch foreach`` (when torch imports): the same loss, ``backward()`` and
  ``torch.optim.Adam(fused=True)`` / ``(foreach=True)``, on the CPU or CUDA like MLX.

Where the parts are separable it also times them alone: the forward + backward
(``grad_fn`` on the tree; and the resident step's own, on the buffers: views made and
gradients gathered inside one graph, no optimizer), each optimizer step on fixed gradients,
torch's ``opt.step()`` on fixed gradients.  The contenders take turns for ``--rounds`` rounds and the medians pool the
rounds, so a shared machine's slow spells fall on all of them; read the ratios.

    python benchmarks/resident_step.py [--device cpu|gpu] [--rounds N] [--iters N]
        [--loss quadratic|lora]

Never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_latency import lora_tree  # noqa: E402

import nestedfn as nf  # noqa: E402
from nestedfn.fast.gather import gather  # noqa: E402
from nestedfn.fast.packing import pack, pack_layout, unpack  # noqa: E402
from nestedfn.optim.optimizers import adam  # noqa: E402

LR = 1e-3


# --------------------------------------------------------------------------------------------
# losses (the same math in MLX and torch)
# --------------------------------------------------------------------------------------------


def quadratic_loss(params: Any, w: mx.array) -> mx.array:
    total = mx.array(0.0)
    for p in nf.leaves(params):
        total = total + mx.sum(p * p)
    return 0.5 * w * total


def lora_loss(params: Any, x_h: mx.array, x_i: mx.array) -> mx.array:
    """Every projection's LoRA path on one row: ``mean((x @ a) @ b)``; ``x`` is the hidden
    row, or the intermediate row for ``down_proj``."""
    total = mx.array(0.0)
    for layer in params["model"]["layers"]:
        for block in layer.values():
            for name, proj in block.items():
                x = x_i if name == "down_proj" else x_h
                total = total + mx.mean((x @ proj["lora_a"]) @ proj["lora_b"])
    return total


def batch_for(loss: str, params: Any) -> tuple[mx.array, ...]:
    if loss == "quadratic":
        return (mx.array(0.5),)
    return (mx.random.normal((1, 896)), mx.random.normal((1, 4864)))


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def time_loop(step: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None]):
    for _ in range(warmup):
        step()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def mlx_sync() -> None:
    mx.synchronize()


# --------------------------------------------------------------------------------------------
# MLX contenders
# --------------------------------------------------------------------------------------------


def mlx_contenders(params: Any, loss_fn: Callable, batch: tuple) -> dict[str, Callable]:
    """name -> a closure running one timed unit (state kept between calls)."""
    opt = adam(LR)
    grad_fn = mx.compile(mx.value_and_grad(loss_fn))
    _, fixed_grads = grad_fn(params, *batch)
    mx.eval(fixed_grads)
    out: dict[str, Callable] = {}

    for name, step_fn in (
        ("usual", nf.compile_step(opt)),
        ("packed", nf.compile_step(opt, packed=True)),
    ):
        box = [step_fn.init(params) if name == "packed" else nf.init(opt, params)]

        def train(step_fn=step_fn, box=box) -> None:
            loss, grads = grad_fn(box[0].params, *batch)
            box[0] = step_fn(box[0], grads)
            mx.eval(loss, box[0].params, box[0].opt_state)

        def opt_only(step_fn=step_fn, box=box) -> None:
            box[0] = step_fn(box[0], fixed_grads)
            mx.eval(box[0].params, box[0].opt_state)

        out[name] = train
        out[f"{name}: optimizer only"] = opt_only

    def fwd_bwd() -> None:
        mx.eval(grad_fn(params, *batch))

    out["forward + backward only (tree)"] = fwd_bwd

    # the resident step's own forward + backward, without the optimizer: views of the buffers
    # inside the graph, gradients gathered into buffers inside it (what resident adds to this
    # is its optimizer over the buffers)
    leaves, td = nf.flatten(params)
    layout = pack_layout(leaves, td)
    bufs = pack(layout, leaves)
    mx.eval(bufs)
    views_grad = mx.value_and_grad(lambda vs, b: loss_fn(nf.unflatten(td, vs), *b))

    @mx.compile
    def buffers_grad(bufs: list, b: tuple) -> list:
        loss, g = views_grad(unpack(layout, bufs), b)
        return [loss, *gather(layout, g, dtypes_checked=True)]

    out["forward + backward only (buffers)"] = lambda: mx.eval(buffers_grad(bufs, batch))

    variants = [("resident", None)]
    if mx.default_device() == mx.cpu:  # on a GPU the step uses one stream anyway
        variants.append(("resident, threads=1", 1))
    for name, threads in variants:
        resident = nf.resident_step(opt, loss_fn, params, threads=threads)
        rbox = [resident.init()]

        def resident_train(resident=resident, rbox=rbox) -> None:
            loss, rbox[0] = resident(rbox[0], *batch)
            mx.eval(loss, rbox[0].buffers, rbox[0].opt_state)

        out[name] = resident_train
    return out


# --------------------------------------------------------------------------------------------
# torch contenders (optional)
# --------------------------------------------------------------------------------------------


def torch_contenders(params: Any, loss: str, batch: tuple, gpu: bool) -> dict[str, Callable]:
    try:
        import numpy as np
        import torch
    except ImportError:
        return {}
    dev = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    if gpu and dev.type != "cuda":
        print("torch: no CUDA device, torch contenders skipped")
        return {}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    leaves = nf.leaves(params)
    names = nf.flatten(params)[1].paths()
    tb = [torch.tensor(np.array(x), device=dev) for x in batch]

    def t_loss(ps: list) -> Any:
        if loss == "quadratic":
            return 0.5 * tb[0] * sum((p * p).sum() for p in ps)
        total = 0
        for name, a, b in zip(names[0::2], ps[0::2], ps[1::2]):
            x = tb[1] if "down_proj" in name else tb[0]
            total = total + ((x @ a) @ b).mean()
        return total

    out: dict[str, Callable] = {}
    for kind in ("fused", "foreach"):
        ps = [torch.tensor(np.array(x), device=dev, requires_grad=True) for x in leaves]
        opt = torch.optim.Adam(ps, lr=LR, **{kind: True})

        def train(ps=ps, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            t_loss(ps).backward()
            opt.step()
            sync()

        def opt_only(ps=ps, opt=opt) -> None:
            for p in ps:
                if p.grad is None:
                    p.grad = torch.randn_like(p) * 1e-2
            opt.step()
            sync()

        out[f"torch {kind}"] = train
        out[f"torch {kind}: optimizer only"] = opt_only

    def fwd_bwd() -> None:
        ps = out_ps
        for p in ps:
            p.grad = None
        t_loss(ps).backward()
        sync()

    out_ps = [torch.tensor(np.array(x), device=dev, requires_grad=True) for x in leaves]
    out["torch forward + backward only"] = fwd_bwd
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default=None)
    ap.add_argument("--rounds", type=int, default=3, help="turns each contender takes")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per turn")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per turn")
    ap.add_argument("--loss", choices=("quadratic", "lora"), default="quadratic")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch peers")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dev = mx.default_device()
    gpu = dev == mx.gpu
    mx.random.seed(0)
    params = lora_tree()
    batch = batch_for(args.loss, params)
    mx.eval(params, batch)
    n = sum(x.size for x in nf.leaves(params))
    loss_fn = quadratic_loss if args.loss == "quadratic" else lora_loss
    contenders = {k: (v, mlx_sync) for k, v in mlx_contenders(params, loss_fn, batch).items()}
    torch_note = "torch: skipped"
    if not args.no_torch:
        peers = torch_contenders(params, args.loss, batch, gpu)
        if peers:
            import torch

            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)

            torch_note = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        contenders.update({k: (v, lambda: None) for k, v in peers.items()})
    print(
        f"# resident step: mlx {mx.__version__}, device {dev}, "
        f"{platform.processor() or platform.machine()}, {torch_note}\n"
        f"# LoRA tree: {len(nf.leaves(params))} arrays, {n} params; loss {args.loss}; "
        f"Adam lr {LR}; {args.rounds} rounds x {args.iters} iters (+{args.warmup} warmup)\n",
        flush=True,
    )
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        for name, (fn, sync) in contenders.items():
            if name not in times:
                continue
            try:
                times[name] += time_loop(fn, args.iters, args.warmup, sync)
            except Exception as e:  # report the others; say loudly what failed
                print(f"{name}: FAILED, dropped: {type(e).__name__}: {e}", flush=True)
                del times[name]
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = "torch fused" if "torch fused" in med else next(iter(med))
    print(f"\nMedian ms (ratio to {ref}; lower is faster):\n")
    print("| contender | ms | ratio |")
    print("|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / med[ref]:.2f}x |")
    pairs = [("resident", "usual"), ("resident", "packed"), ("resident", "torch fused")]
    print(
        "\n"
        + "; ".join(f"{a} / {b}: {med[a] / med[b]:.2f}x" for a, b in pairs if a in med and b in med)
    )


if __name__ == "__main__":
    main()
