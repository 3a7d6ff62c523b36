"""``--resume`` never continues silently from something wrong: damaged checkpoints fall back
(with a warning) or are refused naming the file; config.yaml and metrics.jsonl are held
against what the run recorded."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from nestedfn.lm.config import ConfigError
from nestedfn.lm.errors import RunError
from nestedfn.lm.trainer import Interrupted, train
from tests.lm.conftest import small

CFG = dict(steps=6, save_every=2, eval_every=3, keep_last=3)


def _train(cfg, run, **kw):
    warnings = []
    train(cfg, run, progress=False, log=lambda s: None, warn=warnings.append, **kw)
    return warnings


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """A straight run and one stopped at step 4 (checkpoints 2 and 4)."""
    root = tmp_path_factory.mktemp("resume")
    _train(small(assets, **CFG), root / "straight")
    _train(small(assets, **CFG), root / "stopped", stop_at=4)
    return root / "straight", root / "stopped"


@pytest.fixture
def stopped(runs, tmp_path):
    shutil.copytree(runs[1], tmp_path / "run")
    return tmp_path / "run"


def _same_adapters(a, b):
    x, y = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    return x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]).item() for k in x)


def _damage(path, mode):
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "zero-fill":
        path.write_bytes(bytes(len(data)))
    elif mode == "delete":
        path.unlink()
    else:  # one bit in the middle
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        path.write_bytes(bytes(b))


@pytest.mark.parametrize("name", ["arrays.safetensors", "meta.json"])
@pytest.mark.parametrize("mode", ["truncate", "zero-fill", "delete", "flip"])
def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(assets, runs, stopped, name, mode):
    damaged = stopped / "checkpoints" / "step_00000004" / name
    _damage(damaged, mode)
    warnings = _train(small(assets, **CFG), stopped, resume=True)
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "step_00000002" in warnings[0]
    assert _same_adapters(stopped, runs[0])  # the same trajectory from the step before
    assert (stopped / "checkpoints" / "damaged-step_00000004").is_dir()  # set aside, kept


def test_no_intact_checkpoint_is_refused_naming_the_files(assets, stopped):
    for step in (2, 4):
        _damage(stopped / "checkpoints" / f"step_{step:08d}" / "arrays.safetensors", "flip")
    with pytest.raises(
        RunError, match=r"no intact checkpoint.*step_00000004/arrays.*step_00000002/arrays"
    ):
        _train(small(assets, **CFG), stopped, resume=True)


def test_a_truncated_config_yaml_is_refused_naming_the_missing_option(assets, stopped):
    text = (stopped / "config.yaml").read_text()
    (stopped / "config.yaml").write_text(text[: text.index("learning_rate:")])
    with pytest.raises(RunError, match="lacks option.*learning_rate"):
        _train(small(assets, **CFG), stopped, resume=True)


@pytest.mark.parametrize("option,value", [("learning_rate", 0.5), ("iters", 9)])
def test_an_edited_config_yaml_is_refused_naming_the_option(assets, stopped, option, value):
    """(``iters`` is mlx-lm's name of ``steps``, the one config.yaml uses.)"""
    import yaml

    path = stopped / "config.yaml"
    data = yaml.safe_load(path.read_text())
    assert option in data
    data[option] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RunError, match=f"{option} is {value!r} but the run was started with"):
        _train(small(assets, **CFG), stopped, resume=True)


def test_resumable_options_change_by_flag(assets, runs, stopped):
    _train(small(assets, **CFG), stopped, resume=True, overrides={"steps": 5})
    # config.yaml now says steps 5 and the manifest accepts it; resume again to 6
    _train(small(assets, **CFG), stopped, resume=True, overrides={"steps": 6})
    assert _same_adapters(stopped, runs[0])


@pytest.mark.parametrize("mode", ["zero-fill", "flip", "truncate"])
def test_a_damaged_metrics_file_is_refused(assets, stopped, mode):
    _damage(stopped / "metrics.jsonl", mode)
    with pytest.raises(RunError, match="metrics.jsonl"):
        _train(small(assets, **CFG), stopped, resume=True)


