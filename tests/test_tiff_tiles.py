"""Levels of tiled TIFF slides decoded tile by tile (``tiff_tiles``) instead of through OpenSlide's
compositing or tifffile's Zarr store: the very same pixels, or the backend reads them itself."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from wsi_espnet.slide import OpenSlideSlide, TiffSlide, open_slide
from wsi_espnet.tiff_tiles import TileCache, TiledPageReader

FIX = "openslide-python-fixtures"


def _without_tile_decode(path, monkeypatch, backend="auto"):
    monkeypatch.setenv("WSI_ESPNET_TILE_DECODE", "0")
    s = open_slide(path, backend=backend)
    monkeypatch.delenv("WSI_ESPNET_TILE_DECODE")
    assert s._tile_readers == {}
    return s


def _regions(w: int, h: int, rng: np.random.Generator, n: int = 12):
    """Random regions inside a level, plus its corners and a one-pixel read."""
    out = [(0, 0, min(w, 300), min(h, 200)), (w - min(w, 257), h - min(h, 129), min(w, 257), min(h, 129)),
           (w - 1, h - 1, 1, 1)]
    for _ in range(n):
        rw, rh = int(rng.integers(1, min(w, 600) + 1)), int(rng.integers(1, min(h, 600) + 1))
        out.append((int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1)), rw, rh))
    return out


@pytest.mark.parametrize("name, levels", [("demo", [0, 1, 2, 3]), ("real/CMU-1-Small-Region.svs", [0]),
                                          ("real/TCGA-CR-7395-01A-01-TS1.svs", [0]), (f"{FIX}/boxes.tiff", [0, 1])])
def test_tiled_levels_are_decoded_here_with_openslides_pixels(slides_dir, demo_svs, monkeypatch, name, levels):
    """JPEG (demo, CMU), JPEG 2000 (TCGA) and deflate (boxes.tiff) levels; the TCGA slide's level 1
    (downsample 2.0005) and boxes.tiff's levels 2-3 (4.016, 8.086) stay on OpenSlide, whose sub-pixel
    sampling of them a tile decode would not reproduce."""
    path = demo_svs if name == "demo" else slides_dir / name
    rng = np.random.default_rng(7)
    with open_slide(path) as ours, _without_tile_decode(path, monkeypatch) as ref:
        assert isinstance(ours, OpenSlideSlide)
        assert sorted(ours._tile_readers) == levels
        for level, (w, h) in enumerate(ours.level_dimensions):
            for x, y, rw, rh in _regions(w, h, rng):
                np.testing.assert_array_equal(ours._read_level(level, x, y, rw, rh),
                                              ref._read_level(level, x, y, rw, rh),
                                              err_msg=f"{name} level {level} region {(x, y, rw, rh)}")
        if ours.mpp:
            for mpp in (ours.mpp, 1.0, 2.0 * ours.mpp + 0.13):
                np.testing.assert_array_equal(ours.read_at_mpp(17, 9, 333, 222, mpp),
                                              ref.read_at_mpp(17, 9, 333, 222, mpp))
        np.testing.assert_array_equal(ours.get_thumbnail(200), ref.get_thumbnail(200))


@pytest.mark.parametrize("name, levels", [("demo_ome", [0, 1, 2, 3]), ("real/OS-1-detail.ome.tif", [0]),
                                          (f"{FIX}/boxes.tiff", [0, 1, 2, 3]), ("real/CMU-1-Small-Region.svs", [0])])
def test_tifffile_levels_are_decoded_here_with_the_stores_pixels(slides_dir, demo_ome, monkeypatch, name, levels):
    """The tifffile backend (OME-TIFF with SubIFD levels, a generic TIFF, an SVS opened with tifffile)."""
    path = demo_ome if name == "demo_ome" else slides_dir / name
    rng = np.random.default_rng(5)
    with open_slide(path, backend="tifffile") as ours, _without_tile_decode(path, monkeypatch, "tifffile") as ref:
        assert isinstance(ours, TiffSlide) and sorted(ours._tile_readers) == levels
        for level, (w, h) in enumerate(ours.level_dimensions):
            for x, y, rw, rh in _regions(w, h, rng):
                np.testing.assert_array_equal(ours._read_level(level, x, y, rw, rh),
                                              ref._read_level(level, x, y, rw, rh))
        np.testing.assert_array_equal(ours.get_thumbnail(128), ref.get_thumbnail(128))


def test_strips_and_grey_pages_stay_on_the_store(tmp_path):
    import tifffile

    rgb = np.random.default_rng(2).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", rgb, rowsperstrip=16, photometric="rgb")
    tifffile.imwrite(tmp_path / "grey.tif", rgb[..., 0], tile=(64, 64))
    for name, backend in [("strips.tif", "auto"), ("grey.tif", "tifffile"), ("grey.tif", "openslide")]:
        with open_slide(tmp_path / name, backend=backend) as s:
            assert s._tile_readers == {}
            assert s._read_level(0, 0, 0, 120, 100).shape == (100, 120, 3)


@pytest.mark.parametrize("name", ["real/test3-DAPI-2-387.ndpi", "real/dicom-camelyon16/camelyon16-lymph-node.dcm"])
def test_other_formats_stay_on_openslide(slides_dir, name):
    with open_slide(slides_dir / name) as s:
        assert isinstance(s, OpenSlideSlide) and s._tile_readers == {}


def test_a_level_that_would_decode_differently_stays_on_openslide(demo_svs, monkeypatch):
    """The check at open compares bytes: one grey level off anywhere in the checked reads and the level
    is OpenSlide's (here every tile decode is made one grey level darker)."""
    real_read = TiledPageReader.read

    def darker(self, x, y, w, h):
        out = real_read(self, x, y, w, h)
        return np.where(out > 0, out - 1, out).astype(np.uint8)

    monkeypatch.setattr(TiledPageReader, "read", darker)
    with open_slide(demo_svs) as s:
        assert s._tile_readers == {}
        monkeypatch.undo()
        with _without_tile_decode(demo_svs, monkeypatch) as ref:
            np.testing.assert_array_equal(s.read_at_mpp(0, 0, 512, 384, 1.0), ref.read_at_mpp(0, 0, 512, 384, 1.0))


