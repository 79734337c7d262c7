"""Atomic file replacement: a crash or error while writing never damages the file already there."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


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
