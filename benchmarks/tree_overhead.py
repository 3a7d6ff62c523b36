"""What nestedfn's exact, checked tree plumbing costs next to MLX's own unchecked utilities.

Run:

    python benchmarks/tree_overhead.py [--rounds 5] [--iters 40] [--frozen]

The model is a real ``nn.Module`` shaped like an mlx-lm model after LoRA: ``model.layers`` is a
list of 24 blocks, each with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
holding ``lora_a``/``lora_b`` (336 arrays, Qwen2.5-0.5B dimensions, rank 8).  ``--frozen``
also gives every projection its big frozen base ``weight`` (what ``parameters()`` must walk
in a real LoRA model; the update tree stays the 336 LoRA leaves).

Timed in one run: ``--rounds`` rounds, each timing every case in turn (so drift hits every
case alike) over ``--iters`` calls; a case's figure is the median of its per-round medians,
in microseconds per call:

* ``mlx round trip``: ``tree_unflatten(tree_flatten(tree))``, MLX's own unchecked path;
* ``module.update``: ``model.update(tree)``, unchecked;
* ``nf.check_fits``: every path, container kind, shape and dtype checked against the model;
* ``nf.update_module``: ``check_fits`` + ``model.update`` + proof every leaf landed (also
  timed after an explicit ``nf.check_fits``, the belt-and-braces caller);
* ``nf to_flat+from_flat(like)`` and ``nf to_flat+from_flat(sparse)``: the dotted round trip.

The updating cases (``module.update``, ``nf.update_module``) alternate between two trees of
fresh arrays, never the module's own: each call really replaces every LoRA array, and the
verification of ``nf.update_module`` has to find the new objects in the module.

Target: ``nf.update_module`` (checked) costs no more than the MLX round trip (unchecked).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import nestedfn as nf

HIDDEN, INTER, KV, RANK, LAYERS = 896, 4864, 128, 8, 24
ATTN = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV)}
ATTN["o_proj"] = (HIDDEN, HIDDEN)
MLP = {"gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}


class LoRAProj(nn.Module):
    def __init__(self, din: int, dout: int, frozen: bool):
        super().__init__()
        if frozen:
            self.weight = mx.zeros((dout, din))
        self.lora_a = mx.zeros((din, RANK))
        self.lora_b = mx.zeros((RANK, dout))


class Group(nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, int]], frozen: bool):
        super().__init__()
        for name, (din, dout) in shapes.items():
            setattr(self, name, LoRAProj(din, dout, frozen))


class Block(nn.Module):
    def __init__(self, frozen: bool):
        super().__init__()
        self.self_attn = Group(ATTN, frozen)
        self.mlp = Group(MLP, frozen)


class Inner(nn.Module):
    def __init__(self, frozen: bool):
        super().__init__()
        self.layers = [Block(frozen) for _ in range(LAYERS)]


class Model(nn.Module):
    def __init__(self, frozen: bool):
        super().__init__()
        self.model = Inner(frozen)
        if frozen:
            self.freeze(keys=["weight"])


def median_us(fn: Callable[[], object], iters: int) -> float:
    """The median over ``iters`` calls of ``fn``'s wall time, in microseconds."""
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def fresh_copies(tree: object, n: int) -> list[object]:
    """``n`` trees shaped like ``tree`` holding new, evaluated arrays (``k + 1`` everywhere)."""
    out = [
        nf.tree_map(lambda a, k=k: mx.full(a.shape, float(k + 1), a.dtype), tree) for k in range(n)
    ]
    mx.eval(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median of them)")
    ap.add_argument("--iters", type=int, default=40, help="calls per case per round (median)")
    ap.add_argument("--frozen", action="store_true", help="also give projections a base weight")
    args = ap.parse_args()

    model = Model(args.frozen)
    mx.eval(model.parameters())
    tree = model.trainable_parameters()
    n_leaves = len(nf.leaves(tree))
    treedef = nf.flatten(tree)[1]
    pairs = tree_flatten(tree)
    a, b = copies = fresh_copies(tree, 2)

    def held_by_model(new: object) -> bool:
        got = nf.to_flat(model.trainable_parameters())
        return all(got[p] is v for p, v in nf.to_flat(new).items())

    # the updates must really land: each fresh tree in turn ends up in the model
    for new, other in ((a, b), (b, a)):
        nf.update_module(model, new)
        assert held_by_model(new) and not held_by_model(other)
    # the updating cases take turns with them (all of them, in one cycle): every call hands
    # over the tree the model does not hold, so every call replaces every array for real
    fresh = itertools.cycle(copies)

    def checked(new: object) -> object:
        nf.check_fits(model, new)
        return nf.update_module(model, new)

    cases: dict[str, Callable[[], object]] = {
        "mlx round trip (unchecked)": lambda: tree_unflatten(tree_flatten(tree)),
        "mlx tree_unflatten only": lambda: tree_unflatten(pairs),
        "module.update (unchecked)": lambda: model.update(next(fresh)),
        "nf.check_fits": lambda: nf.check_fits(model, tree),
        "nf.update_module (checked, verified)": lambda: nf.update_module(model, next(fresh)),
        "nf.update_module(verify=False)": lambda: nf.update_module(
            model, next(fresh), verify=False
        ),
        "nf.check_fits + nf.update_module": lambda: checked(next(fresh)),
        "nf to_flat+from_flat(like=treedef)": lambda: nf.from_flat(nf.to_flat(tree), like=treedef),
        "nf to_flat+from_flat(sparse=True)": lambda: nf.from_flat(nf.to_flat(tree), sparse=True),
        "nf flatten+unflatten": lambda: nf.unflatten(*reversed(nf.flatten(tree))),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm up
        fn()
    for _ in range(args.rounds):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            samples[name].append(median_us(fn, args.iters))
    # the last call left the model holding the tree the cycle does not hand out next
    upcoming = next(fresh)
    held = b if upcoming is a else a
    assert held_by_model(held) and not held_by_model(upcoming), "an update did not land"

    base = statistics.median(samples["mlx round trip (unchecked)"])
    print(
        f"{n_leaves} leaves, {LAYERS} layers, frozen base weights: {args.frozen}, "
        f"{args.rounds} rounds x {args.iters} calls, median of per-round medians per call"
    )
    print(f"{'case':40s} {'us':>9s} {'x mlx round trip':>17s}")
    for name in cases:
        med = statistics.median(samples[name])
        print(f"{name:40s} {med:9.1f} {med / base:17.2f}")
    for name in ("nf.update_module (checked, verified)", "nf.check_fits + nf.update_module"):
        ratio = statistics.median(samples[name]) / base
        verdict = "MET" if ratio <= 1.0 else "MISSED"
        print(f"target ({name} <= mlx round trip): {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
