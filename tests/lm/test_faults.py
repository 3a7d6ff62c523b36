"""A few trials of the fault matrix (``benchmarks/faults.py``) in the suite: SIGTERM and
SIGKILL at random moments resume bit-identical, two runs on one directory, OS errors (full
disk, read-only, immutable, under a file) are one line with status 74, and the CLI's own
one-line errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestedfn.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _faults():
    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["faults"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    faults = _faults()
    return faults, faults.setup(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_at_a_random_moment_resumes_bit_identical(matrix, sig):
    faults, ctx = matrix
    result = faults.kill_trial(ctx, sig, seed=3)
    assert result["ok"], result["why"]
    assert ctx.tracebacks == []


def test_sigterm_exits_143_after_a_checkpoint(matrix, tmp_path):
    faults, ctx = matrix
    run = tmp_path / "run"
    proc = faults.start(faults.run_args(ctx, run, "--steps", "400", "--save-every", "1000"))
    faults._wait_for(run / "metrics.jsonl", proc)
    while '"train"' not in (run / "metrics.jsonl").read_text() and proc.poll() is None:
        time.sleep(0.05)  # a step completed
    proc.send_signal(signal.SIGTERM)
    rc, err = faults.finish(ctx, proc)
    assert rc == 143, err
    assert "terminated (SIGTERM)" in err and "--resume" in err
    assert list((run / "checkpoints").iterdir())  # the last completed step, saved


def test_two_runs_on_one_directory(matrix):
    faults, ctx = matrix
    result = faults.concurrent_trial(ctx, "new")
    assert result["ok"], result


def _cli_train(faults, ctx, out, capsys):
    code = main(["train", *faults.run_args(ctx, out, "--steps", "4", "--eval-every", "0")])
    return code, capsys.readouterr().err


def _error_lines(err):
    assert "Traceback" not in err
    return sum(ln.startswith("nestedfn train: error:") for ln in err.splitlines())


def _mount(target, opts):
    target.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


def test_a_full_disk_is_one_line_74_and_leaves_no_temporary(matrix, tmp_path, capsys):
    faults, ctx = matrix
    mnt = tmp_path / "small"
    _mount(mnt, "size=300k")  # one checkpoint fits (about 240 kB), the second does not
    try:
        code, err = _cli_train(faults, ctx, mnt / "run", capsys)
        assert code == 74 and "No space left on device" in err and str(mnt / "run") in err, err
        assert _error_lines(err) == 1
        assert faults.temporaries(mnt / "run") == []
        assert faults._intact_checkpoints(mnt / "run")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_read_only_file_system_is_one_line_74(matrix, tmp_path, capsys):
    faults, ctx = matrix
    mnt = tmp_path / "ro"
    _mount(mnt, "ro,size=64k")
    try:
        code, err = _cli_train(faults, ctx, mnt / "run", capsys)
        assert code == 74 and "Read-only file system" in err and str(mnt) in err, err
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_an_immutable_directory_is_one_line_74(matrix, tmp_path, capsys):
    faults, ctx = matrix
    d = tmp_path / "immutable"
    d.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        code, err = _cli_train(faults, ctx, d / "run", capsys)
        assert code == 74 and "Operation not permitted" in err, err
    finally:
        subprocess.run(["chattr", "-i", str(d)])


def test_out_under_a_regular_file_is_one_line_74(matrix, tmp_path, capsys):
    faults, ctx = matrix
    (tmp_path / "file").write_text("x")
    code, err = _cli_train(faults, ctx, tmp_path / "file" / "run", capsys)
    assert code == 74 and "Not a directory" in err and _error_lines(err) == 1


def test_an_os_error_without_privileges_is_one_line_74(matrix, tmp_path, capsys, monkeypatch):
    """The same path without mount or chattr: the OS call made to fail."""
    import errno

    import nestedfn.lm.lock as lock

    faults, ctx = matrix

    def erofs(*a, **k):
        raise OSError(
            errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / ".nestedfn.lock")
        )

    monkeypatch.setattr(lock.os, "open", erofs)
    code, err = _cli_train(faults, ctx, tmp_path / "run", capsys)
    assert code == 74 and "Read-only file system" in err and _error_lines(err) == 1


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["train", "--learning-rate", "abc"], "invalid float value: 'abc'"),
        (["train", "--tiers", '{"(": 0}', "--out", "x"], "is not a regular expression"),
        (["inspect", "--tiers", '{"(": 0}'], "is not a regular expression"),
    ],
)
def test_cli_errors_are_one_line(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
