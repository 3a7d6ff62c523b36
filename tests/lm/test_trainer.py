"""The LoRA trainer (nestedfn.lm.trainer): exact resume, adapters mlx-lm loads, the pieces."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from nestedfn.lm.errors import RunError
from nestedfn.lm.trainer import Interrupted, train
from tests.lm.conftest import small


def adapters(run) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


def test_resume_is_bit_identical_with_accumulation_and_slow_tiers_mid_chunk(assets, tmp_path):
    # micro-steps 10 = 5 updates with accumulation 2; stop after micro-step 5: mid accumulation
    # chunk (5 % 2 = 1), and after 2 updates tier 1 (every 4 updates) is mid chunk as well.
    # LoRA dropout draws from a generator seeded per step, so the resumed process draws the
    # masks the straight one drew at the same steps.
    cfg = small(
        assets, steps=10, grad_accumulation=2, frequencies=[1, 4], warmup_steps=2, lora_dropout=0.2
    )
    straight = train(cfg, tmp_path / "straight", progress=False, log=lambda s: None)
    train(cfg, tmp_path / "split", progress=False, log=lambda s: None, stop_at=5)
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step_00000005"]
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False, log=lambda s: None)
    assert straight.steps == resumed.steps == 10
    a, b = adapters(tmp_path / "straight"), adapters(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) == 4 * 7 * 2
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    init = mx.load(str(tmp_path / "split" / "checkpoints" / "step_00000005" / "arrays.safetensors"))
    assert init, "checkpoint holds arrays"
    # the run really moved, and the slow tier moved only once (1 update in 5 at frequency 4)
    recs = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == list(range(1, 11)), "metrics: one record per step, none duplicated"
    assert recs[-1]["tier_updates"] == [5, 1]


def test_resume_with_more_steps_equals_the_longer_run(assets, tmp_path):
    cfg = small(assets, steps=6, frequencies=[1, 2, 4])
    long = train(cfg, tmp_path / "long", progress=False, log=lambda s: None)
    train(small(assets, steps=3, frequencies=[1, 2, 4]), tmp_path / "r", progress=False, log=str)
    with pytest.raises(RunError, match="cannot change learning_rate"):
        train(cfg, tmp_path / "r", resume=True, overrides={"learning_rate": 1.0}, log=str)
    train(cfg, tmp_path / "r", resume=True, overrides={"steps": 6}, progress=False, log=str)
    a, b = adapters(tmp_path / "long"), adapters(tmp_path / "r")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert long.last_loss < long.first_loss


def test_written_adapters_give_the_in_memory_models_logits_in_mlx_lm(assets, tmp_path):
    import mlx_lm

    run = tmp_path / "run"
    summary = train(small(assets, steps=3), run, progress=False, log=lambda s: None)
    tokens = mx.array([[40, 41, 42, 43, 44, 45, 46, 47]])
    expected = summary.model(tokens)
    model, _ = mlx_lm.load(str(assets[0]), adapter_path=str(run))
    got = model(tokens)
    assert mx.allclose(got, expected, atol=1e-5).item()
    base, _ = mlx_lm.load(str(assets[0]))
    assert not mx.allclose(base(tokens), expected, atol=1e-4).item()
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 2 and config["num_layers"] == 4


def test_early_stopping_stops_when_the_valid_loss_stops_improving(assets, tmp_path):
    # a learning rate of 1e-30 moves no logit in float32: the valid loss after step 1 equals
    # the one at step 0, which is no improvement, so patience 1 stops the run there
    cfg = small(assets, steps=6, eval_every=1, early_stopping=1, learning_rate=1e-30)
    s = train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert s.stopped_early and s.steps == 1
    assert [v for _, v in s.valid_losses][0] == s.valid_losses[1][1]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001").is_dir()


def _records(run, timing: bool = True) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drop = () if timing else ("time", "elapsed", "peak_memory_gb")
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def _interrupt_on_call(monkeypatch, obj, name, k):
    """``obj.name`` raises KeyboardInterrupt (as Ctrl-C would) on its k-th call (1-based)."""
    real, calls = getattr(obj, name), []

    def fake(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, fake)


def _meta(path):
    """A checkpoint's metadata but the checksums of things holding timings (the metrics) and
    the run directory's own path (in the recorded options)."""
    meta = json.loads(path.read_text())
    del meta["digest"], meta["extra"]["metrics_sha256"], meta["extra"]["config"]["adapter_path"]
    return meta


