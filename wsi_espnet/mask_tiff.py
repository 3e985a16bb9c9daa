"""The label mask as a tiled, compressed, pyramidal OME-TIFF that OpenSlide, tifffile and QuPath open.

File layout (checked with OpenSlide 4.0.1, tifffile 2026.3 and Bio-Formats 7.3, the reader QuPath
uses for OME-TIFF):

* Little-endian TIFF (BigTIFF above ~3.5 GiB of raw pixels), every level tiled and deflate-compressed,
  uint8 class ids, photometric *palette* with a ColorMap built from the class colours.
* IFD 0 is the full working resolution and carries the OME-XML (physical pixel size in µm, class
  names and colours) in its ImageDescription. The reduced levels (NewSubfileType = reduced image,
  each half the size of the one before) are referenced twice: from IFD 0's **SubIFDs** tag, which is
  how Bio-Formats (so QuPath) and tifffile find OME-TIFF pyramids, and as the **main IFD chain** after
  IFD 0, which is how OpenSlide's generic-tiff driver finds levels (it never reads SubIFDs, so an
  ordinary pyramidal OME-TIFF opens in OpenSlide with one level only). tifffile writes the SubIFD
  layout; one 4- or 8-byte "next IFD" pointer of IFD 0 is then set to the first reduced level. Both
  kinds of reader see the same bytes, so the file costs nothing extra.
* Why little-endian matters: OpenSlide 4.0.1 cannot read *big-endian* classic TIFF at all (its TIFF
  parser reads the first-IFD offset as 8 bytes and keeps the wrong half), which is why a Bio-Formats
  written OME-TIFF such as ``OS-1-detail.ome.tif`` is "unsupported" there although it is tiled.

What the readers return:

* tifffile / Bio-Formats / QuPath: the raw class ids (QuPath shows them as a grey single channel).
* OpenSlide (``read_region``): RGBA of the palette colours, i.e. a readable picture of the mask, not
  the ids. Use tifffile (or :func:`read_mask_info` + tifffile) to get class ids back.

Metadata: the OME ``Pixels`` element has ``PhysicalSizeX/Y`` (µm); ``MapAnnotation``\\ s in
namespaces :data:`CLASSES_NAMESPACE` and :data:`COLORS_NAMESPACE` list ``class id -> name`` and
``class id -> #rrggbb``, and :data:`SLIDE_NAMESPACE` the slide mapping (``scale``, ``bounds-x``,
``bounds-y``), and :data:`PROVENANCE_NAMESPACE` what made the mask (free ``key -> text`` pairs:
``wsi-segment`` records the software version, the model's name and SHA-256, the slide and the
settings); the image ``Description`` spells the classes out for people. :func:`read_mask_info`
parses it all back. (OME-XML rather than a JSON ImageDescription: Bio-Formats and QuPath need the
OME-XML there to find the pyramid and the pixel size, and a TIFF page has one description.)

Pyramid: each reduced level is the 2x2 *mode* of the level above (ties go to the top-left pixel). A
mode keeps class areas unbiased at every level, where nearest-neighbour sampling aliases; single-pixel
specks vanish at coarse levels, which only matters for display: level 0 is always exact. Levels are
built into temporary raw label files next to the output, block by block, so no level is ever held whole
in memory; then each level is streamed into the TIFF tile row by tile row.  Building the pyramid
notes where each level has labels, so the second pass reads only those regions, and every empty tile
is the same encoded zero tile (same bytes as tifffile's own encoding, a fraction of the time).

``255`` in the input means "not computed" (outside tissue) and is written as class 0.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import tifffile

from .errors import UserError
from .label_file import LabelFile
from .outputs import check_output
from .tiling import Occupancy

NOT_COMPUTED = 255
CLASSES_NAMESPACE = "wsi-espnet/classes"
COLORS_NAMESPACE = "wsi-espnet/class-colors"
SLIDE_NAMESPACE = "wsi-espnet/slide"  # keys: scale, bounds-x, bounds-y (see write_mask_tiff)
PROVENANCE_NAMESPACE = "wsi-espnet/provenance"  # what made the mask (see write_mask_tiff)
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"

# Above this much raw pixel data (all levels) the file is written as BigTIFF: deflate cannot grow
# data by more than a fraction of a percent, so classic TIFF's 4 GiB offsets are safe below it.
_BIGTIFF_RAW_BYTES = int(3.5 * 2**30)
# Compressions that libtiff (OpenSlide), Bio-Formats (QuPath) and tifffile all decode.
_COMPRESSIONS = {"zlib": "zlib", "deflate": "zlib", "lzw": "lzw", "packbits": "packbits", None: None}


@dataclass(frozen=True)
class MaskInfo:
    """What :func:`read_mask_info` finds in a mask written by :func:`write_mask_tiff`."""

    shape: tuple[int, int]
    mpp: float
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    level_shapes: list[tuple[int, int]]
    scale: float | None  # slide level-0 px per mask px, when the writer was told
    offset: tuple[float, float]  # the slide's bounds-x/y (QuPath's origin on OpenSlide-cropped slides)
    provenance: dict[str, str] = field(default_factory=dict)  # what made the mask, as the writer was told


def write_mask_tiff(
    path: str | os.PathLike,
    labels: Any,
    mpp: float,
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    *,
    tile: int = 512,
    compression: str | None = "zlib",
    overwrite: bool = False,
    bigtiff: bool | None = None,
    block: int = 1024,
    scale: float | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    occupied: Occupancy | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``labels`` (H x W uint8 class ids; a Zarr array or anything sliceable like NumPy) as a
    pyramidal OME-TIFF at ``path``, reading it ``block``-sized pieces at a time.

    ``mpp`` is the label image's pixel size in µm. ``bigtiff=None`` decides from the size. The file
    appears at ``path`` only when complete (written as ``<name>.partial``, then renamed).

    ``scale`` (slide level-0 px per mask px) and ``offset`` (the slide's ``openslide.bounds-x/y``)
    are only recorded, for tools that map the mask back onto the slide (the QuPath import script
    in ``examples/`` uses them; a slide without mpp in QuPath has nothing else to go by).

    ``occupied`` says where ``labels`` may be non-zero; regions it rules out are not read at all.

    ``provenance``: what made the mask (software, model, slide, settings), kept as text so that a
    mask found on a share years later still says how it came about.
    """
    path = Path(path)
    height, width = _check_labels(labels)
    mpp = float(mpp)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    palette = _palette(class_names, colors)
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (a TIFF rule), got {tile}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(map(str, _COMPRESSIONS))}, got {compression!r}")
    block = max(tile, block - block % tile)
    if occupied is not None:
        occupied.check_shape((height, width))
    check_output(path, overwrite)

    shapes = pyramid_shapes(height, width, tile)
    if bigtiff is None:
        bigtiff = sum(h * w for h, w in shapes) > _BIGTIFF_RAW_BYTES
    unfinished = path.with_name(path.name + ".partial")
    # One fixed name, like the .partial beside it (both are the one writer's of this path: wsi-segment
    # holds the output's lock): found with one stat, where a pattern would list the whole folder
    # (an archive's outputs) and match other masks' names (``[`` in a name is a glob class).
    scratch = path.with_name(f".{path.name}.levels")
    shutil.rmtree(scratch, ignore_errors=True)  # left by a run that was killed
    scratch.mkdir()
    reduced: list[LabelFile] = []  # closed below however the write ends, also mid-build
    try:
        occupancy = _build_levels(labels, shapes, scratch, reduced, block, len(class_names), occupied)
        levels = [labels] + reduced
        description = _ome_xml(path.name, width, height, mpp, class_names, palette[1], scale, offset,
                               {str(k): str(v) for k, v in (provenance or {}).items()})
        _write_tiff(unfinished, levels, occupancy, shapes, mpp, palette[0], description, tile,
                    _COMPRESSIONS[compression], bigtiff, block, len(class_names))
        _link_subifds_into_main_chain(unfinished)
        os.replace(unfinished, path)
    except BaseException:
        unfinished.unlink(missing_ok=True)
        raise
    finally:
        for level in reduced:
            level.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """Level shapes, halving (rounding up) until the level fits in one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def read_mask_info(path: str | os.PathLike) -> MaskInfo:
    """Pixel size, class names and colours, and level shapes of a mask written here."""
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages.first.description
        level_shapes = [tuple(level.shape[:2]) for level in tif.series[0].levels]
    root = ET.fromstring(xml)
    ns = {"ome": OME_NS}
    pixels = root.find("ome:Image/ome:Pixels", ns)
    if pixels is None:
        raise UserError(f"{path} has no OME-XML pixel description; was it written by wsi-espnet?")
    maps: dict[str, dict[str, str]] = {}
    for ann in root.findall("ome:StructuredAnnotations/ome:MapAnnotation", ns):
        maps[ann.get("Namespace", "")] = {
            m.get("K"): (m.text or "") for m in ann.findall("ome:Value/ome:M", ns)
        }
    names = {int(k): v for k, v in maps.get(CLASSES_NAMESPACE, {}).items()}
    hexes = {int(k): v for k, v in maps.get(COLORS_NAMESPACE, {}).items()}
    slide = maps.get(SLIDE_NAMESPACE, {})
    return MaskInfo(
        shape=(int(pixels.get("SizeY")), int(pixels.get("SizeX"))),
        mpp=float(pixels.get("PhysicalSizeX")),
        class_names=[names[k] for k in sorted(names)],
        colors=[_hex_to_rgb(hexes[k]) for k in sorted(hexes)],
        level_shapes=level_shapes,
        scale=float(slide["scale"]) if "scale" in slide else None,
        offset=(float(slide.get("bounds-x", 0)), float(slide.get("bounds-y", 0))),
        provenance=maps.get(PROVENANCE_NAMESPACE, {}),
    )


def mode_downsample_2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent value of each 2x2 cell; ties (2+2, 1+1+1+1) go to the top-left pixel.

    ``block`` must have even height and width.  A label map is flat almost everywhere (99 % of the
    cells of the demo's mask hold one class), so those cells are found in five passes and only the
    others get the vote: six comparisons per cell, no histograms (1.6x faster than voting everywhere).
    """
    a, b = block[0::2, 0::2], block[0::2, 1::2]
    c, d = block[1::2, 0::2], block[1::2, 1::2]
    mixed = a != b
    mixed |= a != c
    mixed |= a != d
    out = a.copy()
    flat = np.flatnonzero(mixed)  # 8x faster than a 2-D nonzero for the ~1 % that are mixed
    if flat.size:
        where = np.unravel_index(flat, mixed.shape)
        out[where] = _mode_of_four(a[where], b[where], c[where], d[where])
    return out


