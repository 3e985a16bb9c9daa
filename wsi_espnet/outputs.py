"""How every output is made safely.  Checks before a writer starts: an existing output needs
``overwrite``, and the folder must exist and be writable (done up front, so a mistake costs
nothing).  All or nothing at the final path: a file is written under a temporary name and renamed at
the end (:func:`atomic_file` for files written in one go; the mask, GeoJSON and overlay writers keep
their own ``.partial`` beside the output, fsynced before the rename), a folder replaced or deleted is first renamed aside
(:func:`replace_folder`, :func:`discard_folder`), so that a kill at any moment leaves either the
old thing or the new one.  And a lock, so that two runs never make the same mask or patch store at
once (:func:`exclusive_output`)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputWarning, OutputBusyError, OutputExistsError, UserError


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
def atomic_file(path: str | os.PathLike, suffix: str = ".part") -> Iterator[Path]:
    """A new, empty temporary file beside ``path`` to write in the block; it replaces ``path`` only if
    the block finishes, and is removed if it does not, so a killed or failed writer never leaves a
    cut-short file under the final name.

    The temporary name is unique (two writers of one path never share it); ``suffix`` is its ending,
    for writers that choose a format by extension.  Its permissions are those of a file made the usual
    way (0666 less the umask): ``mkstemp`` alone would make it 0600, and the lab's other users could
    not read the result."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask.  Read from ``/proc`` where there is one: the only other way, setting it and
    setting it back, leaves it 0 for a moment, and a file another thread creates in that moment
    would be writable by anyone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_folder(folder: Path) -> Path | None:
    """Create ``folder`` and its missing parents; the highest one created (None if it existed), so
    that a run that fails before writing anything can take away what it made."""
    if folder.exists():
        return None
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {folder}: {exc.strerror}") from None
    return top


def remove_empty_folders(top: Path) -> None:
    """``top`` and the folders under it, those left empty: what a run that failed before writing
    anything had created (a resumable work folder is not empty and stays)."""
    for dirpath, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def replace_folder(new: Path, dst: Path) -> None:
    """Put the finished folder ``new`` (a Zarr store) at ``dst``.  Whatever is at ``dst`` is renamed
    aside first and deleted only after: killed at any moment, ``dst`` never holds half a store
    (which a re-run could not even recognise as a store to replace): the old one, the new one, or,
    killed between the two renames, none until the re-run makes it.  What a killed call left aside
    goes with the next call on ``dst``."""
    aside = _move_aside(dst)
    os.replace(new, dst)
    if aside is not None:
        remove_path(aside)


def discard_folder(folder: Path) -> None:
    """Delete ``folder`` (a run's work folder) so that a kill midway leaves nothing under its name:
    renamed aside in one step, then deleted.  Deleted in place, a kill could leave a folder that
    has lost its progress file but still holds gigabytes, which no later run would recognise as its
    own to resume or to remove."""
    aside = _move_aside(folder)
    if aside is not None:
        remove_path(aside)


def remove_aside(path: Path) -> None:
    """Finish the deletion that a killed :func:`replace_folder` or :func:`discard_folder` on ``path``
    left (call it holding ``path``'s lock: the lock is also why one fixed name aside is enough)."""
    remove_path(_aside_name(path))


def _move_aside(path: Path) -> Path | None:
    """``path`` renamed to its aside name in one step (what a killed call left there goes first);
    the new name, or None if nothing was at ``path``."""
    remove_aside(path)
    if not (path.exists() or path.is_symlink()):
        return None
    aside = _aside_name(path)
    os.replace(path, aside)
    return aside


def _aside_name(path: Path) -> Path:
    # Hidden: a slide archive's walk (wsi-batch) skips it, and a user's listing does not show it.
    # One stat to find, where a name per process would need the folder listed: an output folder
    # of a large archive holds tens of thousands of files.
    return path.with_name(f".{path.name}.deleting")


