"""Smoke test of the pretrained continual benchmark (``benchmarks/pretrained_continual.py``):
its pieces against independent computations, and one end-to-end run at toy size on synthetic
domains (the Debian text packages are not needed here)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import benchmarks.pretrained_continual as pc
import nestedfn as nf
from benchmarks.continual import discard_schedule


@given(
    st.lists(st.integers(0, 255), min_size=1, max_size=200),
    st.lists(st.integers(0, 255), min_size=1, max_size=50),
)
@settings(max_examples=50, deadline=None)
def test_unigram_loss_is_the_smoothed_cross_entropy(train, targets):
    counts = Counter(train)
    total = len(train) + 256
    expected = -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)
    got = pc.unigram_loss(np.asarray(train, dtype=np.uint8), np.asarray(targets))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_split_docs_is_a_deterministic_partition():
    docs = [f"doc {i}".encode() for i in range(200)]
    a, b = pc.split_docs(docs, 3), pc.split_docs(docs, 3)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "valid", "test"))
    parts = [bytes(getattr(a, k)).split(b"\n")[:-1] for k in ("train", "valid", "test")]
    assert sorted(sum(parts, [])) == sorted(docs)  # every document in exactly one split
    assert [len(p) for p in parts] == [180, 10, 10]
    assert not np.array_equal(pc.split_docs(docs, 4).test, a.test)
    with pytest.raises(ValueError, match="at least 40"):
        pc.split_docs(docs[:10], 0)


def _synthetic(kind: int):
    """Documents with strong byte context (what a model can learn beyond unigram counts)."""
    words = (["the cat", "a dog", "my owl"], ["sees", "eats", "likes"], ["red", "old", "big"])

    def docs() -> list[bytes]:
        rng = np.random.Generator(np.random.PCG64(kind))
        out = []
        for _ in range(300):
            w = [ws[int(rng.integers(3))] for ws in words]
            out.append(f"{w[0]} {w[1]} the {w[2]} thing {kind}.".encode())
        return out

    return docs


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_end_to_end_toy_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str):
    for i, d in enumerate(pc.DOMAINS):
        monkeypatch.setitem(pc.LOADERS, d, _synthetic(i))
    names = ["adam", "seed_discard(1, 2, 4)", "adam lr/3 (control)"]
    argv = ["--quick", "--seeds", "2", "--modes", mode, "--out", str(tmp_path / "out")]
    argv += ["--cache", str(tmp_path / "cache"), "--only", *names, "--set"]
    argv += ["hidden=16", "intermediate=32", "seq_len=16", "pretrain_steps=60"]
    argv += ["pretrain_lr=0.01", "steps=4", "eval_every=2", "eval_windows=8"]
    assert pc.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "pretrained_continual.json").read_text())
    base = doc["base"]
    # the base model learned context: it beats the unigram baseline on held-out P
    assert base["held_out_loss"]["P"] < base["unigram_loss_p"] - 0.1
    # the unigram baseline is the cross-entropy of the held-out targets, computed apart here
    s = pc.Settings(**doc["config"]["settings"])
    domains = pc.load_domains(s.data_seed)
    targets = np.asarray(pc.eval_batches(s, domains, "test")["P"])[:, 1:]
    assert base["unigram_loss_p"] == pytest.approx(pc.unigram_loss(domains["P"].train, targets))
    rows = doc["results"]
    assert sorted((r["optimizer"], r["seed"]) for r in rows) == sorted(
        (n, k) for n in names for k in (0, 1)
    )
    fields = [f"loss_{d}_{t}" for d in "pab" for t in ("before", "after_a", "after_b")]
    fields += ["forgetting_a", "forgetting_p", "forgetting_p_frac", "learned_a", "lr", "time_s"]
    for r in rows:
        assert r["mode"] == mode
        assert all(math.isfinite(r[f]) for f in fields), r
        assert r["curve_steps"] == [0, 2, 4, 6, 8]
        assert r["forgetting_a"] == pytest.approx(r["loss_a_after_b"] - r["loss_a_after_a"])
        assert r["loss_a_curve"][2] == r["loss_a_after_a"]
        assert r["loss_b_curve"][-1] == r["loss_b_after_b"]
    by = {(r["optimizer"], r["seed"]): r for r in rows}
    assert by["adam lr/3 (control)", 0]["lr"] == pytest.approx(by["adam", 0]["lr"] / 3)
    # every contender starts from the same model: the "before" losses agree per seed
    assert by["adam", 1]["loss_p_before"] == by["seed_discard(1, 2, 4)", 1]["loss_p_before"]
    assert set(doc["summary"][mode]) == set(names)
    assert (tmp_path / "out" / "pretrained_continual.png").stat().st_size > 0
    # a second run reuses the cached base model
    assert pc.main([*argv[:6], str(tmp_path / "out2"), *argv[7:]]) == 0
    again = json.loads((tmp_path / "out2" / "pretrained_continual.json").read_text())["base"]
    assert again["cached"] and again["held_out_loss"] == base["held_out_loss"]


def _toy_problem(seed: int):
    """A small two-layer tanh regression as a loss of a flat leaf list (what ``FusedStep`` takes),
    its parameters and a few batches."""
    rng = np.random.Generator(np.random.PCG64(seed))
    params = {
        "blocks": [
            {"w": mx.array(rng.normal(size=(6, 5)).astype(np.float32) * 0.5)},
            {"w": mx.array(rng.normal(size=(5, 3)).astype(np.float32) * 0.5)},
            {"w": mx.array(rng.normal(size=(3, 2)).astype(np.float32) * 0.5)},
        ]
    }
    leaves, td = nf.flatten(params)
    xs = mx.array(rng.normal(size=(12, 4, 8)).astype(np.float32))

    def loss_fn(ls: list[mx.array], x: mx.array) -> mx.array:
        p = nf.unflatten(td, ls)
        h = x[:, :6]
        for b in p["blocks"]:
            h = mx.tanh(h @ b["w"])
        return mx.mean((h - x[:, 6:]) ** 2)

    return params, td, loss_fn, xs


@pytest.mark.parametrize(
    "name", ["adam", "nested_adam(1, 2, 4) deep_fast", "seed_discard(1, 2, 4)"]
)
@given(seed=st.integers(0, 2**16))
@settings(max_examples=4, deadline=None)
def test_fused_step_is_compile_step_after_the_gradient(name: str, seed: int):
    """The fused step (loss, gradient and update in one graph) against the unfused peer: the
    compiled gradient, then ``nf.compile_step``'s MLX graph (bit for bit) and eager
    ``nf.apply_gradients`` (float32 rounding: the graph reads the step as float32)."""
    params, td, loss_fn, xs = _toy_problem(seed)
    opt = pc.make_optimizer(name, 0.05)
    fused = pc.FusedStep(opt, loss_fn, td)
    grad = mx.compile(mx.value_and_grad(loss_fn))
    peer, eager = nf.compile_step(opt, native=False), nf.init(opt, params)
    ref = nf.init(opt, params)
    p, (o, otd) = nf.flatten(params)[0], nf.flatten(ref.opt_state)
    for k in range(len(xs)):
        loss, p, o = fused(p, o, otd, k, xs[k])
        want, g = grad(nf.flatten(ref.params)[0], xs[k])
        ref = peer(ref, nf.unflatten(td, g))
        eager = nf.apply_gradients(
            opt, eager, nf.unflatten(td, grad(nf.flatten(eager.params)[0], xs[k])[1])
        )
        assert loss.item() == want.item()
        got = fused.state(p, o, k + 1)
        for a, b in zip(nf.flatten(got)[0], nf.flatten(ref)[0]):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (name, k)
        for a, b in zip(nf.flatten(got.params)[0], nf.flatten(eager.params)[0]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert len(fused._graphs) == (1 if name == "adam" else 3)  # one graph per phase


def test_train_names_the_first_non_finite_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A divergent rate: ``Bench.train`` raises naming the first step whose training loss is
    not finite, found apart here by a step-by-step replay of the same windows."""
    for i, d in enumerate(pc.DOMAINS):
        monkeypatch.setitem(pc.LOADERS, d, _synthetic(i))
    s = pc.Settings(hidden=16, intermediate=32, seq_len=16, pretrain_steps=5, steps=12,
                    eval_every=5, eval_windows=4)  # fmt: skip
    base = pc.pretrain(s, pc.load_domains(s.data_seed), tmp_path)
    bench = pc.Bench(s, "full", Path(base["cache"]) / "weights.safetensors")
    # a rate that is 0 for 6 steps, then blows up: the first non-finite loss is in the second
    # chunk between checks (eval_every 5), where the step's offset matters
    opt = nf.sgd(lambda k: mx.where(k < 6, 0.0, 1e30))
    with pytest.raises(FloatingPointError) as e:
        bench.train(opt, nf.init(opt, bench.init_params(0)), "A", 0)
    state, xs = nf.init(opt, bench.init_params(0)), bench.phase_windows("A", 0)
    grad = mx.value_and_grad(bench._mean_loss)
    for k in range(s.steps):
        loss, g = grad(nf.flatten(state.params)[0], xs[k])
        if not math.isfinite(loss.item()):
            break
        state = nf.apply_gradients(opt, state, nf.unflatten(bench.treedef, g))
    assert k > s.eval_every and f"at step {k + 1}" in str(e.value)


def test_default_phases_give_every_slowest_tier_50_updates():
    """The issue's floor: in one phase of the default length, the slowest tier of each frequency
    set updates at least 50 times (counted by the discard rule's own schedule), and each set is
    a contender in both orders."""
    s = pc.Settings()
    for freqs in (pc.F1, pc.F2):
        slowest = [k for k in range(s.steps) if discard_schedule(k, freqs)[-1]]
        assert len(slowest) >= 50, (freqs, len(slowest))
        for order in ("shallow_fast", "deep_fast"):
            assert f"nested_adam{freqs} {order}" in pc.CONTENDERS
    assert s.steps % s.eval_every == 0  # the switch is an evaluation point


def test_grids_give_every_family_of_a_mode_the_same_number_of_points():
    for mode, grids in pc.GRIDS.items():
        assert len({len(g) for g in grids.values()}) == 1, mode
        for g in grids.values():
            assert list(g) == sorted(set(g)), (mode, g)
    assert {fam for _, fam in pc.CONTENDERS.values()} <= set(pc.GRIDS["lora"])
