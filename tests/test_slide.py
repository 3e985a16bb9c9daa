"""The slide reader on real files from real writers, both backends, and on the demo slide."""

from __future__ import annotations

import pickle
import shutil

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from wsi_espnet.errors import NoMppError, SlideError, UserError
from wsi_espnet.slide import OpenSlideSlide, TiffSlide, open_slide

FIX = "openslide-python-fixtures"


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: k x k block mean, rounded half up."""
    h, w = a.shape[0] // k, a.shape[1] // k
    s = a[: h * k, : w * k].astype(np.int64).reshape(h, k, w, k, 3).sum(axis=(1, 3))
    return ((s + k * k // 2) // (k * k)).astype(np.uint8)


# --------------------------------------------------------------------------- what each real file is
@pytest.mark.parametrize(
    "name, backend, vendor, dims, levels, mpp, objective",
    [
        ("real/CMU-1-Small-Region.svs", "openslide", "aperio", (2220, 2967), 1, 0.499, 20.0),
        ("real/TCGA-CR-7395-01A-01-TS1.svs", "openslide", "aperio", (4443, 3567), 2, None, None),
        ("real/dicom-camelyon16/camelyon16-lymph-node.dcm", "openslide", "dicom", (1152, 700), 1, 28.9685, None),
        ("real/test3-DAPI-2-387.ndpi", "openslide", "hamamatsu", (3968, 4864), 7, 0.22818, 40.0),
        ("real/OS-1-detail.ome.tif", "tifffile", "ome", (1101, 1101), 1, 0.2271, None),
        (f"{FIX}/boxes.tiff", "openslide", "generic-tiff", (300, 250), 4, None, None),
        (f"{FIX}/boxes_0.dcm", "openslide", "dicom", (16, 16), 1, 0.499, 20.0),
        (f"{FIX}/small.svs", "openslide", "aperio", (16, 16), 1, 0.499, 20.0),
        (f"{FIX}/boxes.png", "image", None, (300, 250), 1, None, None),
    ],
)
def test_real_files_open_with_the_right_geometry(slides_dir, name, backend, vendor, dims, levels, mpp, objective):
    with open_slide(slides_dir / name) as s:
        assert (s.backend, s.vendor, s.dimensions, s.level_count) == (backend, vendor, dims, levels)
        assert s.mpp == (None if mpp is None else pytest.approx(mpp, rel=1e-3))
        assert s.objective_power == objective
        region = s.read_region((0, 0), s.level_count - 1, (16, 16))
        assert region.shape == (16, 16, 3) and region.dtype == np.uint8
        assert s.bounds is None
        thumb = s.get_thumbnail(128)
        assert max(thumb.shape[:2]) <= 128 and thumb.shape[2] == 3
        # aspect ratio kept
        assert abs(thumb.shape[1] / thumb.shape[0] - dims[0] / dims[1]) < 0.05


def test_slide_without_mpp_stops_with_a_clear_message_unless_given(slides_dir):
    path = slides_dir / "real/TCGA-CR-7395-01A-01-TS1.svs"
    with open_slide(path) as s:
        assert s.mpp is None
        with pytest.raises(NoMppError, match="--mpp") as err:
            s.read_at_mpp(0, 0, 64, 64, 1.0)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(NoMppError):
            s.size_at_mpp(1.0)
        # a slide without mpp still gives thumbnails (tissue detection needs no physical size)
        assert s.get_thumbnail(256).shape == (206, 256, 3)
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.file_mpp is None
        assert s.size_at_mpp(0.5) == (2222, 1784)
        tile = s.read_at_mpp(1000, 800, 256, 256, 0.5)
        assert tile.shape == (256, 256, 3) and tile.std() > 10  # real tissue, not blank


def test_generic_tiff_at_72_dpi_has_no_mpp(slides_dir):
    """boxes.tiff says 72 dpi (28.35 px/cm), a writer's default: not 352.8 µm/px, in both backends."""
    path = slides_dir / FIX / "boxes.tiff"
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as s:
            assert s.mpp is None
            with pytest.raises(NoMppError, match="software default"):
                s.read_at_mpp(0, 0, 8, 8, 1.0)


