"""One small slide-reader interface over OpenSlide and tifffile.

Everything downstream (tissue detection, tiling, segmentation) reads slides through :class:`Slide`
and never touches a backend, so a slide OpenSlide cannot open (OME-TIFF, a strip TIFF, a PNG) goes
through the same code as an Aperio scan.  Two rules shape the interface:

* **Resolution is physical.**  Models are trained at a fixed µm/px, so :meth:`Slide.read_at_mpp`
  reads at a requested µm/px whatever the scanner's resolution, picking a pyramid level and resampling
  with exact area averaging.  Coordinates are pixels of the *virtual image at that resolution*, so tiles
  cut from it line up exactly, with no level-0 rounding drift between neighbours.
* **No silent guesses.**  A slide without a physical pixel size gets ``mpp = None`` and any read in
  µm/px raises :class:`NoMppError` asking for ``--mpp``.  Resolution tags that are a software default
  (72 or 96 dpi from a generic TIFF writer) are treated as missing, not as 352 µm/px.

Pixels come back as uint8 RGB ``(h, w, 3)``; transparent and out-of-slide areas are white (glass), the
same in both backends.  Where both backends open a file they return identical pixels for the same
level-pixel-aligned region (tested on real files).  OpenSlide itself interpolates sub-pixel when a
level-0 location is not a multiple of a non-integer level downsample (e.g. Aperio's 4.0002); the
tifffile backend snaps to the nearest level pixel instead.

Reads are the pipeline's largest cost after the network, so two fast paths sit under the OpenSlide
backend, each checked against OpenSlide's own pixels and left unused where they differ: OpenSlide
reads straight into numpy (no PIL round trip; checked when the slide opens), and levels of Aperio
and generic tiled TIFF slides are decoded tile by tile with a cache of decoded tiles (``tiff_tiles``;
each level checked at its first use) instead of through OpenSlide's cairo compositing.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NoMppError, SlideError, UserError
from .tiff_tiles import TiledPageReader, TileFile, checked_readers, tile_decode_enabled

#: Pixels whose recorded width and height differ by more than this (relative) are said to be non-square.
NON_SQUARE = 0.01
#: A pyramid level is used for a target resolution when it is at most this much coarser (relative).
#: Slightly coarser levels are common: an Aperio AT2 scan at 0.2527 µm/px has its 4x level at
#: 1.0108 µm/px, 1.08 % coarser than a 1 µm/px model's resolution.  Passed over, the next finer level
#: is read and area-averaged instead: level 0 on such a file, 16x the pixels (on a demo slide at that
#: resolution with a 2x level, 19 instead of 11 ms of CPU a 512² tile), for a 1 % difference in scale
#: that no tissue model notices.
LEVEL_TOLERANCE = 0.02

#: Reading a scan more than this many times coarser than asked (upsampling it) gets a warning.
COARSE_SCAN = 2.0

#: Upper bound on the source pixels resampled at once, so a thumbnail of a slide without a pyramid is
#: made in bounded memory instead of decoding its whole level 0 in one piece.
MAX_SOURCE_PIXELS = 1 << 22

#: Grid on which OpenSlide reads of levels with a non-integer downsample are anchored (level pixels).
OPENSLIDE_BLOCK = 256

#: Resolutions (dots per inch) that image software writes when it knows nothing about the pixel size.
DEFAULT_DPI = (72.0, 96.0)

_UNIT_TO_UM = {
    "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4,
    "m": 1e6, "Å": 1e-4, "pm": 1e-6, "in": 25400.0,
}
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a")


class _NotThisBackend(Exception):
    """A backend's "this file is not for me", as opposed to a file it recognised and found broken."""


def _one_line(exc: BaseException | str) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


