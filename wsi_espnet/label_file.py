"""A uint8 label map kept in a raw, sparse file: the work store of a segmentation run and the mask
writer's scratch pyramid levels.

Why not Zarr: these arrays are written once, a band of rows at a time, read back once or twice, and
deleted.  Zarr's per-chunk machinery (an event loop, a codec pipeline, a file per chunk) cost ~1 ms a
chunk: flushing one 448-row band of a 4096-wide label map took 8–10 ms, compressed or not, and on a
2-core CPU every millisecond outside the model is a millisecond the model waits (issue 4).  Here
that band is eight ``pwrite`` calls (~0.2 ms).

Layout: vertical stripes :data:`STRIPE` columns wide, one after the other, each row-major (the last
one narrower).  A block of rows in one stripe is one contiguous run of bytes, so a band flush or a
writer's block read is one system call per stripe it touches, whatever the slide's width (a
row-major file would take one per row, 28,000 for the mask pyramid of a 4096² map).  The file is
``height * width`` bytes, created by truncation: never-written regions are holes that read as 0
(background) and take no disk space, so while a run lasts the file occupies about the tissue's
stripes (at most ``height * width`` bytes: a 50k x 50k map at 1 µm/px, 2.5 GB, if tissue is
everywhere).  ``pread``/``pwrite`` carry their own offsets, so threads share one descriptor and may write
disjoint regions at once (a write that covers part of a stripe's width reads, patches and rewrites
those rows, under the file's lock), and what is read or written goes through the page
cache, never into this process's memory (a ``numpy.memmap`` would count every touched page in the
resident set).
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from pathlib import Path

import numpy as np

STRIPE = 512  # columns per stripe of the file layout


class LabelFile:
    """(height, width) uint8, indexed like a 2-D NumPy array with step-1 slices (``a[y0:y1, x0:x1]``
    reads, ``a[y0:y1, x0:x1] = block`` writes).  Use :meth:`create` or :meth:`open`."""

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], writable: bool, fd: int) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.writable = writable
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self._patching = threading.Lock()  # partial-stripe writes: read, patch, write back

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, int]) -> "LabelFile":
        """A new all-zero map at ``path`` (replacing any file there)."""
        h, w = (int(shape[0]), int(shape[1]))
        if h < 1 or w < 1:
            raise ValueError(f"label map shape must be positive, got {shape}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, h * w)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(path)) from None  # say which file
        except BaseException:
            os.close(fd)
            raise
        return cls(path, (h, w), True, fd)

    @classmethod
    def open(cls, path: str | os.PathLike, shape: tuple[int, int], writable: bool = False) -> "LabelFile":
        """An existing map; ``ValueError`` if its size does not match ``shape`` (a file from other
        settings, or cut short)."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size != int(shape[0]) * int(shape[1]):
            os.close(fd)
            need = int(shape[0]) * int(shape[1])
            raise ValueError(f"{path}: {size} bytes, but a {shape[0]} x {shape[1]} label map has {need}")
        return cls(path, shape, writable, fd)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "LabelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _region(self, key) -> tuple[int, int, int, int]:
        if not isinstance(key, tuple):
            key = (key, slice(None))
        if len(key) != 2 or not all(isinstance(k, slice) for k in key):
            raise IndexError("LabelFile takes two slices, e.g. labels[y0:y1, x0:x1]")
        (y0, y1, ys), (x0, x1, xs) = (k.indices(n) for k, n in zip(key, self.shape))
        if ys != 1 or xs != 1:
            raise IndexError("LabelFile slices take no step")
        return y0, max(y0, y1), x0, max(x0, x1)

    def _check_open(self) -> None:
        if not self._closer.alive:
            raise ValueError(f"{self.path.name}: label file is closed")

    def _stripes(self, x0: int, x1: int):
        """(first column, width, file offset) of each stripe that columns [x0, x1) touch."""
        height, width = self.shape
        for c0 in range(x0 - x0 % STRIPE, x1, STRIPE):
            yield c0, min(STRIPE, width - c0), c0 * height

    def __getitem__(self, key) -> np.ndarray:
        y0, y1, x0, x1 = self._region(key)
        self._check_open()
        out = np.empty((y1 - y0, x1 - x0), np.uint8)
        if out.size == 0:
            return out
        try:
            for c0, sw, offset in self._stripes(x0, x1):
                slab = np.empty((y1 - y0, sw), np.uint8)
                _pread_into(self._fd, slab, offset + y0 * sw)
                a, b = max(x0, c0), min(x1, c0 + sw)
                out[:, a - x0 : b - x0] = slab[:, a - c0 : b - c0]
        except OSError as exc:  # a failing disk, a file cut short: say which file
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        return out

    def __setitem__(self, key, value) -> None:
        y0, y1, x0, x1 = self._region(key)
        self._check_open()
        if not self.writable:
            raise ValueError(f"{self.path.name}: label file opened read-only")
        block = np.broadcast_to(np.asarray(value, np.uint8), (y1 - y0, x1 - x0))
        if block.size == 0:
            return
        try:
            self._write(block, y0, y1, x0, x1)
        except OSError as exc:  # a full disk, a quota: say which file
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def _write(self, block: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        for c0, sw, offset in self._stripes(x0, x1):
            a, b = max(x0, c0), min(x1, c0 + sw)
            if a == c0 and b == c0 + sw:  # the stripe's whole width: write the rows as they are
                _pwrite_all(self._fd, np.ascontiguousarray(block[:, a - x0 : b - x0]), offset + y0 * sw)
                continue
            # Part of it: read those rows, patch, write back; under the lock, so that another
            # thread's patch of other columns in the same rows is not lost.
            with self._patching:
                slab = np.empty((y1 - y0, sw), np.uint8)
                _pread_into(self._fd, slab, offset + y0 * sw)
                slab[:, a - c0 : b - c0] = block[:, a - x0 : b - x0]
                _pwrite_all(self._fd, slab, offset + y0 * sw)


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):  # straight into the array
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # macOS: no preadv in Python's os there
            data = os.pread(fd, len(view) - done, offset + done)
            n = len(data)
            view[done : done + n] = data
        if n <= 0:
            raise OSError(errno.EIO, f"label file cut short at byte {offset + done} while in use")
        done += n


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
