"""Overlap blending of tile predictions into a whole-slide label map, in bounded memory.

Why cells: every tile edge of the grid cuts the image into rectangular *cells*; each cell is covered
by a fixed set of tiles (one in a tile's interior, two or four where tiles overlap).  A cell is final
once all of its covering tiles have been seen, so with tiles fed in raster order only the cells in
the overlap strip below the current tile row (and beside the current tile) are ever pending.  Memory
is O(overlap × width × classes) 16-bit values (the strip, packed: see ``_pack``) plus float32 cells
around the current tile, never a full-slide float buffer, and interior cells (one tile) skip the
blending arithmetic altogether.

Why this window: each tile's probabilities are weighted by a separable raised-cosine ramp over the
``overlap`` pixels at each border (``sin²``, flat 1 inside).  Two neighbours overlapping by exactly
``overlap`` then have weights summing to 1 across the seam, a clean cross-fade in which each pixel is
dominated by the tile that sees it farther from its border (where zero padding has less effect).
A Gaussian window would instead mix every pixel with border-affected neighbours and down-weight the
tile centres for nothing.  The weights never reach 0, so a pixel seen by one tile keeps its value.
The label is the argmax of the weighted average (taken on the weighted sum: the same, without the
rounding of a division); ties go to the lower class id (numpy's argmax).
"""

from __future__ import annotations

import bisect
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .labels import Box, class_argmax
from .runtime import lazy_zeros
from .tiling import Tile, TileGrid

_PACK_SCALE = 65535  # uint16 fixed point for probabilities in [0, 1]


def border_ramp(tile: int, overlap: int) -> np.ndarray:
    """1-D window: sin² ramp over ``overlap`` pixels at both ends, 1 inside; strictly positive."""
    w = np.ones(tile, np.float32)
    if overlap > 0:
        u = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
        ramp = np.sin(0.5 * np.pi * u) ** 2
        w[:overlap] = ramp
        w[tile - overlap :] = ramp[::-1]
    return w


@dataclass(frozen=True)
class Band:
    """Tile rows fed together, and their tiles in feed order.  Everything above ``bottom`` (the
    top of the next band, or the image's height) is final once the band has been fed."""

    rows: tuple[int, ...]
    tiles: list[Tile]
    top: int
    bottom: int


def feed_bands(grid: TileGrid) -> list[Band]:
    """The grid's kept tiles in the order that keeps pending state thin: tile row by tile row, except
    that the last row (flush with the far edge, so it overlaps its neighbour by more than
    ``overlap``) is interleaved column by column with the row before it.  Fed row by row, that wide
    overlap would stay pending across the whole slide width; interleaved, only around one tile."""
    per_row: list[list[Tile]] = [[] for _ in grid.ys]
    for t in grid.tiles:
        per_row[t.row].append(t)
    groups = [[r] for r in range(len(grid.ys))]
    ys = list(grid.ys)
    if len(ys) >= 2 and ys[-2] + grid.tile - ys[-1] > grid.overlap:
        groups = groups[:-2] + [[len(ys) - 2, len(ys) - 1]]
    bands = []
    for i, rows in enumerate(groups):
        tiles = sorted((t for r in rows for t in per_row[r]), key=lambda t: (t.col, t.row))
        bottom = ys[groups[i + 1][0]] if i + 1 < len(groups) else grid.image_size[1]
        bands.append(Band(tuple(rows), tiles, ys[rows[0]], bottom))
    return bands


@dataclass
class _Cell:
    key: tuple[int, int]
    y0: int
    y1: int
    x0: int
    x1: int
    pending: int
    acc: np.ndarray | None = None  # (C, h, w) weighted probability sum
    packed: np.ndarray | None = None  # or, waiting for the next row, the partial average as uint16
    packed_rows: slice | None = None  # where in the strip buffer
    seen: list[tuple[int, int]] = field(default_factory=list)  # (y, x) of the tiles summed so far