@pytest.mark.parametrize("where", ["after_update", "in_eval", "saving_best"])
def test_ctrl_c_saves_the_last_completed_step_and_resume_is_identical(
    assets, tmp_path, monkeypatch, where
):
    import nestedfn.lm.trainer as trainer

    cfg = small(assets, steps=8, eval_every=3, save_every=100, frequencies=[1, 2])
    straight, straight7 = tmp_path / "straight", tmp_path / "straight7"
    train(cfg, straight, progress=False, log=lambda s: None)
    train(cfg, straight7, progress=False, log=lambda s: None, stop_at=7)
    run = tmp_path / "run"
    if where == "after_update":
        # mid step 5: its update is computed but its metrics are not written yet
        _interrupt_on_call(monkeypatch, mx, "get_peak_memory", 5)
        done = 4
    elif where == "in_eval":
        # in the eval after step 5 (mlx-lm's evals: before iterations 1, 3, 6 and the last, 8,
        # i.e. after steps 0, 2, 5, 7): step 5's train record is written
        _interrupt_on_call(monkeypatch, trainer, "valid_loss", 3)
        done = 4
    else:
        # writing the best adapters of step 7 (the 3rd better valid loss; step 5's is not
        # better): its eval record is written and the best-loss bookkeeping updated already,
        # yet step 7 is not complete
        _interrupt_on_call(monkeypatch, trainer, "save_adapters", 3)
        done = 6
    with pytest.raises(Interrupted) as e:
        train(cfg, run, progress=False, log=lambda s: None)
    monkeypatch.undo()
    assert e.value.step == done and isinstance(e.value, KeyboardInterrupt)
    assert e.value.checkpoint == run / "checkpoints" / f"step_{done:08d}"
    assert f"nestedfn train --resume {run}" in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{done:08d}"]

    def same(a_run, b_run, names):
        for name in names:
            a, b = mx.load(str(a_run / name)), mx.load(str(b_run / name))
            assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)

    # at step 7 (evaluated: mlx-lm evaluates before the last iteration) the best adapters and
    # the best-loss bookkeeping are the same as the straight run's
    train(cfg, run, resume=True, progress=False, log=lambda s: None, stop_at=7)
    same(run, straight7, ["adapters.safetensors", "best/adapters.safetensors"])
    meta = "checkpoints/step_00000007/meta.json"
    assert _meta(run / meta) == _meta(straight7 / meta)
    train(cfg, run, resume=True, progress=False, log=lambda s: None)
    same(run, straight, ["adapters.safetensors", "best/adapters.safetensors"])
    # every record once, with the same values bit for bit (timings and memory aside)
    assert _records(run, timing=False) == _records(straight, timing=False)


@pytest.mark.parametrize("lands_in", ["peer_lost", "interrupted"])
def test_ctrl_c_pending_behind_a_peers_failure_still_saves_the_last_step(
    assets, tmp_path, monkeypatch, lands_in
):
    """Under ``mlx.launch`` a rank blocked in a collective gets its own Ctrl-C only when the
    collective returns -- failing, because the peer that was interrupted first has left.
    Python runs the pending handler at its next check: inside the handling of that failure
    (checking it, or entering the save).  The step completed before it is saved all the same."""
    import nestedfn.lm.trainer as trainer
    from nestedfn.run import distributed

    lost = RuntimeError("[ring] Too many send/recv errors. Failing pending tasks...")
    real_step, real_save, steps = trainer._Run.one_step, trainer._Run.interrupted, []

    def one_step(self):
        steps.append(1)
        if len(steps) == 4:  # step 4's collective fails: the peer left after step 3
            raise lost
        real_step(self)

    def interrupted_once(self):  # the pending Ctrl-C lands as the save is entered, once
        if not getattr(self, "_landed", False):
            self._landed = True
            raise KeyboardInterrupt
        real_save(self)

    monkeypatch.setattr(trainer._Run, "one_step", one_step)
    if lands_in == "peer_lost":
        landed = []

        def peer_lost(e):
            if not landed:
                landed.append(e)
                raise KeyboardInterrupt
            return True

        monkeypatch.setattr(distributed, "peer_lost", peer_lost)
    else:
        monkeypatch.setattr(distributed, "peer_lost", lambda e: e is lost)
        monkeypatch.setattr(trainer._Run, "interrupted", interrupted_once)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        train(small(assets, steps=8, save_every=100), run, progress=False, log=lambda s: None)
    assert e.value.step == 3 and e.value.checkpoint == run / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert [r["step"] for r in _records(run) if r["type"] == "train"] == [1, 2, 3]


def test_ctrl_c_before_any_step_saves_nothing(assets, tmp_path, monkeypatch):
    _interrupt_on_call(monkeypatch, mx, "get_peak_memory", 1)
    with pytest.raises(Interrupted, match="nothing to resume") as e:
        train(small(assets), tmp_path / "run", progress=False, log=lambda s: None)
    assert e.value.checkpoint is None and e.value.step == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("crash_on", ["config.yaml", "metrics.jsonl"])
def test_resume_rewrites_config_and_metrics_atomically(assets, tmp_path, monkeypatch, crash_on):
    import os
    import shutil

    run = tmp_path / "run"
    train(small(assets, steps=4, save_every=2), run, progress=False, log=lambda s: None)
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # killed after step 4, before its save
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    real = os.replace

    def crash(src, dst):  # the machine dies just before the new file would replace the old
        if os.path.basename(dst) == crash_on:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        train(small(assets), run, resume=True, overrides={"steps": 6}, log=lambda s: None)
    monkeypatch.undo()
    assert (run / crash_on).read_bytes() == before[crash_on]  # whole, not half rewritten
    hidden = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert hidden == [".nestedfn-run.json"]  # the manifest; no temporary, no lock left
    # a torn last record (killed mid-write) is dropped on resume, the rest trimmed to step 2
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    train(small(assets), run, resume=True, overrides={"steps": 6}, progress=False, log=str)
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 5, 6]


def test_run_files_get_the_umask_permissions_not_0600(assets, tmp_path):
    import os

    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        train(small(assets, steps=2, eval_every=1), run, progress=False, log=lambda s: None)
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"adapters.safetensors", "adapter_config.json", "config.yaml"} <= {p.name for p in files}
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {name: oct(0o666 & ~0o027) for name in modes}
