"""Continual learning on a pretrained model: do tiers of different frequencies forget less?

``python benchmarks/pretrained_continual.py [--quick] [--workers N] [--out DIR]``, offline,
from Debian packages only (``apt-get install wordnet-base fortunes python3.11-doc``):

* **P (pretraining)**: WordNet 3.0 glosses and example sentences (``/usr/share/wordnet/data.*``,
  WordNet 3.0 licence, Princeton: use, copy and distribute freely with the notice kept).
* **A (phase A)**: the ``fortunes`` files (``/usr/share/games/fortunes``, quotes, jokes,
  literature; BSD licence of fortune-mod and the files' own notices), ``ascii-art`` left out.
* **B (phase B)**: the Python 3.11 documentation sources (``/usr/share/doc/python3.11/html/
  _sources/**/*.rst.txt``, paragraphs; PSF licence).

Each domain's documents are shuffled (fixed seed) and cut 90/5/5 into train/valid/test byte
streams.  Tokens are bytes (vocabulary 256: no tokenizer to train).  The base model is an
mlx-lm Llama (``mlx_lm.models.llama``, tiny dims, ``Settings``), pretrained on P with
``mlx.optimizers.AdamW`` (not nestedfn: the base owes nothing to the library under test) and
cached in ``~/.cache/nestedfn/pretrained/<sha256 of its settings and corpus>/``; its held-out
loss is reported next to P's unigram baseline (the cross-entropy of P's test bytes under
P's train byte frequencies, add-one smoothed), the proof that it learned something.

Protocol (one *run* = one fine-tuning mode, one contender, one learning rate, one seed): phase
A for ``steps`` steps, then phase B for ``steps`` steps, one optimizer state throughout, the last
``tuned_blocks`` blocks fine-tuned with LoRA (``lora``) or in full (``full``).  Held-out test
losses on P, A and B at the start, every ``eval_every`` steps, after A and after B.
``forgetting_a = A after B - A after A`` and ``forgetting_a_frac`` = that over what phase A
learned (``A before - A after A``); ``forgetting_p = P after B - P before`` and
``forgetting_p_frac`` = that over what pretraining learned (``unigram - P before``); B after B is
the plasticity.  Every contender's learning rate is picked by the same sweep (the same number
of grid points, one sweep seed not among the reported seeds, phase A alone, lowest A
*validation* loss); the controls take a fixed fraction of Adam's pick.

Contenders: ``adam``, ``adamw``; ``nested_adam`` with tiers by depth (one tuned block per
tier) in both orders (``shallow_fast``, ``deep_fast``) at two frequency sets; the seed app's
discard rule (``benchmarks.continual.seed_discard``); ``nested_adam`` with per-tier learning
rates ``lr / C_k`` (a slow tier also steps less far: the paper's slow memories as *stable*
memories; composed here from ``nestedfn.nested`` with one Adam per tier, which the library
exposes); ``multiscale_momentum``; controls: Adam at a third and a tenth of Adam's rate.

Output ``DIR/pretrained_continual.json`` (config, base model, sweep, per-seed ``results``,
``summary`` per mode, timings) and ``DIR/pretrained_continual.png`` (loss on P, A and B
through both phases, mean and ±1 std band per contender, one row per mode).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

import nestedfn as nf
from nestedfn.optim.core import tracing_step

try:
    from benchmarks.continual import _write_json, lora_init, mean_ci, seed_discard
except ModuleNotFoundError:  # run as a script: benchmarks/ is sys.path[0]
    from continual import _write_json, lora_init, mean_ci, seed_discard  # type: ignore[no-redef]

Params = Any

# ---------------------------------------------------------------------------------------------
# the three text domains (Debian packages)
# ---------------------------------------------------------------------------------------------

DOMAINS = ("P", "A", "B")
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
PACKAGES = {"P": "wordnet-base", "A": "fortunes", "B": "python3.11-doc"}


def wordnet_glosses(root: Path = WORDNET) -> list[bytes]:
    """Every synset's gloss (definition and quoted examples, the text after ``" | "``) in
    ``data.{noun,verb,adj,adv}``; the licence header lines (two leading spaces) skipped."""
    docs: list[bytes] = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos}").read_bytes().splitlines():
            if line.startswith(b"  ") or b" | " not in line:
                continue
            docs.append(line.split(b" | ", 1)[1].strip())
    return docs


def fortune_texts(root: Path = FORTUNES) -> list[bytes]:
    """Every fortune (the ``%``-separated records) of every file but ``ascii-art`` (pictures)."""
    docs: list[bytes] = []
    for f in sorted(root.iterdir()):
        if f.suffix or f.is_symlink() or f.name == "ascii-art" or not f.is_file():
            continue
        for rec in f.read_bytes().split(b"\n%\n"):
            rec = rec.strip(b"%\n ")
            if rec:
                docs.append(rec)
    return docs


def pydoc_paragraphs(root: Path = PYDOC, min_bytes: int = 40) -> list[bytes]:
    """The blank-line-separated paragraphs (at least ``min_bytes`` long) of every
    ``*.rst.txt`` of the Python documentation sources, files in sorted order."""
    docs: list[bytes] = []
    for f in sorted(root.rglob("*.rst.txt")):
        for par in f.read_bytes().split(b"\n\n"):
            par = par.strip(b"\n")
            if len(par) >= min_bytes:
                docs.append(par)
    return docs


LOADERS: dict[str, Callable[[], list[bytes]]] = {
    "P": wordnet_glosses,
    "A": fortune_texts,
    "B": pydoc_paragraphs,
}


@dataclass(frozen=True)
class Domain:
    """A domain's byte streams (``uint8``): documents joined by ``\\n``."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_docs(docs: Sequence[bytes], seed: int) -> Domain:
    """Shuffle ``docs`` with ``Generator(PCG64(seed))`` and cut 90/5/5 (test, valid, train
    order of the shuffled list) into byte streams; raises if a split would be empty."""
    if len(docs) < 40:
        raise ValueError(f"need at least 40 documents, got {len(docs)} (package not installed?)")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(docs))
    n5 = len(docs) // 20
    parts = (order[2 * n5 :], order[n5 : 2 * n5], order[:n5])

    def stream(ix: np.ndarray) -> np.ndarray:
        return np.frombuffer(b"\n".join(docs[i] for i in ix) + b"\n", dtype=np.uint8)

    return Domain(*(stream(ix) for ix in parts))