def _mode_of_four(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Elementwise mode of four arrays (ties to ``a``, then the earlier of b, c, d)."""
    ab, ac, ad = a == b, a == c, a == d
    bc, bd, cd = b == c, b == d, c == d
    out = a.copy()
    best = ab.astype(np.uint8) + ac + ad
    for value, votes in ((b, ab.astype(np.uint8) + bc + bd),
                         (c, ac.astype(np.uint8) + bc + cd),
                         (d, ad.astype(np.uint8) + bd + cd)):
        wins = votes > best
        out[wins] = value[wins]
        np.maximum(best, votes, out=best)
    return out


# ----------------------------------------------------------------------------------------- checks


def _check_labels(labels: Any) -> tuple[int, int]:
    shape = tuple(getattr(labels, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {shape}")
    if np.dtype(labels.dtype) != np.uint8:
        raise ValueError(f"labels must be uint8 class ids, got {labels.dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"labels must not be empty, got shape {shape}")
    return int(shape[0]), int(shape[1])


def _palette(class_names: Sequence[str], colors: Sequence[Sequence[int]]) -> tuple[np.ndarray, list]:
    """TIFF ColorMap (3 x 256, 16-bit) and the validated colours."""
    if len(class_names) != len(colors):
        raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
    if not 1 <= len(class_names) < NOT_COMPUTED:
        raise ValueError(f"need 1 to {NOT_COMPUTED - 1} classes, got {len(class_names)}")
    rgb = []
    for color in colors:
        c = tuple(int(v) for v in color)
        if len(c) != 3 or not all(0 <= v <= 255 for v in c):
            raise ValueError(f"colours must be (r, g, b) in 0..255, got {color!r}")
        rgb.append(c)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, : len(rgb)] = np.asarray(rgb, np.uint16).T * 257  # 8-bit to 16-bit: 255 -> 65535
    return colormap, rgb


def clean_block(block: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids of a block of input labels: "not computed" (255) becomes 0; any other id beyond the
    class list is a bug upstream and stops the write rather than producing a silently wrong mask."""
    block = np.asarray(block, dtype=np.uint8)
    if not block.size or int(block.max()) < num_classes:  # the usual case: one pass, no copy
        return block
    block = np.where(block == NOT_COMPUTED, np.uint8(0), block)
    if int(block.max()) >= num_classes:
        raise ValueError(f"label value {int(block.max())} found, but only {num_classes} classes are named")
    return block


# --------------------------------------------------------------------------------------- pyramid


def _build_levels(labels: Any, shapes: list[tuple[int, int]], scratch: Path, levels: list[LabelFile], block: int,
                  num_classes: int, occupied: Occupancy | None = None, workers: int = 2) -> list[Occupancy | None]:
    """Levels 1.. as label files under ``scratch``, appended to ``levels`` as each is created (so the
    caller closes them even when the build fails: a caller that keeps the exception, as a task
    framework does, would otherwise keep the deleted files' descriptors and disk space), each from
    the previous one in blocks on ``workers`` threads (the blocks of a level are independent, and
    numpy and the file reads let go of the GIL).  Returns, for every level (0 included), where it may
    be non-zero (None: not known, read it all)."""
    occupancy: list[Occupancy | None] = [occupied] + [None] * (len(shapes) - 1)
    source = labels
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mask-pyramid") as pool:
        for k, (h, w) in enumerate(shapes[1:], start=1):
            dest = LabelFile.create(scratch / f"level{k}.u8", (h, w))
            levels.append(dest)
            if k == 1:  # learn where level 0 has labels while reading it for level 1
                occupancy[0] = Occupancy.empty(shapes[0], 2 * block, within=occupied)
            occupancy[k] = Occupancy.empty((h, w), block)
            blocks = [(y0, x0) for y0 in range(0, h, block) for x0 in range(0, w, block)]
            # list(): wait for the whole level (and raise the first error) before the next reads it
            reduce = partial(_reduce_block, source, dest, k, block=block, shapes=shapes, occupancy=occupancy,
                             num_classes=num_classes)
            list(pool.map(lambda yx: reduce(*yx), blocks))
            source = dest
    return occupancy


def _reduce_block(source: Any, dest: LabelFile, k: int, y0: int, x0: int, *, block: int,
                  shapes: list[tuple[int, int]], occupancy: list[Occupancy | None], num_classes: int) -> None:
    """One block of level ``k``: the 2x2 mode of the block of level ``k - 1`` under it."""
    h, w = shapes[k]
    src_h, src_w = shapes[k - 1]
    y1, x1 = min(y0 + block, h), min(x0 + block, w)
    sy0, sy1, sx0, sx1 = 2 * y0, min(2 * y1, src_h), 2 * x0, min(2 * x1, src_w)
    src_occ = occupancy[k - 1] if k > 1 else occupancy[0].within
    if src_occ is not None and not src_occ.may_have(sy0, sy1, sx0, sx1):
        return
    piece = np.asarray(source[sy0:sy1, sx0:sx1])
    if not piece.any():
        return  # all background: the level's fill value already says so (most of a slide)
    if k == 1:
        occupancy[0].mark(sy0, sx0)
        piece = clean_block(piece, num_classes)
    pad = ((0, 2 * (y1 - y0) - piece.shape[0]), (0, 2 * (x1 - x0) - piece.shape[1]))
    if any(p for _, p in pad):  # odd edge: repeat the last row/column
        piece = np.pad(piece, pad, mode="edge")
    dest[y0:y1, x0:x1] = mode_downsample_2x2(piece)
    occupancy[k].mark(y0, x0)


def _tiles(level: Any, shape: tuple[int, int], tile: int, block: int, clean: int | None,
           occupancy: Occupancy | None = None) -> Iterator[np.ndarray | None]:
    """Row-major tiles of one level, read ``tile`` rows by ``block`` columns at a time; ``None`` for
    a tile in a region the occupancy map rules out (not read, known to be background: on a 50k²
    mask most of its 9,600 tiles, which then cost no check either)."""
    h, w = shape
    for y0 in range(0, h, tile):
        for xb in range(0, w, block):
            y1, x1 = min(y0 + tile, h), min(xb + block, w)
            if occupancy is not None and not occupancy.may_have(y0, y1, xb, x1):
                yield from (None for _ in range(xb, x1, tile))
                continue
            band = np.asarray(level[y0:y1, xb:x1])
            if not band.any():
                yield from (None for _ in range(xb, x1, tile))
                continue
            if clean is not None:
                band = clean_block(band, clean)
            for x0 in range(0, band.shape[1], tile):
                yield band[:, x0: x0 + tile]


def _encoded_tiles(tiles: Iterator[np.ndarray | None], tile: int, compression: str | None,
                   workers: int = 2, ahead: int = 16) -> Iterator[bytes]:
    """The tiles as the bytes TIFF stores, in order, encoded on ``workers`` threads.

    Why not let tifffile encode: a slide's mask is mostly background, and tifffile deflates every
    empty tile anew (0.7 ms each: 6 s of CPU for the 9,600 tiles of a 50k² mask).  Here an all-zero
    tile (``None``: known empty, or found so) is the one encoding of a zero tile, made once; the
    other tiles get the same encoder and padding tifffile would use, so the file's bytes are the same."""
    encode = _tile_encoder(compression)

    def padded(t: np.ndarray) -> np.ndarray:
        t = np.ascontiguousarray(t, np.uint8)
        if t.shape != (tile, tile):  # an edge tile: zeros beyond the image, as tifffile pads
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
        return t

    empty = encode(np.zeros((tile, tile), np.uint8))
    queue: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiff-encode") as pool:
        for t in tiles:
            queue.append(empty if t is None or not t.any() else pool.submit(encode, padded(t)))
            while len(queue) > ahead:
                item = queue.popleft()
                yield item if isinstance(item, bytes) else item.result()
        while queue:
            item = queue.popleft()
            yield item if isinstance(item, bytes) else item.result()


def _tile_encoder(compression: str | None):
    """tifffile's own encoder for ``compression`` (as its ``write`` calls it for one-sample tiles)."""
    if compression is None:
        return lambda t: t.tobytes()
    tag = int(tifffile.COMPRESSION[{"zlib": "ADOBE_DEFLATE", "lzw": "LZW", "packbits": "PACKBITS"}[compression]])
    encoder = tifffile.TIFF.COMPRESSORS[tag]
    if compression == "packbits":
        return lambda t: encoder(t, axis=-1)  # PackBits runs stop at each row
    return encoder


def _write_tiff(path: Path, levels: list, occupancy: list[Occupancy | None], shapes: list[tuple[int, int]], mpp: float,
                colormap: np.ndarray, description: str, tile: int, compression: str | None,
                bigtiff: bool, block: int, num_classes: int) -> None:
    height, width = shapes[0]
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder="<", ome=False) as tif:
        for k, (level, occ, shape) in enumerate(zip(levels, occupancy, shapes)):
            # Physical size per level, from the real size ratio (odd sizes round up).
            px_per_cm = (1e4 / (mpp * width / shape[1]), 1e4 / (mpp * height / shape[0]))
            tiles = _tiles(level, shape, tile, block, num_classes if k == 0 else None, occ)
            tif.write(
                _encoded_tiles(tiles, tile, compression),
                shape=shape,
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="palette",
                colormap=colormap,
                compression=compression,
                resolution=px_per_cm,
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                subifds=len(shapes) - 1 if k == 0 and len(shapes) > 1 else None,
                description=description.encode("utf-8") if k == 0 else None,
                software="wsi-espnet",
                metadata=None,
            )


