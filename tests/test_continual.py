"""Fast tests of the continual-learning benchmark's pieces (``benchmarks/continual.py``): the
task generator and the seed app's discard rule.  The benchmark itself is not run here."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import nestedfn as nf
from benchmarks.continual import (
    TEMPLATES,
    _write_json,
    discard_schedule,
    make_task,
    mean_ci,
    seed_discard,
    task_sentence,
    task_vocabulary,
    words,
)
from nestedfn.lm.demo import demo_sentence


def _sample(task: str, n: int = 600, seed: int = 0) -> list[str]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [task_sentence(task, rng) for _ in range(n)]


def test_task_generator_is_deterministic_by_seed():
    a1 = make_task("A", 5, 30, 10, 10)
    a2 = make_task("A", 5, 30, 10, 10)
    assert a1 == a2
    assert make_task("A", 6, 30, 10, 10).train != a1.train
    assert make_task("B", 5, 30, 10, 10).train != a1.train
    # the splits are separate draws, not copies of each other
    assert a1.valid != a1.train[:10]


def test_task_a_is_the_demo_dataset_distribution():
    for seed in range(3):
        r1 = np.random.Generator(np.random.PCG64(seed))
        r2 = np.random.Generator(np.random.PCG64(seed))
        assert [task_sentence("A", r1) for _ in range(50)] == [demo_sentence(r2) for _ in range(50)]


def test_tasks_have_disjoint_vocabularies_and_templates():
    a, b = _sample("A"), _sample("B")
    wa = set().union(*(words(t) for t in a))
    wb = set().union(*(words(t) for t in b))
    assert wa and wb and not (wa & wb)
    # every word seen is declared, and the declared vocabularies are disjoint too
    assert wa <= task_vocabulary("A") and wb <= task_vocabulary("B")
    assert not (task_vocabulary("A") & task_vocabulary("B"))
    # the fixed wording of the templates (slots removed) shares no word either
    fixed = {
        t: set().union(*(words(s.replace("{", "<").replace("}", ">")) for s in TEMPLATES[t]))
        for t in TEMPLATES
    }
    slot_words = {"name", "color", "animal", "place", "sound", "n"}
    assert not ((fixed["A"] - slot_words) & (fixed["B"] - slot_words))
    # all three templates of each task occur
    assert any("says" in t and t.startswith("In the") for t in a)
    assert any("now there are" in t for t in a)
    assert any(t.startswith("At ") for t in b) and any("crates" in t for t in b)


def test_task_b_associations_hold():
    speeds = {"truck": "slow", "jet": "swift", "rocket": "blazing", "van": "quick"}
    german = ["null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben", "acht", "neun"]
    seen = 0
    for t in _sample("B"):
        w = t.rstrip("!").split()
        if "feels" in w:
            vehicle = w[w.index("every") + 1]
            if vehicle in speeds:
                assert w[-1] == speeds[vehicle]
                seen += 1
        if "crates" in w:
            n = german.index(w[w.index("loads") + 1])
            assert w[-1] == german[n + 1]
    assert seen > 10


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="task"):
        task_sentence("C", np.random.Generator(np.random.PCG64(0)))


def test_discard_schedule_matches_a_hand_count():
    # 1-based steps 1..8 with periods (1, 2, 4): tier 1 on even steps, tier 2 on 4 and 8
    hand = [
        (True, False, False),
        (True, True, False),
        (True, False, False),
        (True, True, True),
        (True, False, False),
        (True, True, False),
        (True, False, False),
        (True, True, True),
    ]
    assert [discard_schedule(i, (1, 2, 4)) for i in range(8)] == hand
    # (1, 4, 16) over 32 steps: 32, 8 and 2 updates, tier 2 at 1-based steps 16 and 32
    sched = [discard_schedule(i, (1, 4, 16)) for i in range(32)]
    assert [sum(s[k] for s in sched) for k in range(3)] == [32, 8, 2]
    assert [i + 1 for i, s in enumerate(sched) if s[2]] == [16, 32]
    with pytest.raises(ValueError):
        discard_schedule(-1, (1, 2))


def _toy() -> dict:
    return {"layers": [{"w": mx.zeros((2,))}, {"w": mx.zeros((2,))}, {"w": mx.zeros((2,))}]}


def _grads(step: int) -> dict:
    # a different gradient per step and layer: 10**layer * (step + 1)
    return {"layers": [{"w": mx.full((2,), 10.0**k * (step + 1))} for k in range(3)]}


@pytest.mark.parametrize("compiled", [False, True])
def test_seed_discard_uses_only_the_update_steps_gradient(compiled: bool):
    opt = seed_discard(1.0, (1, 2, 4), inner=nf.sgd(1.0))
    state = nf.init(opt, _toy())
    step = nf.compile_step(opt) if compiled else (lambda s, g: nf.apply_gradients(opt, s, g))
    for i in range(4):
        state = step(state, _grads(i))
    got = [float(layer["w"][0].item()) for layer in state.params["layers"]]
    # by hand, gradients g_i = 10**k * i at 1-based steps i = 1..4:
    # tier 0 every step: -(1+2+3+4); tier 1 at steps 2 and 4: -10(2+4); tier 2 at step 4: -400
    assert got == [-10.0, -60.0, -400.0]
    assert [int(c.item()) for c in state.opt_state.count] == [4, 2, 1]
    # the CMS rule (sum) would instead have fed tier 2 all four gradients: -1000
    cms = nf.nested(nf.sgd(1.0), nf.by_depth(_toy(), 3), (1, 2, 4), reduce="sum")
    s2 = nf.init(cms, _toy())
    for i in range(4):
        s2 = nf.apply_gradients(cms, s2, _grads(i))
    assert float(s2.params["layers"][2]["w"][0].item()) == -1000.0


def test_seed_discard_with_adam_leaves_inactive_tiers_alone():
    opt = seed_discard(0.1, (1, 2, 4))
    state = nf.init(opt, _toy())
    state = nf.apply_gradients(opt, state, _grads(0))  # 1-based step 1: tier 0 only
    w = [float(layer["w"][0].item()) for layer in state.params["layers"]]
    assert w[1:] == [0.0, 0.0]
    assert math.isclose(w[0], -0.1, rel_tol=1e-5)  # Adam's first step: lr * sign(g)


def test_mean_ci_against_hand_values():
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert math.isclose(s["ci95"], 4.303 / math.sqrt(3))
    assert math.isnan(mean_ci([1.0])["ci95"])


def test_json_is_strict(tmp_path):
    _write_json(tmp_path / "x.json", {"a": [math.nan, 1.0, math.inf], "b": {"c": -math.inf}})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": [None, 1.0, None], "b": {"c": None}}
