"""The label map as QuPath-ready GeoJSON: one classified MultiPolygon annotation per class.

Polygons follow pixel edges exactly (no marching-squares corner cutting), so a class's polygon area
equals its pixel count times ``scale**2``, and a pixel at label ``(x, y)`` is the level-0 square
``[x*scale, (x+1)*scale) x [y*scale, (y+1)*scale)`` shifted by ``-offset``.

How (bounded memory: no full-slide raster, and no full set of outlines either):

1. The label array is read in ``block`` x ``block`` pieces. In each piece, the boundary between
   pixels of different labels is cut into straight segments at every lattice point where edges meet;
   each segment gives two directed half-edges, each owning the pixel on its right (screen
   coordinates, y down). A half-edge's successor is the next boundary edge turning right, else
   straight on, else left: tracing that permutation's cycles (pointer jumping in NumPy, no Python
   loop per vertex) gives every ring of every 4-connected region. Shells run one way round and holes
   the other, and a connected-component labelling says which holes belong to which shell.
2. A region that does not reach a border shared with another block is complete: it is finished
   (step 4) and written to a temporary file per class straight away.  So are the holes of every
   region (a hole lies inside its block).  Only the outer rings of regions cut by a block border stay
   in memory: on a map in ~10^6 specks, ~10 % of its vertices (the writer held them all, 2.4 GB for
   an 8192² map of specks, before it streamed: ``benchmarks/bench_writers.py --blob 3``).
3. Along the block's own border every ring keeps a vertex at every pixel corner, so the pieces of a
   region cut by a block border share their edges vertex for vertex; ``shapely.coverage_union_all``
   (edge cancellation, fast and exact for such a coverage) merges them without seams, and each
   merged part takes back the holes of the pieces it was made of.
4. Vertices on straight edges are dropped, coordinates scaled to level-0 pixels, the offset
   subtracted, snapped to QuPath 0.6's 0.01-pixel grid, and the label map's far edges pulled in to
   the slide's ``extent``; every part is checked valid after that (``make_valid`` if ever not).

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

There is no outline simplification: a topology-preserving one needs a class's outlines all at
once (what step 2 avoids), and on CMU-1-Small-Region (a label pixel = 2 level-0 px) Douglas-Peucker
at one label pixel moved class areas by −2.7 % to −27 %; ``min_area`` is the size control.

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
import tempfile
import unicodedata
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from skimage.measure import label as connected_components

from .engine import available_cores
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
    level-0 ``(width, height)``; outlines are cut at it (the label map's size is the slide's at its
    resolution, rounded: its last row and column may reach up to half a label pixel past the
    slide's edge, or stop as much short of it, which then stays unoutlined).

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

    if occupied is not None:
        occupied.check_shape((height, width))
    # Regions the footprint rules out are class 0: skipped unread, unless class 0 is drawn too.
    skip = occupied if occupied is not None and not keep[0] else None
    place = _Placement.make(scale, (ox, oy), (width, height), extent)
    level0_um2 = (float(mpp) / scale) ** 2 if mpp is not None else None
    partial = path.with_name(path.name + ".partial")
    try:
        with ExitStack() as stack:
            hole_spool = stack.enter_context(tempfile.TemporaryFile(dir=path.parent))
            outlines = {int(c): stack.enter_context(_ClassOutlines(path.parent, hole_spool))
                        for c in np.flatnonzero(keep)}
            counts = _trace_blocks(labels, block, len(class_names), outlines, place, min_area_px, skip)
            summary: dict[str, Any] = {"features": 0, "classes": {}}
            for c, name in enumerate(class_names):
                summary["classes"][name] = {
                    "pixels": int(counts[c]),
                    "area_um2": float(counts[c]) * float(mpp) ** 2 if mpp is not None else None,
                    "written_name": written_names[c],
                    "polygons": 0, "holes": 0, "vertices": 0,
                }
            with open(partial, "wb") as raw, _text_stream(raw, path) as fh:
                fh.write('{"type": "FeatureCollection", "features": [')
                for c, spool in outlines.items():
                    if spool.polygons == 0:
                        continue
                    info = summary["classes"][class_names[c]]
                    info.update(polygons=spool.polygons, holes=spool.holes, vertices=spool.vertices)
                    area = spool.area * level0_um2 if level0_um2 is not None else None
                    fh.write(",\n" if summary["features"] else "\n")
                    fh.write(f'{{"type": "Feature", "id": "{uuid.uuid4()}", '
                             '"geometry": {"type": "MultiPolygon", "coordinates": [')
                    spool.write_polygons(fh)
                    fh.write("]}, " + _properties(written_names[c], rgb[c], area, info["pixels"]) + "}")
                    summary["features"] += 1
                fh.write("\n]}\n")
        _fsync(partial)
        os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a full disk in the nameless spool files: say which output it stopped
        raise
    return summary


def _trace_blocks(labels: Any, block: int, named: int, outlines: dict[int, _ClassOutlines],
                  place: _Placement, min_area: float, skip: Occupancy | None) -> np.ndarray:
    """Read ``labels`` block by block into ``outlines`` (one per drawn class); returns the count of
    every label value.  ``skip``: blocks it rules out are counted as class 0 unread.

    Why threads: reading and tracing a block (numpy, most of it without the GIL) needs nothing but
    the block, so the next few blocks are traced while this thread merges the outlines of the
    current one; the merges still happen in raster order, so the output is the same.  A few blocks
    ahead, not a row: a block of specks is many polygons, and memory must not grow with the map."""
    height, width = labels.shape
    keep = np.zeros(256, bool)
    keep[list(outlines)] = True
    counts = np.zeros(256, np.int64)
    blocks = [(y0, x0, min(y0 + block, height), min(x0 + block, width))
              for y0 in range(0, height, block) for x0 in range(0, width, block)]
    ahead = min(4, available_cores())

    def trace(y0: int, x0: int, y1: int, x1: int):
        if skip is not None and not skip.may_have(y0, y1, x0, x1):
            return None
        raw = np.asarray(labels[y0:y1, x0:x1], dtype=np.uint8)
        block_counts = np.bincount(raw.ravel(), minlength=256)
        if not block_counts[keep].any():
            return block_counts, None  # no class to draw here (all background, say): nothing to trace
        traced = np.where(keep[raw], raw.astype(np.int16), np.int16(-1))
        return block_counts, trace_regions(traced, origin=(x0, y0))

    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="geojson-trace") as pool:
        pending: deque[Future] = deque()
        for i, (y0, x0, y1, x1) in enumerate(blocks):
            while len(pending) <= ahead and i + len(pending) < len(blocks):
                pending.append(pool.submit(trace, *blocks[i + len(pending)]))
            done = pending.popleft().result()
            if done is None:
                counts[0] += (y1 - y0) * (x1 - x0)
            else:
                block_counts, traced = done
                counts += block_counts
                unnamed = np.flatnonzero(counts[named:NOT_COMPUTED])
                if unnamed.size:
                    for f in pending:
                        f.cancel()
                    raise ValueError(f"label value {unnamed[0] + named} found, but only {named} classes are named")
                if traced is not None:
                    _add_pieces(outlines, *traced, (x0, y0, x1, y1), (width, height), place, min_area)
            if x1 == width:  # the last block of its row
                for spool in outlines.values():
                    spool.end_row(y1 if y1 < height else None, place, min_area)
    return counts


def _add_pieces(outlines: dict[int, _ClassOutlines], polygons: np.ndarray, classes: np.ndarray,
                box: tuple[int, int, int, int], size: tuple[int, int], place: _Placement, min_area: float) -> None:
    """One block's traced regions (``box``: its x0, y0, x1, y1) to their classes' outlines: whole,
    or cut where a region reaches a border shared with another block (it may continue there)."""
    x0, y0, x1, y1 = box
    width, height = size
    b = shapely.bounds(polygons)
    cut = (((b[:, 0] == x0) & (x0 > 0)) | ((b[:, 1] == y0) & (y0 > 0))
           | ((b[:, 2] == x1) & (x1 < width)) | ((b[:, 3] == y1) & (y1 < height)))
    for c in np.unique(classes):
        mine = classes == c
        outlines[int(c)].add_whole(polygons[mine & ~cut], place, min_area)
        outlines[int(c)].add_cut(polygons[mine & cut], place, min_area)


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
    """Names QuPath 0.4-0.6 read back unchanged: ASCII, no ``:``, no surrounding blanks, and
    distinct (QuPath would merge two classes of one name): a name already taken gets `` (id)``."""
    out: list[str] = []
    for class_id, name in enumerate(names):
        ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
        ascii_name = "".join(ch if ch.isprintable() else " " for ch in ascii_name)
        ascii_name = ascii_name.replace(":", "-").strip() or "Unnamed"
        while ascii_name in out:
            ascii_name = f"{ascii_name} ({class_id})"
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
    del hor, ver, hbreak, vbreak
    # The arrays below hold one entry per half-edge, millions on a block of specks: they are int32
    # or narrower, and each is dropped once used (a 2048² block of specks: 362 MB of them at once
    # when they were int64 and all kept to the end, 109 MB now).

    # Half-edges: start node, direction, owned pixel (padded coordinates) on the right-hand side.
    sx = np.concatenate([hx0, hx1, vx, vx])
    sy = np.concatenate([hy, hy, vy0, vy1])
    ex = np.concatenate([hx1, hx0, vx, vx])
    ey = np.concatenate([hy, hy, vy1, vy0])
    d = np.concatenate([np.full(hx0.size, _E, np.int8), np.full(hx0.size, _W, np.int8),
                        np.full(vx.size, _S, np.int8), np.full(vx.size, _N, np.int8)])
    own_r = np.concatenate([hy + 1, hy, vy0 + 1, vy0 + 1])
    own_c = np.concatenate([hx0 + 1, hx0 + 1, vx, vx + 1])
    del hy, hx0, hx1, vx, vy0, vy1
    owner = padded[own_r, own_c]
    real = owner >= 0
    sx, sy, ex, ey, d, own_r, own_c, owner = (a[real] for a in (sx, sy, ex, ey, d, own_r, own_c, owner))
    del real
    n = sx.size
    if n == 0:
        return np.empty(0, dtype=object), np.empty(0, np.int16)

    # Successor: at the end node, turn right if an edge goes that way, else straight on, else left.
    right, left = (d + 1) % 4, (d + 3) % 4
    next_dir = np.where(out[right, ey, ex], right, np.where(out[d, ey, ex], d, left))
    del out, right, left
    stride = w + 1
    keys = (sy.astype(np.int64) * stride + sx) * 4 + d
    del d
    order = np.argsort(keys).astype(np.int32)
    keys = keys[order]
    wanted = (ey.astype(np.int64) * stride + ex) * 4 + next_dir
    del ex, ey, next_dir
    at = np.minimum(np.searchsorted(keys, wanted), n - 1)
    if not np.array_equal(keys[at], wanted):  # would mean a broken boundary graph: a bug here
        raise AssertionError("ring tracing found a dangling boundary edge")
    del keys, wanted
    succ = order[at]
    del order, at

    ring, rank = _cycles(succ)
    del succ
    seq = np.lexsort((-rank, ring)).astype(np.int32)  # half-edges in ring order; each contributes its start vertex
    ring = ring[seq]
    del rank
    xs, ys = sx[seq], sy[seq]
    del sx, sy
    ring_of = _split_pinched_rings(ring, ys.astype(np.int64) * stride + xs)
    del ring
    regroup = np.argsort(ring_of, kind="stable")  # split-off loops keep their vertex order
    seq, xs, ys, ring_of = seq[regroup], xs[regroup], ys[regroup], ring_of[regroup]
    del regroup
    ring_ids, ring_start = np.unique(ring_of, return_index=True)
    # Shoelace sign with y down: shells > 0, holes < 0 (in int64: x * y overflows int32 on a block
    # wider than 46,340 px, which write_geojson's ``block`` allows).
    ring_end = np.append(ring_start[1:], n) - 1
    nx, ny = np.roll(xs, -1), np.roll(ys, -1)
    nx[ring_end], ny[ring_end] = xs[ring_start], ys[ring_start]
    is_hole = np.add.reduceat(xs.astype(np.int64) * ny - nx.astype(np.int64) * ys, ring_start) < 0
    del nx, ny, ring_end

    # Which region each ring bounds: the 4-connected component of the pixel its first edge owns.
    components = connected_components(labels, background=-1, connectivity=1)
    first = seq[ring_start]
    ring_component = components[own_r[first] - 1, own_c[first] - 1]
    del components, own_r, own_c, seq
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
    coords = np.column_stack([xs + np.float64(origin[0]), ys + np.float64(origin[1])])
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
    rows, x0 = (a.astype(np.int32) for a in np.nonzero(starts))
    x1 = np.nonzero(ends)[1].astype(np.int32)
    return rows, x0, x1 + 1


def _cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycle id (smallest member) and position of every element of a permutation made of cycles.

    Pointer jumping: log2(longest cycle) vectorised steps instead of a Python walk per vertex.
    ``rank`` counts steps to the end of the cycle, so sorting by ``-rank`` gives cycle order.
    """
    n = succ.size
    ring = np.arange(n, dtype=succ.dtype)
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
    rank = (~tails).astype(succ.dtype)
    while True:
        rank = rank + rank[nxt]
        newnxt = nxt[nxt]
        if np.array_equal(newnxt, nxt):
            break
        nxt = newnxt
    return ring, rank


