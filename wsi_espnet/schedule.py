"""How reading, the model and the blending share the machine during a whole-slide run.

The model's batches are cut once for the slide (:func:`feed_batches`); tiles are read and decoded on
a thread pool ahead of their use (:class:`TileReader`; OpenSlide and the codecs release the GIL).
What runs beside what is the *schedule* (:func:`choose_schedule`):

* ``beside``: with an accelerator, or CPU cores the model leaves free, reading runs ahead and
  blending one batch behind (on a thread of its own) while the model works.
* ``streams``: a CPU model with every core runs as :data:`MODEL_STREAMS` calls side by side, each on
  its share of the threads (:class:`ModelStreams`), while the caller blends the results in feed
  order.  Reading and blending beside one call on every core would preempt one of its threads
  mid-layer and stall all the others at the next barrier; beside two calls of fewer threads, a
  core taken delays one stream only, and while one stream's batch is blended the other computes.
* ``between``: reading and blending between the model's batches (an engine that cannot split its
  threads between calls, or one core): the model runs as fast as alone, and the cores idle while
  one thread blends.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from .engine import Engine, available_cores
from .errors import UserError
from .slide import Slide
from .stitch import Band
from .tiling import Tile

SCHEDULES = ("auto", "beside", "between", "streams")  # SegmentOptions.schedule; see choose_schedule
MODEL_STREAMS = 2  # model calls side by side under the "streams" schedule


def read_tile(slide: Slide, t: Tile, mpp: float) -> np.ndarray:
    return slide.read_at_mpp(t.x, t.y, t.width, t.height, mpp)


def feed_batches(bands: list[Band], batch: int, first_band: int = 0) -> tuple[list[list[Tile]], int]:
    """The model's batches: the grid's tiles in feed order, ``batch`` at a time across bands (a
    slide's bands often hold one or two tissue tiles: per band, most batches would be short).

    Resuming at ``first_band``, the batches are still cut from the start of the slide, so that each
    tile is run in the same batch as before (batch composition changes the model's floating-point
    results); returns the batches from the one holding ``first_band``'s first tile on, and how many
    tiles of earlier bands lead that batch (run, not blended)."""
    order = [t for b in bands for t in b.tiles]
    skip = sum(len(b.tiles) for b in bands[:first_band])
    if skip == len(order):  # no tile left to blend
        return [], 0
    start = skip - skip % batch
    return [order[i : i + batch] for i in range(start, len(order), batch)], skip - start


class TileReader:
    """Decoded tiles, a batch at a time in feed order, read on a thread pool ahead of their use.
    The caller says when reading may start (:meth:`read_ahead`): beside the model, or only once the
    model has let go of the cores."""

    def __init__(self, slide: Slide, batches: list[list[Tile]], mpp: float, workers: int) -> None:
        self.slide, self.mpp = slide, mpp
        self.batches = batches
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tile-reader")
        self._queue: deque[tuple[list[Tile], list[Future]]] = deque()  # batches whose reads started
        self._next = 0  # index of the first batch not started

    def read_ahead(self, batches: int) -> None:
        """Start reading until ``batches`` batches are read or being read ahead of the consumer."""
        while self._next < len(self.batches) and len(self._queue) < batches:
            tiles = self.batches[self._next]
            self._queue.append((tiles, [self._pool.submit(read_tile, self.slide, t, self.mpp) for t in tiles]))
            self._next += 1

    def next_batch(self) -> tuple[list[Tile], np.ndarray]:
        """The next batch's tiles and their (N, h, w, 3) pixels, waiting for reads still running."""
        self.read_ahead(1)
        tiles, futures = self._queue.popleft()
        return tiles, np.stack([f.result() for f in futures])

    def close(self) -> None:
        """Also when the consumer stops early (an error, Ctrl-C): no read may outlive this reader,
        because the caller closes the slide next and OpenSlide aborts the process on a read from a
        closed handle."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class ModelStreams:
    """The model's batches run on ``streams`` threads of their own (schedule "streams"), each thread
    taking the next batch as soon as it is free; results are handed out in feed order.  ``run(tiles,
    images)`` is the model's call on a batch.

    Why not in turn: two streams started together would stay in step, and the second would wait, at
    every batch, for the first's batch to be blended before it got its next one (the model was
    idle 5-8 % of the run so).  At most ``streams + 1`` batches are taken and not yet handed out,
    so a slow consumer holds a bounded number of results."""

    def __init__(self, reader: TileReader, run: Callable[[list[Tile], np.ndarray], Any], count: int,
                 streams: int) -> None:
        self._reader, self._run, self._streams = reader, run, streams
        self._results: list[Future | None] = [Future() for _ in range(count)]
        self._next = 0  # the next batch to take
        self._lock = threading.Lock()  # taking a batch: its index and its tiles, in order
        self._room = threading.Semaphore(streams + 1)
        self._stop = False
        reader.read_ahead(2 * streams)
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="model")
        for _ in range(streams):
            self._pool.submit(self._stream)

    def _stream(self) -> None:
        while True:
            self._room.acquire()
            try:
                with self._lock:
                    if self._stop or self._next >= len(self._results):
                        return
                    result = self._results[self._next]
                    self._next += 1
                    tiles, images = self._reader.next_batch()
                    self._reader.read_ahead(self._streams)
                result.set_result((tiles, self._run(tiles, images)))
            except BaseException as exc:  # a read or the model, KeyboardInterrupt too: the consumer raises it
                self._stop = True
                result.set_exception(exc)
                return

    def result(self, i: int) -> tuple[list[Tile], Any]:
        """Batch ``i``'s tiles and what ``run`` gave for them, waiting for them; call for 0, 1, 2...
        in turn."""
        tiles_probs = self._results[i].result()
        self._results[i] = None
        self._room.release()
        return tiles_probs

    def close(self) -> None:
        """Stop taking batches and wait for the calls running (also after an error or Ctrl-C)."""
        self._stop = True
        for _ in range(self._streams):
            self._room.release()
        self._pool.shutdown(wait=True)


def cores_free_beside(engine: Engine) -> bool:
    """Whether reading and blending can run beside the model without taking its cores: when it runs
    on an accelerator, or on fewer CPU threads than this process has cores (``--threads``).

    On CPU with a thread per core they cannot; run beside it anyway, they take a core mid-layer and
    the model's threads, which meet at a barrier after every layer, all wait for the one preempted
    (measured on 2 cores: the model's calls took 12 % longer than alone).  Then the model runs as
    streams instead, or they run between its batches (:func:`choose_schedule`)."""
    if not str(getattr(engine, "device", "cpu")).startswith("cpu"):
        return True
    threads = getattr(engine, "cpu_threads", None)
    return threads is not None and threads < available_cores()


def default_batch(device: str) -> int:
    """Tiles per model call when none is given: 2 on a CPU, 4 on an accelerator.

    On a CPU a call of 2 tiles is the fastest per tile, on one thread or two (one thread: 40.8 ms a
    512² tile against 41.8 for calls of 1, 42.6 for 4 and 44.1 for 8: a larger call's feature maps
    outgrow the caches; docs/performance.md, session 16), and under "streams" the two calls side by
    side then hold as many tiles' feature maps as one call of 4 (at 4 each the run's peak grew by
    350 MB)."""
    return 2 if str(device).startswith("cpu") else 4


def choose_schedule(engine: Engine, schedule: str = "auto") -> str:
    """What ``schedule="auto"`` means for ``engine``: "beside" where cores are free beside the model
    (:func:`cores_free_beside`); else "streams" where the engine can split its threads between
    calls (``threads_per_call``: PyTorch and ONNX Runtime) and has at least two, else "between".

    Why streams: between the model's batches the blending adds are one thread's work, and the other
    cores idle through it; on 2 cores that and the reads left the model ~12 % of the run idle.  As
    two calls of one thread each, one stream's model runs while the other's batch is blended, and a
    core taken by a reader delays only the thread on it (no barrier waits on it).  Two one-thread
    calls side by side are also no slower than one two-thread call on the model alone (2 cores:
    24.6-25.8 against 23.0-24.8 tiles/s).

    "streams" asked for an engine without ``threads_per_call`` is a :class:`UserError`."""
    if schedule == "streams" and not hasattr(engine, "threads_per_call"):
        raise UserError("schedule 'streams' needs an engine that can split its threads between calls "
                        "(threads_per_call: the torch and onnxruntime engines can)")
    if schedule != "auto":
        return schedule
    if cores_free_beside(engine):
        return "beside"
    threads = getattr(engine, "cpu_threads", None) or 1
    return "streams" if threads >= MODEL_STREAMS and hasattr(engine, "threads_per_call") else "between"


def model_threads(engine: Engine, schedule: str) -> contextlib.AbstractContextManager:
    """Under "streams", each model call gets its share of the engine's threads for the run."""
    if schedule != "streams":
        return contextlib.nullcontext()
    return engine.threads_per_call(max(1, (getattr(engine, "cpu_threads", None) or 1) // MODEL_STREAMS))
