"""One config, one result: mlx-lm's own ``train()`` and nestedfn's trainer, from one config,
report the same train losses, valid losses and test loss (float32 tolerance).

The mlx-lm side is ``mlx_lm.lora``'s own code path: ``CONFIG_DEFAULTS`` merged under the
config as its ``main`` does, ``np.random.seed(seed)`` as its ``run`` does, its
``load_dataset``, ``train_model`` (which builds the optimizer and the schedule and calls
``train``) and, for the test split, ``evaluate`` as ``evaluate_model`` calls it.  Two valid and
two test batches with ``val_batches``/``test_batches`` 1 make the seeded batch selection count.
"""

from __future__ import annotations

import json
import types

import mlx.core as mx
import numpy as np
import pytest
import yaml

from nestedfn.lm import TrainingCallback, fine_tune

STEPS = 20
# float32 over 20 steps: the two Adam implementations round differently (about 1e-4 after 20
# steps); a real difference (bias correction, a batch, the pad target) is 1e-2 or more
RTOL = 3e-4

CASES = {
    "adam": {"optimizer": "adam", "learning_rate": 2e-3},
    "adamw": {
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "optimizer_config": {"adamw": {"betas": [0.8, 0.95], "weight_decay": 0.05}},
    },
    "cosine": {
        "optimizer": "adam",
        "lr_schedule": {"name": "cosine_decay", "arguments": [3e-3, STEPS, 1e-4], "warmup": 5},
    },
}


class Recorder(TrainingCallback):
    def __init__(self):
        self.train: list[tuple[int, float]] = []
        self.valid: list[tuple[int, float]] = []

    def on_train_loss_report(self, info):
        self.train.append((info["iteration"], info["train_loss"]))

    def on_val_loss_report(self, info):
        self.valid.append((info["iteration"], info["val_loss"]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    root = tmp_path_factory.mktemp("parity")
    model = build_demo_model(root / "model", seed=0)
    data = write_demo_dataset(root / "data", seed=0, n_train=30, n_valid=9)
    lines = (data / "valid.jsonl").read_text().splitlines()
    (data / "test.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    return model, data


def config(model, data, out, case: str) -> dict:
    """One run's config in mlx-lm's keys (every key ``mlx_lm lora`` reads is here or in its
    CONFIG_DEFAULTS)."""
    return {
        "model": str(model),
        "data": str(data),
        "train": True,
        "test": True,
        "adapter_path": str(out),
        "seed": 7,
        "num_layers": 2,
        "batch_size": 4,
        "iters": STEPS,
        "steps_per_report": 5,
        "steps_per_eval": 8,
        "val_batches": 1,
        "test_batches": 1,
        "max_seq_length": 128,
        "save_every": 100,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        **CASES[case],
    }


def mlx_lm_run(cfg: dict) -> tuple[Recorder, float]:
    """``python -m mlx_lm lora -c cfg`` (train, then test), with a recording callback."""
    from mlx_lm import lora
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load

    args = {**lora.CONFIG_DEFAULTS, **cfg}
    args["optimizer_config"] = {**lora.CONFIG_DEFAULTS["optimizer_config"], **cfg.get(
        "optimizer_config", {})}  # fmt: skip
    args = types.SimpleNamespace(**args)
    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, test_set = load_dataset(args, tokenizer)
    rec = Recorder()
    lora.train_model(args, model, train_set, valid_set, rec)
    test = evaluate(
        model=model,
        dataset=CacheDataset(test_set),
        batch_size=args.batch_size,
        num_batches=args.test_batches,
        max_seq_length=args.max_seq_length,
    )
    return rec, test


@pytest.mark.parametrize("case", list(CASES))
def test_mlx_lm_train_and_nestedfn_report_the_same_losses(data, tmp_path, case):
    model, data_dir = data
    theirs, their_test = mlx_lm_run(config(model, data_dir, tmp_path / "mlx_lm", case))
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config(model, data_dir, tmp_path / "nestedfn", case)))
    ours = Recorder()
    summary = fine_tune(path, training_callback=ours, progress=False, log=lambda s: None)

    assert [i for i, _ in ours.train] == [i for i, _ in theirs.train] == [5, 10, 15, 20]
    np.testing.assert_allclose([v for _, v in ours.train], [v for _, v in theirs.train], rtol=RTOL)
    assert [i for i, _ in ours.valid] == [i for i, _ in theirs.valid] == [0, 7, 15, 19]
    np.testing.assert_allclose([v for _, v in ours.valid], [v for _, v in theirs.valid], rtol=RTOL)
    assert summary.test_loss == pytest.approx(their_test, rel=RTOL)
    # the adapters themselves: mlx-lm's file and nestedfn's hold the same arrays, to 1% of
    # their norm (Adam's normalized step turns float32 rounding in a near-zero gradient into a
    # visible, bounded difference; no bias correction vs bias correction differs by 3x at step 1)
    a = mx.load(str(tmp_path / "mlx_lm" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "nestedfn" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.array(a[k]), np.array(b[k])
        assert np.linalg.norm(x - y) <= 1e-2 * np.linalg.norm(x), k
    records = [json.loads(x) for x in (tmp_path / "nestedfn" / "metrics.jsonl").open()]
    assert not any(r.get("tier_updates") for r in records)  # no tiers unless asked for


def test_test_only_evaluates_an_adapter_directory_mlx_lm_wrote(data, tmp_path, capsys):
    """``nestedfn lora --test`` (no ``--train``) on mlx-lm's adapters prints mlx-lm's line."""
    import math

    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    from nestedfn.cli import main

    model, data_dir = data
    cfg = config(model, data_dir, tmp_path / "mlx_lm", "adam")
    mlx_lm_run(cfg)
    # mlx-lm's `--test` path: seed, load, load the adapters, evaluate
    args = types.SimpleNamespace(**{**cfg, "train": False, "hf_dataset": None})
    np.random.seed(args.seed)
    m, tok = load(args.model)
    *_, test_set = load_dataset(args, tok)
    load_adapters(m, args.adapter_path)
    want = evaluate(m, CacheDataset(test_set), args.batch_size, args.test_batches, 128)
    capsys.readouterr()
    argv = ["lora", "--model", str(model), "--data", str(data_dir), "--test", "--seed", "7"]
    argv += ["--adapter-path", str(tmp_path / "mlx_lm"), "--batch-size", "4"]
    argv += ["--test-batches", "1", "--max-seq-length", "128"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"Test loss {want:.3f}, Test ppl {math.exp(want):.3f}."
    )
