"""Continual-learning benchmark: does training in tiers of different frequencies forget less?

``python benchmarks/continual.py [--quick] [--seeds N] [--out DIR]``, offline, on the demo's
tiny Llama (``nestedfn.lm.demo``: hidden 64, 4 layers, random weights) with LoRA adapters.

Protocol (one *run* = one contender, one learning rate, one seed):

1. Task A for ``n`` steps, then task B for ``n`` steps, one optimizer state throughout (a
   continual learner does not know the data changed: moments, chunk sums and tier clocks carry
   on).  A and B are templated sentences like the demo dataset's, with disjoint templates and
   disjoint word vocabularies (``task_sentence``); they share only the byte-level tokens.
2. Measured on held-out *test* sets (drawn apart from the training and validation sets):
   A's loss after phase A and after phase B (forgetting = the increase), B's loss after phase
   B (plasticity) and before it, and A's and B's loss every ``n // 8`` steps of phase B.
3. Every contender gets ``n`` gradient evaluations per phase (one batch each).  Its learning
   rate is picked by a sweep of the same number of grid points for every contender: phase A
   alone, one sweep seed not among the reported seeds, lowest loss on A's *validation* set.

Contenders: ``adam``, ``adamw``, ``nested_adam`` (1, 2, 4) with ``reduce="mean"`` and
``"sum"``, ``nested_adam`` (1, 4, 16), ``nested_adam`` (1, 2, 4) with the deep-fast tier order,
``multiscale_momentum`` and ``seed_discard``: the rule of the original app (tier ``k``
updated when the 1-based step is a multiple of ``C_k``, with that step's gradient alone; the
other ``C_k - 1`` gradients thrown away), written here as an ``Optimizer``.

Output: ``DIR/continual.json`` (``{"config", "sweep", "results": [...], "summary"}``) and
``DIR/continual.png`` (A's loss during phase B, mean and band per contender; forgetting vs
plasticity).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

import nestedfn as nf

Params = Any
Optimizer = nf.Optimizer

# ---------------------------------------------------------------------------------------------
# the two tasks
# ---------------------------------------------------------------------------------------------

# Task A: the demo's world (animals and their sounds, counting in English).
_A_ANIMALS = {
    "cat": "meow",
    "dog": "woof",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "frog": "ribbit",
    "lion": "roar",
}
_A_COLORS = ("red", "blue", "green", "yellow", "black", "white")
_A_PLACES = ("farm", "forest", "garden", "river", "barn", "field")
_A_NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")
_A_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Task B: vehicles and their speeds, metals, cities, counting in German; no word of A.
_B_VEHICLES = {
    "truck": "slow",
    "jet": "swift",
    "boat": "steady",
    "tram": "smooth",
    "bike": "light",
    "rocket": "blazing",
    "barge": "heavy",
    "van": "quick",
}
_B_METALS = ("iron", "copper", "silver", "zinc", "nickel", "tin")
_B_CITIES = ("Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth")
_B_PILOTS = ("Ivo", "Jun", "Kai", "Lev", "Mo", "Nia", "Oz", "Pia")
_B_NUMBERS = ("null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben", "acht", "neun")

# The templates; slots in braces.  ``{n}``/``{n1}`` are a number word and its successor,
# ``{sound}``/``{speed}`` are fixed by the animal/vehicle (what the model can learn beyond the
# fixed wording).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "A": (
        "{name} has a {color} {animal} on the {place}. The {animal} says {sound}.",
        "{name} sees {n} {animal}s in the {place}. One more comes, now there are {n1}.",
        "In the {place}, the {color} {animal} says {sound} to {name}.",
    ),
    "B": (
        "Pilot {name} steers {color} {animal} toward {place}: every {animal} feels {sound}!",
        "Pilot {name} loads {n} crates onto {animal}; adding another gives {n1}!",
        "At {place}, {name} rides {color} {animal}, running {sound} all day!",
    ),
}

_SLOTS: dict[str, dict[str, Any]] = {
    "A": {
        "pairs": _A_ANIMALS,
        "color": _A_COLORS,
        "place": _A_PLACES,
        "name": _A_NAMES,
        "numbers": _A_NUMBERS,
    },
    "B": {
        "pairs": _B_VEHICLES,
        "color": _B_METALS,
        "place": _B_CITIES,
        "name": _B_PILOTS,
        "numbers": _B_NUMBERS,
    },
}

TASKS = ("A", "B")


def task_vocabulary(task: str) -> frozenset[str]:
    """Every lower-cased word (``[a-z]+``) a sentence of ``task`` can contain: its template
    wording and all its slot values (and their plurals)."""
    s = _SLOTS[task]
    text = " ".join(
        [*TEMPLATES[task], *s["pairs"], *s["pairs"].values(), *s["color"], *s["place"]]
        + [f"{k}s" for k in s["pairs"]]  # A's plural template "{animal}s"
        + [*s["name"], *s["numbers"]]
    )
    return frozenset(words(text.replace("{", " ").replace("}", " ")) - _SLOT_NAMES)


_SLOT_NAMES = frozenset({"name", "color", "animal", "place", "sound", "n", "s"})


def words(text: str) -> set[str]:
    """The lower-cased ``[a-z]+`` words of ``text``."""
    return set(re.findall(r"[a-z]+", text.lower()))


def task_sentence(task: str, rng: np.random.Generator) -> str:
    """One sentence of ``task`` (``"A"`` or ``"B"``) drawn with ``rng``: a template, then its
    slots (the animal fixes its sound and the vehicle its speed; a number fixes its successor).
    Task A is the demo dataset's sentence distribution (``nestedfn.lm.demo.demo_sentence``)."""
    if task not in TEMPLATES:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    s = _SLOTS[task]
    kind = int(rng.integers(3))
    name = s["name"][int(rng.integers(len(s["name"])))]
    keys = list(s["pairs"])
    animal = keys[int(rng.integers(len(keys)))]
    color = s["color"][int(rng.integers(len(s["color"])))]
    place = s["place"][int(rng.integers(len(s["place"])))]
    fill = {"name": name, "animal": animal, "color": color, "place": place}
    fill["sound"] = s["pairs"][animal]
    if kind == 1:
        n = int(rng.integers(len(s["numbers"]) - 1))
        fill["n"], fill["n1"] = s["numbers"][n], s["numbers"][n + 1]
    return TEMPLATES[task][kind].format(**fill)