def load_domains(data_seed: int) -> dict[str, Domain]:
    """P, A and B; a missing package is one line naming it."""
    out = {}
    for i, d in enumerate(DOMAINS):
        try:
            docs = LOADERS[d]()
        except FileNotFoundError as e:
            raise SystemExit(
                f"domain {d}: {e.filename} missing: apt-get install {PACKAGES[d]}"
            ) from None
        out[d] = split_docs(docs, data_seed * 10 + i)
    return out


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> mx.array:
    """``(len(starts), length)`` int32 windows of ``stream``."""
    idx = starts[:, None] + np.arange(length)[None, :]
    return mx.array(stream[idx].astype(np.int32))


def random_starts(stream: np.ndarray, n: int, length: int, key: Sequence[int]) -> np.ndarray:
    """``n`` window starts drawn uniformly with ``Generator(PCG64(key))``."""
    rng = np.random.Generator(np.random.PCG64(list(key)))
    return rng.integers(0, len(stream) - length, size=n)


def unigram_loss(train: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy (nats) of the bytes ``targets`` under ``train``'s add-one-smoothed
    byte frequencies: the loss of the best model that ignores context (up to smoothing)."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(targets, dtype=np.int64).ravel()].mean())


# ---------------------------------------------------------------------------------------------
# settings, the base model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a result depends on (stated in the JSON; the pretraining part keys the cache)."""

    hidden: int = 32
    layers: int = 4
    heads: int = 4
    intermediate: int = 96
    seq_len: int = 32
    pretrain_steps: int = 800
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    data_seed: int = 0
    # fine-tuning
    tuned_blocks: int = 3
    lora_rank: int = 4
    lora_scale: float = 20.0
    steps: int = 400  # per phase: the slowest tier of F1 updates 100 times, of F2 50 times
    batch: int = 4
    eval_every: int = 50
    eval_windows: int = 32  # per domain and split, fixed
    sweep_seed: int = 1000

    def pretrain_key(self) -> str:
        keys = ("hidden", "layers", "heads", "intermediate", "seq_len", "pretrain_steps")
        keys += ("pretrain_batch", "pretrain_lr", "data_seed")
        return json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)


def model_args(s: Settings) -> Any:
    from mlx_lm.models import llama

    return llama.ModelArgs(
        model_type="llama",
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        rms_norm_eps=1e-5,
        vocab_size=256,
        tie_word_embeddings=True,
    )


def cache_dir(s: Settings, domains: dict[str, Domain], root: Path) -> Path:
    """``root/<sha256(pretraining settings, P's train stream)[:16]>``."""
    h = hashlib.sha256(s.pretrain_key().encode())
    h.update(hashlib.sha256(domains["P"].train.tobytes()).digest())
    h.update(mx.__version__.encode())
    return root / h.hexdigest()[:16]