# -------------------------------------------------------------------------------------- geometry


class _Placement:
    """Where label-pixel outlines land in the file: level-0 pixels, the offset subtracted, on QuPath's
    0.01 grid, and the label map's far edges pulled in to the slide's ``extent``.

    Why pull edges in rather than clip: the map's last row and column may reach past the slide (by
    up to half a label pixel as ``wsi-segment`` rounds; the writer allows up to one).  Every other vertex lies inside, so moving
    just the far edge is a strictly increasing map of each axis: it cuts exactly what an intersection
    with the slide's box would, without changing any polygon's topology (a part can never split, so
    the holes kept on disk still belong to the part they were read with).
    """

    def __init__(self, scale: float, offset: tuple[float, float], limit: tuple[float, float]):
        self.scale, self.shift, self.limit = scale, np.asarray(offset, np.float64), np.asarray(limit)

    @classmethod
    def make(cls, scale: float, offset: tuple[float, float], size: tuple[int, int],
             extent: tuple[float, float] | None) -> _Placement:
        if extent is None:
            return cls(scale, offset, (math.inf, math.inf))
        limit = []
        for n, off, edge in zip(size, offset, extent):
            if not (math.isfinite(float(edge)) and float(edge) > (n - 1) * scale):
                raise ValueError(f"extent {tuple(extent)} cuts whole label pixels off a {size[0]}x{size[1]} "
                                 f"label map at scale {scale}: it must fall within the last pixel or beyond")
            last_inside = round((n - 1) * scale - off, 2)  # the far pixel's near edge, as placed
            limit.append(max(round(float(edge) - off, 2), round(last_inside + QUPATH_GRID, 2)))
        return cls(scale, offset, tuple(limit))

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return np.minimum(np.round(xy * self.scale - self.shift, 2), self.limit)


