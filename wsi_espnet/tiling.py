"""The tile grid: which square windows of a slide are read, at a working resolution.

The rules below are a contract: the whole-slide stitcher relies on them to put predictions back.

* The grid lives in the *virtual image at the working mpp* (the slide resampled to ``mpp`` µm/px,
  ``image_size`` = (W, H) pixels, as :meth:`Slide.size_at_mpp` gives it).
* ``stride = tile - overlap``.  Along each axis the tile origins are ``0, stride, 2*stride, ...`` and,
  when that does not end exactly at the far edge, one more tile at ``W - tile`` (aligned to the edge,
  so it overlaps its neighbour by more than ``overlap``).  Every tile is full size and the union of
  the tiles is exactly the image.
* An axis shorter than one tile gets a single tile at 0; the reader pads it with white beyond the
  image and the stitcher crops.
* ``index`` is a tile's position in :attr:`TileGrid.tiles` (the row of the patch store); ``row`` and
  ``col`` are its place in the full grid (:func:`grid_positions`), which exists whatever was kept.
* Level-0 coordinates: ``x0 = x * mpp / level0_mpp`` and ``w0 = tile * mpp / level0_mpp``, kept as
  exact floats on :class:`Tile`; :meth:`Tile.level0_box` rounds them to the nearest integer (origin
  and far corner rounded separately, so neighbouring boxes share their edges).  A tile that runs past
  the image keeps its full level-0 size.
* The tissue fraction of a tile is that of its level-0 rectangle in the :class:`TissueMask`, over
  the part of the rectangle that is on the slide (so a slide smaller than one tile is judged by its
  content, not by the padding).  Tiles are kept when ``tissue >= threshold``; ``threshold <= 0`` keeps
  all of them, as does ``tissue=None`` (then every tile reports ``tissue = 1.0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .tissue import TissueMask


@dataclass(frozen=True)
class Tile:
    """One window of the grid; ``x, y, width, height`` in pixels at the working mpp."""

    index: int
    row: int
    col: int
    x: int
    y: int
    width: int
    height: int
    x0: float
    y0: float
    w0: float
    h0: float
    tissue: float

    def level0_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, w0, h0) in whole level-0 pixels, origin and far corner rounded to nearest."""
        x0, y0 = int(round(self.x0)), int(round(self.y0))
        x1, y1 = int(round(self.x0 + self.w0)), int(round(self.y0 + self.h0))
        return x0, y0, x1 - x0, y1 - y0


