"""Process-wide settings for a process whose job is inference, and memory that costs nothing until
it is touched.

Library functions never change the process they run in; the command-line entry points (``wsi-segment``,
``wsi-espnet segment``/``predict``, the batch pipeline's workers) call :func:`tune_for_inference`
once, before PyTorch is imported, because those processes exist to run the model.  Measured on the
project's 2-core CPU (docs/performance.md):

* :func:`retain_freed_memory`: glibc hands every freed block above its mmap threshold (at most 32 MiB)
  back to the kernel, so each batch's feature maps fault in (and are zeroed) anew: the model runs
  ~20 % faster on tiles without it, and a batch of 8 no longer costs 30 % more per tile than 4.
* :func:`one_malloc_arena`: one heap for all threads, so that what one thread frees (and the heap
  keeps) serves the others: a run with every output peaked 150-200 MB lower.
* ``GOMP_SPINCOUNT``: after each parallel region PyTorch's OpenMP threads spin 300,000 times before
  they sleep (~3 ms here), which between the model's batches takes a core from the reading and
  blending that must happen there (6 ms of CPU per batch of 4 tiles).  30,000 left the model's own
  speed unchanged.  Read by libgomp when it loads, so it only counts before ``import torch``.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

GOMP_SPINCOUNT = "30000"


def tune_for_inference() -> dict[str, bool]:
    """Apply this module's settings to the current process (a user's own ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` wins); returns which took effect."""
    spin = False
    if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
        spin = True
    return {"gomp_spincount": spin, "retain_freed_memory": retain_freed_memory(), "one_malloc_arena": one_malloc_arena()}


def retain_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and to keep freed memory (up to 1 GiB at
    the heap's top) in the process instead of handing it back to the kernel (``mallopt``:
    ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` 1 GiB).

    Why: a 1024×512 frame allocates ~150 MB of feature maps and a 42 MB output, and frees them
    again.  By default glibc maps every block above its mmap threshold (at most 32 MiB) straight
    from the kernel and unmaps it on free, so each frame's pages fault and are zeroed anew: 45 ms
    of system time per frame on this machine (25,000 page faults), 20% of the work.  With this set
    the same frame takes no page faults at all.  Peak memory is unchanged; resident memory stays
    at its peak instead of shrinking between frames.  Large buffers that must stay lazily zeroed
    come from :func:`lazy_zeros` instead.  Process-wide; returns False (and does nothing) where
    the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def one_malloc_arena() -> bool:
    """Have every thread allocate from glibc's one main heap (``M_ARENA_MAX`` 1; a user's own
    ``MALLOC_ARENA_MAX`` wins).  Returns whether it was set.

    Why: glibc gives threads heaps of their own (up to 8 per core), and with
    :func:`retain_freed_memory` each keeps what it frees for itself.  The feature maps the model
    frees on the main thread then cannot serve the reader, labeler or GeoJSON tracing threads, which
    grow heaps of their own beside it: a ``wsi-segment --probs --geojson`` run peaked 150-200 MB
    higher (941-993 against 744-753 MB on a 20k² demo slide), its speed the same either way.  Call
    it before threads start: a thread that has a heap keeps it, and once glibc has settled how many
    heaps there may be (at its ninth) this changes nothing.  It cannot be undone."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULT_MMAP_MAX = 65536  # glibc's own default
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_scoped_lock = threading.Lock()
_scoped_users = 0


@contextmanager
def retained_memory() -> Iterator[bool]:
    """:func:`retain_freed_memory` for the duration of a block, in a process that is not ours to
    tune for good (a Dask worker of someone else's cluster): afterwards the C library's settings are
    those the process was started with (``MALLOC_TRIM_THRESHOLD_`` as its environment says, else
    glibc's defaults) and the kept memory goes back to the system (``malloc_trim``).  Nested and
    concurrent blocks share one tuning, undone when the last ends.  Yields whether it applied.

    Why: Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes
    glibc's mmap threshold at its 128 KiB floor: each batch's feature maps are then mapped, faulted in
    and unmapped anew, and the model ran 2x slower on such workers (README, *Batch*)."""
    global _scoped_users
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _scoped_lock:
        _scoped_users += 1
        if _scoped_users == 1:
            retain_freed_memory()
    try:
        yield True
    finally:
        with _scoped_lock:
            _scoped_users -= 1
            if _scoped_users == 0:
                try:
                    trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", _DEFAULT_TRIM_THRESHOLD))
                except ValueError:
                    trim = _DEFAULT_TRIM_THRESHOLD
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, trim)
                libc.malloc_trim(0)


def _glibc():
    """The C library, where it is glibc (whose ``mallopt`` these settings are), else None."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose pages become resident only where it is written, whatever the allocator's
    settings (an anonymous mapping: ``np.zeros`` from a heap that keeps freed memory would clear,
    and so make resident, all of it).  For buffers as wide as the slide that mostly hold glass."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    mapping = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return np.frombuffer(mapping, dtype, count=count).reshape(shape)