def test_ome_tiff_gets_its_mpp_from_ome_xml_and_is_not_for_openslide(slides_dir):
    path = slides_dir / "real/OS-1-detail.ome.tif"
    with open_slide(path) as s:
        assert isinstance(s, TiffSlide)
        assert s.properties["ome.PhysicalSizeX"].startswith("0.227")
        assert s.mpp == pytest.approx((0.2270972430394695 + 0.22710240047237298) / 2)
        w, h = s.size_at_mpp(1.0)
        assert (w, h) == (250, 250)
        assert s.read_at_mpp(0, 0, w, h, 1.0).mean() < 230  # H&E, not glass
    with pytest.raises(SlideError, match="OS-1-detail.ome.tif"):
        open_slide(path, backend="openslide")


@pytest.mark.parametrize("name", ["real/dicom-camelyon16/camelyon16-lymph-node.dcm", "real/dicom-camelyon16", "copy"])
def test_dicom_opens_through_its_dcm_file_or_its_folder(slides_dir, tmp_path, name):
    path, expect = slides_dir / name, "camelyon16-lymph-node.dcm"
    if name == "copy":  # a folder whose first .dcm is no slide, and the slide's file without a suffix
        path, expect = tmp_path / "dicom", "image0001"
        path.mkdir()
        (path / "DICOMDIR.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
        shutil.copy(slides_dir / "real/dicom-camelyon16/camelyon16-lymph-node.dcm", path / expect)
    with open_slide(path) as s:
        assert s.path.name == expect
        region = s.read_region((0, 0), 0, s.dimensions)
        assert region.shape == (700, 1152, 3)
        assert region.min() < 150  # stained tissue is there


# --------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize(
    "name, regions",
    [
        ("real/CMU-1-Small-Region.svs", [((0, 0), 0, (2220, 2967)), ((-40, 2900), 0, (300, 200))]),
        ("real/TCGA-CR-7395-01A-01-TS1.svs", [((1000, 500), 0, (700, 600)), ((0, 0), 1, (2221, 1783))]),
        ("real/test3-DAPI-2-387.ndpi", [((1024, 2048), 0, (512, 512)), ((0, 0), 1, (1984, 2432)),
                                        ((800, 1600), 2, (300, 200)), ((0, 0), 3, (496, 608))]),
        (f"{FIX}/boxes.tiff", [((0, 0), 0, (300, 250)), ((20, 40), 1, (100, 60)), ((0, 0), 2, (75, 62)),
                               ((0, 0), 3, (37, 31))]),
        (f"{FIX}/small.svs", [((0, 0), 0, (16, 16))]),
    ],
)
def test_openslide_and_tifffile_agree_pixel_for_pixel(slides_dir, name, regions):
    path = slides_dir / name
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.level_dimensions[: b.level_count] == b.level_dimensions
        assert a.level_downsamples[: b.level_count] == pytest.approx(b.level_downsamples)
        assert (a.mpp, a.objective_power) == (b.mpp, b.objective_power)
        for location, level, size in regions:
            ra, rb = a.read_region(location, level, size), b.read_region(location, level, size)
            assert ra.shape == (size[1], size[0], 3)
            np.testing.assert_array_equal(ra, rb, err_msg=f"{name} {location} level {level}")


def test_backends_agree_on_the_demo_slide_and_its_ome_twin(demo_svs, demo_ome):
    with open_slide(demo_svs, backend="openslide") as a, open_slide(demo_svs, backend="tifffile") as b, \
            open_slide(demo_ome) as c:
        assert a.level_dimensions == b.level_dimensions == c.level_dimensions
        for level, (w, h) in enumerate(a.level_dimensions):
            ra = a.read_region((0, 0), level, (w, h))
            np.testing.assert_array_equal(ra, b.read_region((0, 0), level, (w, h)))
            np.testing.assert_array_equal(ra, c.read_region((0, 0), level, (w, h)))
        np.testing.assert_array_equal(a.read_at_mpp(37, 11, 300, 200, 1.3), c.read_at_mpp(37, 11, 300, 200, 1.3))


def test_png_reads_like_the_same_image_as_tiff(slides_dir):
    with open_slide(slides_dir / FIX / "boxes.png") as png, open_slide(slides_dir / FIX / "boxes.tiff") as tif:
        np.testing.assert_array_equal(png.read_region((0, 0), 0, (300, 250)), tif.read_region((0, 0), 0, (300, 250)))
        with pytest.raises(NoMppError):
            png.read_at_mpp(0, 0, 10, 10, 1.0)
    with open_slide(slides_dir / FIX / "boxes.png", mpp=0.5) as png:
        assert png.read_at_mpp(0, 0, 150, 125, 1.0).shape == (125, 150, 3)