class _ClassOutlines:
    """One class's outlines while the label map is read, in memory that does not grow with the map.

    A piece traced in one block that does not reach a border shared with another block is a whole
    part: it is finished and spooled to a temporary file as GeoJSON text at once.  A piece *cut* by
    such a border must be merged with its neighbours: its outer ring is kept until its row of blocks
    has been read, while its holes, which lie inside the block (a hole reaching the block's edge would
    not be enclosed), are final and go to the shared hole file at once.  At the end of each row of
    blocks the row's pieces are merged with the parts still open from the rows above; a merged part
    that does not reach the row's bottom is complete and spooled with the holes of all its pieces.
    So only the parts that cross the current row's bottom are held.
    """

    def __init__(self, folder: Path, hole_spool: IO[bytes]):
        self.spool: IO[bytes] = tempfile.TemporaryFile(dir=folder)
        self.hole_spool = hole_spool
        self.polygons = self.holes = self.vertices = 0
        self.area = 0.0  # level-0 px² of the written outlines
        self.row_shells: list[np.ndarray] = []  # this row's cut pieces: outer rings as polygons, label px
        self.row_refs: list[np.ndarray] = []  # and where each one's holes are in ``hole_spool``
        self.open_parts = np.empty(0, dtype=object)  # merged parts reaching the last row's bottom
        self.open_refs: list[np.ndarray] = []  # the holes of each one's pieces

    def __enter__(self) -> _ClassOutlines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.spool.close()

    def add_whole(self, polygons: np.ndarray, place: _Placement, min_area: float) -> None:
        if polygons.size == 0:
            return
        parts = _finish(polygons, place, min_area)
        bad = ~shapely.is_valid(parts)
        self._spool_finished(np.concatenate([parts[~bad], _repair(parts[bad])]) if bad.any() else parts, min_area)

    def add_cut(self, polygons: np.ndarray, place: _Placement, min_area: float) -> None:
        if polygons.size:
            shells, refs = self._shells_and_spooled_holes(polygons, place, min_area)
            self.row_shells.append(shells)
            self.row_refs.append(refs)

    def _shells_and_spooled_holes(self, polygons: np.ndarray, place: _Placement,
                                  min_area: float) -> tuple[np.ndarray, np.ndarray]:
        """``polygons`` (label px) without their holes, which are finished and written to the hole
        file, under ``min_area`` filled; and one record a polygon saying where its holes went."""
        refs = np.zeros(polygons.size, _HOLE_REF)
        if polygons.size == 0:
            return polygons, refs
        rings, owner, shell = _rings(polygons)
        if shell.all():
            return polygons, refs
        holes, owner = _finish(shapely.polygons(rings[~shell]), place, 0.0, hole=True), owner[~shell]
        area = shapely.area(holes)
        kept = _at_least(area, min_area)  # smaller holes are filled
        holes, owner, area = holes[kept], owner[kept], area[kept]
        if holes.size:
            texts = _coordinates(shapely.get_exterior_ring(holes))
            vertices = shapely.get_num_coordinates(holes)
            self.hole_spool.seek(0, os.SEEK_END)
            for i in np.unique(owner):
                mine = np.flatnonzero(owner == i)
                data = ("," + ",".join(texts[j] for j in mine)).encode("ascii")
                refs[i] = (self.hole_spool.tell(), len(data), mine.size, vertices[mine].sum(), area[mine].sum())
                self.hole_spool.write(data)
        return shapely.polygons(rings[shell]), refs

    def end_row(self, bottom: int | None, place: _Placement, min_area: float) -> None:
        """Merge this row's cut pieces with the open parts (edge cancellation: they share their
        border edges vertex for vertex); spool every part that does not reach ``bottom`` (None: the
        map's last row, where every part is complete)."""
        if not self.row_shells and not self.open_parts.size:
            return
        pieces = np.concatenate([self.open_parts, *self.row_shells])
        refs = self.open_refs + [r[i: i + 1] for r in self.row_refs for i in range(r.size)]
        self.row_shells, self.row_refs = [], []
        merged = shapely.get_parts(shapely.coverage_union_all(pieces))
        # Which part each piece became: a point inside the piece lies inside exactly that part.
        # (The parts are the query side: shapely prepares them once each, so a part of millions of
        # vertices answers each point in log time; the other way round took minutes on a maze.)
        part, piece = shapely.STRtree(shapely.point_on_surface(pieces)).query(merged, predicate="contains")
        if piece.size != pieces.size:  # would lose or double a piece's holes: a bug here
            raise AssertionError("merged outlines do not account for every piece exactly once")
        order = np.argsort(part, kind="stable")
        piece, part = piece[order], part[order]
        cuts = np.searchsorted(part, np.arange(merged.size + 1))
        merged_refs = [np.concatenate([refs[i] for i in piece[cuts[k]: cuts[k + 1]]] or [refs[0][:0]])
                       for k in range(merged.size)]
        still_open = (shapely.bounds(merged)[:, 3] == bottom) if bottom is not None else np.zeros(merged.size, bool)
        # An open part's holes are complete (a ring reaching the row's bottom is not a hole): only
        # its outer ring stays in memory.
        self.open_parts, refs = self._shells_and_spooled_holes(merged[still_open], place, min_area)
        self.open_refs = [np.append(merged_refs[k], refs[i: i + 1]) if refs[i]["length"] else merged_refs[k]
                          for i, k in enumerate(np.flatnonzero(still_open))]
        done = np.flatnonzero(~still_open)
        if done.size:
            self.hole_spool.flush()
            self._spool_parts(merged[done], [merged_refs[k] for k in done], place, min_area)

    def write_polygons(self, fh: io.TextIOWrapper) -> None:
        """The class's polygons, as the body of a MultiPolygon's coordinate array."""
        self.spool.seek(0)
        while chunk := self.spool.read(1 << 20):
            fh.write(chunk.decode("ascii"))

    def _spool_parts(self, parts: np.ndarray, refs: list[np.ndarray], place: _Placement, min_area: float) -> None:
        """Finish merged parts (label px) and spool each with its pieces' holes (``refs``)."""
        parts = _finish(parts, place, min_area)
        bad = ~shapely.is_valid(parts)
        if bad.any():  # not expected (see ``_finish``): repair the whole outline, holes and all
            whole = [self._with_holes(parts[k], refs[k]) for k in np.flatnonzero(bad)]
            self._spool_finished(_repair(np.asarray(whole, dtype=object)), min_area)
            keep = np.flatnonzero(~bad)
            parts, refs = parts[keep], [refs[k] for k in keep]
        hole_area = np.array([r["area"].sum() for r in refs])
        if min_area > 0 and parts.size:
            keep = np.flatnonzero(_at_least(shapely.area(parts) - hole_area, min_area))
            parts, refs, hole_area = parts[keep], [refs[k] for k in keep], hole_area[keep]
        if not parts.size:
            return
        for text, held in zip(_coordinates(parts), refs):
            held = held[held["length"] > 0]
            if not held.size:
                self._append(text)
                continue
            self._append(text[:-1])  # the polygon's ring list stays open for its pieces' holes
            for ref in held:  # copied file to file: a part's holes may be most of the class
                self._copy_holes(ref)
            self.spool.write(b"]")
            self.holes += int(held["holes"].sum())
            self.vertices += int(held["vertices"].sum())
        self._count(parts)
        self.area -= float(hole_area.sum())

    def _spool_finished(self, parts: np.ndarray, min_area: float) -> None:
        """Finished parts without holes elsewhere: those over ``min_area`` spooled."""
        if min_area > 0:
            parts = parts[_at_least(shapely.area(parts), min_area)]
        if parts.size:
            self._count(parts)
            self._append(",".join(_coordinates(parts)))

    def _read_holes(self, ref: np.void) -> str:
        return os.pread(self.hole_spool.fileno(), int(ref["length"]), int(ref["offset"])).decode("ascii")

    def _copy_holes(self, ref: np.void) -> None:
        offset, end = int(ref["offset"]), int(ref["offset"] + ref["length"])
        while offset < end:
            chunk = os.pread(self.hole_spool.fileno(), min(end - offset, 1 << 20), offset)
            self.spool.write(chunk)
            offset += len(chunk)

    def _with_holes(self, part: shapely.Polygon, refs: np.ndarray) -> shapely.Polygon:
        """``part`` with its pieces' spooled holes put back in, as one polygon."""
        rings = [shapely.from_geojson(f'{{"type": "LineString", "coordinates": {text}}}')
                 for ref in refs if ref["length"] for text in _split_rings(self._read_holes(ref))]
        return shapely.Polygon(part.exterior, [*part.interiors, *rings])

    def _append(self, text: str) -> None:
        self.spool.write(((", " if self.spool.tell() else "") + text).encode("ascii"))

    def _count(self, parts: np.ndarray) -> None:
        self.polygons += int(parts.size)
        self.holes += int(shapely.get_num_interior_rings(parts).sum())
        self.vertices += int(shapely.get_num_coordinates(parts).sum())
        self.area += float(shapely.area(parts).sum())


