"""Annotations as training labels: QuPath GeoJSON (or a label image) rasterised at any resolution.

A pathologist's annotations are polygons in level-0 pixels of the slide; the model trains on label
patches at its working resolution.  :class:`AnnotationMap` keeps the polygons (in a spatial index)
and draws any region at any downsample on demand, so a training store is built patch by patch and a
whole-slide label image never exists in memory.

What QuPath exports, and how each case is handled (the README's "Annotations" section says the same):

- containers: a FeatureCollection, one Feature, a JSON array of Features, or a bare geometry;
- ``properties.classification`` is a string or an object with ``name`` (``color`` is not needed
  here); names are matched to the config's classes ignoring case and surrounding spaces;
- ``Ignore*`` (QuPath's built-in class for "leave this out") paints the ignore index;
- an annotation without a classification is skipped with a warning (QuPath users often draw an
  unclassified outline around the area they then annotate);
- objects that are not annotations (``objectType`` detection, cell, tile, TMA core) are skipped
  with a warning: cell outlines are not tissue regions;
- points and lines have no area and are skipped with a warning;
- an unknown class name raises :class:`UserError` that lists every unknown name and the known ones
  (``unknown="ignore"`` skips them with a warning instead);
- self-intersecting or otherwise invalid polygons are repaired with ``shapely.make_valid`` (a bow
  tie becomes its two triangles) and counted in a warning;
- polygons reaching outside the slide are clipped to it; polygons entirely outside are dropped;
  both are counted in a warning;
- a file with no usable annotation left raises :class:`UserError`;
- where annotations overlap, the smaller one wins: a detail drawn inside a larger region (a duct
  inside a stroma outline) keeps its class, whatever the order in the file;
- pixels no annotation covers get ``background`` (default: the ignore index, so they teach nothing;
  a config may instead name a class for them, e.g. when the annotator outlined everything but the
  glass).

Coordinates: QuPath puts (0, 0) at the top-left of the image *it* shows; for slides where OpenSlide
reports ``bounds-x``/``bounds-y`` (MIRAX, some Hamamatsu) that is the bounds' corner, not level-0
(0, 0).  ``origin`` is where the annotations' (0, 0) lies in level-0 pixels of the slide reader.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape

from .errors import InputWarning, UserError

#: QuPath's built-in class for regions to leave out of training.
IGNORE_NAMES = ("ignore*", "ignore")
NOT_ANNOTATIONS = ("detection", "cell", "tile", "tma_core", "tmacore")


class AnnotationWarning(UserWarning):
    """Something in an annotation file was repaired or skipped; the message says what and how many."""


@dataclass(frozen=True)
class Annotation:
    """One polygonal annotation: its geometry (level-0 pixels, QuPath's origin) and class name."""

    geometry: Polygon | MultiPolygon
    class_name: str | None


def _classification_name(props: dict[str, Any]) -> str | None:
    c = props.get("classification")
    if c is None:
        return None
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        name = c.get("name")
        if isinstance(name, str):
            return name
        names = c.get("names")  # QuPath's derived classes: {"names": ["Tumor", "Positive"]}
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return None


def _features(obj: Any, where: str) -> list[dict[str, Any]]:
    """Every Feature in a GeoJSON document, bare geometries wrapped as unclassified Features."""
    if isinstance(obj, list):
        out: list[dict[str, Any]] = []
        for item in obj:
            out.extend(_features(item, where))
        return out
    if not isinstance(obj, dict) or "type" not in obj:
        raise UserError(f"{where}: not GeoJSON (expected a FeatureCollection, a Feature, an array of Features or a geometry)")
    kind = obj["type"]
    if kind == "FeatureCollection":
        return _features(obj.get("features") or [], where)
    if kind == "Feature":
        return [obj]
    if kind in ("Polygon", "MultiPolygon", "GeometryCollection", "Point", "MultiPoint", "LineString", "MultiLineString"):
        return [{"type": "Feature", "geometry": obj, "properties": {}}]
    raise UserError(f"{where}: unknown GeoJSON type {kind!r}")


def _polygonal(geom: Any) -> Polygon | MultiPolygon | None:
    """The area-bearing part of a geometry (a repaired polygon can come back as a collection with
    stray lines); None when there is no area."""
    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom if geom.area > 0 else None
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon)) and g.area > 0]
    if not parts:
        return None
    polys: list[Polygon] = []
    for p in parts:
        polys.extend(p.geoms if isinstance(p, MultiPolygon) else [p])
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def parse_geojson(obj: Any, where: str = "GeoJSON") -> list[Annotation]:
    """Annotations from a decoded GeoJSON document.  Warns (AnnotationWarning) about what it skips."""
    skipped: dict[str, int] = {}
    out: list[Annotation] = []
    for feat in _features(obj, where):
        props = feat.get("properties") or {}
        object_type = str(props.get("objectType", "annotation")).lower()
        if object_type in NOT_ANNOTATIONS:
            skipped[f"{object_type} objects"] = skipped.get(f"{object_type} objects", 0) + 1
            continue
        raw = feat.get("geometry")
        if raw is None:
            skipped["features without geometry"] = skipped.get("features without geometry", 0) + 1
            continue
        try:
            geom = shape(raw)
        except Exception as exc:  # malformed coordinates: a user's file, not our bug
            raise UserError(f"{where}: a feature has an unreadable geometry ({type(exc).__name__}: {str(exc)[:80]})") from None
        if not shapely.is_valid(geom):
            geom = shapely.make_valid(geom)
            skipped["invalid (e.g. self-intersecting) polygons repaired"] = skipped.get("invalid (e.g. self-intersecting) polygons repaired", 0) + 1
        poly = _polygonal(geom)
        if poly is None:
            skipped["points/lines (no area)"] = skipped.get("points/lines (no area)", 0) + 1
            continue
        name = _classification_name(props)
        if name is None:
            skipped["unclassified annotations"] = skipped.get("unclassified annotations", 0) + 1
            continue
        out.append(Annotation(poly, name))
    if skipped:
        detail = ", ".join(f"{n} {what}" for what, n in skipped.items())
        warnings.warn(f"{where}: {detail}", AnnotationWarning, stacklevel=2)
    return out


