"""``--force`` removes what the run wrote and never the user's files; stale temporaries go."""

from __future__ import annotations

import pytest

from nestedfn.lm.errors import RunError
from nestedfn.lm.manifest import MANIFEST, clean_temporaries, clear_run, run_files
from nestedfn.lm.trainer import train
from tests.lm.conftest import small


@pytest.fixture(scope="module")
def run_dir(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("manifest") / "run"
    train(
        small(assets, steps=4, save_every=2, eval_every=2), run, progress=False, log=lambda s: None
    )
    return run


def _copy(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("user_file", ["checkpoints/important.txt", "best/mine.txt"])
def test_force_refuses_and_removes_nothing_when_user_files_are_on_the_runs_paths(
    run_dir, tmp_path, user_file
):
    run = _copy(run_dir, tmp_path)
    (run / user_file).write_text("mine")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(RunError, match=user_file.replace("/", ".")):
        clear_run(run)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_force_without_a_manifest_keeps_a_users_config_yaml(tmp_path):
    (tmp_path / "config.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(RunError, match="config.yaml"):
        clear_run(tmp_path)
    assert (tmp_path / "config.yaml").read_text() == "learning_rate: 0.1\n"


def test_force_removes_exactly_the_runs_files_and_leaves_others(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "model").mkdir()
    (run / ".adapters.safetensors.123-0123abcd.safetensors").write_bytes(b"x")
    owned, unknown = run_files(run)
    assert unknown == []
    clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["model", "notes.txt"]


def test_clean_temporaries_removes_only_stale_temporaries(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    stale = [
        run / ".adapters.safetensors.4242-deadbeef.safetensors",
        run / ".config.yaml.4242-0badf00d",
        run / "best" / ".adapter_config.json.77-12345678",
    ]
    for p in stale:
        p.write_bytes(b"half")
    (run / "checkpoints" / ".tmp-step_00000006-1-abcdef01").mkdir()
    keep = [run / ".config.yaml.bak", run / "best" / "mine.txt", run / MANIFEST]
    for p in keep[:2]:
        p.write_text("mine")
    removed = clean_temporaries(run)
    assert len(removed) == 4 and not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


def test_resume_and_force_clean_stale_temporaries(assets, run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    stale = [
        run / ".adapters.safetensors.4242-deadbeef.safetensors",
        run / "best" / ".adapters.safetensors.9-00000000.safetensors",
    ]
    for p in stale:
        p.write_bytes(b"half")
    train(
        small(assets, steps=4, save_every=2, eval_every=2),
        run,
        resume=True,
        progress=False,
        log=lambda s: None,
    )
    assert not any(p.exists() for p in stale)
    for p in stale:
        p.write_bytes(b"half")
    train(small(assets, steps=2), run, force=True, progress=False, log=lambda s: None)
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("damage", ["unreadable", "missing", "garbage"])
def test_an_unreadable_manifest_is_an_os_error_not_a_missing_one(
    run_dir, tmp_path, monkeypatch, damage
):
    """Missing or damaged, the manifest is ``None`` (a resume warns and writes it again);
    unreadable (``EACCES``), it is an ``OSError`` naming it: taken for missing, it would be
    replaced and the input fingerprints it holds never checked."""
    import os
    from pathlib import Path

    from nestedfn.lm.manifest import read_manifest

    run = _copy(run_dir, tmp_path)
    manifest = run / MANIFEST
    assert read_manifest(run) is not None
    if damage == "missing":
        manifest.unlink()
    elif damage == "garbage":
        manifest.write_bytes(b"\x00{not json")
    else:
        manifest.chmod(0o000)
        if os.geteuid() == 0:  # root reads any mode: the OS refusing it, as to a user
            real = Path.read_text

            def refused(self, *a, **kw):
                if self == manifest:
                    raise PermissionError(13, "Permission denied", str(self))
                return real(self, *a, **kw)

            monkeypatch.setattr(Path, "read_text", refused)
        with pytest.raises(PermissionError) as e:
            read_manifest(run)
        assert e.value.filename == str(manifest)
        return
    assert read_manifest(run) is None
