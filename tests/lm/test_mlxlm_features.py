"""grad_checkpoint, resume_adapter_file, the test split, report lines, absolute paths, and
tiers by the model's own block order."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nestedfn.lm.errors import RunError
from nestedfn.lm.prepare import prepare
from nestedfn.lm.trainer import train
from nestedfn.tree import to_flat
from tests.lm.conftest import small

QUIET = {"progress": False, "log": lambda s: None}


def _grads(prep):
    from nestedfn.lm.batches import RunBatches
    from nestedfn.lm.loss import make_grad_fn

    batch = RunBatches.for_run(prep.config, prep.train_set, prep.valid_set).train(0)
    loss, _, grads = make_grad_fn(prep.model, prep.params, compile=False)(prep.params, *batch)
    return loss, to_flat(grads)


def test_grad_checkpoint_recomputes_every_block_and_gives_the_same_gradients(assets, monkeypatch):
    import nestedfn.lm.remat as remat

    plain_loss, plain = _grads(prepare(small(assets)))
    calls = []
    real = mx.checkpoint
    monkeypatch.setattr(remat.mx, "checkpoint", lambda f: calls.append(f) or real(f))
    prep = prepare(small(assets, grad_checkpoint=True))
    assert all(remat.is_checkpointed(b) for b in prep.model.layers)
    loss, grads = _grads(prep)
    assert len(calls) == len(prep.model.layers)  # one checkpointed call per block
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for k, g in plain.items():
        assert mx.allclose(grads[k], g, atol=1e-6).item(), k
    other = prepare(small(assets))  # another model of the same class is untouched
    assert not any(remat.is_checkpointed(b) for b in other.model.layers)


def test_resume_adapter_file_starts_from_the_adapters_with_a_fresh_optimizer(assets, tmp_path):
    first = train(small(assets, steps=3), tmp_path / "a", **QUIET)
    file = tmp_path / "a" / "adapters.safetensors"
    prep = prepare(small(assets, resume_adapter_file=str(file)))
    saved = mx.load(str(file))
    assert set(to_flat(prep.params)) == set(saved)
    assert all(mx.array_equal(v, saved[k]).item() for k, v in to_flat(prep.params).items())
    assert int(prep.state.step) == 0
    assert to_flat(first.state.params).keys() == saved.keys()
    run = train(
        small(assets, steps=2, resume_adapter_file=str(tmp_path / "a")), tmp_path / "b", **QUIET
    )
    assert run.first_loss < first.first_loss  # it starts where the first run ended
    with pytest.raises(RunError, match="resume_adapter_file: adapters in .* do not fit"):
        prepare(small(assets, lora_rank=4, resume_adapter_file=str(file)))


def _with_test_split(data, tmp_path, n=8):
    out = tmp_path / "data"
    out.mkdir()
    for split in ("train", "valid"):
        (out / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
    lines = (data / "valid.jsonl").read_text().splitlines()[:n]
    (out / "test.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_test_loss_equals_mlx_lm_evaluate_on_the_same_adapters(assets, tmp_path, capsys):
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import evaluate

    from nestedfn.cli import main
    from nestedfn.lm.data import load_records

    model_dir, data = assets
    data = _with_test_split(data, tmp_path)
    # nestedfn's pad_target: false (the default, mlx-lm's own loss, is test_mlxlm_parity's)
    cfg = small(
        assets, data=str(data), steps=3, test=True, test_batches=-1, max_seq_len=128,
        pad_target=False,
    )  # fmt: skip
    summary = train(cfg, tmp_path / "run", **QUIET)
    model, tok = mlx_lm.load(str(model_dir), adapter_path=str(tmp_path / "run"))
    records = load_records(data / "test.jsonl")

    def loss_without_padding(model, batch, lengths):
        # mlx-lm's default_loss, except its mask `steps <= length` also counts the target after
        # the last token (a padding 0 whenever the batch is padded); pad_target: false counts
        # only real targets, so the peer does too: `steps < length`
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
        ce = nn.losses.cross_entropy(model(inputs), targets) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    dataset = CacheDataset(create_dataset(records, tok, None))
    peer = evaluate(
        model, dataset, batch_size=2, num_batches=-1, max_seq_length=128, loss=loss_without_padding
    )
    assert summary.test_loss == pytest.approx(peer, rel=1e-5)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1] == {"type": "test", "step": 3, "test_loss": summary.test_loss}
    # test only (mlx-lm's --test without --train): the adapters already in the run
    args = ["train", "--no-train", "--test", "--model", str(model_dir), "--data", str(data)]
    args += [
        "--adapter-path",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        "--max-seq-length",
        "128",
    ]
    args += ["--test-batches", "-1", "--no-pad-target"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"Test loss {peer:.3f}, Test ppl {math.exp(peer):.3f}."


def test_without_a_terminal_a_plain_line_every_steps_per_report(assets, tmp_path):
    lines: list[str] = []
    cfg = small(assets, steps=5, steps_per_report=2, optimizer="nested_adam")  # tiers: asked for
    train(cfg, tmp_path / "run", log=lines.append)
    report = [ln for ln in lines if ln.startswith("step ") and "loss" in ln]
    assert [ln.split(":")[0] for ln in report] == ["step 2/5", "step 4/5", "step 5/5"]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["type"] == "train"]
    first = report[0]
    assert f"loss {np.mean(losses[:2]):.3f}," in first  # the window's mean, as mlx-lm reports
    assert "tokens/s" in first and "GB peak memory" in first and "tier updates 2/1/0" in first
    assert not any("\r" in ln for ln in lines)


def test_config_yaml_keeps_absolute_paths_so_resume_works_from_anywhere(
    assets, tmp_path, monkeypatch, capsys
):
    import shutil

    from nestedfn.cli import main

    model, data = assets
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(model, work / "model")
    shutil.copytree(data, work / "data")
    monkeypatch.chdir(work)
    args = ["train", "--model", "model", "--data", "data", "--adapter-path", "run"]
    args += ["--iters", "4", "--batch-size", "2", "--max-seq-length", "24", "--stop-at", "2"]
    assert main(args) == 0
    saved = (work / "run" / "config.yaml").read_text()
    assert f"model: {work / 'model'}" in saved and f"data: {work / 'data'}" in saved
    assert str(work / "run") in capsys.readouterr().out  # hints name the absolute path
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(work / "run")]) == 0  # from another directory
    recs = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in recs if '"train"' in r] == [1, 2, 3, 4]


def test_tiers_by_depth_follow_the_model_s_block_order_not_path_names():
    import mlx.nn as nn

    from nestedfn.lm.blocks import block_depths
    from nestedfn.tiered.tiers import by_depth

    class Stack(nn.Module):  # afm7-like: model.layers + model.kv_reuse_layers
        def __init__(self):
            super().__init__()
            self.first = [nn.Linear(2, 2) for _ in range(2)]
            self.kv_reuse_layers = [nn.Linear(2, 2) for _ in range(2)]

        @property
        def layers(self):
            return self.first + self.kv_reuse_layers

    model = Stack()
    params = model.parameters()
    depths = block_depths(model, params)
    assert depths["kv_reuse_layers.1.weight"] == 3 and depths["first.0.bias"] == 0
    tiers = to_flat(by_depth(params, 2, depths=depths))
    assert tiers["first.1.weight"] == 0 and tiers["kv_reuse_layers.0.weight"] == 1
