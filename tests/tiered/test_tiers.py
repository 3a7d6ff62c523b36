"""Tests for nestedfn.tiers: tier maps on real parameter paths, rules, errors, the table."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.tiered.tiers import (
    TierRule,
    by_depth,
    by_grad_norm,
    by_pattern,
    describe,
    layer_index,
    manual,
    resolve,
)
from nestedfn.tree import PathError, TreeMismatchError, flatten, to_flat
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def lora_params():
    """Trainable params of a tiny real mlx-lm Llama with LoRA on all 4 layers (no download)."""
    return tiny_llama(lora_layers=4).trainable_parameters()


def tier_sizes(labels, params, n):
    sizes = [0] * n
    for lab, x in zip(flatten(labels)[0], flatten(params)[0]):
        sizes[lab] += x.size
    return sizes


def test_by_depth_on_real_mlx_lm_lora_model(lora_params):
    flat = to_flat(lora_params)
    assert len(flat) == 4 * 14 and all(".lora_" in p for p in flat)
    labels = by_depth(lora_params, 3)
    sizes = tier_sizes(labels, lora_params, 3)
    assert all(s > 0 for s in sizes), sizes
    tiers_of = {p: t for p, t in to_flat(labels).items()}
    # 4 layers into 3 contiguous blocks: layers 0,1 -> tier 0 (fast), 2 -> 1, 3 -> 2
    for path, t in tiers_of.items():
        layer = int(re.search(r"layers\.(\d+)\.", path).group(1))
        assert t == {0: 0, 1: 0, 2: 1, 3: 2}[layer], path
    assert tiers_of["model.layers.0.self_attn.q_proj.lora_a"] == 0
    assert tiers_of["model.layers.3.mlp.down_proj.lora_b"] == 2
    deep = to_flat(by_depth(lora_params, 2, order="deep_fast"))
    assert deep["model.layers.0.mlp.up_proj.lora_a"] == 1
    assert deep["model.layers.3.mlp.up_proj.lora_a"] == 0


def test_by_depth_outside_leaves_sparse_layers_and_errors():
    params = {
        "embed": mx.zeros((4, 2)),
        "layers": [{}, {}, {"w": mx.zeros((2,))}, {"w": mx.zeros((3,))}],
        "head": mx.zeros((2,)),
    }
    labels = to_flat(by_depth(params, 2))
    # only indices that hold params count: 2 -> tier 0, 3 -> tier 1; outside -> tier 0
    assert labels == {"embed": 0, "layers.2.w": 0, "layers.3.w": 1, "head": 0}
    assert to_flat(by_depth(params, 2, outside=1))["head"] == 1
    with pytest.raises(ValueError, match="'embed' is in no layer list"):
        by_depth(params, 2, outside=None)
    with pytest.raises(
        ValueError, match=r"3 tiers need at least 3 distinct layer indices.*\[2, 3\]"
    ):
        by_depth(params, 3)
    with pytest.raises(ValueError, match="order"):
        by_depth(params, 2, order="random")
    with pytest.raises(ValueError, match="n_tiers"):
        by_depth(params, 0)


def test_layer_index_finds_the_real_index_anywhere():
    assert layer_index("model.layers.3.self_attn.q_proj.lora_a") == 3
    assert layer_index("layers.12.w") == 12
    assert layer_index("model.vision.layers.7.mlp.layers.2.w") == 7
    assert layer_index("model.layers_norm.3") is None
    assert layer_index("model.h.2.attn.c_attn.lora_a") == 2  # GPT-2 style
    assert layer_index("model.h.2.w", names=("layers",)) is None
    assert layer_index("lm_head.weight") is None


def test_by_pattern_first_match_wins_and_fails_loud(lora_params):
    labels = to_flat(
        by_pattern({r"layers\.[01]\.": 0, r"self_attn": 1, r"mlp": 2}, params=lora_params)
    )
    assert labels["model.layers.1.mlp.up_proj.lora_a"] == 0
    assert labels["model.layers.2.self_attn.k_proj.lora_b"] == 1
    assert labels["model.layers.3.mlp.down_proj.lora_a"] == 2
    rule = by_pattern({r"lora_a$": 0}, default=1)
    assert isinstance(rule, TierRule)
    assert rule("x.lora_a") == 0 and rule("x.lora_b") == 1
    with pytest.raises(ValueError, match=r"no tier for parameter 'model.layers.0.self_attn"):
        by_pattern({r"mlp": 0}, params=lora_params)
    with pytest.raises(ValueError, match=r"pattern 'q_porj' matches no parameter path"):
        by_pattern({r"q_porj": 1}, default=0, params=lora_params)
    with pytest.raises(ValueError, match="non-negative int"):
        by_pattern({r"mlp": -1})


def test_manual_paths_and_subtrees_unknown_path_is_path_error(lora_params):
    labels = to_flat(
        manual(
            {"model.layers.0": 1, "model.layers.0.mlp.up_proj.lora_b": 2},
            params=lora_params,
            default=0,
        )
    )
    assert labels["model.layers.0.self_attn.q_proj.lora_a"] == 1
    assert labels["model.layers.0.mlp.up_proj.lora_b"] == 2  # longest path wins
    assert labels["model.layers.1.mlp.up_proj.lora_b"] == 0
    with pytest.raises(PathError, match=r"unknown path 'model.layers.0.mlp.up_porj'.*"):
        manual({"model.layers.0.mlp.up_porj": 1}, params=lora_params, default=0)
    try:
        manual({"model.layers.0.mlp.up_porj": 1}, params=lora_params, default=0)
    except PathError as e:
        assert e.prefix == "model.layers.0.mlp"
    # "model.layers.1" must not cover "model.layers.10..." (segment-wise prefixes only)
    assert manual({"layers.1": 0}, default=1)("layers.10.w") == 1
    with pytest.raises(ValueError, match="no tier for parameter 'model.layers.1"):
        manual({"model.layers.0": 0}, params=lora_params)


def test_by_grad_norm_ranks_by_rms():
    grads = {
        "big_small_rms": mx.full((100,), 0.1),  # norm 1.0, rms 0.1
        "tiny_big_rms": mx.full((1,), 5.0),  # rms 5
        "mid": mx.full((4,), 1.0),  # rms 1
        "zero": mx.zeros((3,)),
    }
    assert by_grad_norm(grads, 2) == {
        "big_small_rms": 1,
        "tiny_big_rms": 0,
        "mid": 0,
        "zero": 1,
    }
    assert by_grad_norm(grads, 4) == {"big_small_rms": 2, "tiny_big_rms": 0, "mid": 1, "zero": 3}
    with pytest.raises(ValueError, match="'mid' has non-finite norm"):
        by_grad_norm({**grads, "mid": mx.array([float("nan")])}, 2)
    with pytest.raises(ValueError, match="4 leaves cannot fill 5 tiers"):
        by_grad_norm(grads, 5)


def test_describe_table_counts(lora_params):
    labels = by_depth(lora_params, 3)
    table = describe(labels, lora_params, (1, 2, 4))
    assert describe("depth", lora_params, (1, 2, 4)) == table
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["tier", "frequency", "arrays", "parameters", "share"]
    # independent count from the shapes: per layer 14 arrays; tier 0 holds 2 layers
    per_layer = sum(
        int(np.prod(x.shape)) for p, x in to_flat(lora_params).items() if ".layers.0." in p
    )
    row0, row1, row2, total = (ln.split() for ln in lines[1:5])
    assert row0[:4] == ["0", "1", "28", f"{2 * per_layer:,}"]
    assert row1[:4] == ["1", "2", "14", f"{per_layer:,}"]
    assert row2[:4] == ["2", "4", "14", f"{per_layer:,}"]
    assert total[:3] == ["all", "56", f"{4 * per_layer:,}"]
    assert "model.layers.0.self_attn.q_proj.lora_a .. model.layers.1.mlp.up_proj.lora_b" in table
    with pytest.raises(ValueError, match="'b' has no valid tier"):
        describe(lambda p, x: None if p == "b" else 0, {"a": mx.zeros(2), "b": mx.zeros(3)})
    # an empty tier is shown, not hidden
    assert "(empty)" in describe({"a": 0, "b": 0}, {"a": mx.zeros(2), "b": mx.zeros(3)}, (1, 2))


def test_resolve_checks_shape():
    params = {"a": mx.zeros(2), "b": mx.zeros(3)}
    with pytest.raises(TreeMismatchError, match="b: missing in tiers"):
        resolve({"a": 0}, params)
    assert resolve(lambda p, x: int(x.size), params) == {"a": 2, "b": 3}


def test_by_depth_drives_nested_on_the_lora_model_every_tier_moves_on_its_steps(lora_params):
    """The seed app's failure (tiers matching no real path) made slow tiers never move: here
    each tier's leaves change exactly on that tier's steps, seen through the params."""
    from nestedfn.optim.core import Optimizer, apply_updates
    from nestedfn.tiered import nested, tier_stats
    from nestedfn.tree import tree_map

    sgd = Optimizer(lambda p: (), lambda g, s, p, step: (tree_map(lambda x: -0.1 * x, g), s))
    labels = by_depth(lora_params, 3)
    opt = nested(sgd, labels, (1, 2, 4))
    state = opt.init(lora_params)
    assert [t.parameters for t in tier_stats(state)] == tier_sizes(labels, lora_params, 3)
    params = lora_params
    tier_of = flatten(labels)[0]
    for step in range(4):
        grads = tree_map(lambda p: mx.ones(p.shape, p.dtype), params)
        updates, state = opt.update(grads, state, params, step)
        new = apply_updates(params, updates)
        moved = [
            not np.array_equal(np.array(a), np.array(b))
            for a, b in zip(flatten(new)[0], flatten(params)[0])
        ]
        for k, freq in enumerate((1, 2, 4)):
            in_k = [m for m, t in zip(moved, tier_of) if t == k]
            assert all(in_k) if (step + 1) % freq == 0 else not any(in_k), (step, k)
        params = new
