"""The label map as QuPath-ready GeoJSON: one classified MultiPolygon annotation per class.

Polygons follow pixel edges exactly (no marching-squares corner cutting), so a class's polygon area
equals its pixel count times ``scale**2``, and a pixel at label ``(x, y)`` is the level-0 square
``[x*scale, (x+1)*scale) x [y*scale, (y+1)*scale)`` shifted by ``-offset``.

How (bounded memory, no full-slide raster):

1. The label array is read in ``block`` x ``block`` pieces. In each piece, the boundary between
   pixels of different labels is cut into straight segments at every lattice point where edges meet;
   each segment gives two directed half-edges, each owning the pixel on its right (screen
   coordinates, y down). A half-edge's successor is the next boundary edge turning right, else
   straight on, else left: tracing that permutation's cycles (pointer jumping in NumPy, no Python
   loop per vertex) gives every ring of every 4-connected region. Shells run one way round and holes
   the other, and a connected-component labelling says which holes belong to which shell.
2. Along the block's own border every ring keeps a vertex at every pixel corner, so the pieces of a
   region cut by a block border share their edges vertex for vertex; ``shapely.coverage_union_all``
   (edge cancellation, fast and exact for such a coverage) then merges all pieces of a class into
   one geometry without seams, and ``simplify(0)`` drops the collinear vertices left behind.
3. Coordinates are scaled to level-0 pixels, the offset subtracted, and snapped to QuPath 0.6's
   0.01-pixel grid; the result is checked valid after that snap (``make_valid`` if ever not).

Classes: one Feature per class present, except those named in ``exclude`` (default
``("Background",)``, compared case-insensitively; pass ``exclude=()`` to keep it). ``255`` in the
input means "not computed" and never becomes a polygon. Class names are made ASCII and ``:`` is
replaced (QuPath 0.4 reads the file in the platform encoding and splits names at ``:`` into
sub-classes); the summary maps original to written names.

``min_area`` (µm², default 0: exact) drops the parts of a class smaller than that and fills its
holes smaller than that: a model's output is sprinkled with specks of a few pixels (70–94 % of the
parts on the real slides in ``../shared``, 16–27 % of the vertices), each a separate piece of the
annotation that QuPath draws and stores.  A speck inside a filled hole is always dropped too (it is
smaller than the hole), so the classes never overlap.

``simplify`` (level-0 px, default 0: exact) is a topology-preserving Douglas-Peucker.  Below one
label pixel (``scale``) it only straightens staircases; from one label pixel up it also eats small
regions: on CMU-1-Small-Region (a label pixel = 2 level-0 px) ``simplify=2`` moved class areas by
−2.7 % to −27 %, while a 240-px disk keeps its area within 1 %.

The ``Area um^2`` measurement is the written outline's area (what QuPath itself would measure);
``Label pixels`` is the class's pixel count in the label map.  A name ending in ``.gz`` is written
gzip-compressed (QuPath imports ``.geojson.gz``; outlines compress ~4x).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import unicodedata
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from skimage.measure import label as connected_components

from .outputs import check_output
from .tiling import Occupancy

NOT_COMPUTED = 255
QUPATH_GRID = 0.01  # QuPath 0.6 snaps coordinates to this grid on import

# Direction codes, clockwise on screen (y down). A right turn is +1.
_E, _S, _W, _N = 0, 1, 2, 3


def write_geojson(
    path: str | os.PathLike,
    labels: Any,
    scale: float,
    offset: tuple[float, float] = (0.0, 0.0),
    *,
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    mpp: float | None = None,
    exclude: Sequence[str] = ("Background",),
    simplify: float = 0.0,
    min_area: float = 0.0,
    block: int = 2048,
    overwrite: bool = False,
    occupied: Occupancy | None = None,
    extent: tuple[float, float] | None = None,
) -> dict:
    """Write ``labels`` (H x W uint8 class ids, Zarr or NumPy) as a GeoJSON FeatureCollection.

    ``scale``: level-0 pixels per label pixel. ``offset``: level-0 ``(x, y)`` subtracted from every
    coordinate (the slide's ``openslide.bounds-x/y`` for QuPath). ``mpp``: µm per label pixel, for
    the ``Area um^2`` measurement and the summary (left out when None).  ``occupied``: where
    ``labels`` may be non-zero; blocks it rules out are counted as class 0 without being read
    (when class 0 is not excluded, they are read and drawn as any other).  ``extent``: the slide's
    level-0 ``(width, height)``; outlines are clipped to it (the label map's last row and column,
    rounded up from the slide's size, may reach up to one label pixel past the slide's edge).

    Returns a summary: ``{"features": n, "classes": {name: {"pixels", "area_um2", "polygons",
    "holes", "vertices", "written_name"}}}`` with pixel counts for *every* class, written or not.
    """
    path = Path(path)
    height, width = _check_labels(labels)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    ox, oy = (float(v) for v in offset)
    if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
        raise ValueError(f"mpp must be a positive number or None, got {mpp!r}")
    if not (math.isfinite(float(min_area)) and float(min_area) >= 0):
        raise ValueError(f"min_area must be a number of µm² >= 0, got {min_area!r}")
    if min_area and mpp is None:
        raise ValueError("min_area is in µm²: it needs mpp")
    # In level-0 px² (the outlines' unit): a label pixel is ``scale`` level-0 px of ``mpp / scale`` µm.
    min_area_px = float(min_area) * (scale / float(mpp)) ** 2 if min_area else 0.0
    if len(class_names) != len(colors):
        raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
    if not 1 <= len(class_names) < NOT_COMPUTED:
        raise ValueError(f"need 1 to {NOT_COMPUTED - 1} classes, got {len(class_names)}")
    rgb = [_rgb(c) for c in colors]
    written_names = qupath_class_names(class_names)
    excluded = {e.casefold() for e in exclude}
    keep = np.zeros(256, bool)
    keep[: len(class_names)] = [n.casefold() not in excluded for n in class_names]
    if block < 16:
        raise ValueError(f"block must be at least 16, got {block}")
    check_output(path, overwrite)

    counts = np.zeros(256, np.int64)
    # Regions the footprint rules out are class 0: skipped unread, unless class 0 is drawn too.
    skip_empty = occupied is not None and not keep[0]
    if occupied is not None:
        occupied.check_shape((height, width))
    # Per kept class: pieces inside their block, and pieces touching its border (to be merged).
    inner: dict[int, list[np.ndarray]] = {int(c): [] for c in np.flatnonzero(keep)}
    edge: dict[int, list[np.ndarray]] = {int(c): [] for c in np.flatnonzero(keep)}
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            y1, x1 = min(y0 + block, height), min(x0 + block, width)
            if skip_empty and not occupied.may_have(y0, y1, x0, x1):
                counts[0] += (y1 - y0) * (x1 - x0)
                continue
            raw = np.asarray(labels[y0:y1, x0:x1], dtype=np.uint8)
            block_counts = np.bincount(raw.ravel(), minlength=256)
            counts += block_counts
            unnamed = np.flatnonzero(counts[len(class_names):NOT_COMPUTED])
            if unnamed.size:
                raise ValueError(f"label value {unnamed[0] + len(class_names)} found, "
                                 f"but only {len(class_names)} classes are named")
            if not block_counts[keep].any():
                continue  # no class to draw here (all background, say): nothing to trace
            traced = np.where(keep[raw], raw.astype(np.int16), np.int16(-1))
            polygons, classes = trace_regions(traced, origin=(x0, y0))
            b = shapely.bounds(polygons)
            touches = (b[:, 0] == x0) | (b[:, 1] == y0) | (b[:, 2] == x1) | (b[:, 3] == y1)
            for c in np.unique(classes):
                inner[int(c)].append(polygons[(classes == c) & ~touches])
                edge[int(c)].append(polygons[(classes == c) & touches])

    summary: dict[str, Any] = {"features": 0, "classes": {}}
    for c, name in enumerate(class_names):
        summary["classes"][name] = {
            "pixels": int(counts[c]),
            "area_um2": float(counts[c]) * float(mpp) ** 2 if mpp is not None else None,
            "written_name": written_names[c],
            "polygons": 0, "holes": 0, "vertices": 0,
        }

    partial = path.with_name(path.name + ".partial")
    level0_um2 = (float(mpp) / scale) ** 2 if mpp is not None else None
    try:
        with open(partial, "wb") as raw, _text_stream(raw, path) as fh:
            fh.write('{"type": "FeatureCollection", "features": [')
            first = True
            for c in inner:
                if not any(p.size for p in inner[c] + edge[c]):
                    continue
                geometry = _class_geometry([p for p in inner[c] if p.size], [p for p in edge[c] if p.size],
                                           scale, (ox, oy), simplify, min_area_px)
                if extent is not None:
                    geometry = _clip(geometry, (-ox, -oy, extent[0] - ox, extent[1] - oy))
                if geometry.is_empty:
                    continue
                info = summary["classes"][class_names[c]]
                info["polygons"] = int(shapely.get_num_geometries(geometry))
                info["holes"] = int(sum(shapely.get_num_interior_rings(shapely.get_parts(geometry))))
                info["vertices"] = int(shapely.get_num_coordinates(geometry))
                fh.write("" if first else ",")
                area = geometry.area * level0_um2 if level0_um2 is not None else None
                fh.write("\n" + _feature(geometry, written_names[c], rgb[c], area, info["pixels"]))
                first = False
                summary["features"] += 1
            fh.write("\n]}\n")
        _fsync(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return summary


def _text_stream(raw: io.BufferedWriter, path: Path) -> io.TextIOWrapper:
    """ASCII text into ``raw``, gzip-compressed when ``path`` ends in ``.gz`` (no time stamp in the
    header, so the same outlines give the same bytes; the header names the file without ``.gz``)."""
    if path.name.lower().endswith(".gz"):
        raw = gzip.GzipFile(filename=path.name[:-3], mode="wb", fileobj=raw, compresslevel=6, mtime=0)
    return io.TextIOWrapper(raw, encoding="ascii", newline="\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def qupath_class_names(names: Sequence[str]) -> list[str]:
    """Names QuPath 0.4-0.6 read back unchanged: ASCII, no ``:``, no surrounding blanks."""
    out = []
    for name in names:
        ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
        ascii_name = "".join(ch if ch.isprintable() else " " for ch in ascii_name)
        ascii_name = ascii_name.replace(":", "-").strip() or "Unnamed"
        out.append(ascii_name)
    return out


# ------------------------------------------------------------------------------------- ring tracing


def trace_regions(labels: np.ndarray, origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Exact pixel-edge polygons of every 4-connected region of equal label ``>= 0`` (``-1``: none).

    Returns ``(polygons, labels_of_polygons)`` in pixel coordinates shifted by ``origin``. Every
    ring has a vertex at every pixel corner along the array's own border, so polygons traced in
    adjacent blocks share their border edges vertex for vertex.
    """
    labels = np.asarray(labels, dtype=np.int16)
    h, w = labels.shape
    padded = np.full((h + 2, w + 2), -1, np.int16)
    padded[1:-1, 1:-1] = labels
    # Unit boundary edges: hor[y, x] lies on y between rows y-1 and y, over [x, x+1];
    # ver[y, x] lies on x between columns x-1 and x, over [y, y+1].
    hor = padded[:-1, 1:-1] != padded[1:, 1:-1]
    ver = padded[1:-1, :-1] != padded[1:-1, 1:]
    # Which unit edges leave each lattice node (h+1, w+1) in each direction.
    out = np.zeros((4, h + 1, w + 1), bool)
    out[_E, :, :-1] = hor
    out[_W, :, 1:] = hor
    out[_S, :-1, :] = ver
    out[_N, 1:, :] = ver
    # Segments break wherever a perpendicular edge touches, and at every node of the block border.
    hbreak = out[_S] | out[_N]
    hbreak[[0, -1], :] = True
    vbreak = out[_E] | out[_W]
    vbreak[:, [0, -1]] = True
    hy, hx0, hx1 = _runs(hor, hbreak)
    vx, vy0, vy1 = _runs(ver.T, vbreak.T)

    # Half-edges: start node, direction, owned pixel (padded coordinates) on the right-hand side.
    sx = np.concatenate([hx0, hx1, vx, vx])
    sy = np.concatenate([hy, hy, vy0, vy1])
    ex = np.concatenate([hx1, hx0, vx, vx])
    ey = np.concatenate([hy, hy, vy1, vy0])
    d = np.concatenate([np.full(hx0.size, _E), np.full(hx0.size, _W), np.full(vx.size, _S), np.full(vx.size, _N)])
    own_r = np.concatenate([hy + 1, hy, vy0 + 1, vy0 + 1])
    own_c = np.concatenate([hx0 + 1, hx0 + 1, vx, vx + 1])
    owner = padded[own_r, own_c]
    real = owner >= 0
    sx, sy, ex, ey, d, own_r, own_c, owner = (a[real] for a in (sx, sy, ex, ey, d, own_r, own_c, owner))
    n = sx.size
    if n == 0:
        return np.empty(0, dtype=object), np.empty(0, np.int16)

    # Successor: at the end node, turn right if an edge goes that way, else straight on, else left.
    right, left = (d + 1) % 4, (d + 3) % 4
    next_dir = np.where(out[right, ey, ex], right, np.where(out[d, ey, ex], d, left))
    stride = w + 1
    keys = (sy.astype(np.int64) * stride + sx) * 4 + d
    order = np.argsort(keys)
    wanted = (ey.astype(np.int64) * stride + ex) * 4 + next_dir
    succ = order[np.minimum(np.searchsorted(keys[order], wanted), n - 1)]
    if not np.array_equal(keys[succ], wanted):  # would mean a broken boundary graph: a bug here
        raise AssertionError("ring tracing found a dangling boundary edge")

    ring, rank = _cycles(succ)
    seq = np.lexsort((-rank, ring))  # half-edges in ring order; each contributes its start vertex
    xs, ys = sx[seq].astype(np.int64), sy[seq].astype(np.int64)
    ring_of = _split_pinched_rings(ring[seq], ys * stride + xs)
    regroup = np.argsort(ring_of, kind="stable")  # split-off loops keep their vertex order
    seq, xs, ys, ring_of = seq[regroup], xs[regroup], ys[regroup], ring_of[regroup]
    ring_ids, ring_start = np.unique(ring_of, return_index=True)
    # Shoelace sign with y down: shells > 0, holes < 0.
    ring_end = np.append(ring_start[1:], n) - 1
    nx, ny = np.roll(xs, -1), np.roll(ys, -1)
    nx[ring_end], ny[ring_end] = xs[ring_start], ys[ring_start]
    is_hole = np.add.reduceat(xs * ny - nx * ys, ring_start) < 0

    # Which region each ring bounds: the 4-connected component of the pixel its first edge owns.
    components = connected_components(labels, background=-1, connectivity=1)
    first = seq[ring_start]
    ring_component = components[own_r[first] - 1, own_c[first] - 1]
    ring_label = owner[first]
    ring_order = np.lexsort((is_hole, ring_component))  # shell first within each component
    shells = ~is_hole[ring_order]
    _, poly_index = np.unique(ring_component[ring_order], return_inverse=True)
    if shells.sum() != poly_index.max() + 1 or not shells[np.r_[0, np.flatnonzero(np.diff(poly_index)) + 1]].all():
        raise AssertionError("ring tracing found a region without exactly one outer ring")

    ring_rank = np.empty_like(ring_order)
    ring_rank[ring_order] = np.arange(ring_order.size)
    vertex_ring = ring_rank[np.searchsorted(ring_ids, ring_of)]
    vertex_order = np.argsort(vertex_ring, kind="stable")
    coords = np.column_stack([xs + origin[0], ys + origin[1]]).astype(np.float64)
    rings = shapely.linearrings(coords[vertex_order], indices=vertex_ring[vertex_order])
    polygons = shapely.polygons(rings, indices=poly_index)
    return polygons, ring_label[ring_order][shells]


def _split_pinched_rings(ring_of: np.ndarray, node: np.ndarray) -> np.ndarray:
    """Split rings that pass through a pixel corner twice into simple rings.

    A region that reaches round a pocket of other pixels and touches itself diagonally at one
    corner is traced as one ring through that corner twice; OGC validity (shapely, QuPath 0.6)
    wants a simple shell plus a hole touching it there. Only rings with a repeated vertex (rare,
    found vectorised) are walked in Python; each repeat closes off the loop since its first visit.
    Returns new ring ids per vertex; each ring's vertices keep their order.
    """
    key = ring_of.astype(np.int64) * (int(node.max()) + 1) + node
    uniq, counts = np.unique(key, return_counts=True)
    pinched = np.unique(uniq[counts > 1] // (int(node.max()) + 1))
    if pinched.size == 0:
        return ring_of
    new = ring_of.astype(np.int64)  # a copy
    next_id = int(ring_of.max()) + 1
    starts = np.searchsorted(ring_of, pinched)
    ends = np.searchsorted(ring_of, pinched, side="right")
    for a, b in zip(starts.tolist(), ends.tolist()):
        nodes = node[a:b].tolist()
        stack: list[int] = []
        index_in_stack: dict[int, int] = {}
        for i, u in enumerate(nodes):
            j = index_in_stack.get(u)
            if j is not None:  # loop stack[j:] runs from u back to u: a ring of its own
                for k in stack[j:]:
                    new[a + k] = next_id
                    del index_in_stack[nodes[k]]
                next_id += 1
                del stack[j:]
            index_in_stack[u] = len(stack)
            stack.append(i)
    return new


def _runs(edges: np.ndarray, breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of unit edges along each row, cut at break nodes: ``(row, start, end)``."""
    before = np.zeros_like(edges)
    before[:, 1:] = edges[:, :-1]
    after = np.zeros_like(edges)
    after[:, :-1] = edges[:, 1:]
    starts = edges & (~before | breaks[:, :-1])
    ends = edges & (~after | breaks[:, 1:])
    rows, x0 = np.nonzero(starts)
    _, x1 = np.nonzero(ends)
    return rows, x0, x1 + 1


def _cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycle id (smallest member) and position of every element of a permutation made of cycles.

    Pointer jumping: log2(longest cycle) vectorised steps instead of a Python walk per vertex.
    ``rank`` counts steps to the end of the cycle, so sorting by ``-rank`` gives cycle order.
    """
    n = succ.size
    ring = np.arange(n)
    jump = succ.copy()
    while True:
        new = np.minimum(ring, ring[jump])
        jump = jump[jump]
        if np.array_equal(new, ring):
            break
        ring = new
    # Cut each cycle before its smallest member, then rank by distance to the cut (list ranking).
    nxt = succ.copy()
    tails = succ == ring
    nxt[tails] = np.flatnonzero(tails)
    rank = (~tails).astype(np.int64)
    while True:
        rank = rank + rank[nxt]
        newnxt = nxt[nxt]
        if np.array_equal(newnxt, nxt):
            break
        nxt = newnxt
    return ring, rank


# -------------------------------------------------------------------------------------- geometry


def _class_geometry(inner: list[np.ndarray], edge: list[np.ndarray], scale: float,
                    offset: tuple[float, float], simplify: float, min_area: float = 0.0) -> shapely.MultiPolygon:
    """All block pieces of one class merged, in level-0 pixels on QuPath's 0.01 grid, valid.

    Only pieces that touch their block's border can continue in a neighbour block, so only those go
    through the coverage union. Rounding to 0.01 px is a strictly increasing map on each axis for
    any ``scale`` > 0.01, so it cannot change the topology of axis-parallel polygons: what QuPath
    0.6 snaps on import is already snapped, and validity is kept (checked once at the end anyway).
    """
    parts = list(np.concatenate(inner)) if inner else []
    if edge:
        parts.extend(shapely.get_parts(shapely.coverage_union_all(np.concatenate(edge))))
    merged = _drop_collinear(np.asarray(parts, dtype=object))
    shift = np.array(offset, dtype=np.float64)
    merged = shapely.transform(merged, lambda xy: np.round(xy * scale - shift, 2))
    if simplify > 0:
        merged = shapely.set_precision(shapely.simplify(merged, simplify, preserve_topology=True), QUPATH_GRID)
    if min_area > 0:
        merged = drop_small(merged, min_area)
    # Not expected (see above); keep the promise to QuPath regardless.  Part by part: the parts come
    # from a coverage union, so they cannot overlap, and checking that across the whole collection
    # (``merged.is_valid``) took minutes and gigabytes on a slide cut into ~10^5 pieces.
    if not shapely.is_valid(shapely.get_parts(merged)).all():
        merged = shapely.make_valid(merged)
    polygons = [p for p in shapely.get_parts(merged) if isinstance(p, shapely.Polygon) and not p.is_empty]
    if not polygons:
        polygons = [p for g in shapely.get_parts(merged) for p in shapely.get_parts(g)
                    if isinstance(p, shapely.Polygon) and not p.is_empty]
    merged = shapely.MultiPolygon(polygons)
    if hasattr(shapely, "orient_polygons"):  # shapely >= 2.1: RFC 7946 winding (shells CCW, y up)
        merged = shapely.orient_polygons(merged, exterior_cw=False)
    return merged


def _clip(geometry: shapely.MultiPolygon, box: tuple[float, float, float, float]) -> shapely.MultiPolygon:
    """``geometry`` inside ``box`` (x0, y0, x1, y1), untouched when already inside; still valid on
    QuPath's grid (the box's edges are snapped to it first)."""
    x0, y0, x1, y1 = (round(v, 2) for v in box)
    bx0, by0, bx1, by1 = geometry.bounds
    if geometry.is_empty or (bx0 >= x0 and by0 >= y0 and bx1 <= x1 and by1 <= y1):
        return geometry
    clipped = shapely.intersection(geometry, shapely.box(x0, y0, x1, y1), grid_size=QUPATH_GRID)
    polygons = [p for p in shapely.get_parts(clipped) if isinstance(p, shapely.Polygon) and not p.is_empty]
    merged = shapely.MultiPolygon(polygons)
    if hasattr(shapely, "orient_polygons"):
        merged = shapely.orient_polygons(merged, exterior_cw=False)
    return merged


def drop_small(geometry: shapely.MultiPolygon, min_area: float) -> shapely.MultiPolygon:
    """``geometry`` without its holes smaller than ``min_area`` (filled) and then without its parts
    smaller than ``min_area`` (their area with those holes filled).  A part lying in a filled hole
    is smaller than the hole, so it goes too and no two parts overlap.  Vectorised over rings."""
    parts = shapely.get_parts(geometry)
    if parts.size == 0:
        return geometry
    rings, part_of = shapely.get_rings(parts, return_index=True)  # each part's shell comes first
    shell = np.append(True, part_of[1:] != part_of[:-1])
    ring_area = shapely.area(shapely.polygons(rings))
    keep_ring = shell | (ring_area >= min_area)
    kept_holes = np.bincount(part_of[~shell & keep_ring], weights=ring_area[~shell & keep_ring], minlength=parts.size)
    big = ring_area[shell] - kept_holes >= min_area
    keep_ring &= big[part_of]
    if not keep_ring.any():
        return shapely.MultiPolygon()
    _, new_index = np.unique(part_of[keep_ring], return_inverse=True)
    return shapely.MultiPolygon(list(shapely.polygons(rings[keep_ring], indices=new_index)))


def _drop_collinear(polygons: np.ndarray) -> shapely.MultiPolygon:
    """MultiPolygon of ``polygons`` without the vertices that lie on a straight edge (the block-border
    vertices the coverage union needed). Vectorised: no per-polygon Python."""
    rings, part_of_ring = shapely.get_rings(polygons, return_index=True)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    last = np.append(ring_of[1:] != ring_of[:-1], True)  # closing repeat of each ring's first point
    xy, ring_of = xy[~last], ring_of[~last]
    start = np.flatnonzero(np.append(True, ring_of[1:] != ring_of[:-1]))
    end = np.append(start[1:], ring_of.size) - 1
    prev = np.roll(xy, 1, axis=0)
    prev[start] = xy[end]
    nxt = np.roll(xy, -1, axis=0)
    nxt[end] = xy[start]
    straight = ((prev[:, 0] == xy[:, 0]) & (xy[:, 0] == nxt[:, 0])) | ((prev[:, 1] == xy[:, 1]) & (xy[:, 1] == nxt[:, 1]))
    keep = ~straight
    new_rings = shapely.linearrings(xy[keep], indices=ring_of[keep])
    return shapely.MultiPolygon(list(shapely.polygons(new_rings, indices=part_of_ring)))


def _feature(geometry: shapely.MultiPolygon, name: str, color: tuple[int, int, int],
             area_um2: float | None, pixels: int) -> str:
    measurements: dict[str, float] = {"Label pixels": float(pixels)}
    if area_um2 is not None:
        measurements["Area um^2"] = round(area_um2, 3)
    properties = {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": name, "color": list(color)},
        "isLocked": False,
        "measurements": measurements,
    }
    return (f'{{"type": "Feature", "id": "{uuid.uuid4()}", "geometry": {shapely.to_geojson(geometry)}, '
            f'"properties": {json.dumps(properties)}}}')


# ------------------------------------------------------------------------------------------ checks


def _check_labels(labels: Any) -> tuple[int, int]:
    shape = tuple(getattr(labels, "shape", ()))
    if len(shape) != 2 or np.dtype(labels.dtype) != np.uint8 or min(shape) < 1:
        raise ValueError(f"labels must be a non-empty 2-D uint8 array, got {shape} {getattr(labels, 'dtype', None)}")
    return int(shape[0]), int(shape[1])


def _rgb(color: Sequence[int]) -> tuple[int, int, int]:
    c = tuple(int(v) for v in color)
    if len(c) != 3 or not all(0 <= v <= 255 for v in c):
        raise ValueError(f"colours must be (r, g, b) in 0..255, got {color!r}")
    return c  # type: ignore[return-value]