def test_missing_tiles_are_white_as_in_openslide(tmp_path, monkeypatch):
    """A tile with byte count 0 is absent (sparse TIFF): OpenSlide draws it transparent, i.e. white."""
    import tifffile

    rng = np.random.default_rng(3)
    img = rng.integers(0, 200, (192, 256, 3), dtype=np.uint8)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        offset, count, dtype = tag.valueoffset, tag.count, tag.dtype
    assert count == 12
    size = {4: 4, 16: 8}.get(int(dtype), 4)
    data = bytearray(path.read_bytes())
    data[offset + 5 * size : offset + 6 * size] = bytes(size)  # tile (row 1, col 1): no data
    path.write_bytes(bytes(data))
    with open_slide(path) as ours, _without_tile_decode(path, monkeypatch) as ref:
        assert ours.vendor == "generic-tiff" and sorted(ours._tile_readers) == [0]
        got = ours._read_level(0, 0, 0, 256, 192)
        np.testing.assert_array_equal(got, ref._read_level(0, 0, 0, 256, 192))
        assert (got[64:128, 64:128] == 255).all()
        np.testing.assert_array_equal(got[:64], img[:64])


def test_concurrent_reads_give_the_serial_pixels(demo_svs):
    """Reader threads share the tile cache; a small cache makes them evict each other's tiles."""
    rng = np.random.default_rng(11)
    regions = _regions(1024, 768, rng, n=40)
    with open_slide(demo_svs) as s:
        s._tile_readers[1]._cache.max_bytes = 4 * 256 * 256 * 3
        serial = [s._read_level(1, *r) for r in regions]
        results: dict[int, list[np.ndarray]] = {}

        def work(k: int) -> None:
            results[k] = [s._read_level(1, *r) for r in regions[k::4]]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k in range(4):
            for got, want in zip(results[k], serial[k::4]):
                np.testing.assert_array_equal(got, want)


def test_tile_cache_is_a_bounded_lru():
    cache = TileCache(max_bytes=3 * 100)
    tiles = {k: np.full(100, k, np.uint8) for k in range(5)}
    for k in range(3):
        cache.put(k, tiles[k])
    assert cache.get(0) == (True, tiles[0])  # 0 is now the most recently used
    cache.put(3, tiles[3])  # evicts 1, the least recently used
    assert cache.get(1) == (False, None)
    assert all(cache.get(k)[0] for k in (0, 2, 3))
    cache.put(9, np.zeros(1000, np.uint8))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(9) == (False, None) and all(cache.get(k)[0] for k in (0, 2, 3))
    assert cache._bytes == 300
    cache.put(4, None)  # an absent tile is remembered too, at a nominal 64 bytes: 0 (read least recently) goes
    assert cache.get(4) == (True, None) and cache.get(0) == (False, None) and cache.get(3)[0]
    assert cache._bytes == 200 + 64
    empty = TileCache(max_bytes=64 * 10)
    for k in range(1000):  # a sparse slide's absent tiles do not pile up
        empty.put(k, None)
    assert len(empty._tiles) == 10 and empty.get(999) == (True, None)


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_the_file_is_released_on_close_and_when_a_slide_is_dropped(demo_svs, backend):
    """A slide that is never closed (a copy unpickled on a Dask worker) must not keep its file open."""
    import gc
    import os
    import pickle

    s = open_slide(demo_svs, backend=backend)
    fd = s._file.fd
    assert s._tile_readers
    s.close()
    assert s._file.closed and s._tile_readers == {}
    with pytest.raises(OSError):
        os.fstat(fd)
    before = len(os.listdir("/proc/self/fd"))
    with open_slide(demo_svs, backend=backend) as kept:
        for _ in range(20):
            copy = pickle.loads(pickle.dumps(kept))
            assert copy._tile_readers and copy.read_at_mpp(0, 0, 8, 8, 1.0).shape == (8, 8, 3)
            del copy
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) <= before + 2  # the kept slide's own, and nothing per copy