def read_geojson(path: str | Path) -> list[Annotation]:
    """Annotations from a QuPath GeoJSON export (``.geojson``/``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:100]})") from None
    return parse_geojson(obj, str(path))


def class_lookup(class_names: Sequence[str], ignore_index: int) -> dict[str, int]:
    """Normalised name -> class id, with QuPath's Ignore* mapped to the ignore index."""
    lookup = {n.strip().lower(): i for i, n in enumerate(class_names)}
    for n in IGNORE_NAMES:
        lookup.setdefault(n, ignore_index)
    return lookup


class AnnotationMap:
    """Classified polygons of one slide, rasterisable at any region and resolution.

    ``shapes`` are (geometry in level-0 pixels of the slide reader, class id); larger polygons are
    drawn first so smaller ones end on top.
    """

    def __init__(
        self,
        shapes: Iterable[tuple[Polygon | MultiPolygon, int]],
        background: int = 255,
        where: str = "annotations",
        ignore_index: int = 255,
    ) -> None:
        # One entry per polygon part: the spatial index then returns only the parts near a region,
        # not a whole class's MultiPolygon.
        parts = [(p, c) for g, c in shapes for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
        items = sorted(parts, key=lambda s: -s[0].area)
        self.ignore_index = int(ignore_index)
        self.geometries = [g for g, _ in items]
        self.class_ids = np.asarray([c for _, c in items], np.int64)
        self.background = int(background)
        self.where = where
        self._tree = shapely.STRtree(self.geometries)

    def __len__(self) -> int:
        return len(self.geometries)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of all annotations, level-0 pixels."""
        b = shapely.total_bounds(np.asarray(self.geometries, dtype=object))
        return tuple(float(v) for v in b)  # type: ignore[return-value]

    def class_areas(self) -> dict[int, float]:
        """Annotated area per class id in level-0 pixels² (overlaps counted once per polygon)."""
        areas: dict[int, float] = {}
        for g, c in zip(self.geometries, self.class_ids):
            areas[int(c)] = areas.get(int(c), 0.0) + float(g.area)
        return areas

    def labels_at_downsample(
        self, x: int, y: int, width: int, height: int, downsample: float, background: int | None = None
    ) -> np.ndarray:
        """(height, width) uint8 label patch of the virtual image at ``downsample`` level-0 pixels
        per output pixel, (x, y) in that image: the same convention as ``Slide.read_at_downsample``,
        so a label patch lines up with the RGB patch read with the same arguments.

        A pixel takes the class of the polygon that contains its centre; pixels no polygon covers
        take ``background`` (default: the map's own).
        """
        fill = self.background if background is None else background
        out = np.full((height, width), fill, np.uint8)
        x0, y0 = x * downsample, y * downsample
        region = box(x0 - downsample, y0 - downsample, x0 + (width + 1) * downsample, y0 + (height + 1) * downsample)
        hits = np.sort(self._tree.query(region, predicate="intersects"))  # sorted = large to small
        for i in hits:
            geom = self.geometries[i]
            if not region.contains(geom):
                geom = _polygonal(shapely.intersection(geom, region))
                if geom is None:
                    continue
            _paint(out, geom, int(self.class_ids[i]), x0, y0, downsample)
        return out

    def labels_at_mpp(self, x: int, y: int, width: int, height: int, mpp: float, slide_mpp: float) -> np.ndarray:
        """As :meth:`labels_at_downsample` with the downsample ``mpp / slide_mpp``."""
        return self.labels_at_downsample(x, y, width, height, mpp / slide_mpp)

    def coverage(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """Boolean: which pixels some annotation labels (Ignore* areas and uncovered pixels not)."""
        ignore = self.ignore_index
        return self.labels_at_downsample(x, y, width, height, downsample, background=ignore) != ignore


def scanline_mask(rings: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the integer points (c, r) inside ``rings`` by the even-odd rule.

    ``rings`` are closed (x, y) coordinate arrays in pixel units (a polygon's shell and holes, or
    the parts of a MultiPolygon: for valid geometry even-odd is exactly "inside a shell and not in
    a hole").  A scanline fill: every edge is cut at the rows it spans (half-open, ymin <= r < ymax,
    so a vertex on a row counts once), crossings are sorted per row and paired, and the spans
    [ceil(x_a), ceil(x_b)) are filled through a difference array.  Cost grows with the rows times
    the crossings, not with pixels times vertices as a point-in-polygon test per pixel would.
    """
    height, width = shape
    x1 = np.concatenate([r[:-1, 0] for r in rings])
    y1 = np.concatenate([r[:-1, 1] for r in rings])
    x2 = np.concatenate([r[1:, 0] for r in rings])
    y2 = np.concatenate([r[1:, 1] for r in rings])
    ylo, yhi = np.minimum(y1, y2), np.maximum(y1, y2)
    first = np.ceil(ylo).astype(np.int64)
    stop = np.ceil(yhi).astype(np.int64)  # rows first..stop-1 satisfy ylo <= r < yhi
    # Rows outside the image still matter for nothing: clip, but keep pairs consistent per row.
    first_c, stop_c = np.clip(first, 0, height), np.clip(stop, 0, height)
    n = np.maximum(stop_c - first_c, 0)
    mask = np.zeros((height, width), bool)
    if n.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(n)), n)
    row = first_c[edge] + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    t = (row - y1[edge]) / (y2[edge] - y1[edge])
    x = x1[edge] + t * (x2[edge] - x1[edge])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    a, b = slice(0, None, 2), slice(1, None, 2)
    if len(row) % 2 or np.any(row[a] != row[b]):  # pragma: no cover - only for open rings
        raise ValueError("rings are not closed")
    start = np.clip(np.ceil(x[a]).astype(np.int64), 0, width)
    end = np.clip(np.ceil(x[b]).astype(np.int64), 0, width)
    keep = end > start
    diff = np.zeros((height, width + 1), np.int32)
    np.add.at(diff, (row[a][keep], start[keep]), 1)
    np.add.at(diff, (row[a][keep], end[keep]), -1)
    np.cumsum(diff[:, :width], axis=1, out=diff[:, :width])
    return diff[:, :width] > 0


