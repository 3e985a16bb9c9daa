"""Process settings of the command-line entry points, and lazily zeroed buffers."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest

from wsi_espnet.runtime import lazy_zeros

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _child(code: str) -> str:
    """Run ``code`` in a fresh interpreter (process settings must not leak into the test session),
    without a GOMP_SPINCOUNT or OMP_WAIT_POLICY of the caller's."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_lazy_zeros_is_a_writable_zero_array():
    a = lazy_zeros((3, 5, 7), np.uint16)
    assert a.shape == (3, 5, 7) and a.dtype == np.uint16 and not a.any()
    a[1, 2, 3] = 65535
    assert a.sum() == 65535
    assert lazy_zeros((0, 4), np.uint8).shape == (0, 4)


RSS = """
import numpy as np
from wsi_espnet.runtime import lazy_zeros, retain_freed_memory

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

assert retain_freed_memory()
before = rss()
lazy = lazy_zeros((200, 1_000_000), np.uint8)  # 200 MB, as wide as a large slide's label band
lazy[:10, :100_000] = 1  # a little tissue
touched = rss() - before
lazy[:] = 2  # all of it
del lazy
lazy_after = rss() - before
heap = np.zeros((200, 1_000_000), np.uint8)  # the same from the heap that keeps freed memory
heap[:] = 2
del heap
print(touched, lazy_after, rss() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_lazy_zeros_holds_only_what_is_written_and_gives_it_back():
    """With the heap keeping freed memory (as the CLI sets it), a slide-wide buffer from ``np.zeros``
    stays resident after the slide; ``lazy_zeros`` holds only the pages written, and returns them."""
    touched, lazy_after, heap_after = map(int, _child(RSS).split())
    assert touched < 20
    assert lazy_after < 20
    assert heap_after > 150  # what it guards against: 200 MB kept by the heap for good


TUNE = """
import os, sys
{pre}
from wsi_espnet.runtime import tune_for_inference
print(tune_for_inference(), os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tune_for_inference_sets_what_it_can_and_leaves_a_users_choice():
    fresh = _child(TUNE.format(pre=""))
    assert fresh == "{'gomp_spincount': True, 'retain_freed_memory': True, 'one_malloc_arena': True} 30000"
    late = _child(TUNE.format(pre="import torch"))  # libgomp already read its settings
    assert late.startswith("{'gomp_spincount': False, 'retain_freed_memory': True, 'one_malloc_arena': True}")
    users = _child(TUNE.format(pre="os.environ['MALLOC_ARENA_MAX'] = '4'"))  # the user's own choice wins
    assert users.startswith("{'gomp_spincount': True, 'retain_freed_memory': True, 'one_malloc_arena': False}")


ARENAS = """
import threading
import numpy as np
from wsi_espnet.runtime import one_malloc_arena, retain_freed_memory

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

{tune}
assert retain_freed_memory()
def work():  # 200 MB in blocks of 4 MB (each far below a thread heap's 64 MB), then freed
    blocks = [np.ones(4_000_000, np.uint8) for _ in range(50)]
    del blocks

work()  # on the main thread: its heap keeps the memory
before = rss()

t = threading.Thread(target=work)
t.start()
t.join()
print(rss() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_one_malloc_arena_lets_threads_reuse_what_the_main_thread_freed():
    shared = int(_child(ARENAS.format(tune="assert one_malloc_arena()")))
    apart = int(_child(ARENAS.format(tune="")))
    assert shared < 20  # served from the main heap's kept memory
    assert apart > 80  # what it guards against: a second heap beside it (123 MB measured)
    users = _child(TUNE.format(pre="os.environ['GOMP_SPINCOUNT'] = '5'"))
    assert users.endswith(" 5") and "'gomp_spincount': False" in users


SCOPED = """
import resource
import numpy as np
from wsi_espnet.runtime import retained_memory

np._core.multiarray._set_madvise_hugepage(False)  # count 4 KiB pages, as torch's allocations fault them

def faults_per_round(rounds=4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = np.ones(8_000_000, np.float64)  # 64 MB, touched: a batch's feature map
        del a
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // rounds

faults_per_round(1)
outside = faults_per_round()
with retained_memory() as applied:
    faults_per_round(1)  # the first allocation faults in once
    inside = faults_per_round()
after = faults_per_round()
print(applied, outside, inside, after)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_retained_memory_for_a_block_then_the_workers_own_settings():
    """A Dask worker starts with MALLOC_TRIM_THRESHOLD_=65536: every large block is mapped and faulted
    in anew.  Inside the block freed memory is kept (no faults after the first round); afterwards the
    worker's own settings are back (the faults too)."""
    import os

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", SCOPED], capture_output=True, text=True, check=True, env=env).stdout
    applied, outside, inside, after = out.split()
    assert applied == "True"
    assert int(outside) > 10_000  # 64 MB is 15,625 pages of 4 KiB
    assert int(inside) < 500
    assert int(after) > 10_000



def test_output_piped_into_head_ends_quietly(monkeypatch):
    """`wsi-espnet ... | head -1`: the reader closes the pipe early, the next write raises
    BrokenPipeError (an OSError); the command ends with exit 0, not a traceback."""
    import sys

    from wsi_espnet import cli

    def printing_into_a_closed_pipe() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # run_guarded swaps it for devnull: put it back after
    assert cli.run_guarded(printing_into_a_closed_pipe) == 0
