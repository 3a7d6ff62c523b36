"""One run per run directory: an exclusive OS lock held for the whole run.

Two ``nestedfn train`` on one ``--out`` would interleave their files (one run's
``config.yaml``, the other's checkpoints, ``metrics.jsonl`` mixed).  ``hold_run_dir(out)``
takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``out/.nestedfn.lock`` before anything else; a
second process gets ``RunDirBusy`` (a ``RunError``: one line, exit status 2) naming the holder
(pid and host, written into the lock file) and touches nothing.  The lock belongs to the open
file, so the kernel drops it when the process dies, however it dies: a SIGKILLed run never
blocks its own resume.

A new run's directory is created to hold the lock; ``release(keep_dir=False)`` (a run that
stopped before writing anything) removes the lock file and the directory again when this
process created it and it is empty.  The lock file is removed on every release; a process
that opened it just before is not fooled: after ``flock`` it checks that the path still names
the file it locked (else it starts again), the usual protocol for lock files that are
unlinked.  Only rank 0 locks (the other ranks of a launch only read the directory).

The lock file is opened through the run directory's descriptor with ``O_NOFOLLOW``
(``nestedfn.run.safedir``): a symlink at ``.nestedfn.lock`` is refused, naming it, and its
target is never written.  ``--out`` of ``/`` or a home directory is refused before the
directory is touched (``safedir.refuse_out``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from nestedfn.lm.errors import RunError
from nestedfn.run.safedir import SafeDir, refuse_out

__all__ = ["LOCK_FILE", "RunDirBusy", "RunDirLock"]

LOCK_FILE = ".nestedfn.lock"


class RunDirBusy(RunError):
    """Another process holds the run directory's lock."""


class RunDirLock:
    """The exclusive lock on a run directory, taken by ``acquire`` (see the module doc)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd: int | None = None
        self.dir: SafeDir | None = None
        self.created_dir = False

    def acquire(self) -> RunDirLock:
        why = refuse_out(self.out)
        if why is not None:
            raise RunError(why)
        if self.out.is_symlink() and not self.out.exists():
            raise RunError(f"output path {self.out} is a dangling symbolic link")
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"output path {self.out} exists and is not a directory")
        if not self.out.exists():
            try:
                self.out.mkdir(parents=True)
                self.created_dir = True
            except FileExistsError:
                pass
        self.dir = SafeDir.open(self.out)
        try:
            return self._lock()
        except BaseException:
            self.dir.close()
            self.dir = None
            raise

    def _lock(self) -> RunDirLock:
        assert self.dir is not None
        for _ in range(100):
            if self.dir.kind(LOCK_FILE) == "link":
                raise RunError(
                    f"{self.path} is a symbolic link; a run never writes through one (move it away)"
                )
            fd = self.dir.open_fd(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirBusy(
                    f"run directory {self.out} is in use by {self._holder()}; wait for it to "
                    "finish (or stop it) before starting another run there"
                ) from None
            st = self.dir.lstat(LOCK_FILE)
            if st is None or os.fstat(fd).st_ino != st.st_ino:
                # the holder removed the file between our open and our flock
                os.close(fd)
                continue
            self.fd = fd
            self._write_holder()
            return self
        raise RunError(f"could not lock {self.path}: it keeps being replaced")

    def _write_holder(self) -> None:
        assert self.fd is not None
        text = f"pid {os.getpid()} on host {socket.gethostname()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def _holder(self) -> str:
        try:
            assert self.dir is not None
            text = self.dir.read_bytes(LOCK_FILE).decode("utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return f"another process ({text})" if text else "another process"

    def release(self, keep_dir: bool = True) -> None:
        """Drop the lock and remove the lock file; with ``keep_dir=False`` also the directory
        when this process created it and it is empty (a run that wrote nothing)."""
        if self.fd is None:
            return
        assert self.dir is not None
        st = self.dir.lstat(LOCK_FILE)
        if st is not None and st.st_ino == os.fstat(self.fd).st_ino:
            with contextlib.suppress(OSError):
                self.dir.unlink(LOCK_FILE)
        os.close(self.fd)
        self.fd = None
        self.dir.close()
        self.dir = None
        if not keep_dir and self.created_dir:
            with contextlib.suppress(OSError):
                self.out.rmdir()