def _paint(out: np.ndarray, geom: Polygon | MultiPolygon, value: int, x0: float, y0: float, ds: float) -> None:
    """Set the pixels of ``out`` whose centres lie inside ``geom`` (holes excluded) to ``value``.

    Output pixel (r, c) has its centre at level-0 (x0 + (c + .5) ds, y0 + (r + .5) ds), so a
    coordinate X maps to (X - x0) / ds - 0.5 and the pixel centres are the integer points.
    """
    height, width = out.shape
    rings = []
    for part in geom.geoms if isinstance(geom, MultiPolygon) else [geom]:
        for ring in (part.exterior, *part.interiors):
            xy = np.asarray(ring.coords, np.float64)
            rings.append(np.stack([(xy[:, 0] - x0) / ds - 0.5, (xy[:, 1] - y0) / ds - 0.5], 1))
    if rings:
        out[scanline_mask(rings, (height, width))] = value


def build_annotation_map(
    annotations: Sequence[Annotation],
    class_names: Sequence[str],
    *,
    ignore_index: int = 255,
    slide_size: tuple[int, int] | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    unknown: str = "error",
    background: int | None = None,
    where: str = "annotations",
) -> AnnotationMap:
    """Map class names to ids, move to the slide reader's level-0 frame, clip to the slide.

    ``unknown``: ``"error"`` (default) raises UserError listing the unknown class names;
    ``"ignore"`` skips those annotations with a warning.  ``background``: the id for pixels no
    annotation covers (default: ``ignore_index``).
    """
    if unknown not in ("error", "ignore"):
        raise UserError(f"unknown-class policy must be 'error' or 'ignore', not {unknown!r}")
    lookup = class_lookup(class_names, ignore_index)
    unknown_names = sorted({a.class_name for a in annotations if a.class_name and a.class_name.strip().lower() not in lookup})
    if unknown_names and unknown == "error":
        raise UserError(
            f"{where}: unknown class name(s) {', '.join(repr(n) for n in unknown_names)}; the config's classes are "
            f"{', '.join(repr(n) for n in class_names)} (rename them in QuPath, or set data.unknown_classes=ignore)"
        )
    notes: dict[str, int] = {}
    if unknown_names:
        notes[f"annotations of unknown class(es) {', '.join(unknown_names)} skipped"] = sum(
            1 for a in annotations if a.class_name in unknown_names
        )
    shapes: list[tuple[Polygon | MultiPolygon, int]] = []
    slide_box = None
    if slide_size is not None:
        slide_box = box(0, 0, float(slide_size[0]), float(slide_size[1]))
    ox, oy = origin
    for a in annotations:
        cid = lookup.get((a.class_name or "").strip().lower())
        if cid is None:
            continue
        geom = a.geometry
        if ox or oy:
            geom = shapely.transform(geom, lambda c: c + np.array([ox, oy]))
        if slide_box is not None and not slide_box.contains(geom):
            clipped = _polygonal(shapely.intersection(geom, slide_box))
            if clipped is None:
                notes["polygons entirely outside the slide dropped"] = notes.get("polygons entirely outside the slide dropped", 0) + 1
                continue
            notes["polygons reaching outside the slide clipped"] = notes.get("polygons reaching outside the slide clipped", 0) + 1
            geom = clipped
        shapes.append((geom, cid))
    if notes:
        warnings.warn(f"{where}: " + ", ".join(f"{n} {what}" for what, n in notes.items()), AnnotationWarning, stacklevel=2)
    if not shapes:
        raise UserError(f"{where}: no usable annotation (need classified polygons inside the slide, of the config's classes)")
    return AnnotationMap(shapes, ignore_index if background is None else background, where, ignore_index)


