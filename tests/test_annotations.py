"""QuPath GeoJSON to label patches: geometry, class names and the bad cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from wsi_espnet.annotations import (
    AnnotationWarning,
    LabelImage,
    build_annotation_map,
    load_annotations,
    parse_geojson,
    scanline_mask,
)
from wsi_espnet.errors import UserError

CLASSES = ["Background", "Tumor", "Stroma"]


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(rings, cls, kind="Polygon"):
    coords = rings if kind == "Polygon" else rings
    props = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def amap(features, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        return build_annotation_map(parse_geojson({"type": "FeatureCollection", "features": features}), CLASSES, **kw)


def test_square_at_full_and_reduced_resolution():
    m = amap([feature([square(10, 10, 20, 20)], {"name": "Tumor", "color": [200, 0, 0]})])
    full = m.labels_at_downsample(0, 0, 32, 32, 1.0)
    assert (full == 1).sum() == 100
    assert (full[10:20, 10:20] == 1).all()
    assert (full == 255).sum() == 32 * 32 - 100  # unannotated: ignore
    half = m.labels_at_downsample(0, 0, 16, 16, 2.0)  # pixel = 2x2 level-0 pixels
    assert (half == 1).sum() == 25 and (half[5:10, 5:10] == 1).all()
    # A window elsewhere: (x, y) are pixels of the reduced image, as Slide.read_at_downsample.
    window = m.labels_at_downsample(4, 4, 4, 4, 2.0)
    np.testing.assert_array_equal(window, half[4:8, 4:8])


def test_polygon_with_a_hole_and_smaller_annotation_on_top():
    stroma = feature([square(0, 0, 40, 40), square(25, 25, 35, 35)], "Stroma")  # hole 10x10
    tumour = feature([square(5, 5, 15, 15)], "tumor ")  # case and blanks do not matter
    m = amap([tumour, stroma])  # the larger one last in the file: order must not matter
    lab = m.labels_at_downsample(0, 0, 40, 40, 1.0)
    assert (lab[25:35, 25:35] == 255).all()  # the hole is not stroma
    assert (lab == 1).sum() == 100
    assert (lab == 2).sum() == 1600 - 100 - 100


def test_multipolygon_feature_array_and_string_classification(tmp_path):
    geo = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square(0, 0, 4, 4)], [square(8, 8, 12, 12)]]},
         "properties": {"classification": "Tumor"}},
    ]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(geo))
    m = load_annotations(path, CLASSES)
    lab = m.labels_at_downsample(0, 0, 12, 12, 1.0)
    assert (lab == 1).sum() == 32


def test_unknown_class_names_are_a_clear_error_listing_them():
    feats = [feature([square(0, 0, 5, 5)], "Tumor"), feature([square(5, 5, 9, 9)], "Lymphocytes"),
             feature([square(1, 1, 2, 2)], {"name": "Fat", "color": [1, 2, 3]})]
    with pytest.raises(UserError) as err:
        amap(feats)
    msg = str(err.value)
    assert "'Fat'" in msg and "'Lymphocytes'" in msg and "'Stroma'" in msg and "\n" not in msg
    with pytest.warns(AnnotationWarning, match="Lymphocytes"):
        m = build_annotation_map(parse_geojson(feats), CLASSES, unknown="ignore")
    assert set(np.unique(m.labels_at_downsample(0, 0, 10, 10, 1.0))) == {1, 255}


def test_polygons_outside_the_slide_are_clipped_or_dropped_with_a_warning():
    feats = [feature([square(90, 90, 150, 150)], "Tumor"), feature([square(200, 200, 220, 220)], "Stroma"),
             feature([square(0, 0, 10, 10)], "Stroma")]
    with pytest.warns(AnnotationWarning) as rec:
        m = build_annotation_map(parse_geojson(feats), CLASSES, slide_size=(100, 100))
    text = " ".join(str(w.message) for w in rec)
    assert "1 polygons reaching outside the slide clipped" in text
    assert "1 polygons entirely outside the slide dropped" in text
    assert len(m) == 2
    assert m.bounds == (0.0, 0.0, 100.0, 100.0)
    assert (m.labels_at_downsample(0, 0, 100, 100, 1.0) == 1).sum() == 100


def test_self_intersecting_polygon_is_repaired():
    bowtie = feature([[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]], "Tumor")
    with pytest.warns(AnnotationWarning, match="repaired"):
        anns = parse_geojson(bowtie)
    assert anns[0].geometry.is_valid and anns[0].geometry.area == pytest.approx(50.0)
    m = build_annotation_map(anns, CLASSES)
    lab = m.labels_at_downsample(0, 0, 10, 10, 1.0)
    assert 40 <= (lab == 1).sum() <= 60  # two triangles of area 25 each
    assert lab[5, 1] == 1 and lab[1, 5] == 255  # left triangle in, top triangle out


def test_empty_or_unusable_annotations_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no usable annotation"):
        amap([])
    with pytest.raises(UserError, match="no usable annotation"):
        amap([feature([square(0, 0, 5, 5)], None)])  # unclassified only
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_annotations(bad, CLASSES)
    with pytest.raises(UserError, match="not found"):
        load_annotations(tmp_path / "missing.geojson", CLASSES)


def test_skipped_objects_warn_and_ignore_class_paints_ignore():
    feats = [
        feature([square(0, 0, 20, 20)], "Stroma"),
        feature([square(2, 2, 6, 6)], "Ignore*"),  # QuPath's built-in class
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(10, 10, 12, 12)]},
         "properties": {"objectType": "cell", "classification": "Tumor"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}, "properties": {"classification": "Tumor"}},
    ]
    with pytest.warns(AnnotationWarning) as rec:
        anns = parse_geojson({"type": "FeatureCollection", "features": feats})
    text = " ".join(str(w.message) for w in rec)
    assert "cell objects" in text and "points/lines" in text
    m = build_annotation_map(anns, CLASSES, background=0)
    lab = m.labels_at_downsample(0, 0, 24, 24, 1.0)
    assert (lab[2:6, 2:6] == 255).all()
    assert (lab[10:12, 10:12] == 2).all()  # the cell outline is not a tumour region
    assert (lab[20:, :] == 0).all()  # unannotated -> the background class asked for
    assert not m.coverage(0, 0, 24, 24, 1.0)[20:, :].any()


def test_origin_shifts_qupath_coordinates_into_the_slide_frame():
    m = amap([feature([square(0, 0, 10, 10)], "Tumor")], origin=(100, 50))
    lab = m.labels_at_downsample(100, 50, 10, 10, 1.0)
    assert (lab == 1).all()
    assert (m.labels_at_downsample(0, 0, 10, 10, 1.0) == 255).all()


def test_scanline_fill_matches_even_odd_rule_on_random_polygons():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:30, 0:30]
    for _ in range(50):
        n = int(rng.integers(3, 10))
        pts = rng.uniform(-4, 34, (n, 2))
        ring = np.vstack([pts, pts[:1]])
        inside = np.zeros((30, 30), bool)
        for (xa, ya), (xb, yb) in zip(ring[:-1], ring[1:]):
            spans = ((ya <= yy) & (yy < yb)) | ((yb <= yy) & (yy < ya))
            with np.errstate(all="ignore"):
                xc = xa + (yy - ya) * (xb - xa) / (yb - ya)
            inside ^= spans & (xx < xc)
        np.testing.assert_array_equal(scanline_mask([ring], (30, 30)), inside)


def test_label_image_aligned_to_the_slide_with_code_table(tmp_path):
    from PIL import Image

    codes = np.zeros((50, 100), np.uint8)  # a 400x200 slide labelled at 1/4 resolution
    codes[:, 50:] = 2
    codes[10:20, 10:20] = 9
    path = tmp_path / "slide.labels.png"
    Image.fromarray(codes).save(path)
    lut = np.full(256, 255, np.uint8)
    lut[2] = 1  # code 2 -> class 1; 0 and 9 unlisted -> ignored
    img = LabelImage(path, (400, 200), 255, 3, lut=lut)
    lab = img.labels_at_downsample(0, 0, 200, 100, 2.0)  # read at half resolution
    assert (lab[:, 100:] == 1).all() and (lab[:, :100] == 255).all()
    with pytest.raises(UserError, match="aspect ratio"):
        LabelImage(path, (400, 400), 255, 3)
    # A mask cut short (a copy interrupted) or not an image at all: one line naming it, no traceback.
    cut = tmp_path / "cut.labels.png"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match=r"cut\.labels\.png: not a readable label image"):
        LabelImage(cut, (400, 200), 255, 3)
    (tmp_path / "junk.png").write_bytes(b"\x00" * 300)
    with pytest.raises(UserError, match=r"junk\.png: not a readable label image"):
        LabelImage(tmp_path / "junk.png", (400, 200), 255, 3)
