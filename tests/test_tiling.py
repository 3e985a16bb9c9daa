"""The tile grid contract the stitcher relies on: full-size tiles, exact cover, edge alignment,
level-0 coordinates, tissue filtering."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_espnet.errors import UserError
from wsi_espnet.tiling import axis_positions, grid_positions, tile_grid
from wsi_espnet.tissue import TissueMask


def _coverage(image_size, grid):
    w, h = image_size
    count = np.zeros((h, w), dtype=np.int32)
    for t in grid.tiles:
        count[t.y : t.y + t.height, t.x : t.x + t.width] += 1
    return count


@pytest.mark.parametrize(
    "size,tile,overlap",
    [((1000, 700), 256, 0), ((1000, 700), 256, 64), ((512, 512), 512, 0), ((513, 1025), 512, 100), ((2000, 90), 128, 32)],
)
def test_tiles_are_full_size_and_cover_the_image_exactly(size, tile, overlap):
    grid = tile_grid(size, tile, overlap, mpp=1.0, level0_mpp=0.5)
    cover = _coverage(size, grid)
    assert cover.min() >= 1, "a pixel of the image is in no tile"
    for t in grid.tiles:
        assert (t.width, t.height) == (tile, tile)
        # Inside the image, except on an axis shorter than one tile.
        assert t.x + tile <= max(size[0], tile) and t.y + tile <= max(size[1], tile)
    assert len(grid) == grid.n_rows * grid.n_cols


def test_positions_step_by_stride_and_align_last_tile_to_the_far_edge():
    assert axis_positions(1000, 256, 192) == [0, 192, 384, 576, 744]
    assert axis_positions(1024, 256, 256) == [0, 256, 512, 768]  # exact fit: no extra tile
    assert axis_positions(100, 256, 256) == [0]  # shorter than a tile: one (padded) tile
    assert axis_positions(256, 256, 200) == [0]
    xs, ys = grid_positions((1000, 300), 256, 64)
    assert xs == [0, 192, 384, 576, 744] and ys == [0, 44]


def test_level0_coordinates_scale_with_mpp_ratio():
    grid = tile_grid((1000, 700), 256, 0, mpp=1.0, level0_mpp=0.25)
    t = grid.tiles[grid.n_cols + 1]  # row 1, col 1
    assert (t.row, t.col, t.x, t.y) == (1, 1, 256, 256)
    assert (t.x0, t.y0, t.w0, t.h0) == (1024.0, 1024.0, 1024.0, 1024.0)
    assert grid.level0_size == (4000, 2800)
    # Non-integer ratio: exact floats on the tile, nearest-integer boxes that tile without gaps.
    g = tile_grid((300, 300), 100, 0, mpp=1.0, level0_mpp=0.3)
    boxes = g.level0_boxes()
    row0 = boxes[: g.n_cols]
    assert np.all(row0[:-1, 0] + row0[:-1, 2] == row0[1:, 0])
    assert g.tiles[1].x0 == pytest.approx(100 / 0.3)


def test_tissue_threshold_filters_tiles_but_geometry_is_kept():
    # Level-0 1000x1000 at 1 µm/px, mask at downsample 10: tissue only in the left 40 %.
    mask = np.zeros((100, 100), bool)
    mask[:, :40] = True
    tm = TissueMask(mask=mask, downsample=10.0, mpp=10.0)
    grid = tile_grid((1000, 1000), 200, 0, mpp=1.0, level0_mpp=1.0, tissue=tm, threshold=0.5)
    assert grid.n_cols == 5 and grid.n_rows == 5  # full geometry is still known
    assert sorted({t.col for t in grid.tiles}) == [0, 1]
    assert [t.index for t in grid.tiles] == list(range(len(grid.tiles)))
    assert all(t.tissue == pytest.approx(1.0) for t in grid.tiles)
    # Column 2 (x 400..600) has 0 % tissue; at threshold 0 it is kept with its true fraction.
    all_tiles = tile_grid((1000, 1000), 200, 0, mpp=1.0, level0_mpp=1.0, tissue=tm, threshold=0.0)
    assert len(all_tiles) == 25
    assert all_tiles.tiles[2].tissue == pytest.approx(0.0)
    # A tile straddling the boundary: x 300..500 at 1 µm -> 50 % tissue.
    g = tile_grid((1000, 1000), 200, 100, mpp=1.0, level0_mpp=1.0, tissue=tm, threshold=0.0)
    straddle = next(t for t in g.tiles if t.x == 300)
    assert straddle.tissue == pytest.approx(0.5)


def test_footprint_marks_exactly_the_cells_kept_tiles_touch():
    mask = np.zeros((100, 100), bool)
    mask[10:30, 60:95] = True  # tissue in one corner region
    tm = TissueMask(mask=mask, downsample=10.0, mpp=10.0)
    grid = tile_grid((1000, 950), 200, 40, mpp=1.0, level0_mpp=1.0, tissue=tm, threshold=0.2)
    covered = np.zeros((950, 1000), bool)
    for t in grid.tiles:
        covered[t.y : t.y + t.height, t.x : t.x + t.width] = True
    for cell in (64, 100, 300):
        fp = grid.footprint(cell).grid
        assert fp.shape == (-(-950 // cell), -(-1000 // cell))
        want = np.array([[covered[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].any()
                          for c in range(fp.shape[1])] for r in range(fp.shape[0])])
        np.testing.assert_array_equal(fp, want)
        assert 0 < fp.sum() < fp.size


def test_no_tissue_gives_an_empty_tile_list():
    tm = TissueMask(mask=np.zeros((10, 10), bool), downsample=100.0)
    grid = tile_grid((1000, 1000), 256, 0, mpp=1.0, level0_mpp=1.0, tissue=tm, threshold=0.5)
    assert len(grid) == 0 and grid.n_positions == 16
    assert grid.level0_boxes().shape == (0, 4)


@pytest.mark.parametrize(
    "tile,overlap,match",
    [(0, 0, "tile size"), (-5, 0, "tile size"), (256, 256, "overlap"), (256, 300, "overlap"), (256, -1, "overlap"), (2.5, 0, "tile size")],
)
def test_bad_arguments_are_user_errors(tile, overlap, match):
    with pytest.raises(UserError, match=match):
        tile_grid((1000, 1000), tile, overlap, mpp=1.0, level0_mpp=0.5)


def test_bad_threshold_and_mpp_are_user_errors():
    with pytest.raises(UserError, match="threshold"):
        tile_grid((100, 100), 64, 0, mpp=1.0, level0_mpp=0.5, threshold=1.5)
    with pytest.raises(UserError, match="threshold"):
        tile_grid((100, 100), 64, 0, mpp=1.0, level0_mpp=0.5, threshold=float("nan"))
    with pytest.raises(UserError, match="mpp"):
        tile_grid((100, 100), 64, 0, mpp=0.0, level0_mpp=0.5)
    with pytest.raises(UserError, match="image size"):
        tile_grid((0, 100), 64, 0, mpp=1.0, level0_mpp=0.5)
