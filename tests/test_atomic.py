"""galr.atomic: replacement is all or nothing, and results get normal file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from galr.atomic import atomic_output, write_bytes_atomically

posix_only = pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")


@posix_only
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_new_file_gets_the_umask_mode_not_a_temporary_files(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_bytes_atomically(tmp_path / "galr.plan", b"bundle")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "galr.plan").stat().st_mode) == 0o666 & ~umask


@posix_only
def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "gallery.gidx"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_bytes_atomically(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