@dataclass(frozen=True)
class TaskData:
    """A task's sentences: ``train`` (what the runs learn), ``valid`` (the learning-rate
    sweep's criterion) and ``test`` (every reported loss), each drawn independently."""

    train: list[str]
    valid: list[str]
    test: list[str]


def make_task(task: str, seed: int, n_train: int, n_valid: int, n_test: int) -> TaskData:
    """The sentences of ``task`` from ``Generator(PCG64([seed, index of task]))``: the same
    ``seed`` gives the same lists on every machine; A and B draw from separate streams."""
    rng = np.random.Generator(np.random.PCG64([seed, TASKS.index(task)]))
    draw = [[task_sentence(task, rng) for _ in range(n)] for n in (n_train, n_valid, n_test)]
    return TaskData(*draw)


def write_task(data: TaskData, out_dir: Path) -> Path:
    """``train/valid/test.jsonl`` of ``{"text": ...}`` records (the demo dataset's format)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        lines = [json.dumps({"text": t}) for t in getattr(data, split)]
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------------------------------------
# the seed app's discard rule, as an Optimizer
# ---------------------------------------------------------------------------------------------


def discard_schedule(step: int, frequencies: Sequence[int]) -> tuple[bool, ...]:
    """Which tiers the seed app updated at 0-based ``step``: tier ``k`` when the 1-based step
    ``step + 1`` is a multiple of ``frequencies[k]`` (it then used that step's gradient alone)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return tuple((step + 1) % int(f) == 0 for f in frequencies)


class SeedDiscardState(NamedTuple):
    """``inner``: per tier, the inner optimizer's state over that tier's leaves (a list);
    ``count``: per tier, int32 number of updates it made (the inner optimizer's clock)."""

    inner: tuple
    count: tuple


def seed_discard(
    learning_rate: float,
    frequencies: Sequence[int] = (1, 2, 4),
    order: str = "shallow_fast",
    inner: Optimizer | None = None,
) -> nf.Optimizer:
    """The original app's multi-frequency rule: tiers by depth (``nf.by_depth``), tier ``k``
    updated by its own ``inner`` optimizer (default ``nf.adam(learning_rate)``) at the steps
    ``discard_schedule`` names, fed **that step's gradient only**; the gradients of the other
    steps of its period are discarded (the CMS rule of ``nf.nested`` accumulates them).  An
    inactive tier gets a zero update; each tier's inner clock counts its own updates."""
    freqs = tuple(int(f) for f in frequencies)
    if not freqs or any(f < 1 for f in freqs):
        raise ValueError(f"frequencies must be positive ints, got {frequencies!r}")
    opt = nf.adam(learning_rate) if inner is None else inner

    def tier_index(params: Params) -> list[list[int]]:
        labels = nf.flatten(nf.by_depth(params, len(freqs), order))[0]
        return [[i for i, t in enumerate(labels) if t == k] for k in range(len(freqs))]

    def init_fn(params: Params) -> SeedDiscardState:
        leaves = nf.flatten(params)[0]
        idx = tier_index(params)
        return SeedDiscardState(
            tuple(opt.init([leaves[i] for i in ix]) for ix in idx),
            tuple(mx.array(0, dtype=mx.int32) for _ in freqs),
        )

    def update_fn(grads: Any, state: SeedDiscardState, params: Params, step: Any) -> Any:
        g, td = nf.flatten(grads)
        p = nf.flatten(params)[0]
        active = discard_schedule(nf.static_step(step), freqs)
        out: list[Any] = [mx.zeros_like(x) for x in g]
        inners, counts = list(state.inner), list(state.count)
        for k, ix in enumerate(tier_index(params)):
            if not active[k]:
                continue
            u, inners[k] = opt.update(
                [g[i] for i in ix], state.inner[k], [p[i] for i in ix], counts[k]
            )
            for i, ui in zip(ix, u):
                out[i] = ui
            counts[k] = counts[k] + 1
        return nf.unflatten(td, out), SeedDiscardState(tuple(inners), tuple(counts))

    return nf.Optimizer(
        init_fn,
        update_fn,
        period=math.lcm(*freqs),
        phase_key=lambda s: discard_schedule(s, freqs),
    )


# ---------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------

ADAM_GRID = (1e-3, 3e-3, 1e-2)
# multiscale_momentum (paper form) divides orthogonalised momenta by sqrt of a running *sum*
# of squared gradients: its step per unit learning rate is far larger than Adam's, so its grid
# (the same number of points) sits lower; placed by the probe described in the README.
M3_GRID = (3e-5, 1e-4, 3e-4)


@dataclass(frozen=True)
class Contender:
    """A named optimizer family: ``make(lr)`` and the learning rates its sweep tries."""

    name: str
    make: Callable[[float], nf.Optimizer]
    grid: tuple[float, ...]
    control_of: str | None = None  # not swept: lr = control_factor x that contender's pick
    control_factor: float = 1.0


CONTENDERS: tuple[Contender, ...] = (
    Contender("adam", lambda lr: nf.adam(lr), ADAM_GRID),
    Contender("adamw", lambda lr: nf.adamw(lr, weight_decay=0.01), ADAM_GRID),
    Contender(
        "nested_adam(1,2,4) mean",
        lambda lr: nf.nested_adam(lr, frequencies=(1, 2, 4), reduce="mean"),
        ADAM_GRID,
    ),
    Contender(
        "nested_adam(1,2,4) sum",
        lambda lr: nf.nested_adam(lr, frequencies=(1, 2, 4), reduce="sum"),
        ADAM_GRID,
    ),
    Contender(
        "nested_adam(1,4,16) mean",
        lambda lr: nf.nested_adam(lr, frequencies=(1, 4, 16), reduce="mean"),
        ADAM_GRID,
    ),
    Contender(
        "nested_adam(1,2,4) deep_fast",
        lambda lr: nf.nested_adam(lr, frequencies=(1, 2, 4), order="deep_fast"),
        ADAM_GRID,
    ),
    Contender("multiscale_momentum", lambda lr: nf.multiscale_momentum(lr), M3_GRID),
    Contender("seed_discard(1,2,4)", lambda lr: seed_discard(lr, (1, 2, 4)), ADAM_GRID),
    # Controls, not contenders: plain Adam at a third and a tenth of Adam's swept rate.  Learning less of
    # A leaves less to forget; this shows how much of a contender's smaller forgetting a lower
    # learning rate alone gives.
    Contender("adam lr/3 (control)", lambda lr: nf.adam(lr), (), "adam", 1 / 3),
    Contender("adam lr/10 (control)", lambda lr: nf.adam(lr), (), "adam", 0.1),
)

# ---------------------------------------------------------------------------------------------
# model, losses, one run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What every run shares (stated in the output JSON)."""

    steps: int  # per phase
    batch_size: int
    max_seq_len: int
    eval_every: int  # steps of phase B between points of the A/B curves
    lora_rank: int
    lora_scale: float
    n_train: int
    n_valid: int
    n_test: int
    data_seed: int
    sweep_seed: int


def lora_init(treedef: Any, leaves: list, seed: int) -> Params:
    """Fresh adapters for ``seed``: ``lora_a ~ U(±1/sqrt(in))``, ``lora_b = 0`` (mlx-lm's
    ``LoRALinear`` init) from ``Generator(PCG64([seed, 7]))``, independent of MLX's state."""
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    out = []
    for path, x in zip(treedef.paths(), leaves):
        if str(path).endswith("lora_a"):
            b = 1.0 / math.sqrt(x.shape[0])
            out.append(mx.array(rng.uniform(-b, b, size=x.shape).astype(np.float32)))
        else:
            out.append(mx.zeros(x.shape, dtype=x.dtype))
    return nf.unflatten(treedef, out)


class Bench:
    """The demo model with LoRA, the tokenized tasks, and compiled loss/gradient functions
    built once (every run starts from its own adapters; the base weights never change)."""

    def __init__(self, settings: Settings, work: Path):
        import mlx.nn as nn
        import mlx_lm

        from nestedfn.lm.data import load_dataset
        from nestedfn.lm.demo import build_demo_model
        from nestedfn.lm.lora import LoraSpec, apply_lora

        self.s = settings
        model_dir = build_demo_model(work / "model", seed=0)
        self.model, tokenizer = mlx_lm.load(str(model_dir))
        params = apply_lora(
            self.model, LoraSpec(rank=settings.lora_rank, scale=settings.lora_scale), seed=0
        )
        self.leaves0, self.treedef = nf.flatten(params)
        self.data: dict[str, dict[str, Any]] = {}
        for task in TASKS:
            d = make_task(
                task, settings.data_seed, settings.n_train, settings.n_valid, settings.n_test
            )
            where = write_task(d, work / f"task_{task}")
            self.data[task] = {
                split: load_dataset(where, split, tokenizer, settings.max_seq_len)
                for split in ("train", "valid", "test")
            }
        model, td = self.model, self.treedef

        def token_loss(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask):
            nf.update_module(model, nf.unflatten(td, leaves), verify=False)
            ce = nn.losses.cross_entropy(model(inputs), targets) * mask
            return ce.astype(mx.float32).sum(), mask.sum()

        def mean_loss(leaves: list[mx.array], inputs: mx.array, targets: mx.array, mask):
            total, n = token_loss(leaves, inputs, targets, mask)
            return total / n

        self._grad = mx.compile(mx.value_and_grad(mean_loss))
        self._eval = mx.compile(token_loss)
        self.model.train(False)  # no dropout anywhere

    def init_params(self, seed: int) -> Params:
        """Fresh adapters for ``seed`` (``lora_init``)."""
        return lora_init(self.treedef, self.leaves0, seed)

    def loss_before(self, seed: int) -> float:
        """A's test loss of the fresh adapters of ``seed`` (the same for every contender)."""
        cache = self.__dict__.setdefault("_before", {})
        if seed not in cache:
            cache[seed] = self.loss(self.init_params(seed), "A", "test")
        return cache[seed]

    def batch(self, task: str, index: int, seed: int) -> tuple[mx.array, mx.array, mx.array]:
        from nestedfn.lm.data import batch_at

        return batch_at(
            self.data[task]["train"], index, self.s.batch_size, seed, self.s.max_seq_len
        )

    def loss(self, params: Params, task: str, split: str) -> float:
        """Mean token loss over the whole ``split`` of ``task`` (batches of 32, fixed order)."""
        from nestedfn.lm.data import batch_at

        ds = self.data[task][split]
        leaves = nf.flatten(params)[0]
        total, ntoks = mx.array(0.0), mx.array(0.0)
        for i in range(-(-len(ds) // 32)):
            # seed 0, one epoch: every example exactly once (the last batch may wrap around)
            t, n = self._eval(leaves, *batch_at(ds, i, 32, 0, self.s.max_seq_len))
            total, ntoks = total + t, ntoks + n
        return float((total / ntoks).item())

    def train(
        self,
        opt: nf.Optimizer,
        state: nf.TrainState,
        task: str,
        seed: int,
        steps: int,
        on_eval: Callable[[int, nf.TrainState], None] | None = None,
    ) -> nf.TrainState:
        """``steps`` steps of ``task`` (batches ``0..steps-1`` of its own stream for ``seed``),
        continuing ``state``; ``on_eval(k, state)`` after every ``eval_every``-th step."""
        step_fn = self._step_fn(opt)
        for k in range(steps):
            inputs, targets, mask = self.batch(task, k, seed)
            loss, grads = self._grad(nf.flatten(state.params)[0], inputs, targets, mask)
            state = step_fn(state, nf.unflatten(self.treedef, grads))
            mx.eval(state.params, state.opt_state)
            if not math.isfinite(float(loss.item())):
                raise FloatingPointError(f"training loss {float(loss.item())} at step {k + 1}")
            if on_eval is not None and (k + 1) % self.s.eval_every == 0:
                on_eval(k + 1, state)
        return state

    def _step_fn(self, opt: nf.Optimizer) -> Callable[[nf.TrainState, Params], nf.TrainState]:
        cache = self.__dict__.setdefault("_steps", {})
        if id(opt) not in cache:
            cache.clear()
            cache[id(opt)] = (opt, nf.compile_step(opt))
        return cache[id(opt)][1]


def run_continual(bench: Bench, contender: Contender, lr: float, seed: int) -> dict[str, Any]:
    """One run: phase A, then phase B; every number the JSON's ``results`` rows hold."""
    tic = time.perf_counter()
    opt = contender.make(lr)
    state = nf.init(opt, bench.init_params(seed))
    n = bench.s.steps
    loss_a_before = bench.loss_before(seed)
    state = bench.train(opt, state, "A", seed, n)
    loss_a_after_a = bench.loss(state.params, "A", "test")
    loss_b_after_a = bench.loss(state.params, "B", "test")
    curve_steps, curve_a, curve_b = [0], [loss_a_after_a], [loss_b_after_a]

    def on_eval(k: int, st: nf.TrainState) -> None:
        curve_steps.append(k)
        curve_a.append(bench.loss(st.params, "A", "test"))
        curve_b.append(bench.loss(st.params, "B", "test"))

    state = bench.train(opt, state, "B", seed, n, on_eval)
    if curve_steps[-1] != n:
        on_eval(n, state)
    loss_a_after_b, loss_b_after_b = curve_a[-1], curve_b[-1]
    return {
        "optimizer": contender.name,
        "seed": seed,
        "lr": lr,
        "loss_a_before": loss_a_before,
        "loss_a_after_a": loss_a_after_a,
        "loss_b_after_a": loss_b_after_a,
        "loss_a_after_b": loss_a_after_b,
        "loss_b_after_b": loss_b_after_b,
        "forgetting": loss_a_after_b - loss_a_after_a,
        "curve_steps": curve_steps,
        "loss_a_curve": curve_a,
        "loss_b_curve": curve_b,
        "time_s": time.perf_counter() - tic,
    }


def sweep(bench: Bench, contender: Contender, grid: Sequence[float]) -> dict[str, Any]:
    """Phase A alone at each learning rate of ``grid`` (sweep seed): A's validation loss per
    rate and the rate with the lowest (a diverged run counts as ``inf``)."""
    losses: dict[str, float] = {}
    for lr in grid:
        opt = contender.make(lr)
        state = nf.init(opt, bench.init_params(bench.s.sweep_seed))
        try:
            state = bench.train(opt, state, "A", bench.s.sweep_seed, bench.s.steps)
            loss = bench.loss(state.params, "A", "valid")
        except FloatingPointError:
            loss = math.inf
        losses[repr(lr)] = loss if math.isfinite(loss) else math.inf
    best = min(grid, key=lambda lr: losses[repr(lr)])
    return {
        "grid": list(grid),
        "valid_loss_a": losses,
        "chosen": best,
        "at_grid_edge": best in (min(grid), max(grid)),
    }


# ---------------------------------------------------------------------------------------------
# statistics, plot, command line
# ---------------------------------------------------------------------------------------------

# two-sided 95% Student t quantiles t_{0.975}(df), df = 1..30
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

METRICS = ("loss_a_after_a", "loss_a_after_b", "loss_b_after_b", "forgetting", "forgetting_frac")


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std and the half-width of the 95% t interval of the mean (``nan`` for
    fewer than 2 values; a ``None`` read back from the JSON counts as ``nan``)."""
    x = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    n = len(x)
    if n < 2:
        return {"mean": float(x.mean()) if n else math.nan, "std": math.nan, "ci95": math.nan}
    std = float(x.std(ddof=1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return {"mean": float(x.mean()), "std": std, "ci95": t * std / math.sqrt(n)}


def summarize(results: list[dict[str, Any]], reference: str = "adam") -> dict[str, Any]:
    """Per contender: mean/std/ci95 of every metric over seeds, and the paired (same seed)
    difference to ``reference`` with ``exceeds_spread`` = its 95% interval excludes 0."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["optimizer"], {})[r["seed"]] = r
    out: dict[str, Any] = {}
    ref = by.get(reference, {})
    for name, rows in by.items():
        entry: dict[str, Any] = {"n_seeds": len(rows), "lr": next(iter(rows.values()))["lr"]}
        for m in METRICS:
            entry[m] = mean_ci([r[m] for r in rows.values()])
            seeds = sorted(set(rows) & set(ref))
            if name != reference and len(seeds) >= 2:
                d = mean_ci([rows[s][m] - ref[s][m] for s in seeds])
                d["exceeds_spread"] = bool(abs(d["mean"]) > d["ci95"])
                entry[f"{m}_minus_{reference}"] = d
        out[name] = entry
    return out


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """``path``: A's test loss during phase B (mean over seeds, band = ±1 std) per contender,
    and forgetting against B's final loss (seeds faint, mean ± std bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["optimizer"] for r in results))
    colors = plt.get_cmap("tab10")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, name in enumerate(names):
        rows = [r for r in results if r["optimizer"] == name]
        c = colors(i % 10)
        steps = np.asarray(rows[0]["curve_steps"])
        curves = np.asarray([r["loss_a_curve"] for r in rows])
        mu = curves.mean(0)
        sd = curves.std(0, ddof=1) if len(rows) > 1 else np.zeros_like(mu)
        ls = "--" if "control" in name else "-"
        ax1.plot(steps, mu, color=c, label=name, lw=1.6, ls=ls)
        ax1.fill_between(steps, mu - sd, mu + sd, color=c, alpha=0.15)
        x = np.asarray([r["loss_b_after_b"] for r in rows])
        y = np.asarray([r["forgetting"] for r in rows])
        ax2.scatter(x, y, color=c, alpha=0.3, s=14)
        xs = x.std(ddof=1) if len(rows) > 1 else 0.0
        ys = y.std(ddof=1) if len(rows) > 1 else 0.0
        ax2.errorbar(x.mean(), y.mean(), xerr=xs, yerr=ys, color=c, fmt="o", ms=7, capsize=3)
        ax2.annotate(name, (x.mean(), y.mean()), fontsize=7, xytext=(4, 4),
                     textcoords="offset points", color=c)  # fmt: skip
    ax1.set_xlabel("step of phase B (training on task B)")
    ax1.set_ylabel("task A test loss (nats/token)")
    ax1.set_title("A's loss while training on B (mean, band ±1 std over seeds)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("task B test loss after phase B (plasticity; lower is better)")
    ax2.set_ylabel("forgetting: A loss after B - after A (lower is better)")
    ax2.set_title("forgetting vs plasticity (dots: seeds; bars: ±1 std)")
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strict(obj: Any) -> Any:
    """``obj`` with every NaN/inf float as ``None``, so the file is strict JSON for any reader
    (a diverged sweep point, an interval of one seed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as strict JSON (non-finite floats as ``null``), atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_strict(obj), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def table(summary: dict[str, Any], reference: str = "adam") -> str:
    """The README's markdown table: mean ± 95% CI half-width per metric; ``*`` marks a
    paired difference to ``reference`` whose 95% interval excludes 0."""

    def cell(entry: dict[str, Any], m: str) -> str:
        s = entry[m]
        d = entry.get(f"{m}_minus_{reference}")
        star = "*" if d is not None and d["exceeds_spread"] else ""
        return f"{s['mean']:.3f} ± {s['ci95']:.3f}{star}"

    lines = [
        "| optimizer | lr | A after A | A after B | B after B | forgetting | forgetting fraction "
        f"| forgetting - {reference} (paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        d = e.get(f"forgetting_minus_{reference}")
        diff = "—" if d is None else f"{d['mean']:+.3f} ± {d['ci95']:.3f}"
        cells = " | ".join(cell(e, m) for m in METRICS)
        lines.append(f"| {name} | {e['lr']:g} | {cells} | {diff} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="2 seeds, 24 steps/phase, no sweep (middle grid lr)"
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; quick 2)")
    ap.add_argument("--out", type=Path, default=Path("nestedfn-runs/continual"))
    ap.add_argument("--steps", type=int, default=None, help="steps per phase (default 64)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these contenders")
    ap.add_argument(
        "--replot", action="store_true", help="only redo summary and plot of DIR/continual.json"
    )
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.out)

    steps = args.steps or (24 if args.quick else 64)
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if steps < 8 or n_seeds < 1:
        ap.error("--steps must be >= 8 and --seeds >= 1")
    settings = Settings(
        steps=steps,
        batch_size=4,
        max_seq_len=128,
        eval_every=max(steps // (4 if args.quick else 8), 1),
        lora_rank=8,
        lora_scale=20.0,
        n_train=400,
        n_valid=32,
        n_test=32,
        data_seed=0,
        sweep_seed=1000,
    )
    contenders = [c for c in CONTENDERS if args.only is None or c.name in args.only]
    if not contenders:
        ap.error(f"--only matched no contender; names: {[c.name for c in CONTENDERS]}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench = Bench(settings, out / "work")
    config = {
        "settings": asdict(settings),
        "model": "nestedfn.lm.demo tiny Llama (hidden 64, 4 layers, random weights, seed 0)",
        "lora": "every linear layer of the 4 blocks, rank 8, scale 20",
        "seeds": list(range(n_seeds)),
        "quick": bool(args.quick),
        "protocol": (
            "phase A for `steps` steps, then phase B for `steps` steps, one optimizer state; "
            "losses on held-out test sets; lr per contender picked by a sweep on A's "
            "validation loss after phase A (sweep seed, not a reported seed), the same number "
            "of grid points and steps for every contender"
        ),
        "command": " ".join(["python", "benchmarks/continual.py", *sys.argv[1:]]),
    }
    doc: dict[str, Any] = {"config": config, "sweep": {}, "results": []}

    print(f"continual: {len(contenders)} contenders, {n_seeds} seeds, {steps} steps/phase")
    for c in contenders:
        tic = time.perf_counter()
        if c.control_of is not None:
            if c.control_of not in doc["sweep"]:
                print(f"[skip] {c.name}: needs {c.control_of}'s sweep", flush=True)
                continue
            lr = c.control_factor * doc["sweep"][c.control_of]["chosen"]
            sw = {"control_of": c.control_of, "factor": c.control_factor, "chosen": lr}
            print(f"[control] {c.name}: lr {lr:g} ({c.control_factor:g} x {c.control_of})")
        elif args.quick:
            lr = c.grid[len(c.grid) // 2]
            sw = {"grid": [lr], "chosen": lr, "note": "--quick: no sweep, the middle grid point"}
            print(f"[quick] {c.name}: lr {lr:g} (no sweep)", flush=True)
        else:
            sw = sweep(bench, c, c.grid)
            losses = ", ".join(f"{lr}: {v:.3f}" for lr, v in sw["valid_loss_a"].items())
            edge = " (at the grid's edge)" if sw["at_grid_edge"] else ""
            print(
                f"[sweep] {c.name}: {losses} -> lr {sw['chosen']:g}{edge}"
                f" [{time.perf_counter() - tic:.0f}s]",
                flush=True,
            )
        doc["sweep"][c.name] = sw
        for seed in range(n_seeds):
            r = run_continual(bench, c, sw["chosen"], seed)
            span = r["loss_a_before"] - r["loss_a_after_a"]
            r["forgetting_frac"] = r["forgetting"] / span if span > 0 else math.nan
            doc["results"].append(r)
            print(
                f"[run] {c.name} seed {seed}: A {r['loss_a_after_a']:.3f} -> "
                f"{r['loss_a_after_b']:.3f} (forgetting {r['forgetting']:+.3f}), "
                f"B {r['loss_b_after_b']:.3f} [{r['time_s']:.0f}s, "
                f"total {time.perf_counter() - started:.0f}s]",
                flush=True,
            )
            _write_json(out / "continual.json", doc)
    doc["elapsed_s"] = time.perf_counter() - started
    finish(doc, out)
    print(f"wrote {out / 'continual.json'} and {out / 'continual.png'} in {doc['elapsed_s']:.0f}s")
    return 0


def finish(doc: dict[str, Any], out: Path) -> None:
    """Summaries (paired against ``adam`` and against ``seed_discard``), the JSON, the plot
    and the table on stdout, all from ``doc["results"]`` (also what ``--replot`` redoes)."""
    results = doc["results"]
    doc["summary"] = summarize(results)
    names = {r["optimizer"] for r in results}
    if DISCARD in names:
        doc["summary_vs_seed_discard"] = summarize(results, reference=DISCARD)
    _write_json(out / "continual.json", doc)
    st = doc["config"]["settings"]
    seeds = len(doc["config"]["seeds"])
    title = (
        f"continual A->B, demo tiny Llama + LoRA r{st['lora_rank']}, {st['steps']} steps/phase, "
        f"batch {st['batch_size']}, {seeds} seeds"
    )
    plot(results, out / "continual.png", title)
    print(table(doc["summary"]))
    if DISCARD in names:
        print(table(doc["summary_vs_seed_discard"], reference=DISCARD))


DISCARD = "seed_discard(1,2,4)"


def replot(out: Path) -> int:
    """Redo the summaries and the plot of ``out/continual.json`` without training."""
    doc = json.loads((out / "continual.json").read_text(encoding="utf-8"))
    finish(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
