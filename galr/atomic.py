"""Atomic file replacement: a crash or error while writing never damages the file already there."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from galr.errors import BusyError, InputError, NotFoundError


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only set it,
    and setting it briefly would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """Permissions the result should get: those of the file it replaces, else a normal new file's."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_current_umask()


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and the previous ``path`` (if any) is untouched.
    The result keeps the permissions of the file it replaces; a new file gets the usual
    ``0o666 & ~umask`` (not the owner-only mode of a temporary file), so a bundle written by one
    user can be served by another.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            os.chmod(tmp_name, _final_mode(path))
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_output(path) as handle:
        handle.write(data)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    write_bytes_atomically(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output ``path`` that cannot be written atomically.

    Its folder must exist and be writable (the atomic writer puts its temporary file there), and
    ``path`` must not be a folder.

    Raises:
        NotFoundError: the folder does not exist.
        InputError: ``path`` is a folder, or the folder is not writable (permissions, read-only file system).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name to write")
    if not folder.is_dir():
        raise NotFoundError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: the folder {folder} is not writable (permissions or a read-only "
                         "file system)")
    return path


@contextmanager
def exclusive_lock(path: str | os.PathLike, *, timeout: float,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive OS lock for writing ``path`` (on ``<path>.lock``) for the whole block.

    Writers of the same file exclude each other from the moment they read it to the moment they
    replace it, so no update is lost. Readers need no lock: every write is an atomic replace. The lock
    is the kernel's (``flock``), so it is released whenever the holder exits, even by ``kill -9``; the
    ``.lock`` file (holding the last holder's process id) stays and is harmless.

    Args:
        path: the file about to be written.
        timeout: seconds to wait for another holder before giving up.
        on_wait: told once, with a message, when the lock is held by another process.

    Raises:
        BusyError: still held by another process after ``timeout`` seconds.
    """
    import fcntl  # POSIX; galr's targets are Linux machines

    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise BusyError(f"{path} is being written by another process (pid {holder}); nothing was "
                                    f"changed. Try again when it is done (waited {timeout:g} s)") from None
                if not announced and on_wait is not None:
                    on_wait(f"{path} is being written by process {holder}; waiting up to {timeout:g} s for it")
                    announced = True
                time.sleep(0.05)
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode("ascii"), 0)
        yield lock_path
    finally:
        os.close(handle)  # releases the lock
