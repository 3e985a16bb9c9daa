"""The synthetic demo slide: a real Aperio SVS and OME-TIFF, truth consistent with pixels, lazy."""

from __future__ import annotations

import tracemalloc

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from wsi_espnet import cli, demo
from wsi_espnet.demo import (BACKGROUND, BENIGN, BLOOD, MALIGNANT, SECRETION, STROMA, DemoSlideSpec,
                             demo_truth, write_demo_slide, write_truth)
from wsi_espnet.errors import OutputExistsError, UserError
from wsi_espnet.slide import open_slide


def test_openslide_sees_an_aperio_slide_with_mpp_and_objective(demo_svs):
    osr = openslide.OpenSlide(str(demo_svs))
    props = osr.properties
    assert props["openslide.vendor"] == "aperio"
    assert float(props["openslide.mpp-x"]) == 0.5 and float(props["openslide.mpp-y"]) == 0.5
    assert float(props["openslide.objective-power"]) == 20
    assert osr.level_dimensions == ((2048, 1536), (1024, 768), (512, 384), (256, 192))
    assert osr.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert props["openslide.level[0].tile-width"] == "256"
    assert "thumbnail" in osr.associated_images
    osr.close()
    tif = tifffile.TiffFile(demo_svs)
    assert tif.is_svs and tif.pages[0].compression == tifffile.COMPRESSION.JPEG and tif.pages[0].is_tiled
    assert not tif.pages[1].is_tiled  # Aperio layout: the thumbnail is the stripped second IFD
    assert tif.pages[0].description.startswith("Aperio Image Library")
    tif.close()


def test_bigtiff_svs_is_still_aperio_for_both_readers(tmp_path):
    path = write_demo_slide(tmp_path / "big.svs", 600, 400, bigtiff=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.is_svs
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.vendor == b.vendor == "aperio" and a.mpp == b.mpp == 0.5
        np.testing.assert_array_equal(a.read_region((0, 0), 1, (300, 200)), b.read_region((0, 0), 1, (300, 200)))


def test_ome_tiff_has_physical_size_and_subifd_pyramid(demo_ome):
    with tifffile.TiffFile(demo_ome) as tif:
        assert tif.is_ome and len(tif.pages) == 1  # levels live in SubIFDs
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(1536, 2048, 3), (768, 1024, 3), (384, 512, 3), (192, 256, 3)]
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata and 'PhysicalSizeXUnit="µm"' in tif.ome_metadata
    with open_slide(demo_ome) as s:
        assert (s.backend, s.vendor, s.mpp, s.level_count) == ("tifffile", "ome", 0.5, 4)


def test_truth_is_consistent_with_the_pixels(demo_svs, demo_spec):
    """At 1 µm/px (what the model sees): the written slide is the rendered function up to JPEG, and
    each class has its own colour."""
    with open_slide(demo_svs) as s:
        rgb = s.read_at_mpp(0, 0, 1024, 768, 1.0).astype(int)
    labels = demo_spec.labels(0, 0, 1024, 768, 1.0)
    rendered = demo_spec.rgb(0, 0, 1024, 768, 1.0).astype(int)
    assert np.abs(rgb - rendered).mean() < 4  # JPEG q90
    counts = np.bincount(labels.ravel(), minlength=8)
    assert all(counts[c] > 500 for c in (BACKGROUND, BENIGN, MALIGNANT, STROMA, SECRETION, BLOOD)), counts
    # interior pixels (away from class edges, where JPEG mixes colours)
    same = np.ones_like(labels, bool)
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            same &= np.roll(labels, (dy, dx), axis=(0, 1)) == labels
    mean = {c: rgb[(labels == c) & same].mean(axis=0) for c in range(8) if ((labels == c) & same).sum() > 200}
    assert (rgb[(labels == BACKGROUND) & same] >= 225).all()  # glass is near-white
    assert (mean[STROMA][0] > mean[STROMA][1] + 40)  # pink
    assert mean[MALIGNANT].sum() < mean[BENIGN].sum() - 60  # malignant epithelium is darker
    assert mean[BLOOD][0] > mean[BLOOD][1] + 80  # red
    assert mean[SECRETION].min() > 190  # pale
    colours = np.array(list(mean.values()))
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(len(colours)) * 1e9
    assert gaps.min() > 15, mean


def test_any_region_at_any_resolution_is_the_same_function(demo_spec):
    for mpp in (0.5, 1.0, 3.0):
        big_rgb, big_lab = demo_spec.render(100, 50, 300, 200, mpp)
        for x, y, w, h in ((100, 50, 37, 200), (217, 99, 183, 151), (399, 249, 1, 1)):
            rgb, lab = demo_spec.render(x, y, w, h, mpp)
            np.testing.assert_array_equal(lab, big_lab[y - 50:y - 50 + h, x - 100:x - 100 + w])
            np.testing.assert_array_equal(rgb, big_rgb[y - 50:y - 50 + h, x - 100:x - 100 + w])
    # labels at a coarser resolution are samples of the same layout: mostly equal to the fine labels
    fine = demo_spec.labels(0, 0, 1024, 768, 1.0)
    coarse = demo_spec.labels(0, 0, 256, 192, 4.0)
    assert (fine[2::4, 2::4] == coarse).mean() > 0.97
    assert not np.array_equal(DemoSlideSpec(2048, 1536, seed=1).labels(0, 0, 256, 192, 4.0), coarse)
    np.testing.assert_array_equal(demo_truth(2048, 1536, seed=0, mpp=0.5, out_mpp=4.0), coarse)


