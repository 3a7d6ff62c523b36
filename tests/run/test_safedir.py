"""The run directory's file layer never acts through a symlink nor outside its directory."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from nestedfn.run.safedir import SafeDir, open_append, refuse_links, refuse_out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` by ``lstat``: kind and content (file bytes, link target)."""
    out: dict[str, tuple] = {}
    for d, dirs, files in os.walk(root, followlinks=False):
        for n in dirs + files:
            p = Path(d) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes(), p.stat().st_mode)
    return out


@pytest.fixture
def world(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("the user's\n")
    (outside / "keep").mkdir()
    (outside / "keep" / "adapters.safetensors").write_bytes(b"weights")
    run = tmp_path / "run"
    run.mkdir()
    return run, outside


def test_write_atomic_replaces_a_symlink_never_writes_through(world):
    run, outside = world
    before = snapshot(outside)
    (run / "config.yaml").symlink_to(outside / "victim.txt")
    with SafeDir.open(run) as d:
        d.write_atomic("config.yaml", b"steps: 1\n")
        assert d.kind("config.yaml") == "file"
    assert (run / "config.yaml").read_text() == "steps: 1\n"
    assert snapshot(outside) == before


@pytest.mark.parametrize("target", ["victim.txt", "missing.txt"])
def test_append_and_open_refuse_a_symlink_naming_it(world, target):
    run, outside = world
    before = snapshot(outside)
    (run / "metrics.jsonl").symlink_to(outside / target)
    with pytest.raises(OSError) as e:
        open_append(run / "metrics.jsonl")
    assert e.value.errno == errno.ELOOP and e.value.filename == str(run / "metrics.jsonl")
    with SafeDir.open(run) as d, pytest.raises(OSError, match="symbolic link"):
        d.open_fd("metrics.jsonl", os.O_RDWR | os.O_CREAT)
    assert snapshot(outside) == before


def test_remove_tree_and_sub_refuse_a_symlinked_directory(world):
    run, outside = world
    before = snapshot(outside)
    (run / "checkpoints").symlink_to(outside / "keep")
    with SafeDir.open(run) as d:
        with pytest.raises(OSError, match="symbolic link"):
            d.remove_tree("checkpoints")
        with pytest.raises(OSError, match="symbolic link"):
            d.sub("checkpoints")
        d.unlink("checkpoints")  # the link itself, explicitly
    assert snapshot(outside) == before
    (outside.parent / "run-link").symlink_to(run)
    with pytest.raises(OSError, match="symbolic link"):
        SafeDir.open(outside.parent / "run-link", follow=False)


def test_remove_tree_never_follows_links_inside(world):
    run, outside = world
    before = snapshot(outside)
    (run / "tree" / "sub").mkdir(parents=True)
    (run / "tree" / "sub" / "link").symlink_to(outside / "keep")
    (run / "tree" / "f").symlink_to(outside / "victim.txt")
    with SafeDir.open(run) as d:
        d.remove_tree("tree")
        assert d.kind("tree") is None
    assert snapshot(outside) == before


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_names_are_plain(world, name):
    run, _ = world
    with SafeDir.open(run) as d, pytest.raises(ValueError, match="plain file name"):
        d.write_atomic(name, b"x")


def test_refuse_links_lists_links_on_the_run_paths(world):
    run, outside = world
    (run / "best").symlink_to(outside / "keep")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000001").symlink_to(outside)
    (run / "mine").symlink_to(outside)  # not a run path: left alone
    found = refuse_links(run, ["best", "config.yaml"], ["checkpoints", "best"])
    assert found == [run / "best", run / "checkpoints" / "step_00000001"]
    assert refuse_links(run / "absent", ["x"]) == []


def test_refuse_out(tmp_path):
    assert "root" in refuse_out("/")
    assert "home directory" in refuse_out(Path.home())
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    assert "data directory" in refuse_out(data, {"data": str(data)})
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    assert "model directory" in refuse_out(tmp_path, {"model": str(model)})
    assert refuse_out(tmp_path / "run", {"data": str(data), "model": "org/repo"}) is None


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_device_on_append_names_the_file():
    f = open_append("/dev/full")
    with pytest.raises(OSError) as e:
        f.write("x" * 100_000)
        f.flush()
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"
    with contextlib.suppress(OSError):
        f.close()
