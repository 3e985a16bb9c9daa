"""Process-wide settings for a process whose job is inference, and memory that costs nothing until
it is touched.

Library functions never change the process they run in; the command-line entry points (``wsi-segment``,
``wsi-espnet segment``/``predict``, the batch pipeline's workers) call :func:`tune_for_inference`
once, before PyTorch is imported, because those processes exist to run the model.  Measured on the
project's 2-core CPU (docs/performance.md):

* :func:`retain_freed_memory`: glibc hands every freed block above its mmap threshold (at most 32 MiB)
  back to the kernel, so each batch's feature maps fault in (and are zeroed) anew: the model runs
  ~20 % faster on tiles without it, and a batch of 8 no longer costs 30 % more per tile than 4.
* ``GOMP_SPINCOUNT``: after each parallel region PyTorch's OpenMP threads spin 300,000 times before
  they sleep (~3 ms here), which between the model's batches takes a core from the reading and
  blending that must happen there (6 ms of CPU per batch of 4 tiles).  30,000 left the model's own
  speed unchanged.  Read by libgomp when it loads, so it only counts before ``import torch``.
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np

GOMP_SPINCOUNT = "30000"


def tune_for_inference() -> dict[str, bool]:
    """Apply this module's settings to the current process (a user's own ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` wins); returns which took effect."""
    spin = False
    if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
        spin = True
    return {"gomp_spincount": spin, "retain_freed_memory": retain_freed_memory()}


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
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose pages become resident only where it is written, whatever the allocator's
    settings (an anonymous mapping: ``np.zeros`` from a heap that keeps freed memory would clear,
    and so make resident, all of it).  For buffers as wide as the slide that mostly hold glass."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    mapping = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return np.frombuffer(mapping, dtype, count=count).reshape(shape)
