"""The mask TIFF: real OpenSlide and tifffile reads of what write_mask_tiff writes from real Zarr."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from wsi_espnet.errors import OutputExistsError
from wsi_espnet.mask_tiff import mode_downsample_2x2, pyramid_shapes, read_mask_info, write_mask_tiff

NAMES = ["Background", "Tumor", "Stroma", "Fat"]
COLORS = [(255, 255, 255), (200, 0, 0), (0, 150, 0), (0, 0, 255)]
MPP = 0.5


def _labels(height: int = 1000, width: int = 1300) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    lab = np.zeros((height, width), np.uint8)
    r2 = (yy - height // 2) ** 2 + (xx - width // 2) ** 2
    lab[r2 < (height // 3) ** 2] = 1
    lab[r2 < (height // 6) ** 2] = 2
    lab[20:90, width - 200: width - 30] = 3
    lab[::97, ::89] = 3  # isolated pixels: must survive exactly at level 0
    lab[:16, :16] = 255  # "not computed": written as class 0
    return lab


def _zarr(tmp_path, lab: np.ndarray, chunks=(256, 256)) -> zarr.Array:
    z = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=lab.shape, chunks=chunks, dtype="uint8")
    z[:] = lab
    return z


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mask")
    lab = _labels()
    path = write_mask_tiff(tmp / "slide.mask.tif", _zarr(tmp, lab), MPP, NAMES, COLORS, tile=256,
                           scale=2.0, offset=(7, 9))
    return path, lab


def test_openslide_opens_every_level_with_mpp(written):
    path, lab = written
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        expected = [(w, h) for h, w in pyramid_shapes(*lab.shape, 256)]
        assert len(expected) == 4
        assert slide.level_dimensions == tuple(expected)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        # OpenSlide renders the palette: a class-2 pixel reads as class 2's colour.
        y, x = lab.shape[0] // 2, lab.shape[1] // 2
        assert slide.read_region((x, y), 0, (1, 1)).getpixel((0, 0)) == (*COLORS[2], 255)
        # read_region takes level-0 coordinates at every level
        assert slide.read_region((x, y), 3, (1, 1)).getpixel((0, 0)) == (*COLORS[2], 255)


def test_tifffile_reads_every_level_exactly_and_the_metadata(written):
    path, lab = written
    info = read_mask_info(path)
    assert info.mpp == pytest.approx(MPP)
    assert info.class_names == NAMES
    assert info.colors == COLORS
    assert info.level_shapes == pyramid_shapes(*lab.shape, 256)
    assert info.scale == 2.0 and info.offset == (7.0, 9.0)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.byteorder == "<"
        series = tif.series[0]
        level0 = series.levels[0].asarray()
        assert level0.dtype == np.uint8
        assert np.array_equal(level0, np.where(lab == 255, 0, lab))
        # Each reduced level is the 2x2 mode of the one above (odd edges repeated).
        previous = level0
        for level in series.levels[1:]:
            h, w = previous.shape
            padded = np.pad(previous, ((0, h % 2), (0, w % 2)), mode="edge")
            expected = mode_downsample_2x2(padded)
            assert np.array_equal(level.asarray(), expected)
            previous = expected
        page = tif.pages.first
        assert page.is_tiled and page.tilewidth == 256
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        # Physical size also in the plain TIFF tags (pixels per cm), for non-OME readers.
        num, den = page.tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(MPP)
        assert "PhysicalSizeX=\"0.5\"" in page.description


def test_palette_holds_the_class_colours(written):
    path, _ = written
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        cmap = page.colormap
        assert cmap.shape == (3, 256)
        for i, color in enumerate(COLORS):
            assert tuple(int(v) // 257 for v in cmap[:, i]) == color


def test_mode_downsample_2x2_majority_and_ties():
    block = np.array([[1, 1, 0, 1, 0, 2],
                      [2, 3, 1, 0, 2, 2]], np.uint8)
    # majority 1; 2+2 tie -> top-left (0); 3 of 4 -> 2
    assert mode_downsample_2x2(block).tolist() == [[1, 0, 2]]
    assert mode_downsample_2x2(np.array([[4, 5], [6, 7]], np.uint8)).tolist() == [[4]]
    assert mode_downsample_2x2(np.array([[4, 5], [5, 7]], np.uint8)).tolist() == [[5]]


def test_mode_downsample_2x2_matches_counting_on_flat_and_mixed_maps():
    """Flat regions (the fast path) and noisy ones (the vote) against a per-cell count."""
    from collections import Counter

    rng = np.random.default_rng(5)
    block = np.repeat(np.repeat(rng.integers(0, 4, (20, 30), dtype=np.uint8), 4, 0), 4, 1)  # flat 4x4 patches
    noisy = rng.random(block.shape) < 0.3
    block[noisy] = rng.integers(0, 4, int(noisy.sum()), dtype=np.uint8)
    block[:, :40] = rng.integers(0, 3, (80, 40), dtype=np.uint8)  # all mixed
    got = mode_downsample_2x2(block)
    for y in range(got.shape[0]):
        for x in range(got.shape[1]):
            a, b, c, d = (int(v) for v in block[2 * y : 2 * y + 2, 2 * x : 2 * x + 2].ravel())
            count = Counter((a, b, c, d))
            top = max(count.values())
            want = a if count[a] == top else next(v for v in (b, c, d) if count[v] == top)
            assert got[y, x] == want, (y, x, (a, b, c, d))


def _pyramid(level0: np.ndarray, shapes: list) -> list[np.ndarray]:
    """Independent reference: each level the 2x2 mode of the one above, odd edges repeated."""
    levels = [level0]
    for _ in shapes[1:]:
        h, w = levels[-1].shape
        levels.append(mode_downsample_2x2(np.pad(levels[-1], ((0, h % 2), (0, w % 2)), mode="edge")))
    return levels


@pytest.mark.parametrize("compression", ["zlib", "lzw", "packbits", None])
def test_mostly_empty_mask_skips_nothing_that_has_labels(tmp_path, compression):
    """A slide's mask is mostly background: empty regions are neither read twice nor encoded anew
    (one shared encoding of a zero tile), which must not lose a single labelled pixel at any level,
    whatever the compression; "not computed" alone in a region still reads as background."""
    lab = np.zeros((2300, 2900), np.uint8)
    lab[1800:1900, 2500:2650] = 2  # far from the origin, straddling tile and block edges
    lab[1201, 767] = 3  # one pixel alone in its block
    lab[0:40, 1500:1600] = 255  # a block holding only "not computed"
    lab[2299, 2899] = 1  # the last pixel (edge tiles, odd shapes)
    path = write_mask_tiff(tmp_path / "sparse.tif", _zarr(tmp_path, lab, chunks=(300, 300)), MPP, NAMES,
                           COLORS, tile=128, block=256, compression=compression)
    expected = _pyramid(np.where(lab == 255, 0, lab), pyramid_shapes(*lab.shape, 128))
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert len(levels) == len(expected) == 6
        for level, want in zip(levels, expected):
            assert np.array_equal(level.asarray(), want)
        counts = tif.pages.first.tags["TileByteCounts"].value
        assert len(set(counts)) < len(counts) // 10  # the empty tiles are one repeated encoding


def test_occupied_hint_spares_reading_level_0_where_it_is_background(tmp_path, recorded):
    """Where the caller knows level 0 is background (no tissue tile ran there) it is not read at all;
    the mask is still exact at every level."""
    from wsi_espnet.tiling import Occupancy

    lab = np.zeros((900, 1100), np.uint8)
    lab[250:700, 300:900] = _labels(450, 600)  # labels only inside the hinted cells
    hint = np.zeros((-(-900 // 200), -(-1100 // 200)), bool)
    hint[1:4, 1:5] = True  # rows 200..800, columns 200..1000
    z = recorded(_zarr(tmp_path, lab))
    reads = z.reads
    path = write_mask_tiff(tmp_path / "hint.tif", z, MPP, NAMES, COLORS, tile=128, block=128,
                           occupied=Occupancy(200, hint))
    with tifffile.TiffFile(path) as tif:
        for level, ref in zip(tif.series[0].levels, _pyramid(np.where(lab == 255, 0, lab), pyramid_shapes(900, 1100, 128))):
            assert np.array_equal(level.asarray(), ref)
    assert reads
    for ys, xs in reads:  # every read touches a hinted cell
        assert hint[ys.start // 200 : -(-ys.stop // 200), xs.start // 200 : -(-xs.stop // 200)].any()
    read_px = sum((ys.stop - ys.start) * (xs.stop - xs.start) for ys, xs in reads)
    assert read_px < 2 * lab.size * 0.75  # two passes over level 0, each skipping most of its background


def test_numpy_input_bigtiff_and_one_level(tmp_path):
    lab = _labels(100, 120)
    path = write_mask_tiff(tmp_path / "small.tif", lab, 2.0, NAMES, COLORS, tile=128, bigtiff=True)
    assert read_mask_info(path).scale is None
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        assert len(tif.series[0].levels) == 1
        assert np.array_equal(tif.asarray(), np.where(lab == 255, 0, lab))
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 1 and slide.dimensions == (120, 100)


def test_bigtiff_pyramid_is_linked_for_openslide(tmp_path):
    lab = _labels(300, 520)
    path = write_mask_tiff(tmp_path / "big.tif", lab, 1.0, NAMES, COLORS, tile=128, bigtiff=True)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((520, 300), (260, 150), (130, 75), (65, 38))


def test_existing_output_and_failed_write_leave_no_trace(tmp_path, written):
    lab = _labels(300, 300)
    target = tmp_path / "m.tif"
    (tmp_path / ".m.tif.levels").mkdir()  # scratch of a run that was killed
    (tmp_path / ".m.tif.levels" / "level1.u8").write_bytes(b"x")
    (tmp_path / "m.tif.partial").write_bytes(b"half a file")
    write_mask_tiff(target, lab, 1.0, NAMES, COLORS, tile=128)
    with pytest.raises(OutputExistsError):
        write_mask_tiff(target, lab, 1.0, NAMES, COLORS, tile=128)
    # A label beyond the class list (a bug upstream) stops the write: no file, no leftovers.
    bad = lab.copy()
    bad[-1, -1] = 9
    with pytest.raises(ValueError, match="label value 9") as kept:
        write_mask_tiff(tmp_path / "bad.tif", bad, 1.0, NAMES, COLORS, tile=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]
    # nor open scratch files, while the exception (and its frames) is kept, as a task framework does
    assert kept.traceback and not _open_files(".levels")


def _open_files(part: str) -> list[str]:
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir() if fds.is_dir() else []:
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    return [t for t in targets if part in t]


def test_memory_stays_far_below_the_label_array(tmp_path):
    n = 8192  # 64 MiB of labels; the writer holds a few blocks and tiles at a time
    z = zarr.create_array(store=str(tmp_path / "big.zarr"), shape=(n, n), chunks=(512, 512), dtype="uint8")
    stripes = (np.arange(n, dtype=np.uint32)[None, :] // 61 % 4).astype(np.uint8)
    for y in range(0, n, 1024):
        z[y: y + 1024] = np.broadcast_to(stripes, (1024, n))
    tracemalloc.start()
    try:
        write_mask_tiff(tmp_path / "big.tif", z, 1.0, NAMES, COLORS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n / 3, f"peak {peak / 2**20:.1f} MiB for a {n * n / 2**20:.0f} MiB label array"
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert np.array_equal(tif.series[0].levels[0].asarray()[:7, :], np.broadcast_to(stripes, (7, n)))


def test_provenance_is_kept_as_text_whatever_the_file_name_holds(tmp_path):
    labels = np.zeros((200, 300), np.uint8)
    labels[20:90, 40:200] = 1
    made = {"software": "wsi-espnet 9.9", "slide": 'case 7 <left> & "right"\r\n\tPräparat µ.svs', "tile": 512}
    path = write_mask_tiff(tmp_path / "m.tif", labels, 0.5, ["bg", "tumour"], [(0, 0, 0), (200, 0, 0)],
                           tile=128, provenance=made)
    assert read_mask_info(path).provenance == {k: str(v) for k, v in made.items()}
    # What XML cannot hold (control characters; a file name that was not UTF-8 decodes to lone
    # surrogates) is spelled as a backslash escape, and the OME-XML stays valid for every reader.
    odd = write_mask_tiff(tmp_path / "o.tif", labels, 0.5, ["bg", "tumour"], [(0, 0, 0), (200, 0, 0)], tile=128,
                          provenance={"slide": "bad\udcff tab\x01.svs"})
    assert read_mask_info(odd).provenance == {"slide": "bad\\xff tab\\x01.svs"}
    with tifffile.TiffFile(odd) as tif:  # read as OME (pyramid and all), not as a generic TIFF
        assert tif.is_ome and tif.series[0].kind == "ome" and len(tif.series[0].levels) == 3
    with openslide.OpenSlide(str(path)) as osr:  # still an OME-TIFF that OpenSlide and tifffile open
        assert osr.dimensions == (300, 200)
    assert tifffile.TiffFile(path).is_ome
    plain = write_mask_tiff(tmp_path / "p.tif", labels, 0.5, ["bg", "tumour"], [(0, 0, 0), (200, 0, 0)], tile=128)
    assert read_mask_info(plain).provenance == {}
    assert "Provenance" not in tifffile.TiffFile(plain).pages[0].description