def load_annotations(
    path: str | Path,
    class_names: Sequence[str],
    *,
    ignore_index: int = 255,
    slide_size: tuple[int, int] | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    unknown: str = "error",
    background: int | None = None,
) -> AnnotationMap:
    """Read a QuPath GeoJSON export and build its :class:`AnnotationMap` (see module docstring)."""
    return build_annotation_map(
        read_geojson(path), class_names, ignore_index=ignore_index, slide_size=slide_size, origin=origin,
        unknown=unknown, background=background, where=str(path),
    )


class LabelImage:
    """A label image aligned to the slide (same extent, any resolution): the other way users bring
    dense labels (exported from QuPath's LabeledImageServer, or from another tool).  Sampled by
    nearest neighbour at pixel centres, behind the same ``labels_at_downsample`` call as polygons.

    The image is read lazily where the format allows (tiled TIFF through tifffile's Zarr view);
    PNGs are decoded whole, which is fine at the low resolutions label images are exported at.
    """

    def __init__(
        self,
        path: str | Path,
        slide_size: tuple[int, int],
        ignore_index: int = 255,
        num_classes: int | None = None,
        lut: np.ndarray | None = None,
        listed: Collection[int] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"label image not found: {self.path}")
        self._array = _open_label_array(self.path)
        if self._array.ndim != 2:
            raise UserError(f"{self.path}: a label image must be single-channel (one class id per pixel), got shape {self._array.shape}")
        h, w = self._array.shape
        self.size = (w, h)
        self.scale_x = slide_size[0] / w  # level-0 pixels per label pixel
        self.scale_y = slide_size[1] / h
        if abs(h - slide_size[1] / self.scale_x) > 1 + 0.01 * h:  # same aspect, up to rounding
            raise UserError(
                f"{self.path}: {w}x{h} label image does not have the slide's aspect ratio ({slide_size[0]}x{slide_size[1]})"
            )
        self.background = ignore_index
        self.num_classes = num_classes
        self.lut = None if lut is None else np.asarray(lut, np.uint8)
        if self.lut is not None and self.lut.shape != (256,):
            raise ValueError("lut must map all 256 codes")
        if listed is not None and isinstance(self._array, np.ndarray):
            _warn_unlisted_codes(self._array, listed)

    def labels_at_downsample(
        self, x: int, y: int, width: int, height: int, downsample: float, background: int | None = None
    ) -> np.ndarray:
        """As :meth:`AnnotationMap.labels_at_downsample`; codes mapped through ``lut`` when given
        (BCSS: 0 = outside the annotated region -> ignore)."""
        h, w = self._array.shape
        cx = ((x + np.arange(width) + 0.5) * downsample / self.scale_x).astype(np.int64)
        cy = ((y + np.arange(height) + 0.5) * downsample / self.scale_y).astype(np.int64)
        out = np.full((height, width), self.background, np.uint8)
        okx, oky = (cx >= 0) & (cx < w), (cy >= 0) & (cy < h)
        if okx.any() and oky.any():
            xs, ys = cx[okx], cy[oky]
            block = np.asarray(self._array[int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1])
            sub = block[(ys - ys.min())[:, None], (xs - xs.min())[None, :]]
            if sub.dtype != np.uint8:
                if sub.size and (sub.min() < 0 or sub.max() > 255):
                    raise UserError(f"{self.path}: label values must be 0-255, found {int(sub.min())}..{int(sub.max())}")
                sub = sub.astype(np.uint8)
            out[np.ix_(oky, okx)] = self.lut[sub] if self.lut is not None else sub
        if background is not None:
            out[out == self.background] = background
        if self.num_classes is not None:
            bad = (out != self.background) & (out >= self.num_classes)
            if bad.any():
                raise UserError(f"{self.path}: label value(s) {sorted(np.unique(out[bad]).tolist())[:5]} are not class ids of the config")
        return out

    def coverage(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        return self.labels_at_downsample(x, y, width, height, downsample) != self.background


def _warn_unlisted_codes(array: np.ndarray, listed: Collection[int]) -> None:
    """Say which codes of a mask the code table does not list (BCSS's 0, "outside the annotation",
    needs no listing; ``7: ignore`` lists a code as ignored): their pixels are ignored in training,
    and a recoded or unexpected mask would otherwise lose its labels without a word.  One line per
    set of codes, not per mask (Python shows an identical warning from here once)."""
    present = np.flatnonzero(np.bincount(array.ravel().astype(np.int64, copy=False)))
    unmapped = [int(c) for c in present if c != 0 and c not in listed]
    if unmapped:
        warnings.warn(f"mask code(s) {', '.join(map(str, unmapped))} are not in data.class_map: their pixels "
                      "are ignored (list them there to train on them)", InputWarning, stacklevel=3)


def _open_label_array(path: Path):
    """The label image at ``path``; a file that cannot be decoded (truncated, not an image) is one
    line naming it, as a broken tile is, not a decoder's traceback."""
    try:
        return _decode_label_array(path)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable label image ({why})") from None


def _decode_label_array(path: Path):
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile
        import zarr

        store = tifffile.imread(path, aszarr=True, level=0)
        arr = zarr.open(store, mode="r")
        if not hasattr(arr, "shape"):
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[-1] == 1:
            return np.asarray(arr)[..., 0]
        return arr
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise UserError(f"{path}: a label image must be single-channel (mode L or P), not {im.mode}")
        return np.asarray(im)
