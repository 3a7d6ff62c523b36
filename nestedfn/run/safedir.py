"""The one file layer of a run directory: nothing written, renamed or removed through a symlink.

Every create, write, append, rename and delete inside a run directory goes through a
``SafeDir``: an open directory file descriptor, and names *relative to it* opened with
``O_NOFOLLOW`` (a symlink is ``ELOOP``, never followed), inspected with ``lstat``, removed with
``unlink``/``rmdir`` on the entry itself (``shutil.rmtree(dir_fd=...)`` for a tree, which
never follows a link).  So a symlink planted where the run writes (``RUN/checkpoints ->
elsewhere``, ``RUN/best -> a user's adapters``, ``RUN/.nestedfn.lock -> victim``, a dangling
``metrics.jsonl``) can make a write fail, never make it land outside the directory.

The run directory itself is opened by the path the user named (its ancestors and its own name
may be symlinks: that is the user's naming); every component *below* it is opened without
following.  ``refuse_links`` lists the symlinks among the names a run writes, so that the
caller refuses the directory, naming them, before anything is touched; ``refuse_out``
refuses an ``--out`` that is ``/``, a home directory, or one of the run's inputs.

Writes are atomic: a temporary ``.NAME.PID-RANDOM[suffix]`` created ``O_EXCL | O_NOFOLLOW``,
written, fsynced, renamed over ``NAME`` through the directory descriptor (a rename replaces a
symlink, never writes through it), then the directory fsynced.  Errors are ``OSError`` naming
the full path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "SafeDir",
    "open_append",
    "refuse_links",
    "refuse_out",
    "symlink_error",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def symlink_error(path: Path | str) -> OSError:
    """The error for a symlink where the run writes (``ELOOP``, naming it)."""
    return OSError(
        errno.ELOOP, "is a symbolic link; a run never writes through one (move it away)", str(path)
    )


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name inside a run directory: {name!r}")
    return name


class SafeDir:
    """An open directory; every operation takes a plain name inside it and never follows a
    symlink (see the module doc).  A context manager (closes the descriptor)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, Path(path)

    # ---- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, create: bool = False, follow: bool = True) -> SafeDir:
        """Open directory ``path`` (made, with its parents, when ``create``).  ``follow=False``
        refuses a symlink as its last component (``ELOOP``)."""
        path = Path(path)
        if create:
            parent = path.parent
            if parent != path and not parent.is_dir():
                parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
        flags = _DIR_FLAGS | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if not follow and path.is_symlink():
                raise symlink_error(path) from None
            raise OSError(e.errno, e.strerror, str(path)) from None
        return cls(fd, path)

    def sub(self, name: str, create: bool = False) -> SafeDir:
        """The subdirectory ``name``, never through a symlink (made when ``create``)."""
        _check_name(name)
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=self.fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path / name)) from None
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as e:
            if self.kind(name) == "link":
                raise symlink_error(self.path / name) from None
            raise OSError(e.errno, e.strerror, str(self.path / name)) from None
        return SafeDir(fd, self.path / name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- looking --------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(_check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def kind(self, name: str) -> str | None:
        """``"file"``, ``"dir"``, ``"link"``, ``"other"`` or ``None`` (absent), by ``lstat``."""
        st = self.lstat(name)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "link"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return "file" if stat.S_ISREG(st.st_mode) else "other"

    def listdir(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def read_bytes(self, name: str) -> bytes:
        fd = self.open_fd(name, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    # ---- writing --------------------------------------------------------------------------

    def open_fd(self, name: str, flags: int, mode: int = 0o666) -> int:
        """``os.open`` of ``name`` in this directory with ``O_NOFOLLOW`` (a symlink: ``ELOOP``
        naming it)."""
        try:
            return os.open(_check_name(name), flags | _NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP or self.kind(name) == "link":
                raise symlink_error(self.path / name) from None
            raise OSError(e.errno, e.strerror, str(self.path / name)) from None

    def temp_name(self, name: str, suffix: str = "") -> str:
        return f".{_check_name(name)}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"

    def write_atomic(
        self,
        name: str,
        data: bytes | Callable[[str], None],
        suffix: str = "",
    ) -> Path:
        """Replace ``name`` all at once with ``data`` (bytes, or a function filling the
        temporary file at the path it is given); see the module doc.  The file gets the
        permissions ``open(path, "w")`` would (``0o666`` less the umask)."""
        tmp = self.temp_name(name, suffix)
        fd = self.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            if isinstance(data, (bytes, bytearray)):
                with os.fdopen(fd, "wb") as f:
                    fd = -1
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                os.close(fd)
                fd = -1
                data(str(self.path / tmp))
                sync = self.open_fd(tmp, os.O_RDONLY)
                try:
                    os.fsync(sync)
                finally:
                    os.close(sync)
            self.rename(tmp, name)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            if isinstance(e, OSError) and e.filename is None:  # a write: name the file
                raise OSError(e.errno, e.strerror or str(e), str(self.path / name)) from None
            raise
        self.fsync()
        return self.path / name

    def append(self, name: str, encoding: str = "utf-8") -> IO[str]:
        """``name`` opened for appending text (created when missing), never through a symlink;
        a failed write or flush (``ENOSPC``...) is an ``OSError`` naming the file."""
        fd = self.open_fd(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return _NamedFile(os.fdopen(fd, "a", encoding=encoding), self.path / name)

    def mkdir(self, name: str) -> None:
        try:
            os.mkdir(_check_name(name), 0o777, dir_fd=self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path / name)) from None

    def rename(self, src: str, dst: str, into: SafeDir | None = None) -> None:
        """Rename entry ``src`` to ``dst`` (in ``into``, default this directory): the entry
        itself moves (a symlink stays a symlink), an existing ``dst`` file is replaced."""
        target = self if into is None else into
        _check_name(src), _check_name(dst)
        try:
            if self._named_by_path() and target._named_by_path():
                # the paths name our descriptors' directories: the same rename, by path
                # (``os.replace``, which tests and tools hook to simulate a crash)
                os.replace(self.path / src, target.path / dst)
            else:
                os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=target.fd)
        except OSError as e:
            if e.errno is None:
                raise
            raise OSError(
                e.errno, e.strerror, str(self.path / src), str(target.path / dst)
            ) from None

    def _named_by_path(self) -> bool:
        """Whether ``self.path`` (taken without following its last component) still names
        the directory this descriptor holds."""
        try:
            return os.path.samestat(os.lstat(self.path), os.fstat(self.fd))
        except OSError:
            return False

    def unlink(self, name: str, missing_ok: bool = False) -> None:
        """Remove file (or symlink: the link itself) ``name``."""
        try:
            os.unlink(_check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path / name)) from None

    def rmdir(self, name: str) -> None:
        try:
            os.rmdir(_check_name(name), dir_fd=self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path / name)) from None

    def remove_tree(self, name: str, missing_ok: bool = False) -> None:
        """Remove directory ``name`` and everything in it, following no symlink (a symlink
        ``name`` is ``ELOOP``: removing it is the caller's explicit ``unlink``)."""
        k = self.kind(name)
        if k is None:
            if missing_ok:
                return
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path / name))
        if k == "link":
            raise symlink_error(self.path / name)
        if k != "dir":
            self.unlink(name)
            return
        assert shutil.rmtree.avoids_symlink_attacks
        try:
            shutil.rmtree(name, dir_fd=self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path / name)) from None

    def fsync(self) -> None:
        os.fsync(self.fd)

    def check_writable(self) -> None:
        """Raise ``OSError`` naming this directory unless an entry can be created and removed
        in it (a temporary file, made ``O_EXCL`` and unlinked): a run checks the directories
        it will write before its first step, not at its first save after hours of steps."""
        name = self.temp_name("probe")
        try:
            os.close(
                os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, dir_fd=self.fd)
            )
            os.unlink(name, dir_fd=self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None


class _NamedFile:
    """A text file whose write errors name it (``OSError.filename``)."""

    def __init__(self, f: IO[str], path: Path):
        self._f, self.path = f, path

    def _named(self, e: OSError) -> OSError:
        return OSError(e.errno, e.strerror or str(e), str(self.path))

    def write(self, text: str) -> int:
        try:
            return self._f.write(text)
        except OSError as e:
            raise self._named(e) from None

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            raise self._named(e) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise self._named(e) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _NamedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_append(path: Path | str, encoding: str = "utf-8") -> IO[str]:
    """``open(path, "a")`` without following a symlink at ``path`` (its directory is opened as
    named); writes that fail name the file."""
    path = Path(path)
    with SafeDir.open(path.parent) as d:
        return d.append(path.name, encoding)


def refuse_links(
    directory: Path | str, names: Iterable[str], inside: Iterable[str] = ()
) -> list[Path]:
    """The symlinks in ``directory`` among ``names`` and among the entries of its
    subdirectories ``inside`` (by ``lstat``; nothing is followed or changed).  An absent
    ``directory`` has none."""
    directory = Path(directory)
    try:
        d = SafeDir.open(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[Path] = []
    with d:
        for name in names:
            if d.kind(name) == "link":
                found.append(directory / name)
        for name in inside:
            if d.kind(name) != "dir":
                continue
            with d.sub(name) as s:
                found += [directory / name / n for n in s.listdir() if s.kind(n) == "link"]
    return found


def _homes() -> set[Path]:
    homes = set()
    with contextlib.suppress(Exception):
        homes.add(Path.home().resolve())
    with contextlib.suppress(Exception):
        import pwd

        homes |= {Path(p.pw_dir).resolve() for p in pwd.getpwall() if p.pw_dir}
    return homes


def refuse_out(out: Path | str, inputs: dict[str, str | None] | None = None) -> str | None:
    """Why ``out`` may not be a run directory, or ``None``: ``/``, a home directory, or
    (``inputs``: ``{"model": path, ...}``) the directory of one of the run's inputs (a file
    input: its directory) -- a run's files do not belong among the user's own."""
    real = Path(os.path.realpath(out))
    if real == Path(real.anchor):
        return f"--out {out} is the file system root; name a directory of its own for the run"
    if real in _homes():
        return f"--out {out} is a home directory; name a directory of its own for the run"
    for what, p in (inputs or {}).items():
        if not p:
            continue
        ip = Path(os.path.realpath(p))
        if ip.is_file():
            ip = ip.parent
        if real == ip:
            return f"--out {out} is the {what} directory ({p}); name a directory of its own"
    return None