def _link_subifds_into_main_chain(path: Path) -> None:
    """Make the reduced levels (SubIFDs of IFD 0) also the main IFD chain, for OpenSlide.

    tifffile links SubIFDs to each other already; only IFD 0's next-IFD pointer (0 as written) has
    to point at the first SubIFD. Each link is checked before it is written. Ends with an fsync so
    the rename that follows never publishes a file whose bytes are still only in the page cache.
    """
    with tifffile.TiffFile(path) as tif:
        first = tif.pages.first
        chain = [first.offset] + list(first.subifds or ())
        big = tif.is_bigtiff
    count_fmt, entry_size, ptr_fmt = ("<Q", 20, "<Q") if big else ("<H", 12, "<I")
    with open(path, "r+b") as fh:
        for here, nxt in zip(chain, chain[1:] + [0]):
            fh.seek(here)
            (entries,) = struct.unpack(count_fmt, fh.read(struct.calcsize(count_fmt)))
            pos = here + struct.calcsize(count_fmt) + entries * entry_size
            fh.seek(pos)
            (current,) = struct.unpack(ptr_fmt, fh.read(struct.calcsize(ptr_fmt)))
            if current == nxt:
                continue
            if current != 0:
                raise RuntimeError(f"unexpected IFD chain in {path}: {here} -> {current}")
            fh.seek(pos)
            fh.write(struct.pack(ptr_fmt, nxt))
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------ OME-XML