# --------------------------------------------------------------------------- resolution
def test_integer_factor_is_the_block_mean_of_level_0(slides_dir):
    path = slides_dir / "real/CMU-1-Small-Region.svs"  # one level: every factor comes from level 0
    with open_slide(path) as s:
        for k in (2, 4, 17):  # 17: past the 16 x 16 blocks whose sums fit 16 bits
            w, h = s.size_at_mpp(0.499 * k)
            assert (w, h) == (round(2220 / k), round(2967 / k))
            n = 1024 // k
            got = s.read_at_mpp(-(-512 // k), -(-1024 // k), n, n, 0.499 * k)
            np.testing.assert_array_equal(got, _block_mean(s.read_region((-(-512 // k) * k, -(-1024 // k) * k), 0, (n * k, n * k)), k))


def test_level_is_used_where_it_matches_and_reads_stay_exact(demo_svs):
    with open_slide(demo_svs) as s:
        assert s.level_for_downsample(2.0) == 1
        assert s.level_for_downsample(1.99) == 1  # within the 2 % tolerance
        assert s.level_for_downsample(2.0 / 1.0108) == 1  # an Aperio AT2 scan's 4x level for 1 µm/px
        assert s.level_for_downsample(1.95) == 0 and s.level_for_downsample(1.9) == 0
        assert s.level_for_downsample(100) == 3
        np.testing.assert_array_equal(s.read_at_mpp(0, 0, 1024, 768, 1.0), s.read_region((0, 0), 1, (1024, 768)))
        np.testing.assert_array_equal(s.read_at_mpp(64, 32, 128, 96, 4.0), s.read_region((512, 256), 3, (128, 96)))
        # 3 µm/px: no level matches, level 2 (2 µm/px) is read and resampled by 1.5
        assert s.level_for_downsample(6.0) == 2
        level2 = s.read_region((0, 0), 2, (512, 384)).astype(int)
        got = s.read_at_mpp(0, 0, 340, 256, 3.0).astype(int)
        # pixel (1, 1) covers level-2 pixels [1.5, 3) x [1.5, 3): weights 1/3, 2/3 per axis
        w = np.array([1 / 3, 2 / 3])
        want = np.einsum("i,j,ijc->c", w, w, level2[1:3, 1:3])
        assert np.abs(got[1, 1] - want).max() <= 0.5 + 1e-4


def test_fractional_factor_is_the_exact_area_average(tmp_path):
    """On a ramp, each output pixel must be the area average of the input over its footprint,
    sub-pixel offset included; reference by dense numerical integration."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (4, 1, 3))
    path = tmp_path / "ramp.png"
    path.write_bytes(imagecodecs.png_encode(ramp))
    with open_slide(path, mpp=1.0) as s:
        for f in (1.5, 2.37, 0.7):
            x0, n = 7, int(200 / f) - 8
            got = s.read_at_mpp(x0, 0, n, 2, f)[0, :, 0].astype(float)
            t = (np.arange(x0, x0 + n)[:, None] + (np.arange(4000)[None, :] + 0.5) / 4000) * f
            want = np.floor(t).mean(axis=1)  # pixel j holds value j on [j, j+1)
            assert np.abs(got - want).max() <= 0.5 + 1e-4, f


@pytest.mark.parametrize("backend, mpp", [("openslide", 0.5), ("tifffile", 0.5), ("openslide", 0.73)])
def test_tiles_of_the_virtual_image_stitch_to_one_big_read(slides_dir, backend, mpp):
    """TCGA's level 1 has OpenSlide downsample 2.0005: tiles must still stitch bit-exactly."""
    with open_slide(slides_dir / "real/TCGA-CR-7395-01A-01-TS1.svs", mpp=0.25, backend=backend) as s:
        big = s.read_at_mpp(300, 200, 600, 400, mpp)
        for ty in range(0, 400, 160):
            for tx in range(0, 600, 250):
                w, h = min(250, 600 - tx), min(160, 400 - ty)
                np.testing.assert_array_equal(s.read_at_mpp(300 + tx, 200 + ty, w, h, mpp), big[ty:ty + h, tx:tx + w])


def test_fractional_scan_resolution_stitches_too(slides_dir):
    with open_slide(slides_dir / "real/CMU-1-Small-Region.svs") as s:  # 0.499 -> 1.0 is factor 2.004
        big = s.read_at_mpp(0, 0, 512, 512, 1.0)
        tiles = [s.read_at_mpp(x, y, 256, 256, 1.0) for y in (0, 256) for x in (0, 256)]
        np.testing.assert_array_equal(np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]), big)


def test_outside_the_slide_is_white(demo_svs, slides_dir):
    for backend in ("openslide", "tifffile"):
        with open_slide(slides_dir / "real/CMU-1-Small-Region.svs", backend=backend) as s:
            r = s.read_region((2200, -10), 0, (40, 30))
            assert (r[:10] == 255).all() and (r[:, 20:] == 255).all()
            assert (r[10:, :20] != 255).any()
            t = s.read_at_mpp(1100, 0, 30, 10, 1.0)  # right edge at 1 µm/px: last columns past the slide
            assert (t[:, -5:] == 255).all()


def test_pickled_slide_reopens_with_the_same_settings(slides_dir):
    with open_slide(slides_dir / "real/TCGA-CR-7395-01A-01-TS1.svs", mpp=0.25, backend="tifffile") as s:
        clone = pickle.loads(pickle.dumps(s))
        assert (clone.backend, clone.mpp) == ("tifffile", 0.25)
        np.testing.assert_array_equal(clone.read_at_mpp(10, 10, 64, 64, 0.5), s.read_at_mpp(10, 10, 64, 64, 0.5))
        clone.close()


def test_mpp_override_wins_and_bad_values_are_user_errors(demo_svs):
    with open_slide(demo_svs, mpp=0.25) as s:
        assert (s.mpp, s.file_mpp) == (0.25, 0.5)
        assert s.size_at_mpp(1.0) == (512, 384)
    for bad in (0, -1, float("nan")):
        with pytest.raises(UserError, match="mpp"):
            open_slide(demo_svs, mpp=bad)
    with open_slide(demo_svs) as s:
        with pytest.raises(UserError):
            s.read_at_mpp(0, 0, 10, 10, 0)
        with pytest.raises(UserError):
            s.read_region((0, 0), 0, (0, 10))
        with pytest.raises(UserError, match="level 9"):
            s.read_region((0, 0), 9, (10, 10))


# --------------------------------------------------------------------------- bad input
def _one_line_slide_error(path, **kw) -> str:
    with pytest.raises(SlideError) as err:
        open_slide(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_paths_give_one_line_errors_naming_the_file(tmp_path):
    assert "no such file" in _one_line_slide_error(tmp_path / "missing.svs")
    assert "folder without a DICOM slide" in _one_line_slide_error(tmp_path)
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    assert "not a slide" in _one_line_slide_error(text)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    assert "empty" in _one_line_slide_error(empty)
    with pytest.raises(UserError, match="backend"):
        open_slide(text, backend="bioformats")


def test_unopenable_and_unreadable_fixtures(slides_dir):
    assert "52479" in _one_line_slide_error(slides_dir / FIX / "unopenable.tiff")
    path = slides_dir / FIX / "unreadable.svs"
    s = open_slide(path)  # opens: the failure is in the tile data
    assert isinstance(s, OpenSlideSlide)
    with pytest.raises(SlideError, match="Bogus marker length") as err:
        s.read_region((0, 0), 0, (16, 16))
    assert not isinstance(err.value, openslide.OpenSlideError) and str(path) in str(err.value)
    with pytest.raises(SlideError):
        s.read_at_mpp(0, 0, 4, 4, 1.0)
    s.close()
    assert "Bogus marker length" in _one_line_slide_error(path, backend="tifffile")


@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.999])
def test_truncated_slide_fails_at_open_in_every_backend(demo_svs, tmp_path, fraction):
    data = demo_svs.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    for backend in ("auto", "tifffile", "openslide"):
        msg = _one_line_slide_error(cut, backend=backend)
        assert any(w in msg for w in ("truncated", "Short read", "not a slide", "invalid", "Cannot")), msg


# --------------------------------------------------------------------------- other TIFF/image flavours
def test_strip_tiff_16_bit_grey_with_resolution_in_cm(tmp_path):
    """OpenSlide does not open non-tiled TIFF: tifffile reads it lazily by strips."""
    import tifffile

    data = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) * 7 % 65536).astype(np.uint16)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, data, rowsperstrip=16, resolution=(4000, 4000), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert (s.backend, s.vendor, s.dimensions) == ("tifffile", "generic-tiff", (300, 200))
        assert s.mpp == pytest.approx(2.5)  # 4000 px/cm
        region = s.read_region((10, 20), 0, (5, 4))
        want = np.floor(data[20:24, 10:15] / 257.0 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(region, np.repeat(want[..., None], 3, axis=2))
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, data, resolution=(25400, 25400), resolutionunit="INCH")
    with open_slide(inch) as s:
        assert s.mpp == pytest.approx(1.0)
    none = tmp_path / "none.tif"
    tifffile.imwrite(none, data, resolution=(5, 5), resolutionunit="NONE")
    with open_slide(none) as s:
        assert s.mpp is None
        with pytest.raises(NoMppError, match="no unit"):
            s.read_at_mpp(0, 0, 4, 4, 1.0)


def test_transparent_pixels_are_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red-ish, right half fully transparent
    rgba[:, 15:20, 3] = 128
    path = tmp_path / "alpha.png"
    path.write_bytes(imagecodecs.png_encode(rgba))
    with open_slide(path) as s:
        r = s.read_region((0, 0), 0, (30, 20))
        assert (r[:, :15] == (200, 0, 0)).all()
        assert (r[:, 20:] == 255).all()
        assert (r[:, 15:20] == (227, 127, 127)).all()  # (200*128 + 255*127) / 255, on white


@pytest.mark.parametrize("name", ["real/TCGA-CR-7395-01A-01-TS1.svs", "real/test3-DAPI-2-387.ndpi",
                                  "real/dicom-camelyon16/camelyon16-lymph-node.dcm", f"{FIX}/boxes.tiff"])
def test_direct_openslide_reads_match_openslide_python(slides_dir, name):
    """Tiles are read by OpenSlide straight into numpy (no PIL); the pixels must be those of the public
    ``OpenSlide.read_region`` composited on white: the same bytes where opaque, and where OpenSlide's
    premultiplied alpha is partial (level edges), within one grey level."""
    from wsi_espnet.slide import _RAW_READ, _rgba_on_white

    assert _RAW_READ is not None  # the fast path is live on this openslide-python
    with open_slide(slides_dir / name) as s:
        assert s._handle is not None  # its own check at open passed
        w, h = s.dimensions
        for level in range(s.level_count):
            for loc in [(0, 0), (-37, -50), (w - 150, h - 90), (w // 3, h // 3)]:
                ours = s.read_region(loc, level, (200, 120))
                ref = _rgba_on_white(np.asarray(s._osr.read_region(loc, level, (200, 120))))
                alpha = np.asarray(s._osr.read_region(loc, level, (200, 120)))[..., 3]
                np.testing.assert_array_equal(ours[alpha == 255], ref[alpha == 255])
                assert np.abs(ours.astype(int) - ref).max() <= 1
                assert (ours[alpha == 0] == 255).all()


def test_direct_reads_fall_back_when_their_check_at_open_fails(slides_dir, monkeypatch):
    """If openslide-python ever binds its C read differently, the check at open sees the mismatch
    and every read takes the public path: same pixels, no crash."""
    import wsi_espnet.slide as slide_mod

    def broken(handle, buf, x, y, level, w, h):  # fills the buffer with the wrong pixels
        import ctypes

        ctypes.memset(buf, 0x7F, w * h * 4)

    monkeypatch.setattr(slide_mod, "_RAW_READ", broken)
    with open_slide(slides_dir / "real/CMU-1-Small-Region.svs") as s:
        assert s._handle is None
        ref = slide_mod._rgba_on_white(np.asarray(s._osr.read_region((100, 200), 0, (64, 48))))
        np.testing.assert_array_equal(s.read_region((100, 200), 0, (64, 48)), ref)


def test_a_tiff_openslide_opens_but_cannot_decode_goes_to_tifffile(tmp_path):
    """32-bit float samples: OpenSlide opens the file as generic-tiff and fails on the first pixel
    ("can not handle images with 32-bit samples"); tifffile reads it."""
    rng = np.random.default_rng(0)
    img = (rng.random((512, 512, 3)) * 0.2 + 0.7).astype(np.float32)
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.mpp == pytest.approx(0.5)
        assert slide.read_at_mpp(0, 0, 64, 64, 0.5).shape == (64, 64, 3)


def test_non_square_pixels_are_said_and_read_at_their_mean(tmp_path):
    """A TIFF recording 0.25 µm across and 0.5 µm down (resolution tags, and OME's PhysicalSizeX/Y):
    read as squares of 0.375 µm, with a sentence saying so; 0.5 % apart is square; --mpp silences it."""
    rgb = np.full((256, 256, 3), 200, np.uint8)
    plain = tmp_path / "aniso.tif"
    tifffile.imwrite(plain, rgb, tile=(128, 128), photometric="rgb",
                     resolution=(40000, 20000), resolutionunit="CENTIMETER")
    ome = tmp_path / "aniso.ome.tif"
    tifffile.imwrite(ome, rgb, tile=(128, 128), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5})
    for path, backends in ((plain, ("openslide", "tifffile")), (ome, ("tifffile",))):
        for backend in backends:
            with open_slide(path, backend=backend) as s:
                assert s.mpp == pytest.approx(0.375)
                assert s.file_mpp_xy == pytest.approx((0.25, 0.5))
                assert "0.25 x 0.5 µm, not square" in s.non_square_pixels
                assert "by a factor of 2 between the two axes" in s.non_square_pixels
            with open_slide(path, backend=backend, mpp=0.3) as s:
                assert s.non_square_pixels == ""
    near = tmp_path / "near.tif"
    tifffile.imwrite(near, rgb, tile=(128, 128), photometric="rgb",
                     resolution=(40000, 39800), resolutionunit="CENTIMETER")
    with open_slide(near) as s:
        assert s.non_square_pixels == "" and s.mpp == pytest.approx((0.25 + 1e4 / 39800) / 2)


@pytest.mark.parametrize("planar", ["separate", "contig"])
def test_several_grey_channels_read_alike_whatever_their_layout(tmp_path, planar):
    """Four grey channels (a fluorescence TIFF): OpenSlide would show the first as grey (contiguous)
    or garble them (separate planes); they go to tifffile, which shows the first three as RGB, and
    are not taken for RGBA."""
    planes = np.stack([(np.arange(256)[None, :] // (c + 1)).repeat(256, 0) for c in range(4)]).astype(np.uint8)
    path = tmp_path / "grey4.tif"
    data = planes if planar == "separate" else np.moveaxis(planes, 0, -1)
    tifffile.imwrite(path, data, tile=(128, 128), photometric="minisblack", planarconfig=planar,
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        assert np.array_equal(s.read_region((0, 0), 0, (256, 256)), np.moveaxis(planes[:3], 0, -1))
    with pytest.raises(SlideError, match="4 grey channels"):
        open_slide(path, backend="openslide")


@pytest.mark.parametrize("samples, photometric, extrasamples, expected", [
    ([60, 120, 180, 0], "minisblack", ["unspecified", "unspecified", "unassalpha"], [255, 255, 255]),
    ([60, 120, 128], "minisblack", ["unspecified", "unassalpha"], [157, 157, 157]),  # first grey, half on white
    ([40, 20, 60, 128], "rgb", ["assocalpha"], [167, 147, 187]),  # premultiplied: white's share added
    ([40, 20, 60, 128], "rgb", ["unassalpha"], [147, 137, 157]),
    ([79, 31, 108, 100], "rgb", ["unspecified"], [79, 31, 108]),  # not alpha: ignored, OpenSlide would blend
])
def test_alpha_is_read_as_the_tiff_says(tmp_path, samples, photometric, extrasamples, expected):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.tile(np.array(samples, np.uint8), (64, 64, 1)), photometric=photometric,
                     extrasamples=extrasamples, tile=(32, 32))
    with open_slide(path) as s:
        assert s.read_region((0, 0), 0, (1, 1))[0, 0].tolist() == expected
        assert s.backend == ("openslide" if photometric == "rgb" and extrasamples != ["unspecified"] else "tifffile")


def test_an_ome_tiff_not_named_so_is_still_read_with_its_ome_metadata(tmp_path):
    path = tmp_path / "plain-name.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), tile=(32, 32), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with open_slide(path) as s:
        assert (s.backend, s.vendor, s.mpp) == ("tifffile", "ome", 0.5)