def remove_path(path: Path) -> None:
    """``path`` gone, whether a folder, a file or a link (a link's target stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_unfinished_writes(store: Path) -> int:
    """Delete the temporary files a killed process left in a Zarr store; returns how many.

    zarr's local store writes each chunk (and each metadata file) as ``<name>.<uuid>.partial`` and
    renames it when complete.  A process killed mid-write leaves that file behind; resumed, the store
    would carry it (dead weight, and noise in any listing) into the finished output."""
    removed = 0
    for dirpath, _, files in os.walk(store):
        for name in files:
            if _ZARR_TEMPORARY.search(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """``dst``: the folder ``src`` again, its files hard links where both folders lie on one file
    system, copies elsewhere; ``zarr.json`` files are always copied (Zarr rewrites metadata in place,
    which would change both).

    Why: a large slide's probabilities are GBs in the run's work folder, and they are final once its
    tiles are done.  A copy doubled them on disk for a while and cost a second write of every byte;
    a link costs neither, and the work copy stays whole until the run has finished (a run stopped
    after this step links or copies again)."""
    def link(source: str, target: str) -> str:
        if os.path.basename(source) != "zarr.json":
            try:
                os.link(source, target)
                return target
            except OSError:  # another file system, or one without hard links
                pass
        return shutil.copy2(source, target)

    shutil.copytree(src, dst, copy_function=link)


def check_not_input(output: Path, source: Path, what: str = "the input slide") -> None:
    """Raise a one-line :class:`UserError` if ``output`` names ``source``: with ``--overwrite`` a slip
    of the tongue would replace the slide with the result."""
    same = os.path.realpath(output) == os.path.realpath(source)
    if not same and os.path.exists(output) and os.path.exists(source):
        same = os.path.samefile(output, source)  # a hard link or another path to the same file
    if same:
        raise UserError(f"{output} is {what}; name the output differently")


@contextmanager
def exclusive_output(path: Path) -> Iterator[None]:
    """Hold ``PATH.lock`` (an advisory ``flock``) while ``path`` is being made: take it before looking
    at what exists, so that a second run on the same output stops at once, having written nothing,
    with a one-line :class:`OutputBusyError` naming the holder's pid.

    Why: two runs on one output (the same command started twice, or a cluster retrying a task whose
    first attempt is still alive) would share one work folder, and the first to finish would delete
    it under the other.  The kernel drops the lock when its process dies, so a killed run never
    blocks its own resumption; its lock file stays and is taken over.  The file is removed while
    still locked, and a lock won on a file no longer at the path is tried again.  Where the file
    system has no locks (some parallel file systems), the run goes on unlocked, with a warning.
    Not POSIX (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    while True:
        fd = _open_lock_file(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = (" in this same process" if holder == str(os.getpid()) else "") + (
                f" (pid {holder})" if holder.isdigit() else "")
            raise OutputBusyError(f"{path} is being made by another run{who}; let it finish, or stop it first") from None
        except OSError as exc:  # no locks on this file system
            os.close(fd)
            warnings.warn(f"cannot lock {lock_path} ({exc.strerror}): a second run on this output at the same "
                          "time would not be stopped", InputWarning, stacklevel=3)
            fd = None
            break
        try:
            current = os.stat(lock_path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # its holder removed it between our open and our lock
    if fd is None:
        yield
        return
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # opened read-only (another user's file): the lock holds without the pid
            pass
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def _open_lock_file(lock_path: Path) -> int:
    """The lock file, opened without following a link (a link planted there must not make a run
    truncate what it points to); read-only if it is another user's (``flock`` needs no write access)."""
    flags = os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(lock_path, os.O_RDWR | flags, 0o666)
    except PermissionError:
        if not os.path.lexists(lock_path):
            raise UserError(f"cannot write {lock_path.with_suffix('')}: folder {lock_path.parent} is not writable") from None
        try:
            return os.open(lock_path, os.O_RDONLY | flags)
        except OSError as exc:
            raise UserError(f"cannot open {lock_path}: {exc.strerror} (if no run is making "
                            f"{lock_path.with_suffix('').name}, remove it)") from None
    except OSError as exc:
        if os.path.islink(lock_path):
            raise UserError(f"{lock_path} is a link; remove it (a run's lock file is a plain file)") from None
        # The output's name, not the lock's: the user asked for the one and never heard of the other.
        raise UserError(f"cannot write {lock_path.with_suffix('')}: {exc.strerror} (making its lock file "
                        f"in {lock_path.parent})") from None