def eval_batches(s: Settings, domains: dict[str, Domain], split: str) -> dict[str, mx.array]:
    """The fixed held-out windows (``eval_windows`` of ``seq_len + 1`` bytes) of each domain."""
    out = {}
    for i, d in enumerate(DOMAINS):
        stream = getattr(domains[d], split)
        starts = random_starts(stream, s.eval_windows, s.seq_len + 1, (s.data_seed, i, 77))
        out[d] = windows(stream, starts, s.seq_len + 1)
    return out


def pretrain(s: Settings, domains: dict[str, Domain], root: Path) -> dict[str, Any]:
    """The base model's weights in the cache (trained now if absent) and its report:
    held-out (test) loss on P, A and B, P's unigram baseline, pretraining time."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    where = cache_dir(s, domains, root)
    report_path = where / "report.json"
    if report_path.exists() and (where / "weights.safetensors").exists():
        rep = json.loads(report_path.read_text(encoding="utf-8"))
        rep["cached"] = True
        return rep
    tic = time.perf_counter()
    mx.random.seed(s.data_seed)
    model = llama.Model(model_args(s))
    sched = optim.join_schedules(
        [
            optim.linear_schedule(0.0, s.pretrain_lr, max(s.pretrain_steps // 10, 1)),
            optim.cosine_decay(s.pretrain_lr, s.pretrain_steps, s.pretrain_lr / 10),
        ],
        [max(s.pretrain_steps // 10, 1)],
    )
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)

    def loss_fn(m: nn.Module, x: mx.array) -> mx.array:
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    grad_fn = nn.value_and_grad(model, loss_fn)
    train = domains["P"].train
    for k in range(s.pretrain_steps):
        starts = random_starts(train, s.pretrain_batch, s.seq_len + 1, (s.data_seed, 0, 1, k))
        loss, grads = grad_fn(model, windows(train, starts, s.seq_len + 1))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if (k + 1) % max(s.pretrain_steps // 8, 1) == 0:
            print(f"[pretrain] step {k + 1}/{s.pretrain_steps} loss {loss.item():.3f}", flush=True)
    test = eval_batches(s, domains, "test")
    held = {
        d: float(nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean().item())
        for d, x in test.items()
    }
    rep = {
        "held_out_loss": held,
        "unigram_loss_p": unigram_loss(train, np.asarray(test["P"][:, 1:])),
        "pretrain_s": time.perf_counter() - tic,
        "cache": str(where),
        "key": s.pretrain_key(),
        "corpus_bytes": {
            d: {k: int(len(getattr(domains[d], k))) for k in ("train", "valid", "test")}
            for d in DOMAINS
        },  # fmt: skip
    }
    where.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(where / "weights.safetensors"), dict(tree_flatten(model.parameters())))
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    tmp.replace(report_path)
    rep["cached"] = False
    return rep


# ---------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------

# two frequency sets; the second's slowest tier (every 8 steps) is the slowest that still
# updates 50 times in a 400-step phase (the issue's floor): every slow tier twice as slow as F1's
F1, F2 = (1, 2, 4), (1, 4, 8)
# the same number of points for every contender of a mode (full fine-tuning takes higher rates:
# its grid reaches further up, so that no pick sits at the top edge; lr/C_k's slow tiers step
# C_k times less far, so it wants the highest); multiscale_momentum's paper form steps far
# larger per unit rate (running sums), so its grid sits lower (see benchmarks/continual)
GRIDS = {
    "lora": {"adam": (3e-4, 1e-3, 3e-3, 1e-2), "m3": (1e-5, 3e-5, 1e-4, 3e-4)},
    "full": {"adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "m3": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)},
}


def per_tier_lr(lr: float, freqs: Sequence[int]) -> nf.Optimizer:
    """Tiers by depth, tier ``k`` Adam at ``lr / C_k`` with the CMS mean (``nestedfn.nested``
    with one inner optimizer per tier)."""
    return nf.nested([nf.adam(lr / f) for f in freqs], "depth", freqs, reduce="mean")


CONTENDERS: dict[str, tuple[Callable[[float], nf.Optimizer], str]] = {
    "adam": (lambda lr: nf.adam(lr), "adam"),
    "adamw": (lambda lr: nf.adamw(lr, weight_decay=0.01), "adam"),
    f"nested_adam{F1} shallow_fast": (lambda lr: nf.nested_adam(lr, frequencies=F1), "adam"),
    f"nested_adam{F1} deep_fast": (
        lambda lr: nf.nested_adam(lr, frequencies=F1, order="deep_fast"),
        "adam",
    ),
    f"nested_adam{F2} shallow_fast": (lambda lr: nf.nested_adam(lr, frequencies=F2), "adam"),
    f"nested_adam{F2} deep_fast": (
        lambda lr: nf.nested_adam(lr, frequencies=F2, order="deep_fast"),
        "adam",
    ),
    f"nested_adam{F1} lr/C_k": (lambda lr: per_tier_lr(lr, F1), "adam"),
    f"seed_discard{F1}": (lambda lr: seed_discard(lr, F1), "adam"),
    "multiscale_momentum": (lambda lr: nf.multiscale_momentum(lr), "m3"),
}
CONTROLS = {"adam lr/3 (control)": 1 / 3, "adam lr/10 (control)": 0.1}
NAMES = (*CONTENDERS, *CONTROLS)
DISCARD = f"seed_discard{F1}"


def make_optimizer(name: str, lr: float) -> nf.Optimizer:
    return nf.adam(lr) if name in CONTROLS else CONTENDERS[name][0](lr)


# ---------------------------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------------------------


class Bench:
    """The cached base model with the ``mode``'s trainable part, the domains' fixed held-out
    batches and compiled loss/gradient functions (each run starts from its own copy)."""

    def __init__(self, s: Settings, mode: str, weights: Path):
        import mlx.nn as nn
        from mlx_lm.models import llama

        from nestedfn.lm.lora import LoraSpec, apply_lora

        self.s, self.mode = s, mode
        self.domains = load_domains(s.data_seed)
        self.model = llama.Model(model_args(s))
        self.model.load_weights(str(weights))
        spec = LoraSpec(s.lora_rank, s.lora_scale, 0.0, s.tuned_blocks, None, mode)
        params = apply_lora(self.model, spec, seed=0)
        self.leaves0, self.treedef = nf.flatten(params)
        mx.eval(self.leaves0)
        self.held = {sp: eval_batches(s, self.domains, sp) for sp in ("valid", "test")}
        model, td = self.model, self.treedef

        def mean_loss(leaves: list[mx.array], x: mx.array) -> mx.array:
            nf.update_module(model, nf.unflatten(td, leaves), verify=False)
            return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()

        self._mean_loss = mean_loss
        self._eval = mx.compile(mean_loss)
        self._steps: dict[int, FusedStep] = {}

    def init_params(self, seed: int) -> Params:
        """LoRA: ``lora_a ~ U(±1/sqrt(in))`` from ``PCG64([seed, 7])``, ``lora_b = 0`` (mlx-lm's
        init); full: the pretrained blocks themselves (the seed then only orders the data)."""
        if self.mode == "full":
            return nf.unflatten(self.treedef, list(self.leaves0))
        return lora_init(self.treedef, self.leaves0, seed)

    def loss(self, params: Params, domain: str, split: str = "test") -> float:
        return float(self._eval(nf.flatten(params)[0], self.held[split][domain]).item())

    def losses(self, params: Params) -> dict[str, float]:
        return {d: self.loss(params, d) for d in DOMAINS}

    def phase_windows(self, domain: str, seed: int) -> mx.array:
        """``(steps, batch, seq_len + 1)``: every training batch of a phase on ``domain``, step
        ``k``'s windows drawn from ``PCG64([seed, domain, k])`` (the same data for every
        contender), sampled at once so the step loop does no host work."""
        s, stream = self.s, self.domains[domain].train
        n = s.seq_len + 1
        starts = np.stack(
            [random_starts(stream, s.batch, n, (seed, DOMAINS.index(domain), k)) for k in range(s.steps)]
        )  # fmt: skip
        return mx.array(stream[starts[..., None] + np.arange(n)].astype(np.int32))

    def train(
        self,
        opt: nf.Optimizer,
        state: nf.TrainState,
        domain: str,
        seed: int,
        on_eval: Callable[[nf.TrainState], None] | None = None,
    ) -> nf.TrainState:
        """``steps`` steps on ``domain``'s train stream (``phase_windows``), each one compiled
        graph (``FusedStep``) evaluated asynchronously; the training losses are checked for a
        non-finite value (``FloatingPointError`` naming the first such step) at every
        evaluation point and at the end, the only host syncs of the loop."""
        if id(opt) not in self._steps:
            self._steps = {id(opt): FusedStep(opt, self._mean_loss, self.treedef)}
        step_fn = self._steps[id(opt)]
        xs = self.phase_windows(domain, seed)
        p, o, opt_td = nf.flatten(state.params)[0], *nf.flatten(state.opt_state)
        at = int(state.step)
        pending: list[mx.array] = []

        def check() -> nf.TrainState:
            """Raise on a non-finite training loss since the last check; the current state."""
            losses = np.asarray(mx.stack(pending)) if pending else np.zeros(0)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                k = at - len(pending) + int(bad[0]) + 1 - int(state.step)
                raise FloatingPointError(f"training loss {float(losses[bad[0]])} at step {k}")
            pending.clear()
            return step_fn.state(p, o, at)

        for k in range(self.s.steps):
            loss, p, o = step_fn(p, o, opt_td, at, xs[k])
            at += 1
            pending.append(loss)
            mx.async_eval(loss, p, o)
            if on_eval is not None and (k + 1) % self.s.eval_every == 0:
                on_eval(check())
        return check()


class FusedStep:
    """One training step on flat leaf lists, ``(params, opt state, step, batch) -> (loss, new
    params, new opt state)``: the loss, its gradient in the trainable leaves and the
    optimizer's update in one ``mx.compile`` graph, the parameters and optimizer state its
    inputs and outputs (nestedfn optimizers are pure functions, so the whole step is one).
    The step count enters as an ``mx.array``; an optimizer whose control flow depends on it
    (tiers, the discard rule) gets one graph per ``opt.phase(step)``, traced under
    ``tracing_step`` as ``nf.compile_step`` does.  The same arithmetic as ``nf.compile_step``'s
    graph (``native=False``) after the compiled gradient: equal to ``nf.apply_gradients`` up to
    float32 rounding (the bias corrections read the step as float32)."""

    def __init__(self, opt: nf.Optimizer, loss_fn: Callable[..., mx.array], treedef: Any):
        self.opt, self.loss_fn, self.treedef = opt, loss_fn, treedef
        self._graphs: dict[Any, Callable[..., Any]] = {}
        self._opt_td: Any = None

    def _build(self, opt_td: Any, at: int) -> Callable[..., Any]:
        opt, td = self.opt, self.treedef
        value_and_grad = mx.value_and_grad(self.loss_fn)

        def step(k: mx.array, p: list[mx.array], o: list[mx.array], x: mx.array) -> list[mx.array]:
            loss, g = value_and_grad(p, x)
            params = nf.unflatten(td, p)
            with tracing_step(at):
                upd, new_o = opt.update(nf.unflatten(td, g), nf.unflatten(opt_td, o), params, k)
            o_leaves, o_td = nf.flatten(new_o)
            if o_td != opt_td:  # the state must keep its structure: it is the next input
                raise TypeError(f"{opt}: the optimizer state changed structure at step {at}")
            return [loss, *nf.flatten(nf.apply_updates(params, upd))[0], *o_leaves]

        return mx.compile(step)

    def __call__(
        self, p: list[mx.array], o: list[mx.array], opt_td: Any, at: int, x: mx.array
    ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        key = (opt_td, self.opt.phase(at))
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._graphs[key] = self._build(opt_td, at)
            self._opt_td = opt_td
        out = fn(mx.array(at, dtype=mx.int32), p, o, x)
        return out[0], out[1 : 1 + len(p)], out[1 + len(p) :]

    def state(self, p: list[mx.array], o: list[mx.array], at: int) -> nf.TrainState:
        """The ``TrainState`` of flat leaves ``p``, ``o`` at step ``at``."""
        return nf.TrainState(nf.unflatten(self.treedef, p), nf.unflatten(self._opt_td, o), at)


def run_continual(bench: Bench, name: str, lr: float, seed: int) -> dict[str, Any]:
    """Phase A then phase B; every field of a ``results`` row."""
    tic = time.perf_counter()
    opt = make_optimizer(name, lr)
    state = nf.init(opt, bench.init_params(seed))
    curve: dict[str, list[float]] = {d: [] for d in DOMAINS}
    steps: list[int] = []

    def record(st: nf.TrainState, at: int) -> dict[str, float]:
        ls = bench.losses(st.params)
        steps.append(at)
        for d in DOMAINS:
            curve[d].append(ls[d])
        return ls

    n = bench.s.steps
    before = record(state, 0)
    state = bench.train(
        opt, state, "A", seed, lambda st: record(st, len(steps) * bench.s.eval_every)
    )
    after_a = {d: curve[d][-1] for d in DOMAINS} if steps[-1] == n else record(state, n)
    state = bench.train(
        opt, state, "B", seed, lambda st: record(st, len(steps) * bench.s.eval_every)
    )
    after_b = {d: curve[d][-1] for d in DOMAINS} if steps[-1] == 2 * n else record(state, 2 * n)
    learned_a = before["A"] - after_a["A"]
    row: dict[str, Any] = {"mode": bench.mode, "optimizer": name, "seed": seed, "lr": lr}
    for tag, ls in (("before", before), ("after_a", after_a), ("after_b", after_b)):
        for d in DOMAINS:
            row[f"loss_{d.lower()}_{tag}"] = ls[d]
    row["learned_a"] = learned_a
    row["forgetting_a"] = after_b["A"] - after_a["A"]
    row["forgetting_a_frac"] = row["forgetting_a"] / learned_a if learned_a > 0 else math.nan
    row["forgetting_p"] = after_b["P"] - before["P"]
    row["curve_steps"] = steps
    for d in DOMAINS:
        row[f"loss_{d.lower()}_curve"] = curve[d]
    row["time_s"] = time.perf_counter() - tic
    return row


def sweep_point(bench: Bench, name: str, lr: float) -> float:
    """A's validation loss after phase A alone (sweep seed); ``inf`` if it diverged."""
    opt = make_optimizer(name, lr)
    state = nf.init(opt, bench.init_params(bench.s.sweep_seed))
    try:
        state = bench.train(opt, state, "A", bench.s.sweep_seed)
        loss = bench.loss(state.params, "A", "valid")
    except FloatingPointError:
        return math.inf
    return loss if math.isfinite(loss) else math.inf


