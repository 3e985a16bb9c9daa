"""QuPath GeoJSON: exact pixel polygons, valid (also on QuPath 0.6's 0.01 grid), in level-0 pixels."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import zarr
from shapely.geometry import shape

from wsi_espnet.errors import OutputExistsError
from wsi_espnet.geojson import qupath_class_names, trace_regions, write_geojson

NAMES = ["Background", "Tumor", "Stroma", "Fat"]
COLORS = [(255, 255, 255), (200, 0, 0), (0, 150, 0), (0, 0, 255)]
SLIDES = Path(__file__).resolve().parents[2] / "shared" / "slides"


def _zarr(tmp_path: Path, lab: np.ndarray, chunks=(64, 64)) -> zarr.Array:
    z = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=lab.shape, chunks=chunks, dtype="uint8")
    z[:] = lab
    return z


def _write(tmp_path: Path, lab, **kw) -> tuple[dict, dict[str, dict]]:
    kw.setdefault("scale", 1.0)
    summary = write_geojson(tmp_path / "out.geojson", lab, class_names=kw.pop("class_names", NAMES),
                            colors=kw.pop("colors", COLORS), **kw)
    data = json.loads((tmp_path / "out.geojson").read_text(encoding="ascii"))
    return summary, {f["properties"]["name"]: f for f in data["features"]}


def _noisy_labels(seed: int, shape=(150, 170)) -> np.ndarray:
    """Blobs with holes, islands, diagonal pinches, T-junctions of three classes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, (shape[0] // 5 + 1, shape[1] // 5 + 1)).astype(np.uint8)
    lab = np.kron(coarse, np.ones((5, 5), np.uint8))[: shape[0], : shape[1]].copy()
    flip = rng.random(shape) < 0.08
    lab[flip] = rng.integers(0, 4, flip.sum())
    return lab


def test_areas_exact_and_valid_on_qupath_grid_across_blocks(tmp_path):
    lab = _noisy_labels(0)
    lab[:7, :9] = 255  # not computed: no polygon
    summary, feats = _write(tmp_path, _zarr(tmp_path, lab), scale=4.0, mpp=0.25, block=32)
    assert set(feats) == {"Tumor", "Stroma", "Fat"}  # Background excluded by default
    yy, xx = np.mgrid[: lab.shape[0], : lab.shape[1]]
    for c, name in enumerate(NAMES[1:], start=1):
        geom = shape(feats[name]["geometry"])
        assert geom.geom_type == "MultiPolygon"
        assert geom.is_valid, shapely.is_valid_reason(geom)
        assert shapely.set_precision(geom, 0.01).is_valid
        assert geom.area == (lab == c).sum() * 16  # exact, in level-0 px
        assert summary["classes"][name]["pixels"] == (lab == c).sum()
        assert summary["classes"][name]["area_um2"] == pytest.approx((lab == c).sum() * 0.0625)
        # every pixel centre (level-0) lies inside its class's polygon and no other's
        inside = shapely.contains_xy(geom, (xx.ravel() + 0.5) * 4, (yy.ravel() + 0.5) * 4).reshape(lab.shape)
        assert np.array_equal(inside, lab == c)


def test_occupied_hint_skips_empty_blocks_and_changes_nothing(tmp_path, recorded):
    """With the segmentation's footprint (labels only inside it), blocks outside are never read,
    and the file's geometry and the class counts are those of the full pass."""
    from wsi_espnet.tiling import Occupancy

    lab = np.zeros((200, 260), np.uint8)
    lab[40:130, 70:190] = _noisy_labels(3, (90, 120))
    hint = Occupancy.empty(lab.shape, 50)
    hint.grid[0:3, 1:4] = True  # rows 0..150, columns 50..200: covers every label
    z = _zarr(tmp_path, lab)
    rec = recorded(z)
    reads = rec.reads
    full, full_feats = _write(tmp_path, z, block=32)
    hinted, hinted_feats = _write(tmp_path, rec, block=32, occupied=hint, overwrite=True)
    assert {n: c["pixels"] for n, c in hinted["classes"].items()} == {n: c["pixels"] for n, c in full["classes"].items()}
    assert hinted["classes"]["Background"]["pixels"] == (lab == 0).sum()
    assert set(hinted_feats) == set(full_feats) == {"Tumor", "Stroma", "Fat"}
    for name in full_feats:
        assert shape(hinted_feats[name]["geometry"]).equals(shape(full_feats[name]["geometry"]))
    n_blocks = -(-200 // 32) * -(-260 // 32)
    assert 0 < len(reads) < n_blocks / 2
    for ys, xs in reads:
        assert hint.may_have(ys.start, ys.stop, xs.start, xs.stop)


def test_occupied_hint_does_not_hide_a_drawn_class_0(tmp_path):
    """When class 0 is drawn as well (``exclude=()`` or a class 0 not called Background), the
    regions the footprint rules out are its pixels: they must be in its polygon, not skipped. A map
    made for another image size is refused."""
    from wsi_espnet.tiling import Occupancy

    lab = np.zeros((64, 64), np.uint8)
    lab[40:50, 40:50] = 1
    hint = Occupancy.empty(lab.shape, 32)
    hint.grid[1, 1] = True
    summary, feats = _write(tmp_path, lab, class_names=["Other", "Tumor"], colors=COLORS[:2], block=32,
                            occupied=hint)
    assert shape(feats["Other"]["geometry"]).area == summary["classes"]["Other"]["pixels"] == 64 * 64 - 100
    with pytest.raises(ValueError, match="does not fit"):
        _write(tmp_path, lab, block=32, occupied=Occupancy.empty((64, 96), 32), overwrite=True)


def test_region_over_many_blocks_is_one_polygon_without_seams(tmp_path):
    lab = np.zeros((100, 120), np.uint8)
    lab[10:90, 7:113] = 2
    _, feats = _write(tmp_path, lab, block=16)
    geom = shape(feats["Stroma"]["geometry"])
    assert len(geom.geoms) == 1
    assert shapely.get_num_coordinates(geom) == 5  # 4 corners + closing point: no seam vertices left
    assert geom.equals(shapely.box(7, 10, 113, 90))


def test_ring_gives_polygon_with_hole(tmp_path):
    yy, xx = np.mgrid[:80, :80]
    r2 = (yy - 40) ** 2 + (xx - 40) ** 2
    lab = ((r2 < 30**2) & (r2 >= 15**2)).astype(np.uint8)
    _, feats = _write(tmp_path, lab, block=32)
    (poly,) = shape(feats["Tumor"]["geometry"]).geoms
    assert len(poly.interiors) == 1
    assert poly.area == lab.sum()
    assert not poly.contains(shapely.Point(40.5, 40.5))


def test_region_cut_by_blocks_keeps_the_holes_of_every_block(tmp_path):
    """The holes of a region cut by block borders are kept apart from its outline while the map is
    read (see ``_ClassOutlines``): each must come back inside the right part, small ones filled."""
    lab = np.zeros((96, 96), np.uint8)
    lab[4:92, 4:60] = 1  # one region over 6 blocks of 32...
    lab[4:40, 70:92] = 1  # ...and a second, over 2 blocks
    holes = [(8, 8, 3), (40, 40, 2), (70, 10, 1), (10, 75, 3), (20, 85, 1)]  # (y, x, side) in 5 blocks
    for y, x, n in holes:
        lab[y:y + n, x:x + n] = 2
    lab[28:36, 28:36] = 0  # a hole across four blocks
    lab[30, 30] = 1  # an island in it, smaller than min_area
    exact, feats = _write(tmp_path, lab, block=32, mpp=1.0)
    geom = shape(feats["Tumor"]["geometry"])
    assert geom.is_valid and len(geom.geoms) == 3 and exact["classes"]["Tumor"]["holes"] == 6
    yy, xx = np.mgrid[:96, :96]
    assert np.array_equal(shapely.contains_xy(geom, xx + 0.5, yy + 0.5), lab == 1)
    summary, feats = _write(tmp_path, lab, block=32, mpp=1.0, min_area=2.0, overwrite=True)
    geom = shape(feats["Tumor"]["geometry"])
    filled = lab == 1
    for y, x, n in holes:
        if n * n < 2:
            filled[y:y + n, x:x + n] = True
    filled[30, 30] = False
    assert geom.is_valid and len(geom.geoms) == 2 and summary["classes"]["Tumor"]["holes"] == 4
    assert np.array_equal(shapely.contains_xy(geom, xx + 0.5, yy + 0.5), filled)
    assert feats["Tumor"]["properties"]["measurements"]["Area um^2"] == pytest.approx(filled.sum())


def test_extent_that_cuts_whole_label_pixels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cuts whole label pixels"):
        _write(tmp_path, np.ones((10, 10), np.uint8), scale=2.0, extent=(17.9, 20.0))


def test_square_lands_on_level0_pixels_with_scale_and_offset(tmp_path):
    lab = np.zeros((40, 50), np.uint8)
    lab[5:12, 20:23] = 3  # label x 20..22, y 5..11
    _, feats = _write(tmp_path, lab, scale=4.0, offset=(10, 6))
    geom = shape(feats["Fat"]["geometry"])
    assert geom.equals(shapely.box(4 * 20 - 10, 4 * 5 - 6, 4 * 23 - 10, 4 * 12 - 6))


def test_fractional_scale_stays_valid_after_qupath_snapping(tmp_path):
    lab = _noisy_labels(1, (90, 110))
    _, feats = _write(tmp_path, lab, scale=3.98765, offset=(0.333, 12.5), block=40)
    for c, name in enumerate(NAMES[1:], start=1):
        geom = shape(feats[name]["geometry"])
        assert geom.is_valid and shapely.set_precision(geom, 0.01).is_valid
        coords = shapely.get_coordinates(geom)
        assert np.allclose(coords * 100, np.round(coords * 100))  # already on QuPath's 0.01 grid
        assert geom.area == pytest.approx((lab == c).sum() * 3.98765**2, rel=0.01)


def test_min_area_drops_specks_and_fills_small_holes_without_overlaps(tmp_path):
    """Threshold 5 label pixels (1.25 µm² at 0.5 µm per label pixel, scale 2): a 4-px speck and the
    hole it leaves go, a 16-px region stays and its 1-px hole is filled, the 1-px dot of the other
    class inside that hole goes with it (no two classes overlap), a 2-px island goes."""
    lab = np.zeros((40, 40), np.uint8)
    lab[5:25, 5:25] = 1
    lab[10:12, 10:12] = 2  # 4-px speck: gone, its hole in class 1 filled
    lab[15:19, 15:19] = 2  # 16 px: stays
    lab[17, 17] = 1  # 1 px inside it: gone, and class 2's hole there filled
    lab[30, 30:32] = 1  # 2-px island: gone
    lab[30:38, 2:12] = 3
    exact, _ = _write(tmp_path, lab, scale=2.0, mpp=0.5)
    summary, feats = _write(tmp_path, lab, scale=2.0, mpp=0.5, min_area=1.25, overwrite=True)
    geoms = {name: shape(f["geometry"]) for name, f in feats.items()}
    assert {n: g.area / 4 for n, g in geoms.items()} == {"Tumor": 400 - 16, "Stroma": 16, "Fat": 80}
    for name, g in geoms.items():
        assert g.is_valid and shapely.set_precision(g, 0.01).is_valid
        parts = shapely.get_parts(g)
        assert (shapely.area(parts) >= 20).all()
        assert feats[name]["properties"]["measurements"]["Area um^2"] == pytest.approx(g.area / 4 * 0.25)
        assert feats[name]["properties"]["measurements"]["Label pixels"] == (lab == NAMES.index(name)).sum()
    assert geoms["Tumor"].intersection(geoms["Stroma"]).area == 0
    assert summary["classes"]["Tumor"]["polygons"] == 1 and summary["classes"]["Tumor"]["holes"] == 1
    assert exact["classes"]["Tumor"]["polygons"] == 3 and exact["classes"]["Tumor"]["holes"] == 2
    with pytest.raises(ValueError, match="needs mpp"):
        _write(tmp_path, lab, min_area=1.0, overwrite=True)


def test_outlines_are_clipped_to_the_slide(tmp_path):
    """The label map's size is the slide's rounded up: its last pixels reach past the slide's edge."""
    lab = np.ones((10, 10), np.uint8)
    lab[:, :3] = 2
    _, feats = _write(tmp_path, lab, scale=2.5, offset=(1.0, 2.0), extent=(24.0, 23.37))
    geoms = [shape(f["geometry"]) for f in feats.values()]
    assert shapely.union_all(geoms).bounds == (-1.0, -2.0, 23.0, 21.37)
    assert sum(g.area for g in geoms) == pytest.approx(24.0 * 23.37)
    for g in geoms:
        assert g.is_valid and shapely.set_precision(g, 0.01).is_valid and g.geom_type == "MultiPolygon"
    _, inside = _write(tmp_path, lab, scale=2.5, extent=(25.0, 25.0), overwrite=True)  # nothing to clip
    assert shape(inside["Tumor"]["geometry"]).area == 7 * 10 * 2.5**2


def test_gz_name_writes_gzip_that_reads_back_the_same(tmp_path):
    import gzip

    lab = _noisy_labels(3, (50, 60))
    _, plain = _write(tmp_path, lab, mpp=0.5)
    write_geojson(tmp_path / "out.geojson.gz", lab, 1.0, class_names=NAMES, colors=COLORS, mpp=0.5)
    raw = (tmp_path / "out.geojson.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and b"out.geojson\x00" in raw[:40]  # gzip, named without .gz
    data = json.loads(gzip.decompress(raw).decode("ascii"))
    packed = {f["properties"]["name"]: f for f in data["features"]}
    assert {n: f["geometry"] for n, f in packed.items()} == {n: f["geometry"] for n, f in plain.items()}
    assert not list(tmp_path.glob("*.partial"))


def test_qupath_feature_structure(tmp_path):
    lab = _noisy_labels(2, (60, 60))
    names = ["Background", "Tumour: invasive", "Stroma \u00e9", "Fat"]
    summary, feats = _write(tmp_path, lab, class_names=names, exclude=(), mpp=0.5)
    data = json.loads((tmp_path / "out.geojson").read_text(encoding="ascii"))
    assert data["type"] == "FeatureCollection"
    assert set(feats) == {"Background", "Tumour- invasive", "Stroma e", "Fat"}  # ASCII, no ':'
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        assert uuid.UUID(feature["id"]).version == 4
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["isLocked"] is False
        cls = props["classification"]
        assert cls["name"] == props["name"]
        index = qupath_class_names(names).index(cls["name"])
        assert cls["color"] == list(COLORS[index])
        assert props["measurements"]["Area um^2"] == pytest.approx((lab == index).sum() * 0.25)
    assert summary["classes"]["Tumour: invasive"]["written_name"] == "Tumour- invasive"


def test_trace_regions_random_labels_match_pixels():
    rng = np.random.default_rng(7)
    for _ in range(40):
        h, w = rng.integers(1, 25, 2)
        lab = rng.integers(-1, 3, (h, w)).astype(np.int16)
        polys, classes = trace_regions(lab, origin=(3, 5))
        assert shapely.is_valid(polys).all()
        yy, xx = np.mgrid[:h, :w]
        for c in range(3):
            sel = polys[classes == c]
            assert shapely.area(sel).sum() == (lab == c).sum()
            if sel.size:
                union = shapely.coverage_union_all(sel)
                inside = shapely.contains_xy(union, xx.ravel() + 3.5, yy.ravel() + 5.5).reshape(h, w)
                assert np.array_equal(inside, lab == c)


def test_existing_output_unnamed_label_and_no_partial(tmp_path):
    lab = np.ones((20, 20), np.uint8)
    write_geojson(tmp_path / "a.geojson", lab, 1.0, class_names=NAMES, colors=COLORS)
    with pytest.raises(OutputExistsError):
        write_geojson(tmp_path / "a.geojson", lab, 1.0, class_names=NAMES, colors=COLORS)
    lab[3, 3] = 7
    with pytest.raises(ValueError, match="label value 7"):
        write_geojson(tmp_path / "b.geojson", lab, 1.0, class_names=NAMES, colors=COLORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson"]


def test_coordinates_land_on_real_slide_pixels(tmp_path):
    """Dark-tissue mask of a real Aperio slide at 1/4 resolution: every polygon vertex region maps
    back onto level-0 pixels whose 4x4 block is dark, and light blocks are outside."""
    with openslide.OpenSlide(SLIDES / "real" / "CMU-1-Small-Region.svs") as slide:
        x0, y0, w, h = 600, 1200, 640, 480  # a level-0 window with tissue and glass
        rgb = np.asarray(slide.read_region((x0, y0), 0, (w, h)).convert("L"), np.float32)
    blocks = rgb.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    lab = (blocks < 180).astype(np.uint8)
    assert 0.1 < lab.mean() < 0.9
    # The label map covers the window only: the offset moves it back to slide coordinates.
    _, feats = _write(tmp_path, lab, scale=4.0, offset=(-x0, -y0), block=64)
    geom = shape(feats["Tumor"]["geometry"])
    assert geom.is_valid and geom.area == lab.sum() * 16
    rng = np.random.default_rng(0)
    px = rng.uniform(x0, x0 + w, 4000)
    py = rng.uniform(y0, y0 + h, 4000)
    dark = blocks[((py - y0) // 4).astype(int), ((px - x0) // 4).astype(int)] < 180
    assert np.array_equal(shapely.contains_xy(geom, px, py), dark)


def test_a_part_invalid_after_placement_is_repaired_with_its_spooled_holes(tmp_path):
    """Not expected to happen (placement keeps topology), but the promise of valid polygons must not
    rest on that: a merged part whose holes are on disk is put back together and repaired whole."""
    from wsi_espnet.geojson import _HOLE_REF, _ClassOutlines, _Placement

    place = _Placement.make(1.0, (0.0, 0.0), (20, 20), None)
    crossing = [(8, 8), (12, 8), (12, 12), (8, 12), (8, 8)]  # a hole poking out of its shell
    spooled = [(2, 2), (2, 4), (4, 4), (4, 2), (2, 2)]
    part = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [crossing])
    with open(tmp_path / "holes", "w+b") as hole_spool, _ClassOutlines(tmp_path, hole_spool) as out:
        hole_spool.write(("," + json.dumps([list(map(float, p)) for p in spooled])).encode())
        hole_spool.flush()
        ref = np.array([(0, hole_spool.tell(), 1, 5, 4.0)], dtype=_HOLE_REF)
        out._spool_parts(np.array([part]), [ref], place, 0.0)
        out.spool.seek(0)
        geom = shapely.from_geojson('{"type": "MultiPolygon", "coordinates": [' + out.spool.read().decode() + "]}")
    assert geom.is_valid and out.polygons == len(geom.geoms)
    whole = shapely.Polygon(part.exterior, [crossing, spooled])
    assert geom.area == pytest.approx(shapely.make_valid(whole).area)  # what make_valid makes of it all
    assert not geom.contains(shapely.Point(3, 3))


def test_class_names_that_become_alike_stay_distinct(tmp_path):
    """QuPath merges classes of one name: names alike once made ASCII get their class id."""
    names = ["Background", "Tumör: grade 2", "Tumor- grade 2", "\u816b\u760d", "\u9593\u8cea"]
    assert qupath_class_names(names) == ["Background", "Tumor- grade 2", "Tumor- grade 2 (2)", "Unnamed",
                                         "Unnamed (4)"]
    lab = np.arange(5, dtype=np.uint8).repeat(4)[None, :].repeat(3, 0)
    _, feats = _write(tmp_path, lab, class_names=names, colors=[(0, 0, 0)] * 5)
    assert {n: shape(f["geometry"]).area for n, f in feats.items()} == {
        "Tumor- grade 2": 12, "Tumor- grade 2 (2)": 12, "Unnamed": 12, "Unnamed (4)": 12}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as on Linux")
def test_a_full_disk_while_tracing_names_the_geojson_and_leaves_nothing(tmp_path):
    """The outlines are spooled to nameless temporary files: a full disk (here a file-size limit)
    while writing them must still say which output stopped, and leave no partial file."""
    import errno
    import resource

    rng = np.random.default_rng(3)
    labels = (rng.random((512, 512)) > 0.5).astype(np.uint8)  # ~60k specks: MBs of outlines
    out = tmp_path / "g.geojson"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))
    try:
        with pytest.raises(OSError) as stop:
            write_geojson(out, labels, scale=1.0, class_names=["Background", "Tumour"], colors=[(0, 0, 0), (255, 0, 0)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert stop.value.errno == errno.EFBIG and stop.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []
