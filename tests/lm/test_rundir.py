"""A run directory holding a symlink where the run writes is refused before anything is
touched, naming it, and nothing outside the run directory changes (the cases of issue 23);
``--out`` of ``/``, a home directory or an input's directory is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nestedfn.cli import main
from tests.run.test_safedir import snapshot


def _args(assets, out: Path, *extra: str) -> list[str]:
    model, data = assets
    return [
        "train",
        *("--model", str(model), "--data", str(data), "--out", str(out)),
        *("--batch-size", "2", "--max-seq-len", "24", "--lora-rank", "2", "--lora-layers", "4"),
        *("--steps", "2", "--save-every", "1", "--eval-every", "2", "--eval-batches", "1"),
        *extra,
    ]


def _train(assets, out, capsys, *extra):
    code = main(_args(assets, out, *extra))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def done_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(_args(assets, out)) == 0
    return out


@pytest.fixture
def world(tmp_path, done_run):
    """A finished run (copied) and, beside it, the user's files (an adapter directory)."""
    outside = tmp_path / "outside"
    (outside / "adapters").mkdir(parents=True)
    (outside / "adapters" / "adapters.safetensors").write_bytes(b"the user's weights")
    (outside / "adapters" / "adapter_config.json").write_text("{}")
    (outside / "victim.txt").write_text("the user's text\n")
    run = tmp_path / "run"
    shutil.copytree(done_run, run, symlinks=True)
    return run, outside


def _refused(code, err, name):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("nestedfn train: error:")]
    assert len(lines) == 1 and name in lines[0] and "symbolic link" in lines[0], err


@pytest.mark.parametrize("flag", ["--force", "--resume"])
def test_checkpoints_symlinked_elsewhere(assets, world, capsys, flag):
    run, outside = world
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(outside / "adapters")
    before, run_before = snapshot(outside), snapshot(run)
    code, err = _train(assets, run, capsys, flag)
    _refused(code, err, str(run / "checkpoints"))
    assert snapshot(outside) == before and snapshot(run) == run_before


def test_best_symlinked_to_a_users_adapters(assets, world, capsys):
    run, outside = world
    shutil.rmtree(run / "best")
    (run / "best").symlink_to(outside / "adapters")
    before = snapshot(outside)
    code, err = _train(assets, run, capsys, "--force")
    _refused(code, err, str(run / "best"))
    assert snapshot(outside) == before


@pytest.mark.parametrize("target", ["victim.txt", "missing"])
@pytest.mark.parametrize("name", [".nestedfn.lock", "metrics.jsonl", "config.yaml"])
def test_a_symlinked_file_in_a_new_run_dir(assets, tmp_path, capsys, name, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("the user's text\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside / target)
    before, run_before = snapshot(outside), snapshot(run)
    code, err = _train(assets, run, capsys, "--force")
    _refused(code, err, str(run / name))
    assert snapshot(outside) == before and snapshot(run) == run_before


@pytest.mark.parametrize("which", ["root", "home", "data"])
def test_out_of_root_home_or_data_is_refused(assets, capsys, which):
    out = {"root": Path("/"), "home": Path.home(), "data": Path(assets[1])}[which]
    before = sorted(p.name for p in out.iterdir())
    code, err = _train(assets, out, capsys, "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == before
