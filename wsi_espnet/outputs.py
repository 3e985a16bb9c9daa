"""Checks every writer makes before it starts: an existing output needs ``overwrite``, and the
folder must exist and be writable.  Done up front, so a mistake costs nothing and no writer leaves a
half-made file (each writes to a temporary name and renames at the end).  And a lock, so that two runs
never make the same output at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, UserError


def check_output(path: Path, overwrite: bool, zarr_store: bool = False) -> None:
    """Raise a one-line :class:`UserError` if ``path`` cannot or must not be written.

    ``zarr_store``: the output is a Zarr store, i.e. a folder; an existing one is replaced with
    ``overwrite`` only if it *is* a Zarr store (v3 or v2 metadata at its top, not a link), never any
    other folder a mistyped path may name."""
    if path.is_dir():
        if not zarr_store:
            raise UserError(f"cannot write {path}: it is a directory")
        if path.is_symlink():
            raise UserError(f"cannot write {path}: it is a link to a folder; name the store itself")
        if not any((path / marker).is_file() for marker in ("zarr.json", ".zarray", ".zgroup")):  # v3, v2
            raise UserError(f"cannot write {path}: it is a folder that is not a Zarr store")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {path.parent} is not writable")


@contextmanager
def exclusive_output(path: Path) -> Iterator[None]:
    """Hold ``PATH.lock`` (an advisory ``flock``) while ``path`` is being made; a second run on the
    same output stops at once with a one-line :class:`UserError` naming the holder's pid.

    Why: two runs on one output (the same command started twice, or a cluster retrying a task whose
    first attempt is still alive) would share one work folder, and the first to finish would delete
    it under the other.  The kernel drops the lock when its process dies, so a killed run never
    blocks its own resumption; its lock file stays and is taken over.  The file is removed while
    still locked, and a lock won on a file no longer at the path is tried again.  Where there are no
    locks (not POSIX, or a file system without them) the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"cannot write {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise UserError(f"{path} is being made by another run{f' (pid {holder})' if holder.isdigit() else ''}; "
                            "let it finish, or stop it first") from None
        except OSError:  # no locks on this file system
            os.close(fd)
            fd = None
            break
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # its holder removed it between our open and our lock
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)
