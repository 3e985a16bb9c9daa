"""Overlap blending of tile predictions into a whole-slide label map, in bounded memory.

Why cells: every tile edge, and every point where a tile's weight turns 0 (its trim, below), cuts
the image into rectangular grid cells; over each, a fixed set of tiles weighs in (one inside a
tile, two or four where tiles blend).  Grid cells of the same kind are merged into rectangles
(``_region``), the *cells* blended as a unit.  A cell is final once all of its tiles have been seen,
so with tiles fed row by row (``feed_bands``: the last two rows interleaved) only the cells in the
overlap strip below the current tile row (and beside the current tile) are ever pending.  Memory is
O(overlap × width × classes) 16-bit values (the strip, packed: see ``_pack``) plus float32 cells
around the current tile, never a full-slide float buffer, and cells that one tile alone weighs skip
the blending arithmetic.

Why this window: a tile's probabilities are least like the whole image's at its borders, where the
network saw zero padding instead of the neighbouring tissue.  Toward each side where a neighbouring
kept tile overlaps it, a tile's weight is 0 over the outer third of the overlap (``trim``: that
neighbour sees those pixels from farther inside), then rises as a raised cosine (``sin²``) over the
middle third (``fade``), and is 1 beyond.  Two neighbours overlapping by exactly ``overlap`` then
cross-fade with weights summing to 1 over the middle third, and each alone decides the third nearer
its own centre.  Toward a side with no kept neighbour (the image edge, glass) the weight stays 1:
every pixel a tile covers has a positive weight from some tile (``test_stitch`` checks this on random
grids with holes).  A Gaussian window would instead mix every pixel with border-affected neighbours
and down-weight tile centres for nothing.

Why a trim, and not a cross-fade over the whole overlap: on demo slides both agree with one pass of
the model over the whole region on the same share of pixels (99.90-99.95 %, docs/performance.md),
but with the trim two tiles are blended over a third of the overlap instead of all of it.  Blending
is the pipeline's own work, which on a CPU comes out of the model's cores: the softmax, the weighted
sums, the packed strip and the argmax now cover 16 % of an inner tile instead of 48 %.

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

from .labels import Box, TilePlan, class_argmax
from .runtime import lazy_zeros
from .tiling import Tile, TileGrid

_PACK_SCALE = 65535  # uint16 fixed point for probabilities in [0, 1]


def trim_of(overlap: int) -> int:
    """Pixels at a tile's border that get weight 0 toward a kept neighbour: the outer third of the
    overlap (the fade is the rest of it, at least a pixel, so an overlap of 1 or 2 is all fade)."""
    return overlap // 3


def border_ramp(tile: int, overlap: int, start: bool = True, end: bool = True) -> np.ndarray:
    """1-D window along one axis of a tile: at each end that meets a neighbour (``start``/``end``),
    0 over the trim, then a ``sin²`` rise over the fade, 1 inside; 1 up to an end with no neighbour.
    The rise and the fall it meets in a neighbour sum to 1 pixel by pixel."""
    w = np.ones(tile, np.float32)
    trim = trim_of(overlap)
    fade = overlap - 2 * trim
    if fade > 0:
        u = (np.arange(fade, dtype=np.float64) + 0.5) / fade
        rise = (np.sin(0.5 * np.pi * u) ** 2).astype(np.float32)
        if start:
            w[:trim] = 0
            w[trim : trim + fade] = rise
        if end:
            w[tile - trim - fade : tile - trim] = rise[::-1]
            w[tile - trim :] = 0
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
    """A rectangle of grid cells that blend alike (see ``BlendStitcher._region``)."""

    key: tuple[int, int, int, int]  # grid cell rows and columns: cy0, cy1, cx0, cx1
    y0: int
    y1: int
    x0: int
    x1: int
    waiting: list[tuple[int, int]]  # (row, col) of the kept tiles that weigh in and are still to come
    in_box: bool  # one tile weighs in, and the cell lies in its label box
    acc: np.ndarray | None = None  # (C, h, w) weighted probability sum
    packed: np.ndarray | None = None  # or, waiting for the next row, the partial average as uint16
    packed_rows: slice | None = None  # where in the strip buffer
    seen: list[tuple[int, int]] = field(default_factory=list)  # (row, col) of the tiles summed so far


@dataclass
class _Axis:
    """Cuts along one axis: every tile's start and end, and where its weight turns 0 toward a
    neighbour (``trim`` inside each end), so that over a cell each tile's weight is 0 or positive
    throughout."""

    starts: list[int]
    tile: int
    trim: int = 0
    cuts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        edges = {s + d for s in self.starts for d in (0, self.trim, self.tile - self.trim, self.tile)}
        self.cuts = sorted(edges)

    def covering(self, pos: int) -> list[int]:
        """Indices of the tiles whose span contains ``pos`` (at most a few)."""
        i = bisect.bisect_right(self.starts, pos) - 1
        out = []
        while i >= 0 and self.starts[i] + self.tile > pos:
            out.append(i)
            i -= 1
        return out

    def cells_of(self, start: int, stop: int) -> range:
        """Indices of the cells between two cuts."""
        return range(bisect.bisect_left(self.cuts, start), bisect.bisect_left(self.cuts, stop))


class BlendStitcher:
    """Accumulates tile probabilities (fed row by row, in ``feed_bands`` order) and emits each cell as
    soon as it is final: its label map to ``on_labels(y, x, labels)`` and, if given, its blended
    probabilities to ``on_probs(y, x, probs)``.  Coordinates are pixels of the working-resolution image; parts of tiles
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
        self.trim = trim_of(grid.overlap)
        self.xs = _Axis(list(grid.xs), grid.tile, self.trim)
        self.ys = _Axis(list(grid.ys), grid.tile, self.trim)
        self.on_labels, self.on_probs = on_labels, on_probs
        self.labeler = labeler
        self._labeling: deque[tuple[int, int, Future | np.ndarray]] = deque()  # (y, x, labels or their computing)
        # Only the tiles that will be fed count towards a cell's coverage and a tile's neighbours.
        self.present = {(t.row, t.col) for t in grid.tiles}
        self._windows: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}  # per kind of neighbourhood
        self._spans: dict[tuple[int, int], Box] = {}
        self._cells: dict[tuple[int, int, int, int], _Cell] = {}  # pending, by their grid cells
        self._cell_of: dict[tuple[int, int], _Cell] = {}  # grid cell -> its pending cell
        self._kinds: dict[tuple[int, int], tuple] = {}  # grid cell -> _kind, around the rows being fed
        self._kinds_row = -1  # the last tile row whose cells _kinds holds
        self._boxes: dict[tuple[int, int], Box | None] = {}  # label_box's answers
        self._strip: np.ndarray | None = None  # packed overlap strip (see _pack)
        self._in_use: np.ndarray | None = None  # strip pixels holding a packed cell

    def _sides(self, row: int, col: int) -> tuple[bool, bool, bool, bool]:
        """Which sides of tile (row, col) (top, bottom, left, right) meet a kept neighbour."""
        p = self.present
        return (row - 1, col) in p, (row + 1, col) in p, (row, col - 1) in p, (row, col + 1) in p

    def window(self, row: int, col: int) -> np.ndarray:
        """Grid tile (row, col)'s (tile, tile) blending weights (see the module docstring): one
        shared array per kind of neighbourhood (at most 16), never to be written to."""
        sides = self._sides(row, col)
        w = self._windows.get(sides)
        if w is None:
            top, bottom, left, right = sides
            w = np.outer(border_ramp(self.tile, self.overlap, top, bottom), border_ramp(self.tile, self.overlap, left, right))
            self._windows[sides] = w
        return w

    def span(self, row: int, col: int) -> Box:
        """The tile-local box (y0, y1, x0, x1) where grid tile (row, col)'s weight is positive:
        outside it, its output is never read."""
        span = self._spans.get((row, col))
        if span is None:
            top, bottom, left, right = self._sides(row, col)
            t, T = self.trim, self.tile
            span = self._spans[row, col] = (t if top else 0, T - t if bottom else T, t if left else 0, T - t if right else T)
        return span

    def plan(self, row: int, col: int) -> TilePlan:
        """What the stitcher will read of grid tile (row, col)'s output
        (:func:`~wsi_espnet.labels.predict_split`).  Depends only on the grid: safe from any thread."""
        return TilePlan(self.span(row, col), self.label_box(row, col), self.window(row, col))

    def _inside(self, cy: int, cx: int, row: int, col: int, box: Box) -> bool:
        """Whether grid cell (cy, cx) lies in ``box``, a box local to grid tile (row, col)."""
        ty, tx = self.ys.starts[row], self.xs.starts[col]
        return (ty + box[0] <= self.ys.cuts[cy] and self.ys.cuts[cy + 1] <= ty + box[1]
                and tx + box[2] <= self.xs.cuts[cx] and self.xs.cuts[cx + 1] <= tx + box[3])

    def _contributors(self, cy: int, cx: int) -> tuple[tuple[int, int], ...]:
        """(row, col) of the kept tiles with a positive weight over grid cell (cy, cx) (the cuts
        make a weight positive over a whole grid cell or nowhere in it)."""
        return tuple((r, c) for r in self.ys.covering(self.ys.cuts[cy]) for c in self.xs.covering(self.xs.cuts[cx])
                     if (r, c) in self.present and self._inside(cy, cx, r, c, self.span(r, c)))

    def _kind(self, cy: int, cx: int) -> tuple:
        """What grid cell (cy, cx)'s blend depends on: the tiles that weigh in and, where one alone
        does, whether the cell lies in that tile's label box (labels there, probabilities elsewhere)."""
        kind = self._kinds.get((cy, cx))
        if kind is None:
            who = self._contributors(cy, cx)
            box = self.label_box(*who[0]) if len(who) == 1 else None
            kind = self._kinds[cy, cx] = (who, box is not None and self._inside(cy, cx, *who[0], box))
        return kind

    def _region(self, cy: int, cx: int) -> _Cell:
        """The pending cell holding grid cell (cy, cx), made on first use: the rectangle of grid
        cells of its kind that runs as far as it can along x, then on along y over the rows whose run
        is the same.  The rule depends only on the grid, so every tile that weighs in finds the same
        rectangle.  Why: the grid's cuts (every tile's edges and trims, across the whole slide) cut a
        tile into up to 7 x 7 grid cells, ~25 inside its span; merged, a tile inside the grid has 9
        (its label box, four overlap strips, four corners), and each cell costs the blending,
        the label argmax and the label writes a few numpy calls, whatever its size."""
        cell = self._cell_of.get((cy, cx))
        if cell is not None:
            return cell
        kind = self._kind(cy, cx)
        nx, ny = len(self.xs.cuts) - 1, len(self.ys.cuts) - 1

        def run(k: int) -> tuple[int, int] | None:
            if self._kind(k, cx) != kind:
                return None
            a, b = cx, cx + 1
            while a > 0 and self._kind(k, a - 1) == kind:
                a -= 1
            while b < nx and self._kind(k, b) == kind:
                b += 1
            return a, b

        a, b = run(cy)
        top, bottom = cy, cy + 1
        while top > 0 and run(top - 1) == (a, b):
            top -= 1
        while bottom < ny and run(bottom) == (a, b):
            bottom += 1
        ycuts, xcuts = self.ys.cuts, self.xs.cuts
        cell = _Cell((top, bottom, a, b), ycuts[top], ycuts[bottom], xcuts[a], xcuts[b], waiting=list(kind[0]),
                     in_box=kind[1])
        self._cells[cell.key] = cell
        for i in range(top, bottom):
            for j in range(a, b):
                self._cell_of[i, j] = cell
        return cell

    def _forget_kinds_above(self, row: int) -> None:
        """Drop the cached kinds of grid cells above tile row ``row - 1``: no tile fed from now on
        reaches them (memory stays a few tile rows, not the slide)."""
        if row <= self._kinds_row:
            return
        self._kinds_row = row
        first = bisect.bisect_left(self.ys.cuts, self.ys.starts[max(row - 1, 0)])
        for key in [k for k in self._kinds if k[0] < first]:
            del self._kinds[key]

    def label_box(self, row: int, col: int) -> Box | None:
        """The tile-local box (y0, y1, x0, x1) of grid tile (row, col), made of whole cells, where
        no other kept tile weighs in, the largest such (or None): inside it the blended label is this
        tile's own argmax, so :meth:`add` can take labels there instead of probabilities
        (:func:`~wsi_espnet.labels.predict_split`).  Depends only on the grid: safe from any thread."""
        if (row, col) in self._boxes:
            return self._boxes[row, col]
        ty, tx = self.ys.starts[row], self.xs.starts[col]
        y0, y1, x0, x1 = self.span(row, col)
        cys, cxs = self.ys.cells_of(ty + y0, ty + y1), self.xs.cells_of(tx + x0, tx + x1)
        alone = np.array([[len(self._contributors(cy, cx)) == 1 for cx in cxs] for cy in cys], bool)
        ycuts, xcuts = self.ys.cuts, self.xs.cuts
        best, area = None, 0
        # A tile spans a few cells a side (5 inside the grid): every band of cell rows, and in it
        # every run of columns alone throughout the band.
        for i0 in range(len(cys)):
            every = np.ones(len(cxs), bool)
            for i1 in range(i0 + 1, len(cys) + 1):
                every &= alone[i1 - 1]
                height = ycuts[cys[i1 - 1] + 1] - ycuts[cys[i0]]
                j = 0
                while j < len(cxs):
                    if not every[j]:
                        j += 1
                        continue
                    k = j
                    while k < len(cxs) and every[k]:
                        k += 1
                    width = xcuts[cxs[k - 1] + 1] - xcuts[cxs[j]]
                    if height * width > area:
                        area = height * width
                        best = (ycuts[cys[i0]] - ty, ycuts[cys[i1 - 1] + 1] - ty, xcuts[cxs[j]] - tx, xcuts[cxs[k - 1] + 1] - tx)
                    j = k
        self._boxes[row, col] = best  # asked for by the model's thread, then by add
        return best

    def add(self, row: int, col: int, probs: np.ndarray, box_labels: np.ndarray | None = None,
            weighted: bool = False) -> None:
        """Feed the (C, tile, tile) probabilities of grid tile (row, col); only those inside its
        :meth:`span` are read.  With ``box_labels``, the labels inside :meth:`label_box` (where
        ``probs`` may then hold anything: they are not read); ``weighted``: ``probs`` come multiplied
        by the tile's :meth:`window` already (:func:`~wsi_espnet.labels.predict_split`).  Neither
        with probabilities as an output (``on_probs``), which needs them as they are."""
        if (box_labels is not None or weighted) and self.on_probs is not None:
            raise ValueError("box labels or weighted probabilities, but this stitcher writes probabilities")
        box = self.label_box(row, col) if box_labels is not None else None
        window = None if weighted else self.window(row, col)
        ty, tx = self.ys.starts[row], self.xs.starts[col]
        y0, y1, x0, x1 = self.span(row, col)
        below = self.ys.starts[row + 1] if row + 1 < len(self.ys.starts) else self.height + self.tile
        self._forget_kinds_above(row)
        cells = {}  # this tile's cells, top rows first (a strip is unpacked before the one below is packed)
        for cy in self.ys.cells_of(ty + y0, ty + y1):
            for cx in self.xs.cells_of(tx + x0, tx + x1):
                cell = self._region(cy, cx)
                cells[cell.key] = cell
        for cell in cells.values():
            sy = slice(cell.y0 - ty, cell.y1 - ty)
            sx = slice(cell.x0 - tx, cell.x1 - tx)
            if len(cell.waiting) == 1 and not cell.seen:
                # Weighed by this tile alone: the weighted average is the tile's own value.
                if box is not None and cell.in_box:
                    self._emit(cell, None, labels=box_labels[sy.start - box[0] : sy.stop - box[0],
                                                             sx.start - box[2] : sx.stop - box[2]])
                else:
                    self._emit(cell, probs[:, sy, sx])
                continue
            if cell.packed is not None:
                cell.acc = cell.packed * (self._weight_sum(cell) / np.float32(_PACK_SCALE))
                cell.packed = None
                self._in_use[cell.packed_rows, cell.x0 : cell.x1] = False
            part = probs[:, sy, sx] if weighted else probs[:, sy, sx] * window[sy, sx]
            if cell.acc is None:
                cell.acc = part.copy() if weighted else part  # never a view of the batch: it would pin it
            else:
                cell.acc += part
            cell.seen.append((row, col))
            cell.waiting.remove((row, col))
            if not cell.waiting:
                self._emit(cell, cell.acc, blended=True)
            elif all(r > row for r, _ in cell.waiting):
                self._pack(cell, below)  # waits for the next tile row: the strip across the width

    def _pack(self, cell: _Cell, top: int) -> None:
        """Keep a pending cell of the overlap strip below a tile row as its partial average in 16-bit
        fixed point (step 1/65535: at most 7.6e-6 off per probability, the size of the model's own
        float noise, so a label can change only at a tie).  A weighted average of probabilities
        lies in [0, 1] but for float rounding (at most 65535.01 steps, which rounds to 65535).

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
        scaled = cell.acc
        scaled *= np.float32(_PACK_SCALE) / self._weight_sum(cell)  # the average, in steps of 1/65535
        view = self._strip[:, rows, cell.x0 : cell.x1]
        np.rint(scaled, out=view, casting="unsafe")  # rounded and stored in one pass
        cell.packed, cell.packed_rows = view, rows
        cell.acc = None

    def _weight_sum(self, cell: _Cell) -> np.ndarray:
        """The cell's sum of window weights, recomputed from the tiles it saw instead of kept beside
        ``acc``: pending memory is then C, not C + 1, floats per pixel of the overlap strip (the same
        additions in the same order, so the same float32 values)."""
        def weights(row: int, col: int) -> np.ndarray:
            ty, tx = self.ys.starts[row], self.xs.starts[col]
            return self.window(row, col)[cell.y0 - ty : cell.y1 - ty, cell.x0 - tx : cell.x1 - tx]

        (row, col), *rest = cell.seen
        wsum = weights(row, col).copy()
        for row, col in rest:
            wsum += weights(row, col)
        return wsum

    def _emit(self, cell: _Cell, probs: np.ndarray | None, blended: bool = False,
              labels: np.ndarray | None = None) -> None:
        """``probs``: one tile's probabilities, or (``blended``) the weighted sum of several tiles'.
        The label is the argmax of either: a pixel's weights are the same for every class, so it is
        taken before the division by their sum, which only the probabilities need (and whose
        rounding could only turn a narrow win into a tie).  Or ``labels``, as they came with the
        cell's one tile (:meth:`label_box`)."""
        del self._cells[cell.key]
        cy0, cy1, cx0, cx1 = cell.key
        for i in range(cy0, cy1):
            for j in range(cx0, cx1):
                del self._cell_of[i, j]
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