def _ome_xml(name: str, width: int, height: int, mpp: float, class_names: Sequence[str],
             colors: list[tuple[int, int, int]], scale: float | None, offset: tuple[float, float],
             provenance: dict[str, str]) -> str:
    legend = "; ".join(f"{i}={n}" for i, n in enumerate(class_names))
    names = "".join(f"<M K=\"{i}\">{_text(n)}</M>" for i, n in enumerate(class_names))
    hexes = "".join(f"<M K=\"{i}\">#{r:02x}{g:02x}{b:02x}</M>" for i, (r, g, b) in enumerate(colors))
    slide = "".join(f"<M K=\"{k}\">{float(v)!r}</M>" for k, v in
                    ((("scale", scale),) if scale is not None else ()) + (("bounds-x", offset[0]), ("bounds-y", offset[1])))
    made = "".join(f"<M K={_attr(k)}>{_text(v)}</M>" for k, v in provenance.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{OME_NS} {OME_NS}/ome.xsd" Creator="wsi-espnet">'
        f'<Image ID="Image:0" Name={_attr(name)}>'
        f"<Description>{_text('wsi-espnet class ids: ' + legend)}</Description>"
        f'<Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" BigEndian="false" '
        f'Interleaved="false" SignificantBits="8" SizeX="{width}" SizeY="{height}" SizeZ="1" '
        f'SizeC="1" SizeT="1" PhysicalSizeX="{mpp!r}" PhysicalSizeXUnit="\u00b5m" '
        f'PhysicalSizeY="{mpp!r}" PhysicalSizeYUnit="\u00b5m">'
        '<Channel ID="Channel:0:0" Name="class" SamplesPerPixel="1"/>'
        '<TiffData FirstC="0" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1"/>'
        "</Pixels>"
        '<AnnotationRef ID="Annotation:Classes:0"/><AnnotationRef ID="Annotation:Classes:1"/>'
        '<AnnotationRef ID="Annotation:Slide:0"/>'
        + ('<AnnotationRef ID="Annotation:Provenance:0"/>' if made else "")
        + "</Image>"
        "<StructuredAnnotations>"
        f'<MapAnnotation ID="Annotation:Classes:0" Namespace="{CLASSES_NAMESPACE}"><Value>{names}</Value></MapAnnotation>'
        f'<MapAnnotation ID="Annotation:Classes:1" Namespace="{COLORS_NAMESPACE}"><Value>{hexes}</Value></MapAnnotation>'
        f'<MapAnnotation ID="Annotation:Slide:0" Namespace="{SLIDE_NAMESPACE}"><Value>{slide}</Value></MapAnnotation>'
        + (f'<MapAnnotation ID="Annotation:Provenance:0" Namespace="{PROVENANCE_NAMESPACE}"><Value>{made}</Value>'
           "</MapAnnotation>" if made else "")
        + "</StructuredAnnotations>"
        "</OME>"
    )


# Characters XML 1.0 cannot hold at all (most control characters, lone surrogates: a file name that
# was not valid UTF-8 decodes to those), written as backslash escapes instead.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(text: str) -> str:
    def spell(m: re.Match) -> str:
        c = ord(m.group())
        if 0xDC80 <= c <= 0xDCFF:  # a byte that os.fsdecode could not decode
            return f"\\x{c - 0xDC00:02x}"
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _NOT_XML.sub(spell, text)


def _text(text: str) -> str:
    """Element text, as written and read back (a carriage return too, which XML would turn into a
    line feed)."""
    return escape(_xml_safe(text), {"\r": "&#13;"})


def _attr(text: str) -> str:
    return quoteattr(_xml_safe(text))


def _hex_to_rgb(text: str) -> tuple[int, int, int]:
    text = text.strip().lstrip("#")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
