"""Overlay PNG and the block-wise label downsampling that feeds it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from wsi_espnet.errors import OutputExistsError
from wsi_espnet.overlay import downsample_labels, window_mode, write_overlay

NAMES = ["Background", "Tumor", "Stroma"]
COLORS = [(255, 255, 255), (200, 0, 0), (0, 150, 0)]


def _thumb(h=60, w=80) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_blend_background_untouched_and_legend_panel(tmp_path):
    thumb = _thumb()
    lab = np.zeros((60, 80), np.uint8)
    lab[10:30, 10:40] = 1
    lab[40:50, 50:70] = 2
    lab[0:5, 0:5] = 255  # not computed: not tinted
    path = write_overlay(tmp_path / "o.png", thumb, lab, COLORS, NAMES, alpha=0.4,
                         areas_mm2={"Tumor": 1.5, "Stroma": 0.25})
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] == 60 and img.shape[1] > 80  # legend panel to the right
    core = img[:, :80].astype(int)
    untinted = (lab == 0) | (lab == 255)
    assert np.array_equal(core[untinted], thumb[untinted])
    for c in (1, 2):
        expected = np.rint(0.6 * thumb[lab == c] + 0.4 * np.array(COLORS[c])).astype(int)
        assert np.abs(core[lab == c] - expected).max() <= 1
    panel = img[:, 80:]
    for c in (1, 2):  # a swatch of each drawn class colour
        assert (panel == COLORS[c]).all(axis=2).sum() > 20


def test_small_labels_are_resized_and_legend_can_be_off(tmp_path):
    thumb = _thumb(64, 96)
    lab = np.zeros((16, 24), np.uint8)
    lab[:, 12:] = 1
    path = write_overlay(tmp_path / "o.png", thumb, lab, COLORS, NAMES, legend=False, alpha=1.0)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (64, 96, 3)
    assert (img[:, 48:] == COLORS[1]).all()
    assert np.array_equal(img[:, :48], thumb[:, :48])


def test_overwrite_guard_and_atomic(tmp_path):
    thumb, lab = _thumb(), np.zeros((60, 80), np.uint8)
    write_overlay(tmp_path / "o.png", thumb, lab, COLORS, NAMES)
    with pytest.raises(OutputExistsError):
        write_overlay(tmp_path / "o.png", thumb, lab, COLORS, NAMES)
    write_overlay(tmp_path / "o.png", thumb, lab, COLORS, NAMES, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_window_mode_majority_edges_and_ties():
    src = np.array([[1, 1, 2, 0, 0],
                    [1, 2, 2, 0, 3],
                    [2, 2, 2, 3, 3]], np.uint8)
    # 3x3 window: 2 wins 5 to 3; right partial window (3x2): 0 and 3 tie 3-3 -> lower id (0)
    assert window_mode(src, 3).tolist() == [[2, 0]]
    assert window_mode(src, 1).tolist() == src.tolist()


def test_downsample_labels_from_zarr_in_blocks(tmp_path):
    rng = np.random.default_rng(1)
    lab = np.kron(rng.integers(0, 3, (40, 50)), np.ones((7, 7), int)).astype(np.uint8)  # 280 x 350
    lab[:7, :7] = 255
    z = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=lab.shape, chunks=(64, 64), dtype="uint8")
    z[:] = lab
    small = downsample_labels(z, 50, block=40)  # f = 7: each output pixel is one 7x7 cell
    assert small.shape == (40, 50)
    expected = lab[::7, ::7].copy()
    expected[expected == 255] = 0
    assert np.array_equal(small, expected)
    assert np.array_equal(downsample_labels(z, 50, block=4096), small)  # block size does not matter
    assert downsample_labels(z, 1000).shape == lab.shape


def test_downsample_labels_skips_what_the_footprint_rules_out(tmp_path, recorded):
    """Blocks outside the segmentation's footprint are background without being read; inside,
    the same votes as a full pass (also a block holding a single class)."""
    from wsi_espnet.tiling import Occupancy

    rng = np.random.default_rng(2)
    lab = np.zeros((280, 350), np.uint8)
    lab[70:210, 105:280] = np.kron(rng.integers(0, 3, (20, 25)), np.ones((7, 7), int))
    lab[14:42, 14:42] = 2  # one class alone in its blocks
    z = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=lab.shape, chunks=(64, 64), dtype="uint8")
    z[:] = lab
    hint = Occupancy.empty(lab.shape, 70)
    hint.grid[1:3, 1:4] = True
    hint.grid[0, 0] = True
    rec = recorded(z)
    reads = rec.reads
    small = downsample_labels(rec, 50, block=35, occupied=hint)
    assert np.array_equal(small, downsample_labels(z, 50, block=35))
    assert 0 < len(reads) < (280 // 35) * (350 // 35) / 2
    assert all(hint.may_have(ys.start, ys.stop, xs.start, xs.stop) for ys, xs in reads)


@pytest.mark.parametrize("f", [2, 3, 7, 8])
@pytest.mark.parametrize("shape,classes", [((61, 45), 3), ((130, 257), 8), ((9, 300), 21)])
def test_window_mode_is_each_windows_most_frequent_class_lowest_on_ties(f, shape, classes):
    """Against the definition, window by window: random maps (ties in many windows), partial
    windows at the right and bottom edges, up to VOC's 21 classes."""
    rng = np.random.default_rng(f * 1000 + shape[0])
    src = rng.integers(0, classes, shape).astype(np.uint8)
    got = window_mode(src, f)
    h, w = shape
    want = np.array([[np.bincount(src[y : y + f, x : x + f].ravel(), minlength=256).argmax()
                      for x in range(0, w, f)] for y in range(0, h, f)], np.uint8)
    np.testing.assert_array_equal(got, want)