# ---------------------------------------------------------------------------------------------
# jobs (in this process or in --workers processes)
# ---------------------------------------------------------------------------------------------

_BENCHES: dict[tuple[str, str], Bench] = {}


def do_job(job: tuple[str, str, str, float, int, str, str]) -> dict[str, Any]:
    """One sweep point (``kind="sweep"``) or one run (``"run"``); benches built once per
    process.  ``job = (kind, mode, name, lr, seed, settings json, weights path)``."""
    kind, mode, name, lr, seed, sj, weights = job
    key = (mode, sj)
    if key not in _BENCHES:
        _BENCHES.clear()
        _BENCHES[key] = Bench(Settings(**json.loads(sj)), mode, Path(weights))
    bench = _BENCHES[key]
    if kind == "sweep":
        tic = time.perf_counter()
        return {"mode": mode, "optimizer": name, "lr": lr, "valid_loss_a": sweep_point(bench, name, lr), "time_s": time.perf_counter() - tic}  # fmt: skip
    return run_continual(bench, name, lr, seed)


def run_jobs(
    jobs: list[tuple], workers: int, label: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """``do_job`` over ``jobs`` in order (``workers == 1``) or in a spawn pool; one line each."""
    out: list[dict[str, Any]] = []
    if workers == 1:
        for j in jobs:
            out.append(do_job(j))
            print(label(out[-1]), flush=True)
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for r in ex.map(do_job, jobs, chunksize=1):
            out.append(r)
            print(label(r), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# statistics, table, plot
# ---------------------------------------------------------------------------------------------

METRICS = (
    "loss_p_after_b",
    "loss_a_after_a",
    "loss_a_after_b",
    "loss_b_after_b",
    "forgetting_a",
    "forgetting_a_frac",
    "forgetting_p",
    "forgetting_p_frac",
)


def summarize(results: list[dict[str, Any]], reference: str = "adam") -> dict[str, Any]:
    """Per mode and contender: mean/std/ci95 of every metric over seeds, and the paired (same
    seed) difference to ``reference`` with ``exceeds_spread`` = its 95% interval excludes 0."""
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        by: dict[str, dict[int, dict[str, Any]]] = {}
        for r in results:
            if r["mode"] == mode:
                by.setdefault(r["optimizer"], {})[r["seed"]] = r
        ref = by.get(reference, {})
        out[mode] = {}
        for name, rows in by.items():
            entry: dict[str, Any] = {"n_seeds": len(rows), "lr": next(iter(rows.values()))["lr"]}
            seeds = sorted(set(rows) & set(ref))
            for m in METRICS:
                entry[m] = mean_ci([r[m] for r in rows.values()])
                if name != reference and len(seeds) >= 2:
                    d = mean_ci([rows[s][m] - ref[s][m] for s in seeds])
                    d["exceeds_spread"] = bool(abs(d["mean"]) > d["ci95"])
                    entry[f"{m}_minus_{reference}"] = d
            out[mode][name] = entry
    return out


def table(summary: dict[str, Any], reference: str = "adam") -> str:
    """Markdown table per mode: mean ± 95% CI half-width; ``*``: the paired difference to
    ``reference`` has a 95% interval that excludes 0."""
    heads = ("P after B", "A after A", "A after B", "B after B", "forgetting A", "forgetting A frac", "P increase", "P increase frac")  # fmt: skip
    lines = []
    for mode, entries in summary.items():
        lines += [
            f"\n**{mode}** (paired differences against `{reference}`)\n",
            f"| optimizer | lr | {' | '.join(heads)} | forgetting A - {reference} |",
            "|---|---|" + "---|" * (len(heads) + 1),
        ]
        for name, e in entries.items():
            cells = []
            for m in METRICS:
                d = e.get(f"{m}_minus_{reference}")
                star = "*" if d is not None and d["exceeds_spread"] else ""
                cells.append(f"{e[m]['mean']:.3f} ± {e[m]['ci95']:.3f}{star}")
            d = e.get(f"forgetting_a_minus_{reference}")
            diff = "—" if d is None else f"{d['mean']:+.3f} ± {d['ci95']:.3f}"
            lines.append(f"| {name} | {e['lr']:.3g} | {' | '.join(cells)} | {diff} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str, unigram: float) -> None:
    """One row per mode, one column per domain: the test loss through phase A and phase B
    (mean over seeds, band ±1 std) per contender; the dotted line is the phase switch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results))
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(len(modes), 3, figsize=(17, 5 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        for col, d in enumerate(DOMAINS):
            ax = axes[row][col]
            for i, name in enumerate(names):
                rows = [r for r in results if r["mode"] == mode and r["optimizer"] == name]
                if not rows:
                    continue
                x = np.asarray(rows[0]["curve_steps"])
                y = np.asarray([r[f"loss_{d.lower()}_curve"] for r in rows])
                mu = y.mean(0)
                sd = y.std(0, ddof=1) if len(rows) > 1 else np.zeros_like(mu)
                ls = "--" if "control" in name else "-"
                ax.plot(x, mu, color=cmap(i % 20), lw=1.4, ls=ls, label=name)
                ax.fill_between(x, mu - sd, mu + sd, color=cmap(i % 20), alpha=0.12)
            ax.axvline(rows[0]["curve_steps"][-1] / 2, color="k", ls=":", lw=1)
            if d == "P":
                ax.axhline(unigram, color="gray", ls="-.", lw=1, label="P unigram")
            ax.set_title(f"{mode}: test loss on {d} ({PACKAGES[d]})", fontsize=9)
            ax.set_xlabel("step (phase A | phase B)")
            ax.set_ylabel("nats/byte")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

QUICK = {"pretrain_steps": 100, "steps": 8, "eval_every": 4, "eval_windows": 8}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="short pretraining and phases, 2 seeds, no sweep"
    )
    ap.add_argument("--out", type=Path, default=Path("nestedfn-runs/pretrained_continual"))
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; quick 2)")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--only", nargs="*", default=None, help="only these contenders")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/nestedfn/pretrained")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override a Settings field"
    )
    ap.add_argument(
        "--replot", action="store_true", help="redo summary, table and plot of DIR's JSON"
    )
    args = ap.parse_args(argv)
    out: Path = args.out
    if args.replot:
        doc = json.loads((out / "pretrained_continual.json").read_text(encoding="utf-8"))
        finish(doc, out)
        return 0
    s = Settings(**(QUICK if args.quick else {}))
    fields = {f: type(v) for f, v in asdict(s).items()}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in fields or not v:
            ap.error(f"--set {kv!r}: not FIELD=VALUE with FIELD one of {sorted(fields)}")
        s = replace(s, **{k: fields[k](v)})
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    names = [n for n in NAMES if args.only is None or n in args.only]
    if not names or args.workers < 1 or n_seeds < 1 or s.steps < s.eval_every:
        ap.error(
            f"need >= 1 contender of {list(NAMES)}, workers and seeds >= 1, steps >= eval_every"
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    domains = load_domains(s.data_seed)
    base = pretrain(s, domains, args.cache)
    print(
        f"[base] held-out P {base['held_out_loss']['P']:.3f} vs unigram {base['unigram_loss_p']:.3f}"
        f" nats/byte (A {base['held_out_loss']['A']:.3f}, B {base['held_out_loss']['B']:.3f});"
        f" {'cached' if base['cached'] else 'pretrained'} in {base['pretrain_s']:.0f}s at {base['cache']}",
        flush=True,
    )
    weights = str(Path(base["cache"]) / "weights.safetensors")
    sj = json.dumps(asdict(s))
    doc: dict[str, Any] = {
        "config": {
            "settings": asdict(s),
            "seeds": list(range(n_seeds)),
            "modes": args.modes,
            "quick": bool(args.quick),
            "workers": args.workers,
            "frequency_sets": [list(F1), list(F2)],
            "grids": GRIDS,
            "packages": PACKAGES,
            "command": " ".join(["python", "benchmarks/pretrained_continual.py", *sys.argv[1:]]),
            "cpu_count": os.cpu_count(),
        },
        "base": base,
        "sweep": {},
        "results": [],
    }
    # 1. the sweeps (phase A alone, sweep seed), all modes and contenders at once
    tic = time.perf_counter()
    swept = [n for n in names if n in CONTENDERS]
    if "adam" not in swept and any(n in CONTROLS for n in names):
        swept.insert(0, "adam")  # the controls' rate is a fraction of adam's pick
    chosen: dict[tuple[str, str], float] = {}
    if args.quick:
        for m in args.modes:
            for n in swept:
                g = GRIDS[m][CONTENDERS[n][1]]
                chosen[m, n] = g[len(g) // 2]
                doc["sweep"][f"{m}/{n}"] = {"chosen": chosen[m, n], "note": "--quick: no sweep"}
    else:
        jobs = [("sweep", m, n, lr, 0, sj, weights) for m in args.modes for n in swept for lr in GRIDS[m][CONTENDERS[n][1]]]  # fmt: skip
        rows = run_jobs(jobs, args.workers, lambda r: f"[sweep] {r['mode']} {r['optimizer']} lr {r['lr']:g}: A valid {r['valid_loss_a']:.4f} [{r['time_s']:.0f}s, total {time.perf_counter() - started:.0f}s]")  # fmt: skip
        for m in args.modes:
            for n in swept:
                pts = {
                    r["lr"]: r["valid_loss_a"]
                    for r in rows
                    if r["mode"] == m and r["optimizer"] == n
                }
                best = min(pts, key=lambda lr: pts[lr])
                chosen[m, n] = best
                doc["sweep"][f"{m}/{n}"] = {"valid_loss_a": {repr(k): v for k, v in pts.items()}, "chosen": best, "at_grid_edge": best in (min(pts), max(pts))}  # fmt: skip
    for m in args.modes:
        for n, f in CONTROLS.items():
            if n in names:
                chosen[m, n] = f * chosen[m, "adam"]
                doc["sweep"][f"{m}/{n}"] = {
                    "control_of": "adam",
                    "factor": f,
                    "chosen": chosen[m, n],
                }
    doc["sweep_s"] = time.perf_counter() - tic
    # 2. the runs
    tic = time.perf_counter()
    jobs = [("run", m, n, chosen[m, n], seed, sj, weights) for m in args.modes for n in names for seed in range(n_seeds)]  # fmt: skip

    def label(r: dict[str, Any]) -> str:
        return (
            f"[run] {r['mode']} {r['optimizer']} seed {r['seed']}: A {r['loss_a_after_a']:.3f} -> "
            f"{r['loss_a_after_b']:.3f} (frac {r['forgetting_a_frac']:.2f}), P {r['loss_p_before']:.3f} -> "
            f"{r['loss_p_after_b']:.3f}, B {r['loss_b_after_b']:.3f} [{r['time_s']:.0f}s, total {time.perf_counter() - started:.0f}s]"
        )

    doc["results"] = run_jobs(jobs, args.workers, label)
    for r in doc["results"]:  # P's increase over what pretraining learned beyond the unigram
        gain = base["unigram_loss_p"] - r["loss_p_before"]
        r["forgetting_p_frac"] = r["forgetting_p"] / gain if gain > 0 else math.nan
    doc["runs_s"] = time.perf_counter() - tic
    doc["elapsed_s"] = time.perf_counter() - started
    finish(doc, out)
    print(f"wrote {out / 'pretrained_continual.json'} and .png in {doc['elapsed_s']:.0f}s")
    return 0


def finish(doc: dict[str, Any], out: Path) -> None:
    """Summaries (against ``adam`` and the discard rule), JSON, plot and tables."""
    results = doc["results"]
    doc["summary"] = summarize(results)
    if any(r["optimizer"] == DISCARD for r in results):
        doc["summary_vs_seed_discard"] = summarize(results, reference=DISCARD)
    _write_json(out / "pretrained_continual.json", doc)
    s = doc["config"]["settings"]
    title = (
        f"pretrained byte-level Llama (hidden {s['hidden']}, {s['layers']} layers) on WordNet -> "
        f"A fortunes -> B Python docs; last {s['tuned_blocks']} blocks tuned, {s['steps']} steps/phase, "
        f"batch {s['batch']}x{s['seq_len']}, {len(doc['config']['seeds'])} seeds"
    )
    plot(results, out / "pretrained_continual.png", title, doc["base"]["unigram_loss_p"])
    print(table(doc["summary"]))
    if "summary_vs_seed_discard" in doc:
        print(table(doc["summary_vs_seed_discard"], reference=DISCARD))


if __name__ == "__main__":
    raise SystemExit(main())
