"""fine_tune_type lora, dora and full: exact resume, adapters mlx-lm loads and fuses."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.lm.trainer import train
from tests.lm.conftest import small

QUIET = {"progress": False, "log": lambda s: None}
TOKENS = mx.array([[40, 41, 42, 43, 44, 45, 46, 47]])


def adapters(run) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_resume_is_bit_identical_and_mlx_lm_loads_the_adapters(kind, assets, tmp_path):
    import mlx_lm

    cfg = small(assets, steps=4, fine_tune_type=kind, lora_layers=2, frequencies=[1, 2])
    straight = train(cfg, tmp_path / "straight", **QUIET)
    train(cfg, tmp_path / "split", stop_at=2, **QUIET)
    train(cfg, tmp_path / "split", resume=True, **QUIET)
    a, b = adapters(tmp_path / "straight"), adapters(tmp_path / "split")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    leaves = {k.rsplit(".", 1)[-1] for k in a}
    blocks = {int(k.split(".")[2]) for k in a}
    assert blocks == {2, 3}, "the last num_layers blocks, as mlx-lm picks them"
    if kind == "dora":
        assert leaves == {"lora_a", "lora_b", "m"}
    else:  # every weight of those blocks, the model's own names
        assert "weight" in leaves and not leaves & {"lora_a", "lora_b"}
    config = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind and config["num_layers"] == 2
    assert (config["lora_parameters"] is None) == (kind == "full")
    model, _ = mlx_lm.load(str(assets[0]), adapter_path=str(tmp_path / "split"))
    expected = straight.model(TOKENS)
    assert mx.allclose(model(TOKENS), expected, atol=1e-5).item()
    base, _ = mlx_lm.load(str(assets[0]))
    assert not mx.allclose(base(TOKENS), expected, atol=1e-4).item()


def test_full_trains_the_blocks_mlx_lm_unfreezes(assets):
    import mlx_lm
    from mlx.utils import tree_flatten

    from nestedfn.lm.prepare import prepare
    from nestedfn.tree import to_flat

    prep = prepare(small(assets, fine_tune_type="full", lora_layers=3))
    peer, _ = mlx_lm.load(str(assets[0]))  # mlx_lm.lora.train_model's `full` branch
    peer.freeze()
    for layer in peer.layers[-3:]:
        layer.unfreeze()
    assert set(to_flat(prep.params)) == {k for k, _ in tree_flatten(peer.trainable_parameters())}


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_mlx_lm_fuse_takes_the_adapters(kind, assets, tmp_path, monkeypatch):
    import mlx_lm
    from mlx_lm import fuse

    run = tmp_path / "run"
    cfg = small(assets, steps=2, fine_tune_type=kind, lora_layers=2, frequencies=[1, 2])
    summary = train(cfg, run, **QUIET)
    fused = tmp_path / "fused"
    argv = ["mlx_lm.fuse", "--model", str(assets[0]), "--adapter-path", str(run)]
    monkeypatch.setattr(sys, "argv", argv + ["--save-path", str(fused)])
    fuse.main()  # python -m mlx_lm fuse, in this process
    model, _ = mlx_lm.load(str(fused))
    assert mx.allclose(model(TOKENS), summary.model(TOKENS), atol=1e-4).item()
