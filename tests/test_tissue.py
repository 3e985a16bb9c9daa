"""Tissue detection: synthetic images with known answers (tissue, glass, ink, borders, fluorescence,
blank), the mask's geometry and PNG round trip, and the real slides in ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_espnet.outputs import current_umask
from wsi_espnet.errors import UserError
from wsi_espnet.slide import open_slide
from wsi_espnet.tissue import TissueMask, detect_tissue, tissue_mask_from_rgb

REAL = Path(__file__).resolve().parents[2] / "shared" / "slides" / "real"
PINK = (225, 140, 190)  # eosin-stained stroma
PURPLE = (120, 70, 150)  # haematoxylin-rich epithelium
BLUE_INK = (40, 60, 170)
GREEN_INK = (40, 150, 70)


def _glass(h=200, w=300, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(242, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def _disc(img, cy, cx, r, color, seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    texture = rng.normal(0, 12, (int(inside.sum()), 3))
    img[inside] = np.clip(np.asarray(color) + texture, 0, 255).astype(np.uint8)
    return inside


def test_blank_glass_gives_an_empty_mask():
    assert not tissue_mask_from_rgb(_glass()).any()
    # Degenerate inputs never crash.
    assert not tissue_mask_from_rgb(np.full((50, 50, 3), 255, np.uint8)).any()
    assert not tissue_mask_from_rgb(np.zeros((50, 50, 3), np.uint8)).any()
    assert tissue_mask_from_rgb(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1)
    assert tissue_mask_from_rgb(np.zeros((0, 7, 3), np.uint8)).shape == (0, 7)


def test_stained_tissue_is_found_and_specks_are_dropped():
    img = _glass()
    a = _disc(img, 100, 80, 45, PINK)
    b = _disc(img, 90, 210, 35, PURPLE, seed=2)
    speck = _disc(img, 20, 280, 2, PURPLE, seed=3)  # 13 px: dust, below min_object_px
    mask = tissue_mask_from_rgb(img, min_object_px=100)
    truth = a | b
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[speck].any()


def test_pen_ink_and_black_borders_are_rejected():
    img = _glass()
    tissue = _disc(img, 100, 100, 50, PINK)
    img[150:165, 20:290] = BLUE_INK  # a blue pen line crossing glass and tissue
    img[20:40, 200:290] = GREEN_INK
    img[:, -12:] = (10, 10, 10)  # black scanner border
    mask = tissue_mask_from_rgb(img, min_object_px=100)
    assert not mask[152:163, 20:290].any(), "blue ink kept"
    assert not mask[22:38, 202:288].any(), "green ink kept"
    assert not mask[:, -12:].any(), "black border kept"
    # Tissue away from the ink is kept.
    away = tissue.copy()
    away[140:175] = False
    assert mask[away].mean() > 0.95


def test_fluorescence_slide_detects_the_nuclei_region_and_dark_blank_is_empty():
    rng = np.random.default_rng(0)
    img = np.zeros((200, 200, 3), np.uint8)
    img[..., 2] = rng.integers(0, 6, (200, 200))  # dark background with noise
    # DAPI-like nuclei scattered densely in the left half only.
    ys, xs = rng.integers(5, 195, 1500), rng.integers(5, 95, 1500)
    for y, x in zip(ys, xs):
        img[y - 1 : y + 2, x - 1 : x + 2, 2] = 200
    mask = tissue_mask_from_rgb(img, min_object_px=50, closing_radius_px=2)
    assert mask[20:180, 10:90].mean() > 0.9
    assert mask[:, 120:].mean() < 0.02
    dark = np.zeros((100, 100, 3), np.uint8)
    dark[..., 2] = rng.integers(0, 6, (100, 100))
    assert not tissue_mask_from_rgb(dark).any()


def test_fraction_is_area_exact_and_outside_counts_as_glass():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half of a 100x100 level-0 slide (downsample 10)
    tm = TissueMask(mask=mask, downsample=10.0, level0_size=(95, 100))  # last mask column half off-slide
    assert tm.fraction(0, 0, 50, 100) == pytest.approx(1.0)
    assert tm.fraction(25, 0, 50, 100) == pytest.approx(0.5)
    assert tm.fraction(47, 3, 6, 6) == pytest.approx(0.5)  # sub-mask-pixel rectangle
    # Only the part on the slide counts: a padded tile over a small slide is judged by what it shows.
    assert tm.fraction(-50, 0, 100, 100) == pytest.approx(1.0)
    assert tm.fraction(0, 0, 1000, 1000) == pytest.approx(50 / 95)
    assert tm.fraction(200, 200, 10, 10) == 0.0
    np.testing.assert_allclose(tm.fractions(np.array([[0, 0, 95, 100], [50, 0, 50, 50]])), [50 / 95, 0.0])


def test_png_round_trip_and_hand_drawn_masks(tmp_path):
    rng = np.random.default_rng(0)
    tm = TissueMask(mask=rng.random((30, 40)) > 0.5, downsample=16.0, mpp=8.0, level0_size=(640, 480))
    path = tm.save_png(tmp_path / "mask.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # `tile --save-tissue-mask` is shared with the lab
    back = TissueMask.load_png(path)
    assert np.array_equal(back.mask, tm.mask)
    assert (back.downsample, back.mpp, back.level0_size) == (16.0, 8.0, (640, 480))
    with pytest.raises(UserError, match="made for a 640x480 slide"):
        TissueMask.load_png(path, level0_size=(1000, 480))
    # A hand-drawn mask without metadata: the downsample follows from the slide's size.
    from PIL import Image

    Image.fromarray(np.where(tm.mask, 255, 0).astype(np.uint8)).save(tmp_path / "drawn.png")
    drawn = TissueMask.load_png(tmp_path / "drawn.png", level0_size=(640, 480))
    assert drawn.downsample == 16.0 and np.array_equal(drawn.mask, tm.mask)
    with pytest.raises(UserError, match="downsample"):
        TissueMask.load_png(tmp_path / "drawn.png")
    with pytest.raises(UserError, match="aspect ratio"):
        TissueMask.load_png(tmp_path / "drawn.png", level0_size=(640, 900))
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(UserError, match="not a readable image"):
        TissueMask.load_png(tmp_path / "text.png", level0_size=(640, 480))


def test_real_he_slide_has_tissue_at_its_resolution():
    with open_slide(REAL / "CMU-1-Small-Region.svs") as slide:
        tm = detect_tissue(slide, target_mpp=8.0)
    assert tm.mode == "brightfield"
    # 8 µm/px would give a 186 px mask for this small crop: refined to >= 256 px on the longer side,
    # at a whole level-0 factor (11.6 -> 12).
    assert tm.downsample == 12.0 and tm.mpp == pytest.approx(12 * 0.499)
    assert tm.mask.shape == (248, 185)  # ceil(2967 / 12), ceil(2220 / 12)
    # The skin section covers roughly a third of this crop; glass is the rest.
    assert 0.25 < tm.tissue_fraction < 0.5
    assert not tm.mask[:10, :10].any()  # top-left corner is glass


def test_slide_without_mpp_still_gets_a_mask():
    with open_slide(REAL / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        assert slide.mpp is None
        tm = detect_tissue(slide, target_mpp=8.0)
    assert tm.mpp is None and tm.downsample == pytest.approx(16.0)
    assert 0.5 < tm.tissue_fraction < 0.8


def test_fluorescence_ndpi_does_not_crash():
    with open_slide(REAL / "test3-DAPI-2-387.ndpi") as slide:
        tm = detect_tissue(slide, target_mpp=8.0)
    assert tm.mode == "fluorescence"
    assert 0.2 < tm.tissue_fraction < 0.95


def test_agrees_with_the_demo_slides_ground_truth_and_drops_its_pen_stroke():
    from wsi_espnet.demo import BACKGROUND, DemoSlideSpec

    spec = DemoSlideSpec(8192, 8192, mpp=0.5, seed=0, pen=True)
    w, h = spec.size_at_mpp(8.0)
    rgb, labels = spec.render(0, 0, w, h, 8.0)
    truth = labels != BACKGROUND  # the pen stroke is labelled background in the truth
    mask = tissue_mask_from_rgb(rgb, min_object_px=10_000 / 64, min_hole_px=10_000 / 64)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.97
    # Where the stroke crosses tissue (tissue without the pen, background with it): ink, not tissue.
    no_pen = DemoSlideSpec(8192, 8192, mpp=0.5, seed=0, pen=False).labels(0, 0, w, h, 8.0)
    inked_tissue = (no_pen != BACKGROUND) & ~truth
    assert inked_tissue.sum() > 500 and not mask[inked_tissue].any()


def test_detect_tissue_on_the_demo_svs_matches_its_truth(demo_svs, demo_spec):
    from wsi_espnet.demo import BACKGROUND

    with open_slide(demo_svs) as slide:
        tm = detect_tissue(slide)
    h, w = tm.mask.shape
    truth = demo_spec.labels(0, 0, w, h, tm.mpp) != BACKGROUND
    assert (tm.mask & truth).sum() / (tm.mask | truth).sum() > 0.95
    # Tile-sized fractions agree with the truth too (what the patch grid uses).
    k = 1024 // int(tm.downsample)
    assert tm.fraction(0, 0, 1024, 1024) == pytest.approx(truth[:k, :k].mean(), abs=0.03)


def test_counts_by_blocks_are_bincounts_and_cleaning_keeps_its_answers_on_a_large_mask():
    """Component sizes and histograms are counted a block of rows at a time (a whole-mask
    ``bincount`` widens it to 8 bytes a pixel first): on a mask of several blocks they are the
    whole-array counts, and small objects and holes go exactly as a plain reading of the rule says."""
    from scipy import ndimage as ndi

    from wsi_espnet.tissue import _counts, fill_small_holes, remove_small_objects

    rng = np.random.default_rng(3)
    values = rng.integers(0, 300, (1500, 1100)).astype(np.int32)  # ~1.6 blocks of 2**20 pixels
    assert np.array_equal(_counts(values, 300), np.bincount(values.ravel(), minlength=300))
    mask = ndi.binary_opening(rng.random((1500, 1100)) < 0.55)
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    expected = np.isin(labels, np.flatnonzero(sizes >= 40)) & mask
    assert np.array_equal(remove_small_objects(mask, 40), expected)
    holes, m = ndi.label(~mask)
    hole_sizes = np.bincount(holes.ravel())
    small = np.flatnonzero(hole_sizes < 40)
    assert np.array_equal(fill_small_holes(mask, 40), mask | (np.isin(holes, small[small > 0])))