def test_a_deleted_metrics_file_is_a_warning(assets, stopped):
    (stopped / "metrics.jsonl").unlink()
    warnings = _train(small(assets, **CFG), stopped, resume=True)
    assert any("metrics.jsonl is missing" in w for w in warnings)


@pytest.mark.parametrize("name", ["adapters.safetensors", "best/adapter_config.json"])
def test_damaged_adapters_are_a_warning_and_rewritten(assets, runs, stopped, name):
    _damage(stopped / name, "flip")
    warnings = _train(small(assets, **CFG), stopped, resume=True)
    assert any(name.split("/")[-1] in w for w in warnings)
    assert _same_adapters(stopped, runs[0])


def test_stop_at_must_be_a_step_past_the_start(assets, stopped, tmp_path):
    for bad in (0, -1):
        with pytest.raises(RunError, match="--stop-at must be a step >= 1"):
            _train(small(assets, **CFG), tmp_path / "new", stop_at=bad)
        assert not (tmp_path / "new").exists()
    with pytest.raises(RunError, match="not past the checkpoint's step 4"):
        _train(small(assets, **CFG), stopped, resume=True, stop_at=3)


def test_ctrl_c_in_a_save_names_the_checkpoint_resume_uses(assets, tmp_path, monkeypatch):
    import nestedfn.lm.trainer as trainer
    from nestedfn.run.checkpoint import latest_checkpoint

    real, calls = trainer.save_adapters, []

    def interrupted_after_the_checkpoint(*a, **k):  # step 4's checkpoint is on disk
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "save_adapters", interrupted_after_the_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        _train(small(assets, steps=6, save_every=2, eval_every=0), run)
    assert (
        e.value.checkpoint
        == latest_checkpoint(run / "checkpoints")
        == run / "checkpoints" / "step_00000004"
    )
    assert e.value.step == 4


def test_a_nan_eval_writes_json_and_says_no_checkpoint_exists(assets, tmp_path, monkeypatch):
    import nestedfn.lm.trainer as trainer

    monkeypatch.setattr(trainer, "valid_loss", lambda *a, **k: float("nan"))
    run = tmp_path / "run"
    with pytest.raises(
        RunError, match="validation loss became nan at step 0; no checkpoint was written"
    ):
        _train(small(assets, steps=4, eval_every=2), run)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_a_huge_learning_rate_stops_before_the_run_directory_exists(assets, tmp_path):
    # refused where the value is born (the config: beyond float32's range), naming the value
    with pytest.raises((RunError, ConfigError), match="learning_rate must be .*1e\\+300"):
        _train(small(assets, learning_rate=1e300), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nan_weights_stop_before_the_run_directory_exists(assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(assets[0], model)
    weights = mx.load(str(model / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = mx.full(weights[key].shape, float("nan"), dtype=weights[key].dtype)
    mx.save_safetensors(str(model / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(RunError, match="loss of nan.*NaN/Inf"):
        _train(small((model, assets[1])), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_forward_that_cannot_compile_suggests_no_compile(assets, tmp_path, monkeypatch):
    import nestedfn.lm.trainer as trainer

    def make_grad_fn(*a, **k):
        def fails(*a, **k):
            raise ValueError(
                "[eval] Attempting to eval an array during function transformations like "
                "compile or vmap is not allowed."
            )

        return fails

    monkeypatch.setattr(trainer, "make_grad_fn", make_grad_fn)
    with pytest.raises(RunError, match="pass --no-compile"):
        _train(small(assets), tmp_path / "run")


def test_a_model_whose_freeze_fails_is_one_error(assets, tmp_path, monkeypatch):
    import mlx.nn as nn

    def freeze(self, *a, **k):
        raise AttributeError("'RecurrentGemma' object has no attribute '_no_grad'")

    monkeypatch.setattr(nn.Module, "freeze", freeze)
    with pytest.raises(RunError, match="cannot take LoRA adapters: AttributeError"):
        _train(small(assets), tmp_path / "run")
