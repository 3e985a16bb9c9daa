"""ChunkAssembler: blocks in, whole chunks out, the array exact whatever the delivery order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from wsi_espnet.chunk_assembler import ChunkAssembler


def _cells(rects, rng):
    """The union of ``rects`` cut into disjoint blocks along every rectangle edge (as the stitcher's
    cells), in random order."""
    ys = sorted({v for r in rects for v in r[:2]})
    xs = sorted({v for r in rects for v in r[2:]})
    cells = [(a, b, c, d) for a, b in zip(ys, ys[1:]) for c, d in zip(xs, xs[1:])
             if any(r[0] <= a and b <= r[1] and r[2] <= c and d <= r[3] for r in rects)]
    rng.shuffle(cells)
    return cells


@pytest.fixture(params=["inline", "writer thread"])
def writer(request):
    """None (chunks written by the caller) or a writer thread, as ``wsi-segment --probs`` uses."""
    if request.param == "inline":
        yield None
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [(100, 100), (64, 96)])
def test_every_pixel_lands_and_aligned_chunks_are_written_once(tmp_path, seed, chunk, recorded, writer):
    rng = np.random.default_rng(seed)
    H, W, C = 330, 410, 3
    rects = []
    for _ in range(int(rng.integers(3, 9))):
        y, x = int(rng.integers(0, H - 20)), int(rng.integers(0, W - 20))
        rects.append((y, y + int(rng.integers(20, 200)), x, x + int(rng.integers(20, 200))))  # may run past
    padded = rng.random((C, H + 200, W + 200)).astype(np.float32)  # blocks may run past the array
    truth = padded[:, :H, :W]
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(C, H, W), chunks=(C, *chunk), dtype="float16", fill_value=0)
    rec = recorded(arr)
    asm = ChunkAssembler(rec, rects, writer=writer)
    for a, b, c, d in _cells(rects, rng):
        asm.write(a, c, padded[:, a:b, c:d])
    assert asm.held_chunks == 0  # every chunk was complete and written before close
    asm.close()
    covered = np.zeros((H, W), bool)
    for a, b, c, d in rects:
        covered[a:b, c:d] = True
    want = np.where(covered, truth, 0).astype(np.float16)
    np.testing.assert_array_equal(arr[:], want)
    regions = [(ys.start, ys.stop, xs.start, xs.stop) for _, ys, xs in rec.writes]
    chunks_written = [(y0 // chunk[0], x0 // chunk[1]) for y0, _, x0, _ in regions]
    assert len(chunks_written) == len(set(chunks_written))  # one write per chunk
    assert all(y1 - y0 <= chunk[0] and x1 - x0 <= chunk[1] for y0, y1, x0, x1 in regions)


def test_flush_above_puts_rows_on_disk_and_a_resumed_start_is_kept(tmp_path, writer):
    """Rows above a resume point are on disk once flush_above returns, even of a chunk still
    waiting (and with a writer thread, once it has written them); a run that starts below them
    (``start_y``) neither expects nor overwrites them."""
    C, H, W = 2, 200, 150
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(C, H, W), chunks=(C, 128, 128), dtype="float16", fill_value=0)
    asm = ChunkAssembler(arr, [(0, H, 0, W)], writer=writer)
    asm.write(0, 0, np.full((C, 100, W), 0.25, np.float32))
    asm.flush_above(100)
    assert asm.held_chunks == 2  # chunks (0, 0), (0, 1) still wait for rows 100..128
    assert (arr[:, :100] == 0.25).all() and (arr[:, 100:] == 0).all()
    # a "resumed" run from row 100: rows above stay as they are
    resumed = ChunkAssembler(arr, [(0, H, 0, W)], start_y=100, writer=writer)
    resumed.write(60, 0, np.full((C, H - 60, W), 0.75, np.float32))  # rows 60..100 are dropped
    assert resumed.held_chunks == 0
    resumed.close()
    assert (arr[:, :100] == 0.25).all() and (arr[:, 100:] == 0.75).all()


class _FullDisk:
    """A (C, H, W) array whose every write fails as a full disk does."""

    shape, chunks, dtype = (1, 64, 64), (1, 32, 32), np.dtype("float16")

    def __setitem__(self, key, value):
        raise OSError(28, "No space left on device")


def test_a_failed_write_on_the_writer_thread_is_raised_to_the_caller():
    with ThreadPoolExecutor(max_workers=1) as pool:
        asm = ChunkAssembler(_FullDisk(), [(0, 64, 0, 64)], writer=pool)
        asm.write(0, 0, np.zeros((1, 32, 64), np.float32))  # two chunks complete, handed to the thread
        with pytest.raises(OSError, match="No space left"):
            asm.flush_above(32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("aligned", [True, False])
def test_with_the_stitcher_on_sparse_tissue_only_the_strip_is_held(tmp_path, seed, aligned):
    """Fed by the real stitcher over a grid with half its tiles missing (staircase tissue edges, the
    strip below a tile with no tissue under it emitted early), with ``flush_above`` after every band
    as the segmentation calls it: the array equals direct writes, and between bands no more is held
    than the stitcher's own overlap strip, whatever the chunk shape."""
    from wsi_espnet.stitch import BlendStitcher, feed_bands
    from wsi_espnet.tiling import tile_grid

    rng = np.random.default_rng(seed)
    C, T, O = 3, 64, 16
    W, H = int(rng.integers(300, 500)), int(rng.integers(200, 400))
    grid = tile_grid((W, H), T, O, 1.0, 1.0)
    grid.tiles = [t for t in grid.tiles if rng.random() > 0.5]
    chunks = (C, T - O, T - O) if aligned else (C, 100, 70)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(C, H, W), chunks=chunks, dtype="float16", fill_value=0)
    asm = ChunkAssembler(arr, [(t.y, t.y + T, t.x, t.x + T) for t in grid.tiles])
    direct = np.zeros((C, H, W), np.float16)

    def on_probs(y, x, p):
        direct[:, y : y + p.shape[1], x : x + p.shape[2]] = p
        asm.write(y, x, p)

    stitcher = BlendStitcher(grid, C, lambda *a: None, on_probs)
    held = []
    for band in feed_bands(grid):
        for t in band.tiles:
            stitcher.add(t.row, t.col, rng.random((C, T, T)).astype(np.float32))
        asm.flush_above(band.bottom)
        held.append(asm.held_bytes())
    asm.close()
    np.testing.assert_array_equal(arr[:], direct)
    assert max(held) <= C * 2 * O * W
    assert held[-1] == 0


def test_a_chunk_delivered_twice_is_an_error(tmp_path):
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(1, 64, 64), chunks=(1, 32, 32), dtype="float16", fill_value=0)
    asm = ChunkAssembler(arr, [(0, 32, 0, 32)])
    asm.write(0, 0, np.ones((1, 32, 32), np.float32))
    with pytest.raises(AssertionError, match="twice"):
        asm.write(0, 0, np.ones((1, 8, 8), np.float32))
    with pytest.raises(AssertionError, match="no tile"):
        asm.write(40, 40, np.ones((1, 8, 8), np.float32))