_HOLE_REF = np.dtype([("offset", np.int64), ("length", np.int64), ("holes", np.int64),
                      ("vertices", np.int64), ("area", np.float64)])


def _split_rings(text: str) -> list[str]:
    """``,[[x,y],...],[[x,y],...]`` (a piece's spooled holes) as one text per ring."""
    return ["[[" + t.strip(",[]") + "]]" for t in text.split("]],") if t.strip(",[]")]


def _finish(polygons: np.ndarray, place: _Placement, min_area: float, *, hole: bool = False) -> np.ndarray:
    """Label-pixel polygons as written, one for one: without the vertices on straight edges
    (block-border vertices the merge needed), placed, their holes under ``min_area`` filled, wound
    as RFC 7946 wants (shells counter-clockwise with y up; ``hole=True``: a hole's ring the other way).

    Placement cannot change the topology of axis-parallel polygons (rounding to 0.01 px is strictly
    increasing on each axis for any scale > 0.01, and so is :class:`_Placement`'s edge), so the
    callers' validity checks are a promise kept to QuPath, not a repair expected to run."""
    parts = shapely.transform(_drop_collinear(polygons), place)
    if min_area > 0:
        parts = fill_small_holes(parts, min_area)
    return shapely.orient_polygons(parts, exterior_cw=hole)


