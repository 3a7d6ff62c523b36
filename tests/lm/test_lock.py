"""One run per run directory: the second process is refused naming the holder; a killed
holder never blocks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from nestedfn.lm.lock import LOCK_FILE, RunDirBusy, RunDirLock
from nestedfn.lm.trainer import train
from tests.lm.conftest import small


def test_a_second_holder_is_refused_naming_pid_and_host(tmp_path):
    first = RunDirLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        first.release()
    RunDirLock(tmp_path / "run").acquire().release()  # free again
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_killed_holder_does_not_block(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from nestedfn.lm.lock import RunDirLock; "
        f"RunDirLock(Path({str(tmp_path / 'run')!r})).acquire(); print('held', flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
        RunDirLock(tmp_path / "run").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # left behind by the kill, yet free
    RunDirLock(tmp_path / "run").acquire().release()


def test_release_of_a_run_that_wrote_nothing_removes_the_directory_it_made(tmp_path):
    lock = RunDirLock(tmp_path / "new" / "run").acquire()
    lock.release(keep_dir=False)
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    lock = RunDirLock(tmp_path / "mine").acquire()
    lock.release(keep_dir=False)
    assert (tmp_path / "mine").is_dir()  # not ours to remove


def test_train_on_a_locked_directory_touches_nothing(assets, tmp_path):
    run = tmp_path / "run"
    train(small(assets, steps=2), run, progress=False, log=lambda s: None)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    holder = RunDirLock(run).acquire()
    try:
        with pytest.raises(RunDirBusy, match="in use by"):
            train(small(assets, steps=4), run, resume=True, progress=False, log=lambda s: None)
        with pytest.raises(RunDirBusy):
            train(small(assets), run, force=True, progress=False, log=lambda s: None)
    finally:
        holder.release()
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