def test_absent_tiles_are_white_through_tifffile_too(tmp_path, monkeypatch):
    """The tifffile backend draws a tile with byte count 0 as glass, with and without the tile
    decoder, wherever the tile lies (the check at open covers only some tiles)."""
    import tifffile

    img = np.random.default_rng(8).integers(0, 200, (256, 256, 3), dtype=np.uint8)
    for missing in (0, 5, 15):  # a corner tile, one beside the centre, the last tile
        path = tmp_path / f"sparse{missing}.tif"
        tifffile.imwrite(path, img, tile=(64, 64), compression="zlib", photometric="rgb")
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags["TileByteCounts"]
            offset, size = tag.valueoffset, {4: 4, 16: 8}.get(int(tag.dtype), 4)  # LONG or LONG8
        data = bytearray(path.read_bytes())
        data[offset + missing * size : offset + (missing + 1) * size] = bytes(size)
        path.write_bytes(bytes(data))
        ty, tx = divmod(missing, 4)
        reads = []
        for decode in ("1", "0"):
            monkeypatch.setenv("WSI_ESPNET_TILE_DECODE", decode)
            with open_slide(path, backend="tifffile") as s:
                reads.append(s._read_level(0, 0, 0, 256, 256))
        np.testing.assert_array_equal(reads[0], reads[1])
        assert (reads[0][ty * 64 : ty * 64 + 64, tx * 64 : tx * 64 + 64] == 255).all()


def test_a_corrupt_tile_is_a_one_line_slide_error_as_in_openslide(demo_svs, tmp_path, monkeypatch):
    """A tile away from the regions checked at open: the slide opens with its levels decoded here, and
    reading that tile fails with the file's name, as it does through OpenSlide."""
    import tifffile

    from wsi_espnet.errors import SlideError

    bad = tmp_path / "bad.svs"
    data = bytearray(demo_svs.read_bytes())
    with tifffile.TiffFile(demo_svs) as tif:
        page = tif.pages[0]
        assert page.tilewidth == 256 and page.imagewidth == 2048
        offset = page.dataoffsets[1]  # tile row 0, column 1: level 0 pixels x 256..511, y 0..255
    data[offset : offset + 16] = bytes(16)  # no JPEG start-of-image marker any more
    bad.write_bytes(bytes(data))
    for decode in ("1", "0"):
        monkeypatch.setenv("WSI_ESPNET_TILE_DECODE", decode)
        with open_slide(bad) as s:
            assert (0 in s._tile_readers) == (decode == "1")
            s._read_level(0, 1024, 768, 64, 64)  # elsewhere the slide reads
            with pytest.raises(SlideError) as err:
                s._read_level(0, 300, 10, 64, 64)
            msg = str(err.value)
            assert str(bad) in msg and "\n" not in msg


def test_the_switch_reads_as_a_user_would_write_it(demo_svs, monkeypatch):
    for value, on in [("0", False), ("off", False), ("False", False), (" no ", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv("WSI_ESPNET_TILE_DECODE", value)
        with open_slide(demo_svs) as s:
            assert bool(s._tile_readers) is on, value


def test_levels_are_checked_at_their_first_use_not_at_open(demo_svs, monkeypatch):
    """Opening checks nothing; a read checks the one level it uses, once, even from several threads;
    asking for every decoded level checks the rest."""
    import wsi_espnet.tiff_tiles as tt

    checked: list[int] = []
    real_agrees = tt.agrees

    def counting(reader, reference):
        checked.append(reader._key)  # the level
        return real_agrees(reader, reference)

    monkeypatch.setattr(tt, "agrees", counting)
    with open_slide(demo_svs) as s:
        assert checked == []
        threads = [threading.Thread(target=s.read_at_mpp, args=(64 * i, 0, 256, 256, 1.0)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert checked == [1]  # 1 µm/px is the demo's level 1 (0.5 µm/px at level 0)
        assert sorted(s._tile_readers) == [0, 1, 2, 3]
        assert sorted(checked) == [0, 1, 2, 3]