def _repair(parts: np.ndarray) -> np.ndarray:
    """The polygons of ``make_valid(parts)``, wound as :func:`_finish` winds them."""
    pieces = shapely.get_parts(shapely.get_parts(shapely.make_valid(parts)))  # collections one level down
    pieces = pieces[(shapely.get_type_id(pieces) == 3) & ~shapely.is_empty(pieces)]
    return shapely.orient_polygons(pieces, exterior_cw=False)


def _coordinates(geometries: np.ndarray) -> list[str]:
    """Each geometry's GeoJSON ``coordinates`` array as text."""
    return [t[t.index('"coordinates":') + 14: -1] for t in shapely.to_geojson(geometries).tolist()]


def fill_small_holes(parts: np.ndarray, min_area: float) -> np.ndarray:
    """``parts`` (polygons) with their holes smaller than ``min_area`` filled.  Vectorised over rings.

    Dropping the parts then smaller than ``min_area`` is the caller's (a part's own holes may not be
    all it has: see :class:`_ClassOutlines`).  A part lying in a filled hole is smaller than the
    hole, so it goes too and no two parts of a class overlap."""
    if parts.size == 0:
        return parts
    rings, part_of, shell = _rings(parts)
    keep_ring = shell | _at_least(shapely.area(shapely.polygons(rings)), min_area)
    if keep_ring.all():
        return parts
    return shapely.polygons(rings[keep_ring], indices=part_of[keep_ring])


def _rings(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ring of ``polygons``, the polygon each belongs to, and which are shells (shapely lists
    each polygon's shell first, then its holes)."""
    rings, owner = shapely.get_rings(polygons, return_index=True)
    return rings, owner, np.r_[owner[:1] >= 0, owner[1:] != owner[:-1]]


def _at_least(area: np.ndarray, min_area: float) -> np.ndarray:
    """``area >= min_area``, blind to the last bits of rounding: the same outline's area summed from
    another starting vertex (a merged part, a clipped one) must not fall on the other side."""
    return area >= min_area * (1 - 1e-9)


def _drop_collinear(polygons: np.ndarray) -> np.ndarray:
    """``polygons`` without the vertices that lie on a straight edge.  Vectorised: no per-polygon
    Python."""
    if polygons.size == 0:
        return polygons
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
    return shapely.polygons(new_rings, indices=part_of_ring)


def _properties(name: str, color: tuple[int, int, int], area_um2: float | None, pixels: int) -> str:
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
    return f'"properties": {json.dumps(properties)}'


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