def test_truth_png_and_tiff_hold_class_ids(demo_truth_png, demo_spec, tmp_path):
    labels = demo_spec.labels(0, 0, 1024, 768, 1.0)
    np.testing.assert_array_equal(imagecodecs.imread(demo_truth_png), labels)
    tif_path = write_truth(tmp_path / "truth.tif", demo_spec, mpp=1.0)
    with tifffile.TiffFile(tif_path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert tuple(page.colormap[:, 2] // 257) == (200, 0, 0)  # Malignant epithelium's colour
        np.testing.assert_array_equal(page.asarray(), labels)
        x = page.tags["XResolution"].value
        assert x[0] / x[1] == pytest.approx(1e4)  # px per cm at 1 µm/px


def test_pen_marks_and_empty_slides(tmp_path):
    pen = DemoSlideSpec(2048, 1536, seed=0, pen=True)
    rgb, lab = pen.render(0, 0, 512, 384, 4.0)
    ink = (rgb[..., 0] < 90) & (rgb[..., 2] > rgb[..., 0] + 40)
    assert ink.sum() > 500 and (lab[ink] == BACKGROUND).all()
    empty = DemoSlideSpec(1024, 768, empty=True)
    rgb, lab = empty.render(0, 0, 1024, 768)
    assert (lab == BACKGROUND).all() and rgb.min() >= 230


def test_writing_is_lazy_memory_does_not_grow_with_slide_size(tmp_path):
    def peak(w, h):
        tracemalloc.start()
        write_demo_slide(tmp_path / f"m{w}.svs", w, h, workers=2)  # render and encode threads too
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    DemoSlideSpec(64, 64).render(0, 0, 8, 8)  # one-time caches out of the way
    small, large = peak(1024, 512), peak(6144, 2048)  # 24x the pixels
    raw_level0 = 6144 * 2048 * 3
    # the peak is a few tiles in flight per thread (10-15 MB, varying with thread timing), whatever
    # the slide size; holding level 0, or tifffile's default 512 MB encode batches, would show here
    assert large < raw_level0 / 2, (small, large)
    assert large < small * 1.5 + 4e6, (small, large)


def test_outputs_are_atomic_and_need_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "a.svs"
    write_demo_slide(out, 512, 384)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_demo_slide(out, 512, 384, seed=3)
    assert out.read_bytes() == before
    write_demo_slide(out, 512, 384, seed=3, overwrite=True)
    assert out.read_bytes() != before

    calls = {"n": 0}
    real_rgb = DemoSlideSpec.rgb

    def failing_rgb(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real_rgb(self, *a, **k)

    monkeypatch.setattr(DemoSlideSpec, "rgb", failing_rgb)
    with pytest.raises(RuntimeError):
        write_demo_slide(tmp_path / "b.svs", 1024, 1024, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svs"]  # nothing half-written, no temp file


def test_cli_writes_slide_ome_and_truth_and_refuses_to_overwrite(tmp_path, capsys):
    out, ome, truth = tmp_path / "d.svs", tmp_path / "d.ome.tif", tmp_path / "t.png"
    args = ["demo-slide", str(out), "--size", "600x400", "--seed", "5", "--ome", str(ome), "--truth", str(truth)]
    assert cli.main(args) == 0
    with open_slide(out) as a, open_slide(ome) as b:
        assert a.dimensions == b.dimensions == (600, 400) and a.vendor == "aperio"
        np.testing.assert_array_equal(a.read_region((0, 0), 1, (300, 200)), b.read_region((0, 0), 1, (300, 200)))
    np.testing.assert_array_equal(imagecodecs.imread(truth), DemoSlideSpec(600, 400, seed=5).labels(0, 0, 600, 400))
    capsys.readouterr()
    stamp = out.stat().st_mtime_ns
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and "\n" not in err
    assert out.stat().st_mtime_ns == stamp
    assert cli.main(["demo-slide", str(tmp_path / "x.png")]) == 2
    assert cli.main(["demo-slide", str(tmp_path / "y.svs"), "--truth", str(tmp_path / "t.jpg")]) == 2
    assert cli.main(["demo-slide", str(tmp_path / "y.svs"), "--truth", str(truth), "--truth-mpp", "0",
                     "--overwrite"]) == 2
    assert not (tmp_path / "y.svs").exists()  # arguments are checked before anything is written
    with pytest.raises(SystemExit):
        cli.main(["demo-slide", str(out), "--size", "12x"])


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        DemoSlideSpec(0, 10)
    with pytest.raises(UserError):
        write_demo_slide(tmp_path / "a.svs", 64, 64, tile=100)
    with pytest.raises(UserError):
        write_demo_slide(tmp_path / "a.svs", 64, 64, fmt="png")
    with pytest.raises(UserError, match="does not exist"):
        write_demo_slide(tmp_path / "no" / "a.svs", 64, 64)
    assert demo.default_truth_mpp(DemoSlideSpec(100_000, 100_000)) == 8.0