class Slide(ABC):
    """A whole-slide image: pyramid geometry, physical resolution, and RGB region reads.

    Use as a context manager or call :meth:`close`.  Pickling re-opens the file by path, so a slide
    can be handed to Dask workers.
    """

    path: Path
    backend: str  # "openslide" | "tifffile" | "image"
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    file_mpp: float | None  # what the file records (the mean of across and down), whatever the override
    file_mpp_xy: tuple[float, float] | None
    objective_power: float | None
    vendor: str | None
    bounds: tuple[int, int, int, int] | None
    properties: dict[str, str]

    def __init__(self, path: Path, mpp: float | None) -> None:
        self.path = path
        self._mpp_override = mpp
        self._mpp_note = ""
        self.bounds = None
        self.objective_power = None
        self.vendor = None
        self.properties = {}
        self.file_mpp = None
        self.file_mpp_xy = None

    # ----------------------------------------------------------------- geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def no_mpp_reason(self) -> str:
        """Why the file's pixel size is not used (" (its TIFF resolution, 72 dpi, is a software
        default, ...)"), or "" when there is nothing more to say than that it records none."""
        return self._mpp_note

    @property
    def non_square_pixels(self) -> str:
        """A sentence when the file records pixels more than 1 % taller than wide (or the reverse),
        which are read as squares of their mean size; "" otherwise (and under an mpp override)."""
        if self.file_mpp_xy is None or self._mpp_override is not None:
            return ""
        mx, my = self.file_mpp_xy
        if max(mx, my) / min(mx, my) - 1 <= NON_SQUARE:
            return ""
        return (f"{self.path.name} records pixels of {mx:.4g} x {my:.4g} µm, not square: they are read as squares of "
                f"{self.file_mpp:.4g} µm, which distorts shapes by a factor of {max(mx, my) / min(mx, my):.3g} "
                "between the two axes")

    def _finish_init(self, file_mpp_xy: tuple[float, float] | None) -> None:
        """``file_mpp_xy``: the µm/px the file records across and down; the slide is read as square
        pixels of their mean (scanners' pixels are square, up to rounding in the file)."""
        self.file_mpp_xy = file_mpp_xy
        file_mpp = (file_mpp_xy[0] + file_mpp_xy[1]) / 2 if file_mpp_xy else None
        self.file_mpp = file_mpp
        self.mpp = self._mpp_override if self._mpp_override is not None else file_mpp
        self._level_scales = [_level_scale(self.dimensions, d) for d in self.level_dimensions]

    def level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (within LEVEL_TOLERANCE)."""
        best = 0
        for i, (sx, sy) in enumerate(self._level_scales):
            if max(sx, sy) <= downsample * (1.0 + LEVEL_TOLERANCE):
                best = i
        return best

    def size_at_downsample(self, downsample: float) -> tuple[int, int]:
        w, h = self.dimensions
        return max(1, round(w / downsample)), max(1, round(h / downsample))

    def _downsample_for_mpp(self, mpp: float) -> float:
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise UserError(f"resolution must be a positive number of µm per pixel, got {mpp!r}")
        if self.mpp is None:
            raise NoMppError(
                f"{self.path}: the slide has no physical pixel size{self._mpp_note}; "
                "pass --mpp (µm per pixel at full resolution) to read it"
            )
        return mpp / self.mpp

    def size_at_mpp(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the virtual image at ``mpp`` µm/px."""
        return self.size_at_downsample(self._downsample_for_mpp(mpp))

    def upsampling_note(self, mpp: float, whose: str = "the model's") -> str:
        """A warning's text when reading at ``mpp`` would upsample the scan more than
        :data:`COARSE_SCAN` times (an overview image or a thumbnail passed for a slide), else "".
        Why: the run still works, but its outputs grow by the square of that factor and hold no
        detail the scan lacks; a user who passed the wrong file should hear it before waiting."""
        if self.mpp is None or self.mpp <= COARSE_SCAN * mpp:
            return ""
        up_w, up_h = self.size_at_mpp(mpp)
        return (f"{self.path.name} is scanned at {self.mpp:.3g} µm/px, {self.mpp / mpp:.0f}x coarser than "
                f"{whose} {mpp:g} µm/px: it is upsampled to {up_w}x{up_h} px, the outputs are that large, "
                "and the model sees no detail the scan lacks (is this a thumbnail or overview image?)")

    # ----------------------------------------------------------------- reads
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 RGB ``(h, w, 3)`` of ``size`` level pixels, ``location`` in level-0 pixels (as OpenSlide)."""
        self._check_level(level)
        w, h = _check_size(size)
        ds = self.level_downsamples[level]
        x = int(math.floor(location[0] / ds + 0.5))
        y = int(math.floor(location[1] / ds + 0.5))
        return self._read_level_padded(level, x, y, w, h)

    def read_at_downsample(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """Region of the virtual image at ``downsample`` level-0 px per output px; (x, y) in that image.

        Works without an mpp (tissue detection and thumbnails need none).  Each output pixel is the
        area average of the level-0 footprint ``[(x+i)*d, (x+i+1)*d)`` as approximated by the chosen
        level; an integer factor is an exact block mean in integers.  Output pixel values depend only
        on absolute coordinates, so tiles stitch bit-exactly to one big read.
        """
        width, height = _check_size((width, height))
        if not (math.isfinite(downsample) and downsample > 0):
            raise UserError(f"downsample must be positive, got {downsample!r}")
        level = self.level_for_downsample(downsample)
        sx, sy = self._level_scales[level]
        fx, fy = downsample / sx, downsample / sy
        out = np.empty((height, width, 3), np.uint8)
        # Bounded pieces: source pixels per piece <= MAX_SOURCE_PIXELS.
        bw = max(1, min(width, int(math.sqrt(MAX_SOURCE_PIXELS) / max(fx, 1e-9))))
        bh = max(1, min(height, int(MAX_SOURCE_PIXELS / (bw * fx + 2) / max(fy, 1e-9))))
        for oy in range(0, height, bh):
            for ox in range(0, width, bw):
                pw, ph = min(bw, width - ox), min(bh, height - oy)
                out[oy:oy + ph, ox:ox + pw] = self._resample_piece(level, x + ox, y + oy, pw, ph, fx, fy)
        return out

    def read_at_mpp(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """Region of the virtual image at ``mpp`` µm/px; (x, y) are pixels of that image, not level 0.

        Raises NoMppError when the slide has no mpp and none was given at open.
        """
        return self.read_at_downsample(x, y, width, height, self._downsample_for_mpp(mpp))

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """RGB image of the whole slide, longest side <= ``max_size``, read from a low level."""
        w, h = self.dimensions
        ds = max(w / max_size, h / max_size, 1.0)
        tw, th = self.size_at_downsample(ds)
        return self.read_at_downsample(0, 0, min(tw, max_size), min(th, max_size), ds)

    def _resample_piece(self, level: int, x: int, y: int, w: int, h: int, fx: float, fy: float) -> np.ndarray:
        ix, iy = _integer_factor(fx), _integer_factor(fy)
        if ix and iy:
            src = self._read_level_padded(level, x * ix, y * iy, w * ix, h * iy)
            if ix == iy == 1:
                return src
            return _block_mean(src, iy, ix)
        x0, x_idx, x_w = _area_weights(x, w, fx)
        y0, y_idx, y_w = _area_weights(y, h, fy)
        src = self._read_level_padded(level, x0, y0, int(x_idx.max()) + 1, int(y_idx.max()) + 1)
        # Separable weighted taps in a fixed order, rows then columns: each output value is computed
        # from the same numbers in the same order whatever the region, so tiles stitch bit-exactly.
        # float32 is ample for means of 8-bit values (error < 1e-4 of a grey level).  Rows first, as
        # whole-row gathers, shrink the image before the column taps, which gather pixel by pixel
        # (on an (h, w*3) view, so each gather is one flat index): a 0.2527 µm/px scan read at
        # 1 µm/px took 64 ms a 512² tile with columns first and per-pixel gathers, 23 ms so.
        x_w, y_w = x_w.astype(np.float32), y_w.astype(np.float32)
        flat = src.reshape(src.shape[0], -1)
        rows = np.zeros((h, flat.shape[1]), np.float32)
        part = np.empty_like(rows)
        for t in range(y_idx.shape[0]):
            rows += np.multiply(flat[y_idx[t]], y_w[t][:, None], out=part)
        out = np.zeros((h, w * 3), np.float32)
        part = np.empty_like(out)
        for t in range(x_idx.shape[0]):
            columns = (x_idx[t][:, None] * 3 + np.arange(3)).ravel()
            out += np.multiply(np.take(rows, columns, axis=1), np.repeat(x_w[t], 3), out=part)
        out += np.float32(0.5)
        np.floor(out, out=out)
        np.clip(out, 0, 255, out=out)
        out = out.reshape(h, w, 3)
        return out.astype(np.uint8)

    def _read_level_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level pixels [x, x+w) x [y, y+h); areas outside the level are white."""
        lw, lh = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if cx0 == x and cy0 == y and cx1 == x + w and cy1 == y + h:
            return self._read_level(level, x, y, w, h)
        out = np.full((h, w, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        return out

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB of level pixels, region inside the level."""

    def _release_tile_readers(self) -> None:
        """Forget the levels decoded through ``tiff_tiles`` and close their file (both backends)."""
        self._tile_readers = {}
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise UserError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")

    def _read_failed(self, exc: BaseException, level: int, x: int, y: int, w: int, h: int) -> SlideError:
        return SlideError(
            f"{self.path}: cannot read level {level} region x={x} y={y} w={w} h={h} "
            f"({self.backend}): {_one_line(exc)}"
        )

    # ----------------------------------------------------------------- lifecycle
    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self):
        return (open_slide, (str(self.path), self._mpp_override, self.backend))

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count}, "
                f"mpp={self.mpp}, vendor={self.vendor!r})")


# --------------------------------------------------------------------------- helpers
def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise UserError(f"region size must be positive, got {w}x{h}")
    return w, h


def _block_mean(src: np.ndarray, iy: int, ix: int) -> np.ndarray:
    """Mean of each iy x ix block of a uint8 RGB image, rounded half up, in exact integers.

    Why by hand: ``reshape(...).sum(axis=(1, 3))`` walks the image with strides and widens every
    value to 32 bits, 26 ms for a 1024² source; adding whole rows, then column phases, in 16 bits
    (exact up to 16 x 16 blocks) takes 2.6 ms.  This is the read path of every 20x slide whose
    pyramid has no 2x level, for a 1 µm/px model."""
    h, w = src.shape[0] // iy, src.shape[1] // ix
    n = ix * iy
    acc_type = np.uint16 if n * 255 + n // 2 < 2**16 else np.uint32
    rows = src.reshape(h, iy, w * ix, 3)
    acc = rows[:, 0].astype(acc_type)
    for j in range(1, iy):
        acc += rows[:, j]
    cols = acc.reshape(h, w, ix, 3)
    sums = cols[:, :, 0].copy()
    for i in range(1, ix):
        sums += cols[:, :, i]
    sums += n // 2
    sums //= n
    return sums.astype(np.uint8)


def _integer_factor(f: float) -> int:
    k = round(f)
    return k if k >= 1 and abs(f - k) < 1e-9 else 0


def _area_weights(start: int, n: int, f: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Box-filter weights along one axis for output pixels start..start+n at factor ``f``.

    Output pixel i covers source interval [(start+i)*f, (start+i+1)*f).  Returns the first source
    index read, and (taps, n) arrays of source indices (relative to it) and weights summing to 1.
    Computed from absolute indices so any tiling gives the same numbers.
    """
    idx = np.arange(start, start + n, dtype=np.float64)
    lo, hi = idx * f, (idx + 1) * f
    first = np.floor(lo).astype(np.int64)
    last = np.ceil(hi).astype(np.int64)  # exclusive
    taps = int((last - first).max())
    src = first[None, :] + np.arange(taps)[:, None]
    overlap = np.minimum(src + 1, hi[None, :]) - np.maximum(src, lo[None, :])
    weights = np.clip(overlap, 0.0, None) / f
    src = np.minimum(src, last[None, :] - 1)  # unused taps (weight 0) point at a pixel that is read
    x0 = int(first.min())
    return x0, src - x0, weights


def _level_scale(base: tuple[int, int], dims: tuple[int, int]) -> tuple[float, float]:
    """Level-0 pixels per level pixel, per axis.

    Pyramids halve with floor or ceil, so OpenSlide's ratio-of-sizes downsample is slightly off the
    true factor (4443 / 2221 = 2.0005 where the level was made by 2x binning).  When both sizes are
    floor or ceil of base / k for an integer k, k is the true factor; otherwise the size ratio is.
    """
    (bw, bh), (w, h) = base, dims
    k = round(((bw / w) + (bh / h)) / 2)
    if k >= 1 and w in (bw // k, -(-bw // k)) and h in (bh // k, -(-bh // k)):
        return float(k), float(k)
    return bw / w, bh / h


def _openslide_downsample(base: tuple[int, int], dims: tuple[int, int]) -> float:
    """OpenSlide's own formula, so both backends report the same ``level_downsamples``."""
    return ((base[1] / dims[1]) + (base[0] / dims[0])) / 2.0


def _to_rgb_uint8(a: np.ndarray, photometric: int | None = None, colormap: np.ndarray | None = None,
                  extrasamples: Sequence[int] | None = None) -> np.ndarray:
    """(h, w[, c]) of any sample type to uint8 RGB; alpha composited on white.

    Integers wider than 8 bits are scaled by their full range and floats are taken as 0..1: a
    fluorescence image with 12 significant bits then looks dark, which is honest rather than
    auto-contrasted differently tile by tile.  One or two grey channels: the first, as grey; three or
    more colour channels (RGB, or a fluorescence image's grey ones): the first three as RGB.

    ``extrasamples``: a TIFF's ExtraSamples (the last samples of a pixel: 0 unspecified, 1 alpha
    premultiplied into the colour, 2 plain alpha); the first alpha among them is composited and
    unspecified ones count as channels.  None (other formats): the last of 2 or 4 samples is alpha.
    """
    if colormap is not None and a.ndim == 2:
        cmap = np.asarray(colormap)
        if cmap.dtype != np.uint8:
            cmap = (cmap.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
        a = cmap.T[a]  # (h, w, 3)
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            scale = 255.0 / (float(info.max) - float(info.min))
            a = np.floor((a.astype(np.float64) - info.min) * scale + 0.5).astype(np.uint8)
        else:
            a = (np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[2]
    alpha_at, premultiplied = (c - 1 if c in (2, 4) else None), False
    if extrasamples is not None:
        first = c - len(extrasamples)
        alpha_at = next((first + i for i, e in enumerate(extrasamples) if int(e) in (1, 2)), None)
        premultiplied = alpha_at is not None and int(extrasamples[alpha_at - first]) == 1
    colour = a[:, :, :alpha_at] if alpha_at is not None else a
    if photometric == 0:  # MINISWHITE
        colour = 255 - colour
    rgb = np.repeat(colour[:, :, :1], 3, axis=2) if colour.shape[2] < 3 else np.ascontiguousarray(colour[:, :, :3])
    if alpha_at is None:
        return rgb
    return _composite_on_white(rgb, a[:, :, alpha_at], premultiplied)


def _openslide_misreads(path: Path) -> str:
    """Why OpenSlide's generic-TIFF reading (libtiff's RGBA interface) would show a TIFF wrongly, or
    "" (also for what tifffile cannot parse: OpenSlide opened it, so it is OpenSlide's)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return "it is an OME-TIFF, whose pixel size and channels only tifffile reads"
            page = tif.pages[0]
            extras = [int(e) for e in (page.extrasamples or ())]
            if int(page.photometric) in (0, 1):
                channels = int(page.samplesperpixel) - sum(1 for e in extras if e in (1, 2))
                if channels > 1:  # libtiff shows the first of contiguous ones, garbles planes of them
                    return f"it stores {channels} grey channels, which OpenSlide reads as one"
            elif 0 in extras:  # libtiff takes an unspecified extra sample for alpha
                return "it has an extra sample that is not alpha, which OpenSlide takes for alpha"
    except Exception:
        return ""
    return ""


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """PIL's RGBA (plain alpha, as openslide-python hands it over) over white."""
    return _composite_on_white(np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3])


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    if alpha.min() == 255:
        return rgb
    a = alpha[:, :, None].astype(np.uint16)
    if premultiplied:  # the colour is already scaled by alpha: only white's share is added
        return np.minimum(rgb.astype(np.uint16) + (255 - a), 255).astype(np.uint8)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _mpp_from_resolution(xres: Any, yres: Any, unit: int | None) -> tuple[tuple[float, float] | None, str]:
    """µm/px across and down from TIFF resolution tags; (None, why) for no unit or a software-default dpi."""
    def per_unit(r: Any) -> float | None:
        if r is None:
            return None
        if isinstance(r, tuple):
            return r[0] / r[1] if r[1] else None
        return float(r)

    px, py = per_unit(xres), per_unit(yres)
    if not px or px <= 0:
        return None, ""
    py = py if py and py > 0 else px
    if unit in (None, 2):
        dpi = (px + py) / 2
        um_per_unit = 25400.0
    elif unit == 3:
        dpi = (px + py) / 2 * 2.54
        um_per_unit = 10000.0
    else:
        return None, " (its TIFF resolution has no unit)"
    if any(abs(dpi - d) < d * 1e-3 for d in DEFAULT_DPI):
        return None, f" (its TIFF resolution, {dpi:.0f} dpi, is a software default, not a scan resolution)"
    return (um_per_unit / px, um_per_unit / py), ""


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


# --------------------------------------------------------------------------- OpenSlide
class OpenSlideSlide(Slide):
    """Every format OpenSlide opens (Aperio, Hamamatsu, MIRAX, Philips, Leica, DICOM, generic TIFF...)."""

    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import openslide

        super().__init__(path, mpp)
        self._osr = openslide.OpenSlide(str(path))
        try:  # whatever stops the opening here (a bad mpp, pixels it cannot decode) closes the handle
            self._error_type = openslide.OpenSlideError
            props = dict(self._osr.properties)
            self.properties = props
            self.level_dimensions = [tuple(int(v) for v in d) for d in self._osr.level_dimensions]
            self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
            self.vendor = props.get("openslide.vendor")
            self.objective_power = _float_or_none(props.get("openslide.objective-power"))
            if all(f"openslide.bounds-{k}" in props for k in ("x", "y", "width", "height")):
                self.bounds = tuple(int(props[f"openslide.bounds-{k}"]) for k in ("x", "y", "width", "height"))
            mx, my = _float_or_none(props.get("openslide.mpp-x")), _float_or_none(props.get("openslide.mpp-y"))
            file_mpp = (mx, my if my and my > 0 else mx) if mx and mx > 0 else None
            if self.vendor == "generic-tiff" and file_mpp is not None:
                # OpenSlide takes generic TIFF mpp from the resolution tags; apply the same rule as tifffile.
                file_mpp, self._mpp_note = _mpp_from_resolution(
                    _float_or_none(props.get("tiff.XResolution")),
                    _float_or_none(props.get("tiff.YResolution")),
                    {"inch": 2, "centimeter": 3}.get(props.get("tiff.ResolutionUnit", "inch"), 1),
                )
            self._finish_init(file_mpp)
            if self.vendor == "generic-tiff":
                # OpenSlide opens any tiled TIFF but decodes only some sample formats (not 32-bit float,
                # say): a pixel read now hands such a file to tifffile instead of failing mid-slide.
                try:
                    self._osr.read_region((0, 0), len(self.level_dimensions) - 1, (1, 1))
                except self._error_type as exc:
                    raise _NotThisBackend(f"opens it but cannot decode its pixels: {_one_line(exc)}") from None
                misread = _openslide_misreads(path)
                if misread:
                    raise _NotThisBackend(misread)
            self._handle = self._raw_handle()
            self._file: TileFile | None = None
            self._tile_readers = self._tile_reader_levels()
        except BaseException:
            self._osr.close()
            raise

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # OpenSlide maps level-0 locations itself (sub-pixel where the downsample is not an integer).
        self._check_level(level)
        w, h = _check_size(size)
        return self._read_openslide((int(location[0]), int(location[1])), level, w, h)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        tiles = self._tile_readers.get(level)
        if tiles is not None:
            try:
                return tiles.read(x, y, w, h)
            except Exception as exc:  # tifffile/imagecodecs raise many types for corrupt data
                raise self._read_failed(exc, level, x, y, w, h) from None
        ds = self.level_downsamples[level]
        if ds == round(ds):
            return self._read_openslide_level(level, x, y, w, h)
        # A non-integer downsample (Aperio's 2.0005) makes OpenSlide sample level pixels at
        # location / ds, a sub-pixel position interpolated by cairo, so the same level pixel would come
        # out differently depending on where a read starts.  Reading in blocks anchored on a fixed
        # grid makes every level pixel's value depend on its position only: tiles then stitch exactly.
        b = OPENSLIDE_BLOCK
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y // b, (y + h - 1) // b + 1):
            for bx in range(x // b, (x + w - 1) // b + 1):
                x1, y1 = min((bx + 1) * b, x + w), min((by + 1) * b, y + h)
                block = self._read_openslide((round(bx * b * ds), round(by * b * ds)), level, x1 - bx * b, y1 - by * b)
                sx, sy = max(x, bx * b), max(y, by * b)
                out[sy - y:y1 - y, sx - x:x1 - x] = block[sy - by * b:, sx - bx * b:]
        return out

    def _raw_handle(self) -> Any:
        """The C handle for reads without the PIL detour (see ``_raw_openslide_read``), once a small
        read through it matched openslide-python's own; None (the public path) otherwise, e.g. if a
        later openslide-python binds its internals differently."""
        handle = getattr(self._osr, "_osr", None) if _RAW_READ is not None else None
        if handle is None:
            return None
        level = len(self.level_dimensions) - 1
        w, h = (min(16, v) for v in self.level_dimensions[level])
        try:
            raw = _raw_openslide_read(handle, (0, 0), level, w, h)
            ref = _rgba_on_white(np.asarray(self._osr.read_region((0, 0), level, (w, h))))
        except Exception:
            return None
        return handle if raw.shape == ref.shape and np.abs(raw.astype(np.int16) - ref).max() <= 1 else None

    def _tile_reader_levels(self) -> Mapping[int, TiledPageReader]:
        """Levels of an Aperio or generic tiled TIFF whose tiles are decoded here instead of by
        OpenSlide (~4x less CPU per read: see ``tiff_tiles``), each only after reads of it (the tiles
        around its centre, and its last, partial tile) gave OpenSlide's very bytes.  Levels with a
        non-integer downsample stay on OpenSlide, whose sub-pixel sampling of them these would not
        reproduce.  ``WSI_ESPNET_TILE_DECODE=0`` turns this off."""
        if self.vendor not in ("aperio", "generic-tiff") or not tile_decode_enabled():
            return {}
        try:
            import tifffile

            with tifffile.TiffFile(str(self.path)) as tif:
                pages = {(int(p.imagewidth), int(p.imagelength)): p for p in tif.pages if p.is_tiled}
                self._file, readers = checked_readers(self.path, (
                    (level, pages[dims], partial(self._read_openslide_level, level))
                    for level, (dims, ds) in enumerate(zip(self.level_dimensions, self.level_downsamples))
                    if dims in pages and ds == round(ds)))
        except Exception:  # anything unexpected: OpenSlide reads everything, as before
            return {}
        return readers

    def _read_openslide_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = round(self.level_downsamples[level])
        return self._read_openslide((x * ds, y * ds), level, w, h)

    def _read_openslide(self, loc: tuple[int, int], level: int, w: int, h: int) -> np.ndarray:
        try:
            if self._handle is not None:
                return _raw_openslide_read(self._handle, loc, level, w, h)
            img = self._osr.read_region(loc, level, (w, h))
        except self._error_type as exc:
            raise self._read_failed(exc, level, loc[0], loc[1], w, h) from None
        return _rgba_on_white(np.asarray(img))

    def close(self) -> None:
        self._release_tile_readers()
        self._osr.close()


def _openslide_raw_reader():
    """OpenSlide's C ``openslide_read_region`` as openslide-python binds it (with its checks: a
    closed handle is refused, a slide in error raises), or None if this openslide-python binds it
    differently; then reads go through ``OpenSlide.read_region`` instead."""
    try:
        from openslide import lowlevel

        fn = lowlevel._read_region
        return fn if callable(fn) and sys.byteorder == "little" else None
    except (ImportError, AttributeError):
        return None


_RAW_READ = _openslide_raw_reader()


def _raw_openslide_read(handle: Any, loc: tuple[int, int], level: int, w: int, h: int) -> np.ndarray:
    """RGB of a region, read by OpenSlide straight into a numpy buffer.

    Why not ``OpenSlide.read_region``: it un-premultiplies the pixels into a PIL image, which is then
    copied to numpy and composited on white again; that took 40 % of a tile's read time (6.6 → 3.9 ms
    CPU per 512² tile, the CPU the model competes with).  OpenSlide's pixels are premultiplied ARGB, so
    "over white" is exact and cheap: ``c + (255 - alpha)``.  Opaque regions (the usual case) are the
    very bytes PIL would give."""
    import ctypes

    argb = np.empty((h, w), np.uint32)
    _RAW_READ(handle, argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), loc[0], loc[1], level, w, h)
    bgra = argb.view(np.uint8).reshape(h, w, 4)  # little-endian ARGB words: B, G, R, A bytes
    rgb = np.empty((h, w, 3), np.uint8)
    for c in range(3):  # plane by plane: ~4x faster than copying the reversed-channel view at once
        rgb[:, :, c] = bgra[:, :, 2 - c]
    if argb.min() < 0xFF000000:  # some pixel is not opaque: premultiplied over white
        rgb += 255 - bgra[:, :, 3:4]
    return rgb


# --------------------------------------------------------------------------- tifffile
class TiffSlide(Slide):
    """OME-TIFF and plain TIFF (tiled or strips; pyramid as series levels or SubIFDs), read lazily
    through tifffile's Zarr store: a region decodes only the tiles or strips it touches."""

    backend = "tifffile"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import tifffile
        import zarr

        super().__init__(path, mpp)
        self._tif = None
        # tifffile logs a broken IFD chain (a truncated file) as a warning and carries on with the
        # pages it found; here that must be an error, not a slide with fewer levels.
        warnings = _LogRecords()
        log = logging.getLogger("tifffile")
        log.addHandler(warnings)
        try:
            self._tif = tifffile.TiffFile(str(path))
            try:
                series = self._tif.series[0]
                _ = series.levels
                bad = [m for m in warnings.messages if _TRUNCATION.search(m)]
                if bad:
                    why = _one_line(re.sub("<[^>]*>", "", bad[0]))[:160]
                    raise SlideError(f"{path}: truncated or corrupt TIFF ({why})")
                self._init_tiff(series, zarr)
            except Exception:
                self._tif.close()
                raise
        finally:
            log.removeHandler(warnings)

    def _init_tiff(self, series: Any, zarr: Any) -> None:
        tif = self._tif
        levels = series.levels
        _check_extent(self.path, levels)
        self._arrays = []
        self._axes = []
        dims = []
        for i, lvl in enumerate(levels):
            axes = lvl.axes
            if "Y" not in axes or "X" not in axes:
                raise SlideError(f"{self.path}: TIFF series has no Y/X axes ({axes})")
            # Absent tiles of an RGB image are glass (white), as OpenSlide draws them; the store's
            # default fill would be black.
            key = lvl.keyframe
            white = np.dtype(key.dtype) == np.uint8 and int(key.photometric) in (2, 6)
            arr = zarr.open(series.aszarr(level=i, fillvalue=255 if white else None), mode="r")
            self._arrays.append(arr)
            self._axes.append(axes)
            dims.append((int(lvl.shape[axes.index("X")]), int(lvl.shape[axes.index("Y")])))
        # Keep only levels that get smaller (some files repeat a level for focal planes).
        self.level_dimensions = dims
        self.level_downsamples = [_openslide_downsample(dims[0], d) for d in dims]
        page = series.keyframe if hasattr(series, "keyframe") else tif.pages[0]
        self._photometric = int(page.photometric)
        self._colormap = page.colormap if self._photometric == 3 else None
        self._extrasamples = tuple(int(e) for e in (page.extrasamples or ()))
        desc = page.description or ""
        props: dict[str, str] = {}
        if desc:
            props["tiff.ImageDescription"] = desc
        file_mpp = None
        if tif.is_ome and tif.ome_metadata:
            self.vendor = "ome"
            file_mpp, self.objective_power, ome_props = _ome_metadata(tif.ome_metadata)
            props.update(ome_props)
        elif tif.is_svs:
            self.vendor = "aperio"
            aperio = _aperio_properties(desc)
            props.update({f"aperio.{k}": v for k, v in aperio.items()})
            aperio_mpp = _float_or_none(aperio.get("MPP"))
            file_mpp = (aperio_mpp, aperio_mpp) if aperio_mpp and aperio_mpp > 0 else None
            self.objective_power = _float_or_none(aperio.get("AppMag"))
        elif tif.is_ndpi:
            self.vendor = "hamamatsu"
            ndpi = getattr(page, "ndpi_tags", None) or {}
            self.objective_power = _float_or_none(ndpi.get("Magnification"))
        else:
            self.vendor = "generic-tiff"
        if file_mpp is None:
            tags = page.tags
            xr, yr, unit = (tags.get(n) for n in ("XResolution", "YResolution", "ResolutionUnit"))
            if xr is not None:
                file_mpp, self._mpp_note = _mpp_from_resolution(
                    xr.value, yr.value if yr else None, int(unit.value) if unit else None)
        self.properties = props
        self._finish_init(file_mpp)
        # Decode one pixel of the smallest level now: an unsupported compression fails at open,
        # with the file's name, instead of in a worker an hour into a run.
        try:
            self._decode(self.level_count - 1, 0, 0, 1, 1)
        except Exception as exc:  # tifffile/imagecodecs raise many types for undecodable data
            raise SlideError(f"{self.path}: opens but its pixels cannot be decoded: {_one_line(exc)}") from None
        self._file: TileFile | None = None
        self._tile_readers = self._tile_reader_levels(series)

    def _tile_reader_levels(self, series: Any) -> Mapping[int, TiledPageReader]:
        """Levels stored as one tiled RGB page, decoded tile by tile with a cache of decoded tiles
        (``tiff_tiles``) instead of through tifffile's Zarr store, which decodes every tile a read
        touches again at every read; each only after reads of it gave the store's very bytes.
        ``WSI_ESPNET_TILE_DECODE=0`` turns this off."""
        level_pages = [list(lvl.pages) for lvl in series.levels]
        try:
            self._file, readers = checked_readers(self.path, (
                (level, pages[0], partial(self._decode, level)) for level, pages in enumerate(level_pages)
                if self._axes[level] == "YXS" and len(pages) == 1 and isinstance(pages[0], type(series.keyframe))))
        except Exception:  # anything unexpected: the Zarr store reads everything, as before
            return {}
        return readers

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        tiles = self._tile_readers.get(level)
        try:
            if tiles is not None:
                return tiles.read(x, y, w, h)
            return self._decode(level, x, y, w, h)
        except Exception as exc:  # tifffile/imagecodecs raise many types for corrupt data
            raise self._read_failed(exc, level, x, y, w, h) from None

    def _decode(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        axes = self._axes[level]
        index: list[Any] = []
        for ax in axes:
            if ax == "Y":
                index.append(slice(y, y + h))
            elif ax == "X":
                index.append(slice(x, x + w))
            elif ax in "SC" and ("S" not in axes or ax == "S"):
                index.append(slice(None))
            else:
                index.append(0)
        a = np.asarray(self._arrays[level][tuple(index)])
        kept = [ax for ax, ix in zip(axes, index) if isinstance(ix, slice)]
        if "C" in kept and kept.index("C") < kept.index("Y"):
            a = np.moveaxis(a, kept.index("C"), -1)
        elif "S" in kept and kept.index("S") < kept.index("Y"):
            a = np.moveaxis(a, kept.index("S"), -1)
        return _to_rgb_uint8(a, self._photometric, self._colormap, self._extrasamples)

    def close(self) -> None:
        self._release_tile_readers()
        if self._tif is not None:
            self._tif.close()


class _LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_TRUNCATION = re.compile(r"invalid (page )?offset|offset to first page|truncat|beyond end", re.I)


def _check_extent(path: Path, levels: list[Any]) -> None:
    """Every tile or strip of every level must lie inside the file: a cut-off download otherwise
    reads as empty tiles (tifffile fills them) instead of failing."""
    size = path.stat().st_size
    for i, level in enumerate(levels):
        for page in level.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                raise SlideError(
                    f"{path}: truncated file: level {i} needs {int((offsets + counts).max())} bytes, "
                    f"the file has {size}"
                )


def _aperio_properties(desc: str) -> dict[str, str]:
    """``key = value`` pairs after the first ``|`` of an Aperio ImageDescription (as OpenSlide)."""
    out = {}
    for part in desc.split("|")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _ome_metadata(xml: str) -> tuple[tuple[float, float] | None, float | None, dict[str, str]]:
    """µm/px across and down (PhysicalSizeX/Y with their units) and objective magnification of the
    first OME image."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None, {}
    ns = {"ome": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {}
    q = (lambda t: f"ome:{t}") if ns else (lambda t: t)
    image = root.find(q("Image"), ns)
    pixels = image.find(q("Pixels"), ns) if image is not None else None
    props: dict[str, str] = {}
    sizes = []
    if pixels is not None:
        for axis in ("X", "Y"):
            value = _float_or_none(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            if value is not None:
                props[f"ome.PhysicalSize{axis}"] = f"{pixels.get(f'PhysicalSize{axis}')} {unit}"
                factor = _UNIT_TO_UM.get(unit)
                if factor is not None:
                    sizes.append(value * factor)
    mpp = (sizes[0], sizes[-1]) if sizes else None
    magnification = None
    for objective in root.iter(f"{{{ns['ome']}}}Objective" if ns else "Objective"):
        magnification = _float_or_none(objective.get("NominalMagnification"))
        if magnification:
            props["ome.NominalMagnification"] = objective.get("NominalMagnification")
            break
    return mpp, magnification, props


# --------------------------------------------------------------------------- small images
class ImageSlide(Slide):
    """PNG, JPEG, BMP... decoded whole with imagecodecs: for ordinary images, not gigapixel slides.
    These formats carry no reliable physical pixel size, so mpp comes only from the override."""

    backend = "image"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import imagecodecs

        super().__init__(path, mpp)
        with open(path, "rb") as fh:
            head = fh.read(16)
        if not any(head.startswith(m) for m in _IMAGE_MAGIC) and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            raise _NotThisBackend("not a PNG, JPEG, BMP, GIF or WebP image")
        self._pixels = _to_rgb_uint8(np.asarray(imagecodecs.imread(str(path))))
        h, w = self._pixels.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.vendor = None
        self._finish_init(None)
        self._mpp_note = " (an ordinary image file)"

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._pixels[y:y + h, x:x + w].copy()

    def close(self) -> None:
        self._pixels = np.zeros((1, 1, 3), np.uint8)


# --------------------------------------------------------------------------- opening
def _is_ome(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf"))


def _dicom_file_of(folder: Path) -> Path:
    """A DICOM slide is a folder of DICOM files (one per level, label, overview); OpenSlide opens it
    through any one of its images and finds the others itself, so a folder stands for the first file
    OpenSlide recognises as a DICOM slide (``.dcm`` files first; scanners also write them without a
    suffix; a DICOMDIR or a stray non-image object is passed over)."""
    import openslide

    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: (p.suffix.lower() != ".dcm", p.name))
    for path in files:
        if path.suffix.lower() in ("", ".dcm") and openslide.OpenSlide.detect_format(str(path)) == "dicom":
            return path
    raise SlideError(f"{folder}: is a folder without a DICOM slide in it, not a slide (a DICOM slide is a "
                     "folder of .dcm files; other formats are one file)")


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a slide with ``backend`` "openslide", "tifffile", "image" or "auto".

    auto: OpenSlide when it opens the file (tifffile first for ``.ome.tif[f]``, whose OME-XML carries the
    pixel size OpenSlide does not read), else tifffile, else an ordinary image.  ``mpp`` overrides the
    file's µm/px at level 0.  A folder of .dcm files opens as the DICOM slide it holds.  Every
    failure is a one-line :class:`SlideError` naming the file.
    """
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise UserError(f"--mpp must be a positive number of µm per pixel, got {mpp!r}")
    mpp = float(mpp) if mpp is not None else None
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        path = _dicom_file_of(path)
    openers = {"openslide": OpenSlideSlide, "tifffile": TiffSlide, "image": ImageSlide}
    if backend == "auto":
        order = ["tifffile", "openslide", "image"] if _is_ome(path) else ["openslide", "tifffile", "image"]
    elif backend in openers:
        order = [backend]
    else:
        raise UserError(f"unknown slide backend {backend!r} (choose auto, openslide, tifffile or image)")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file, not a slide")
    failures = []
    for name in order:
        try:
            return openers[name](path, mpp)
        except SlideError:
            raise  # the backend recognised the file and found it broken: that is the answer
        except Exception as exc:  # each library raises its own types for "not mine" and "corrupt"
            failures.append(f"{name}: {_one_line(exc)[:200]}")
    raise SlideError(f"{path}: not a slide or image that can be read ({'; '.join(failures)})")
