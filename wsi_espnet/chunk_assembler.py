"""Write a (C, H, W) Zarr array from blocks that arrive in any shape, each chunk in one write.

Why: the stitcher emits blended probabilities cell by cell (a tile's interior, the overlap strips,
the corners), and a cell cuts across chunks.  Written as they come, every chunk would be decoded,
patched and re-encoded once per cell that touches it (``--probs`` cost 80 % on top of a run).  Here a
chunk is held in memory until every pixel it will ever receive has arrived, then written whole.
Which pixels a chunk will receive is known in advance: the kept tiles' rectangles (the stitcher emits
exactly their union, once).  With chunks aligned to the tile stride, a chunk completes within the
tile row that covers it, so only a few chunks are held at a time, never a row across the slide.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1


@dataclass
class _Chunk:
    buf: np.ndarray  # (C, rows, cols) of the chunk (clipped to the array)
    remaining: int  # pixels still to arrive
    top: int  # first row (absolute) not yet written to the array


class ChunkAssembler:
    """Collects ``write(y, x, block)`` calls for ``array`` (a Zarr array, (C, H, W)) and writes each
    chunk when the ``rects`` that cover it have all been delivered.  Rows above ``start_y`` are
    already on disk (a resumed run) and are neither expected nor written."""

    def __init__(self, array, rects: list[Rect], start_y: int = 0) -> None:
        self.array = array
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
        """Deliver ``block`` (C, h, w) at (y, x); parts above ``start_y`` or off the array are dropped."""
        h, w = block.shape[1:]
        y_lo, y_hi, x_hi = max(y, self.start_y), min(y + h, self.height), min(x + w, self.width)
        if y_hi <= y_lo or x_hi <= x:
            return
        for i in range(y_lo // self.ch, (y_hi - 1) // self.ch + 1):
            cy = i * self.ch
            a, b = max(y_lo, cy), min(y_hi, cy + self.ch)
            for j in range(x // self.cw, (x_hi - 1) // self.cw + 1):
                cx = j * self.cw
                c, d = max(x, cx), min(x_hi, cx + self.cw)
                chunk = self._open.get((i, j)) or self._start(i, j)
                chunk.buf[:, a - cy : b - cy, c - cx : d - cx] = block[:, a - y : b - y, c - x : d - x]
                chunk.remaining -= (b - a) * (d - c)
                if chunk.remaining <= 0:
                    self._store(i, j, chunk, cy + chunk.buf.shape[1])
                    del self._open[(i, j)]

    def flush_above(self, bottom: int) -> None:
        """Put every delivered row above ``bottom`` on disk (called before a resume point is
        recorded there), also of chunks still waiting for pixels below it."""
        for (i, j), chunk in self._open.items():
            if chunk.top < bottom:
                self._store(i, j, chunk, min(bottom, i * self.ch + chunk.buf.shape[1]))

    def close(self) -> None:
        """Write what is still held (nothing, when every expected pixel arrived)."""
        for (i, j), chunk in list(self._open.items()):
            self._store(i, j, chunk, i * self.ch + chunk.buf.shape[1])
        self._open.clear()

    @property
    def held_chunks(self) -> int:
        return len(self._open)

    def _start(self, i: int, j: int) -> _Chunk:
        cy, cx = i * self.ch, j * self.cw
        rows, cols = min(self.ch, self.height - cy), min(self.cw, self.width - cx)
        covered = np.zeros((rows, cols), bool)
        for y0, y1, x0, x1 in self._rects.pop((i, j), ()):
            covered[max(y0 - cy, 0) : y1 - cy, max(x0 - cx, 0) : x1 - cx] = True
        chunk = _Chunk(np.zeros((self.array.shape[0], rows, cols), self.array.dtype), int(covered.sum()),
                       max(cy, self.start_y))
        self._open[(i, j)] = chunk
        return chunk

    def _store(self, i: int, j: int, chunk: _Chunk, end: int) -> None:
        cy, cx = i * self.ch, j * self.cw
        if end > chunk.top:
            self.array[:, chunk.top : end, cx : cx + chunk.buf.shape[2]] = chunk.buf[:, chunk.top - cy : end - cy]
            chunk.top = end