@dataclass
class TileGrid:
    """A grid of tiles at ``mpp`` µm/px and the subset of it kept for tissue."""

    tiles: list[Tile]
    mpp: float
    tile: int
    overlap: int
    image_size: tuple[int, int]
    level0_size: tuple[int, int]
    level0_mpp: float
    threshold: float
    xs: list[int] = field(default_factory=list)
    ys: list[int] = field(default_factory=list)

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def n_cols(self) -> int:
        return len(self.xs)

    @property
    def n_rows(self) -> int:
        return len(self.ys)

    @property
    def n_positions(self) -> int:
        return self.n_rows * self.n_cols

    def __len__(self) -> int:
        return len(self.tiles)

    def xy(self) -> np.ndarray:
        """(N, 2) int64 tile origins (x, y) at the working mpp."""
        return np.array([(t.x, t.y) for t in self.tiles], dtype=np.int64).reshape(-1, 2)

    def rowcol(self) -> np.ndarray:
        """(N, 2) int32 (row, col) of each kept tile in the full grid."""
        return np.array([(t.row, t.col) for t in self.tiles], dtype=np.int32).reshape(-1, 2)

    def level0_boxes(self) -> np.ndarray:
        """(N, 4) int64 level-0 (x0, y0, w0, h0) of each kept tile (see :meth:`Tile.level0_box`)."""
        return np.array([t.level0_box() for t in self.tiles], dtype=np.int64).reshape(-1, 4)

    def tissue_fractions(self) -> np.ndarray:
        return np.array([t.tissue for t in self.tiles], dtype=np.float32)

    def footprint(self, cell: int) -> "Occupancy":
        """The ``cell`` x ``cell`` squares of the working-resolution image that the kept tiles touch:
        outside them a segmentation has nothing but background, so the writers need not read there."""
        w, h = self.image_size
        occ = Occupancy.empty((h, w), cell)
        for t in self.tiles:
            occ.grid[t.y // cell : -(-min(t.y + t.height, h) // cell), t.x // cell : -(-min(t.x + t.width, w) // cell)] = True
        return occ

    def describe(self) -> dict:
        """JSON-able summary of the geometry (what a patch store records)."""
        return {
            "mpp": self.mpp,
            "tile": self.tile,
            "overlap": self.overlap,
            "stride": self.stride,
            "image_size": list(self.image_size),
            "level0_size": list(self.level0_size),
            "level0_mpp": self.level0_mpp,
            "n_rows": self.n_rows,
            "n_cols": self.n_cols,
            "n_positions": self.n_positions,
            "n_tiles": len(self.tiles),
            "tissue_threshold": self.threshold,
            "xs": list(self.xs),
            "ys": list(self.ys),
        }


@dataclass
class Occupancy:
    """Which ``cell`` x ``cell`` squares of an image may hold a non-zero label (False: certainly all
    background, 0).  Why: a slide's label map is mostly background, and reading an empty region back
    from Zarr is not free (~0.2 ms per missing chunk), nor is tracing it.  The segmentation knows it
    beforehand (:meth:`TileGrid.footprint`: where no tissue tile ran, nothing was written); the
    mask writer also learns it per pyramid level while building the pyramid."""

    cell: int
    grid: np.ndarray  # bool, (ceil(h / cell), ceil(w / cell))
    within: "Occupancy | None" = None  # a coarser or finer map that also has to allow a region

    @classmethod
    def empty(cls, shape: tuple[int, int], cell: int, within: "Occupancy | None" = None) -> "Occupancy":
        return cls(cell, np.zeros((-(-shape[0] // cell), -(-shape[1] // cell)), bool), within)

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Refuse a map made for another image: it would rule out regions that hold labels."""
        want = (-(-shape[0] // self.cell), -(-shape[1] // self.cell))
        if self.grid.shape != want:
            raise ValueError(f"occupancy map {self.grid.shape} of {self.cell}-px cells does not fit a "
                             f"{shape[0]} x {shape[1]} image (needs {want})")

    def mark(self, y0: int, x0: int) -> None:
        self.grid[y0 // self.cell, x0 // self.cell] = True

    def may_have(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        c = self.cell
        if not self.grid[y0 // c: -(-y1 // c), x0 // c: -(-x1 // c)].any():
            return False
        return self.within is None or self.within.may_have(y0, y1, x0, x1)


def validate_tiling(tile: int, overlap: int) -> None:
    """Raise :class:`UserError` for a tile size and overlap that cannot make a grid."""
    if not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or tile <= 0:
        raise UserError(f"tile size must be a positive integer, got {tile!r}")
    if not isinstance(overlap, (int, np.integer)) or isinstance(overlap, bool) or overlap < 0:
        raise UserError(f"overlap must be a non-negative integer, got {overlap!r}")
    if overlap >= tile:
        raise UserError(f"overlap ({overlap}) must be smaller than the tile size ({tile})")


def axis_positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis of ``length`` pixels (see the module docstring)."""
    if length <= tile:
        return [0]
    last = length - tile
    positions = list(range(0, last + 1, stride))
    if positions[-1] != last:
        positions.append(last)
    return positions


def grid_positions(image_size: tuple[int, int], tile: int, overlap: int) -> tuple[list[int], list[int]]:
    """All tile origins ``(xs, ys)`` of the full grid, before any tissue filtering."""
    validate_tiling(tile, overlap)
    w, h = (int(v) for v in image_size)
    if w <= 0 or h <= 0:
        raise UserError(f"image size must be positive, got {w}x{h}")
    stride = tile - overlap
    return axis_positions(w, tile, stride), axis_positions(h, tile, stride)


def tile_grid(
    image_size: tuple[int, int],
    tile: int,
    overlap: int,
    mpp: float,
    level0_mpp: float,
    tissue: TissueMask | None = None,
    threshold: float = 0.0,
    level0_size: tuple[int, int] | None = None,
) -> TileGrid:
    """The grid over an image of ``image_size`` px at ``mpp``, keeping tiles with enough tissue.

    ``level0_mpp`` is the slide's µm/px at level 0; ``level0_size`` its level-0 size (derived from
    ``image_size`` when not given, for the record only).
    """
    if not (mpp and mpp > 0):
        raise UserError(f"working mpp must be > 0, got {mpp!r}")
    if not (level0_mpp and level0_mpp > 0):
        raise UserError(f"level-0 mpp must be > 0, got {level0_mpp!r}")
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise UserError(f"tissue threshold must be between 0 and 1, got {threshold}")
    xs, ys = grid_positions(image_size, tile, overlap)
    scale = mpp / level0_mpp
    if level0_size is None:
        level0_size = (int(round(image_size[0] * scale)), int(round(image_size[1] * scale)))

    # All positions, row-major, as level-0 rectangles: fractions in one vectorised pass.
    gx, gy = np.meshgrid(np.asarray(xs, np.float64), np.asarray(ys, np.float64))
    side0 = tile * scale
    rects = np.stack([gx.ravel() * scale, gy.ravel() * scale, np.full(gx.size, side0), np.full(gx.size, side0)], 1)
    if tissue is None:
        fractions = np.ones(gx.size)
        keep = np.ones(gx.size, dtype=bool)
    else:
        fractions = tissue.fractions(rects)
        keep = fractions >= threshold if threshold > 0 else np.ones(gx.size, dtype=bool)

    tiles: list[Tile] = []
    n_cols = len(xs)
    for flat in np.flatnonzero(keep):
        r, c = divmod(int(flat), n_cols)
        tiles.append(
            Tile(
                index=len(tiles),
                row=r,
                col=c,
                x=xs[c],
                y=ys[r],
                width=tile,
                height=tile,
                x0=float(rects[flat, 0]),
                y0=float(rects[flat, 1]),
                w0=side0,
                h0=side0,
                tissue=float(fractions[flat]),
            )
        )
    return TileGrid(
        tiles=tiles,
        mpp=float(mpp),
        tile=int(tile),
        overlap=int(overlap),
        image_size=(int(image_size[0]), int(image_size[1])),
        level0_size=(int(level0_size[0]), int(level0_size[1])),
        level0_mpp=float(level0_mpp),
        threshold=float(threshold),
        xs=xs,
        ys=ys,
    )
