"""Write a (C, H, W) Zarr array from blocks that arrive in any shape, each chunk in one write.

Why: the stitcher emits blended probabilities cell by cell (a tile's interior, the overlap strips,
the corners), and a cell cuts across chunks.  Written as they come, every chunk would be decoded,
patched and re-encoded once per cell that touches it (``--probs`` cost 80 % on top of a run).  Here
the pieces of a chunk are held until every pixel it will ever receive has arrived, then the chunk is
written whole.  Which pixels a chunk will receive is known in advance: the kept tiles' rectangles
(the stitcher emits exactly their union, once).

Memory: with chunks aligned to the tile stride, a chunk completes within the tile row that covers
it.  Where it cannot (a chunk taller than a stride, or the strip below a tile whose neighbour below
has no tissue), :meth:`ChunkAssembler.flush_above` writes every row the finished bands have
delivered and drops it, so what is held is at most what the stitcher itself holds: the overlap strip
below the current tile row, never a chunk row across the slide.
"""

from __future__ import annotations

from collections import defaultdict, deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import numpy as np

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1


@dataclass
class _Chunk:
    y: int  # the chunk's first row and column (absolute)
    x: int
    rows: int  # its size, clipped to the array
    cols: int
    remaining: int  # pixels still to arrive
    top: int  # first row (absolute) not yet written to the array
    pieces: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (y, x, (C, h, w)) held


class ChunkAssembler:
    """Collects ``write(y, x, block)`` calls for ``array`` (a Zarr array, (C, H, W)) and writes each
    chunk when the ``rects`` that cover it have all been delivered.  Rows above ``start_y`` are
    already on disk (a resumed run) and are neither expected nor written.

    ``writer``: a thread for the chunk writes (compression and the file), at most ``MAX_PENDING``
    chunks behind; :meth:`flush_above` and :meth:`close` return only once everything handed to it
    is on disk.  Why: a chunk write costs ~8 ms, and the caller is the thread that blends between the
    model's batches, whose every millisecond the model waits for."""

    MAX_PENDING = 4

    def __init__(self, array, rects: list[Rect], start_y: int = 0, writer: Executor | None = None) -> None:
        self.array = array
        self.writer = writer
        self._pending: deque[Future] = deque()
        _, self.height, self.width = array.shape
        self.ch, self.cw = array.chunks[1], array.chunks[2]
        self.start_y = start_y
        self._rects: dict[tuple[int, int], list[Rect]] = defaultdict(list)
        for y0, y1, x0, x1 in rects:
            y0, y1, x1 = max(y0, start_y), min(y1, self.height), min(x1, self.width)
            if y1 <= y0 or x1 <= x0:
                continue
            for i in range(y0 // self.ch, (y1 - 1) // self.ch + 1):
                for j in range(x0 // self.cw, (x1 - 1) // self.cw + 1):
                    self._rects[(i, j)].append((y0, y1, x0, x1))
        self._open: dict[tuple[int, int], _Chunk] = {}

    def write(self, y: int, x: int, block: np.ndarray) -> None:
        """Deliver ``block`` (C, h, w) at (y, x); parts above ``start_y`` or off the array are dropped.
        The block is copied (as the array's dtype): the caller may reuse it."""
        h, w = block.shape[1:]
        y_lo, y_hi, x_hi = max(y, self.start_y), min(y + h, self.height), min(x + w, self.width)
        if y_hi <= y_lo or x_hi <= x:
            return
        for i in range(y_lo // self.ch, (y_hi - 1) // self.ch + 1):
            a, b = max(y_lo, i * self.ch), min(y_hi, (i + 1) * self.ch)
            for j in range(x // self.cw, (x_hi - 1) // self.cw + 1):
                c, d = max(x, j * self.cw), min(x_hi, (j + 1) * self.cw)
                chunk = self._open.get((i, j)) or self._start(i, j)
                chunk.pieces.append((a, c, block[:, a - y : b - y, c - x : d - x].astype(self.array.dtype)))
                chunk.remaining -= (b - a) * (d - c)
                if chunk.remaining <= 0:
                    self._store(chunk, chunk.y + chunk.rows)
                    del self._open[(i, j)]

    def flush_above(self, bottom: int) -> None:
        """Write every delivered row above ``bottom`` and let go of it.  Call it once nothing more
        will arrive above ``bottom`` (a band is finished), before a resume point is recorded there."""
        for chunk in self._open.values():
            if chunk.top < bottom:
                self._store(chunk, min(bottom, chunk.y + chunk.rows))
        self._wait(0)

    def close(self) -> None:
        """Write what is still held (nothing, when every expected pixel arrived), and wait for it."""
        for chunk in self._open.values():
            self._store(chunk, chunk.y + chunk.rows)
        self._open.clear()
        self._wait(0)

    def _wait(self, pending: int) -> None:
        """Wait until at most ``pending`` writes are left in flight (their errors raised here)."""
        while len(self._pending) > pending:
            self._pending.popleft().result()

    @property
    def held_chunks(self) -> int:
        return len(self._open)

    def held_bytes(self) -> int:
        return sum(p.nbytes for chunk in self._open.values() for _, _, p in chunk.pieces)

    def _start(self, i: int, j: int) -> _Chunk:
        rects = self._rects.pop((i, j), None)
        if rects is None:  # completed already, or outside every kept tile: the caller broke the contract
            raise AssertionError(f"pixels delivered twice, or where no tile was kept, in chunk {(i, j)}")
        cy, cx = i * self.ch, j * self.cw
        rows, cols = min(self.ch, self.height - cy), min(self.cw, self.width - cx)
        covered = np.zeros((rows, cols), bool)
        for y0, y1, x0, x1 in rects:
            covered[max(y0 - cy, 0) : y1 - cy, max(x0 - cx, 0) : x1 - cx] = True
        chunk = _Chunk(cy, cx, rows, cols, int(covered.sum()), max(cy, self.start_y))
        self._open[(i, j)] = chunk
        return chunk

    def _store(self, chunk: _Chunk, end: int) -> None:
        """Write rows [chunk.top, end) from the pieces held (zeros where none), keep the rest."""
        if end <= chunk.top:
            return
        buf = np.zeros((self.array.shape[0], end - chunk.top, chunk.cols), self.array.dtype)
        kept = []
        for py, px, piece in chunk.pieces:
            a, b = max(py, chunk.top), min(py + piece.shape[1], end)
            if b > a:
                buf[:, a - chunk.top : b - chunk.top, px - chunk.x : px - chunk.x + piece.shape[2]] = piece[:, a - py : b - py]
            if py + piece.shape[1] > end:  # rows below ``end`` stay (copied out if cut, so the rest is freed)
                kept.append((py, px, piece) if py >= end else (end, px, piece[:, end - py :].copy()))
        chunk.pieces = kept
        region = (slice(None), slice(chunk.top, end), slice(chunk.x, chunk.x + chunk.cols))
        chunk.top = end
        if self.writer is None:
            self.array[region] = buf
            return
        self._wait(self.MAX_PENDING - 1)
        self._pending.append(self.writer.submit(self.array.__setitem__, region, buf))