@dataclass
class _Axis:
    """Cuts along one axis and, for each tile start, the range of cell indices it spans."""

    starts: list[int]
    tile: int
    cuts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.cuts = sorted({s for s in self.starts} | {s + self.tile for s in self.starts})

    def covering(self, pos: int) -> list[int]:
        """Indices of the tiles whose span contains ``pos`` (at most a few)."""
        i = bisect.bisect_right(self.starts, pos) - 1
        out = []
        while i >= 0 and self.starts[i] + self.tile > pos:
            out.append(i)
            i -= 1
        return out

    def cells_of(self, start: int) -> range:
        a = bisect.bisect_left(self.cuts, start)
        b = bisect.bisect_left(self.cuts, start + self.tile)
        return range(a, b)


class BlendStitcher:
    """Accumulates tile probabilities (fed in raster order) and emits each cell as soon as it is
    final: its label map to ``on_labels(y, x, labels)`` and, if given, its blended probabilities to
    ``on_probs(y, x, probs)``.  Coordinates are pixels of the working-resolution image; parts of tiles
    beyond the image (a padded tile on a small image) are cropped.

    Only the grid's kept tiles (tissue) are expected; cells seen by none of them are never emitted —
    the caller's output keeps its fill value (background).

    ``labeler``: a thread pool for the cells' argmax; the labels then reach ``on_labels`` at
    :meth:`deliver`.  Why: blending is sequential (a cell's sum needs its tiles in order) but a
    finished cell's argmax is not, and on a CPU-bound run every millisecond the pipeline spends on
    one core between the model's batches is a millisecond the model waits.  Fed the way
    :func:`~wsi_espnet.labels.predict_split` gives tiles, a tile's own cell arrives as labels, so
    only the overlap cells go to the pool (taking those inline too measured no faster on 2 cores).
    """

    def __init__(
        self,
        grid: TileGrid,
        num_classes: int,
        on_labels: Callable[[int, int, np.ndarray], None],
        on_probs: Callable[[int, int, np.ndarray], None] | None = None,
        labeler: Executor | None = None,
    ) -> None:
        self.width, self.height = grid.image_size
        self.tile, self.overlap, self.num_classes = grid.tile, grid.overlap, num_classes
        self.xs = _Axis(list(grid.xs), grid.tile)
        self.ys = _Axis(list(grid.ys), grid.tile)
        self.on_labels, self.on_probs = on_labels, on_probs
        self.labeler = labeler
        self._labeling: deque[tuple[int, int, Future | np.ndarray]] = deque()  # (y, x, labels or their computing)
        ramp = border_ramp(grid.tile, grid.overlap)
        self.window = np.outer(ramp, ramp)
        # Only the tiles that will be fed count towards a cell's coverage.
        self.present = {(t.row, t.col) for t in grid.tiles}
        self._row_cols: dict[int, list[int]] = {}  # per tile row, the columns that will be fed
        for r, c in sorted(self.present):
            self._row_cols.setdefault(r, []).append(c)
        self._cells: dict[tuple[int, int], _Cell] = {}
        self._boxes: dict[tuple[int, int], Box | None] = {}  # label_box's answers
        self._strip: np.ndarray | None = None  # packed overlap strip (see _pack)
        self._in_use: np.ndarray | None = None  # strip pixels holding a packed cell
        self.emitted_pixels = 0

    @property
    def rows(self) -> list[int]:
        return self.ys.starts

    @property
    def cols(self) -> list[int]:
        return self.xs.starts

    def _coverage(self, cy: int, cx: int) -> int:
        rows = self.ys.covering(self.ys.cuts[cy])
        cols = self.xs.covering(self.xs.cuts[cx])
        return sum((r, c) in self.present for r in rows for c in cols)

    def _cell(self, cy: int, cx: int) -> _Cell:
        cell = self._cells.get((cy, cx))
        if cell is None:
            y0, y1 = self.ys.cuts[cy], self.ys.cuts[cy + 1]
            x0, x1 = self.xs.cuts[cx], self.xs.cuts[cx + 1]
            cell = _Cell((cy, cx), y0, y1, x0, x1, pending=self._coverage(cy, cx))
            self._cells[(cy, cx)] = cell
        return cell

    def label_box(self, row: int, col: int) -> Box | None:
        """The tile-local box (y0, y1, x0, x1) of grid tile (row, col)'s largest cell that no other
        kept tile covers, or None: inside it the blended label is this tile's own argmax, so
        :meth:`add` can take the labels there instead of probabilities
        (:func:`~wsi_espnet.labels.predict_split`).  Depends only on the grid: safe from any thread."""
        if (row, col) in self._boxes:
            return self._boxes[row, col]
        ty, tx = self.ys.starts[row], self.xs.starts[col]
        best, area = None, 0
        for cy in self.ys.cells_of(ty):
            for cx in self.xs.cells_of(tx):
                if self._coverage(cy, cx) != 1:
                    continue
                y0, y1 = self.ys.cuts[cy], self.ys.cuts[cy + 1]
                x0, x1 = self.xs.cuts[cx], self.xs.cuts[cx + 1]
                if (y1 - y0) * (x1 - x0) > area:
                    best, area = (y0 - ty, y1 - ty, x0 - tx, x1 - tx), (y1 - y0) * (x1 - x0)
        self._boxes[row, col] = best  # asked for by the model's thread, then by add
        return best

    def add(self, row: int, col: int, probs: np.ndarray, box_labels: np.ndarray | None = None,
            weighted: bool = False) -> None:
        """Feed the (C, tile, tile) probabilities of grid tile (row, col).  With ``box_labels``, the
        labels inside :meth:`label_box` (where ``probs`` may then hold anything: they are not read);
        ``weighted``: ``probs`` come multiplied by :attr:`window` already
        (:func:`~wsi_espnet.labels.predict_split`).  Neither with probabilities as an output
        (``on_probs``), which needs them everywhere and as they are."""
        if (box_labels is not None or weighted) and self.on_probs is not None:
            raise ValueError("box labels or weighted probabilities, but this stitcher writes probabilities")
        box = self.label_box(row, col) if box_labels is not None else None
        ty, tx = self.ys.starts[row], self.xs.starts[col]
        # Cells below the next row's top and left of the next tile this row will feed get nothing
        # more from this row: they wait, packed, for the next one.
        below = self.ys.starts[row + 1] if row + 1 < len(self.ys.starts) else self.height + self.tile
        cols = self._row_cols.get(row, [])
        i = bisect.bisect_right(cols, col)
        right = self.xs.starts[cols[i]] if i < len(cols) else self.width + self.tile
        for cy in self.ys.cells_of(ty):
            for cx in self.xs.cells_of(tx):
                cell = self._cell(cy, cx)
                sy = slice(cell.y0 - ty, cell.y1 - ty)
                sx = slice(cell.x0 - tx, cell.x1 - tx)
                if cell.pending == 1 and not cell.seen:
                    # Seen by this tile alone: the weighted average is the tile's own value.
                    if box is not None and (sy.start, sy.stop, sx.start, sx.stop) == box:
                        self._emit(cell, None, labels=box_labels)
                    else:
                        self._emit(cell, probs[:, sy, sx])
                    continue
                if cell.packed is not None:
                    cell.acc = cell.packed * (self._weight_sum(cell) / np.float32(_PACK_SCALE))
                    cell.packed = None
                    self._in_use[cell.packed_rows, cell.x0 : cell.x1] = False
                part = probs[:, sy, sx] if weighted else probs[:, sy, sx] * self.window[sy, sx]
                if cell.acc is None:
                    cell.acc = part.copy() if weighted else part  # never a view of the batch: it would pin it
                else:
                    cell.acc += part
                cell.seen.append((ty, tx))
                cell.pending -= 1
                if cell.pending == 0:
                    self._emit(cell, cell.acc, blended=True)
                elif cell.y0 >= below and cell.x1 <= right:
                    self._pack(cell, below)  # waits for the next tile row: the strip across the width

    def _pack(self, cell: _Cell, top: int) -> None:
        """Keep a pending cell of the overlap strip below a tile row as its partial average in 16-bit
        fixed point (step 1/65535: at most 7.6e-6 off per probability, the size of the model's own
        float noise, so a label can change only at a tie; probabilities are clipped to [0, 1]).

        Why: that strip, C values per pixel across the whole width, is the one part of memory that
        grows with the slide.  Packed, it takes half the bytes, and it lives in one buffer allocated
        once, shared by all strips: a strip cell is unpacked (by the tile below it) before the cell
        under that tile, at the same x, is packed (buffer rows count from ``top``, the next tile row's
        first pixel row).  Thousands of long-lived small arrays would instead pin the C library's
        heap, which then grows with the run.  Taller strips (the last two rows, fed together) are
        consumed at once and stay as they are."""
        if cell.y1 - top > self.overlap or cell.y0 < top:
            return
        if self._strip is None:
            width = self.xs.starts[-1] + self.tile if self.xs.starts else self.width
            self._strip = lazy_zeros((self.num_classes, max(self.overlap, 1), width), np.uint16)
            self._in_use = np.zeros(self._strip.shape[1:], bool)
        rows = slice(cell.y0 - top, cell.y1 - top)
        if self._in_use[rows, cell.x0 : cell.x1].any():  # tiles fed out of order: fail, never blend wrongly
            raise AssertionError(f"packed strip at x {cell.x0}-{cell.x1} still in use: tiles fed out of order")
        self._in_use[rows, cell.x0 : cell.x1] = True
        avg = cell.acc
        avg /= self._weight_sum(cell)
        np.clip(avg, 0.0, 1.0, out=avg)
        avg *= np.float32(_PACK_SCALE)
        np.rint(avg, out=avg)
        view = self._strip[:, rows, cell.x0 : cell.x1]
        np.copyto(view, avg, casting="unsafe")
        cell.packed, cell.packed_rows = view, rows
        cell.acc = None

    def _weight_sum(self, cell: _Cell) -> np.ndarray:
        """The cell's sum of window weights, recomputed from the tiles it saw instead of kept beside
        ``acc``: pending memory is then C, not C + 1, floats per pixel of the overlap strip (the same
        additions in the same order, so the same float32 values)."""
        (ty, tx), *rest = cell.seen
        wsum = self.window[cell.y0 - ty : cell.y1 - ty, cell.x0 - tx : cell.x1 - tx].copy()
        for ty, tx in rest:
            wsum += self.window[cell.y0 - ty : cell.y1 - ty, cell.x0 - tx : cell.x1 - tx]
        return wsum

    def _emit(self, cell: _Cell, probs: np.ndarray | None, blended: bool = False,
              labels: np.ndarray | None = None) -> None:
        """``probs``: one tile's probabilities, or (``blended``) the weighted sum of several tiles'.
        The label is the argmax of either: a pixel's weights are the same for every class, so it is
        taken before the division by their sum, which only the probabilities need (and whose
        rounding could only turn a narrow win into a tie).  Or ``labels``, as they came with the
        cell's one tile (:meth:`label_box`)."""
        del self._cells[cell.key]
        # Crop what lies beyond the image (only when the image is smaller than a tile).
        h = min(cell.y1, self.height) - cell.y0
        w = min(cell.x1, self.width) - cell.x0
        if h <= 0 or w <= 0:
            return
        if labels is not None:
            if self.labeler is None:
                self.on_labels(cell.y0, cell.x0, labels[:h, :w])
            else:  # after the cells emitted before it, as they were emitted
                self._labeling.append((cell.y0, cell.x0, labels[:h, :w]))
        elif self.labeler is None:
            self.on_labels(cell.y0, cell.x0, class_argmax(probs[:, :h, :w]))
        else:  # nothing writes to these values any more: the cell is gone
            self._labeling.append((cell.y0, cell.x0, self.labeler.submit(class_argmax, probs[:, :h, :w])))
        if self.on_probs is not None:
            if blended:
                probs = probs / self._weight_sum(cell)
            self.on_probs(cell.y0, cell.x0, probs[:, :h, :w])
        self.emitted_pixels += h * w

    def deliver(self) -> None:
        """Hand the labels computed on ``labeler`` to ``on_labels``, in the order the cells were
        emitted; with a labeler, call it after each batch of tiles (and before using the labels)."""
        while self._labeling:
            y, x, labels = self._labeling.popleft()
            self.on_labels(y, x, labels.result() if isinstance(labels, Future) else labels)

    @property
    def pending_cells(self) -> int:
        return len(self._cells)

    def pending_bytes(self) -> int:
        floats = sum(c.acc.nbytes for c in self._cells.values() if c.acc is not None)
        return floats + (self._strip.nbytes if self._strip is not None else 0)
