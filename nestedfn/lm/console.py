"""Output is not the run: a closed, full or narrow stdout/stderr never stops training.

``install()`` (called by the ``nestedfn`` command itself, not by ``main(argv)`` called
in-process: it changes the process's streams and SIGINT handler) does two things:

* wraps ``sys.stdout`` and ``sys.stderr`` in a ``_Guard``: a write that fails because the
  reader went away (``nestedfn train ... | head -c 1500``: ``EPIPE``), the stream is closed or
  full (``ENOSPC``) turns the stream off -- its descriptor is pointed at ``/dev/null`` so the
  interpreter's own flush at exit is quiet -- and training goes on (``metrics.jsonl`` holds
  every record).  A character the stream's encoding cannot hold (``PYTHONIOENCODING=ascii``
  and a non-ASCII ``--out``) is written escaped (``\\xe9``) instead of raising;
* makes the first SIGINT raise ``KeyboardInterrupt`` as always and ignores the ones that
  follow while it is being handled (Ctrl-C often arrives twice: the terminal's process group
  and a launcher forwarding it), so a second one cannot cut the checkpoint of the last
  completed step short -- the window before the trainer's own guard included.  Each
  ``install()`` arms it again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from typing import IO, Any

__all__ = ["install"]

_GONE = (errno.EPIPE, errno.ENOSPC, errno.EBADF, errno.EIO)


class _Guard:
    """A text stream whose failures switch it off instead of raising (see the module doc)."""

    def __init__(self, stream: IO[str]):
        self._s = stream
        self.dead = False

    def _off(self) -> None:
        self.dead = True
        with contextlib.suppress(Exception):
            fd = self._s.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)

    def write(self, text: str) -> int:
        if self.dead:
            return len(text)
        try:
            return self._s.write(text)
        except UnicodeEncodeError:
            enc = getattr(self._s, "encoding", None) or "ascii"
            safe = text.encode(enc, "backslashreplace").decode(enc)
            return self.write(safe)
        except OSError as e:
            if e.errno not in _GONE:
                raise
        except ValueError:  # I/O operation on closed file
            pass
        self._off()
        return len(text)

    def flush(self) -> None:
        if self.dead:
            return
        try:
            self._s.flush()
        except (OSError, ValueError):
            self._off()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


def _guard(stream: Any) -> Any:
    return stream if stream is None or isinstance(stream, _Guard) else _Guard(stream)


def _interrupt_once(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first one is being handled
    raise KeyboardInterrupt


def install() -> None:
    """Guard ``sys.stdout``/``sys.stderr`` and arm the one-shot SIGINT handler (main thread
    only; a handler the caller installed is left alone)."""
    sys.stdout = _guard(sys.stdout)
    sys.stderr = _guard(sys.stderr)
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGINT)
        if current in (signal.default_int_handler, signal.SIG_IGN, _interrupt_once):
            if current is not signal.SIG_IGN or _armed[0]:
                signal.signal(signal.SIGINT, _interrupt_once)
                _armed[0] = True


_armed = [False]  # whether SIG_IGN on SIGINT is ours (a fired one-shot) or the caller's
