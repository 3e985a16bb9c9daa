"""Tissue detection on a low-resolution view of a slide.

Most of a slide is glass.  Tiling and segmenting it is wasted work, and patches of glass, pen ink or
scanner borders poison a training set, so everything downstream asks one question of a
:class:`TissueMask`: *what fraction of this level-0 rectangle is tissue?*

How the mask is made (:func:`tissue_mask_from_rgb`, a pure function of an RGB image):

* **Bright-field (H&E and the like)**: stained tissue is coloured and glass is white, so the main
  cue is HSV saturation, thresholded with Otsu's method.  The Otsu threshold is clamped to
  ``[0.05, 0.20]``: the floor keeps a blank slide (saturation that is only sensor noise) empty
  instead of splitting its noise in two, and the ceiling keeps pale pink stroma when a slide is almost
  all tissue and Otsu would split eosin from haematoxylin instead of tissue from glass.  Dark,
  unsaturated tissue is caught by optical density (``OD >= 0.5``, well above glass).
* **Rejected**: near-white background; black or dark grey pixels (scanner borders, black ink, out of
  focus debris); blue and green ink (a saturated hue between yellow-green and blue, which neither
  eosin nor haematoxylin has: haematoxylin sits at violet, hue >= 0.67).  Ink regions are dilated a
  little so their anti-aliased halos go too.
* **Morphology**: a closing bridges the gaps between cells, holes smaller than ``min_hole`` are
  filled (lumens and fat larger than that stay holes), objects smaller than ``min_object`` are
  dropped (dust, specks of debris).  On a slide, both sizes are capped at 2 % of the slide's area and
  the mask has at least 256 px on its longer side, so a small crop is judged at a useful scale.
* **Fluorescence**: a slide whose typical pixel is dark (the median of the brightest channel is
  below 60 of 255, e.g. a DAPI scan) is not bright-field; the mask is then the signal (brightest
  channel) above its Otsu threshold (never below 20/255, so an empty dark slide stays empty), closed
  more strongly so that separate nuclei merge into the tissue region they belong to.  Pen and
  background rules do not apply.  ``mode`` forces either kind.

Sizes are given in µm and converted with the mask's own µm/px.  A slide without mpp still gets a mask
(tissue detection must not be the step that stops a run): its sizes are then converted as if level 0
were :data:`NOMINAL_MPP` µm/px (a 20x scan), which only affects the morphology sizes, never a
coordinate.

A mask can be saved as an 8-bit PNG (0 glass, 255 tissue) with its downsample, µm/px and level-0
size in PNG text chunks, and loaded back (or drawn by hand and loaded with the slide's size, from
which the downsample follows).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
from scipy import ndimage as ndi

from .errors import UserError
from .outputs import atomic_file

#: µm/px assumed for level 0 of a slide without mpp, for morphology sizes only.
NOMINAL_MPP = 0.5

#: The mask's longer side is at least this (or the slide's own size), whatever ``target_mpp``.
MIN_MASK_SIDE = 256
#: Minimum object and hole sizes are capped at this share of the slide's area, so that a small crop
#: made of one piece of tissue is not dropped as a speck.
MAX_SPECK_SHARE = 0.02

#: Thresholds of the bright-field rules (fractions of 1 for saturation, OD in log10 units).
SAT_THRESHOLD_RANGE = (0.05, 0.20)
DARK_TISSUE_OD = 0.5
FLUORESCENCE_MEDIAN_MAX = 60
FLUORESCENCE_MIN_SIGNAL = 20

Mode = Literal["auto", "brightfield", "fluorescence"]


class _SlideLike(Protocol):
    """What tissue detection needs from a slide (see :mod:`wsi_espnet.slide`)."""

    dimensions: tuple[int, int]
    level_downsamples: Sequence[float]
    mpp: float | None

    def level_for_downsample(self, downsample: float) -> int: ...

    def read_at_downsample(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray: ...


@dataclass
class TissueMask:
    """A boolean tissue mask of a slide, and where it sits in level-0 pixels.

    Mask pixel ``(i, j)`` covers level-0 pixels ``[j * downsample, (j + 1) * downsample)`` by
    ``[i * downsample, (i + 1) * downsample)``.  ``mpp`` is the µm/px of the mask (None when the
    slide has none).  ``level0_size`` is the slide's level-0 (width, height) when known.
    """

    mask: np.ndarray
    downsample: float
    mpp: float | None = None
    level0_size: tuple[int, int] | None = None
    mode: str = "brightfield"

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, got shape {self.mask.shape}")
        if not self.downsample > 0:
            raise ValueError(f"downsample must be > 0, got {self.downsample}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the whole mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _summed_area(self) -> np.ndarray:
        # (h+1, w+1) summed-area table with a zero first row and column.  Bilinear interpolation of it
        # at fractional positions is the *exact* area integral of the piecewise-constant mask, which is
        # what lets a 512-px tile over a 64-px patch of mask get a fraction that is not quantised.
        # Not cached: callers ask for all their rectangles at once, and at 4 bytes per mask pixel a
        # kept table would sit in memory for the whole run (40 MB on a 100k² slide).
        h, w = self.mask.shape
        dtype = np.int32 if h * w < 2**31 else np.int64
        sat = np.zeros((h + 1, w + 1), dtype=dtype)
        np.cumsum(self.mask, axis=0, dtype=dtype, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, dtype=dtype, out=sat[1:, 1:])
        return sat

    def _integral(self, sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area (mask px²) of [0, x] × [0, y], x and y in mask pixels (clipped to the mask)."""
        h, w = self.mask.shape
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        i0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        j0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        fx = x - i0
        fy = y - j0
        i1 = np.minimum(i0 + 1, w)
        j1 = np.minimum(j0 + 1, h)
        s00 = sat[j0, i0]
        s01 = sat[j0, i1]
        s10 = sat[j1, i0]
        s11 = sat[j1, i1]
        return (s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy).astype(
            np.float64
        )

    def fractions(self, rects: np.ndarray) -> np.ndarray:
        """Tissue fractions of many level-0 rectangles, ``rects`` shaped (N, 4) as (x0, y0, w0, h0).

        The fraction is area-weighted (partial mask pixels count by their covered area) and relative to
        the part of the rectangle that lies on the slide (``level0_size``, or the mask's extent when
        that is unknown): a tile padded past the edge of a small slide is judged by the slide it shows,
        and a rectangle wholly off the slide has fraction 0.
        """
        r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        if r.shape[0] == 0 or self.mask.size == 0:
            return np.zeros(r.shape[0])
        ds = self.downsample
        h, w = self.mask.shape
        bw, bh = self.level0_size if self.level0_size is not None else (w * ds, h * ds)
        x0, y0 = np.clip(r[:, 0], 0, bw) / ds, np.clip(r[:, 1], 0, bh) / ds
        x1, y1 = np.clip(r[:, 0] + r[:, 2], 0, bw) / ds, np.clip(r[:, 1] + r[:, 3], 0, bh) / ds
        area = (x1 - x0) * (y1 - y0)
        sat = self._summed_area()
        inside = (self._integral(sat, x1, y1) - self._integral(sat, x0, y1) - self._integral(sat, x1, y0)
                  + self._integral(sat, x0, y0))
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(area > 0, inside / np.where(area > 0, area, 1.0), 0.0)
        return np.clip(frac, 0.0, 1.0)

    def fraction(self, x0: float, y0: float, w0: float, h0: float) -> float:
        """Tissue fraction of one level-0 rectangle (see :meth:`fractions`)."""
        return float(self.fractions(np.array([[x0, y0, w0, h0]]))[0])

    def save_png(self, path: str | os.PathLike) -> Path:
        """Write the mask as an 8-bit PNG (0/255) with its geometry in text chunks, atomically."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        path = Path(path)
        info = PngInfo()
        info.add_text("wsi-espnet:downsample", repr(float(self.downsample)))
        if self.mpp is not None:
            info.add_text("wsi-espnet:mpp", repr(float(self.mpp)))
        if self.level0_size is not None:
            info.add_text("wsi-espnet:level0_size", f"{self.level0_size[0]}x{self.level0_size[1]}")
        info.add_text("wsi-espnet:mode", self.mode)
        img = Image.fromarray(np.where(self.mask, 255, 0).astype(np.uint8), mode="L")
        with atomic_file(path, suffix=".tmp") as tmp:
            img.save(tmp, format="PNG", pnginfo=info)
        return path

    @classmethod
    def load_png(
        cls,
        path: str | os.PathLike,
        downsample: float | None = None,
        mpp: float | None = None,
        level0_size: tuple[int, int] | None = None,
    ) -> "TissueMask":
        """Read a mask PNG (any non-black pixel is tissue).

        The geometry comes from, in order: the arguments, the PNG's own text chunks (a mask written by
        :meth:`save_png`), or ``level0_size`` divided by the image size (a hand-drawn mask of the
        whole slide).  A mask whose geometry disagrees with the slide's size is a :class:`UserError`.
        """
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        if not path.is_file():
            raise UserError(f"tissue mask {path} does not exist or is not a file")
        try:
            with Image.open(path) as img:
                text = dict(getattr(img, "text", {}) or {})
                arr = np.asarray(img.convert("L"))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"tissue mask {path} is not a readable image: {exc}") from None
        mask = arr >= 128
        saved_ds = _float_or_none(text.get("wsi-espnet:downsample"))
        saved_size = _size_or_none(text.get("wsi-espnet:level0_size"))
        if saved_size is not None and level0_size is not None and tuple(saved_size) != tuple(level0_size):
            raise UserError(
                f"tissue mask {path} was made for a {saved_size[0]}x{saved_size[1]} slide, "
                f"this slide is {level0_size[0]}x{level0_size[1]}"
            )
        if downsample is None:
            downsample = saved_ds
        if downsample is None and level0_size is not None:
            downsample = level0_size[0] / mask.shape[1]
            other = level0_size[1] / mask.shape[0]
            # A hand-drawn mask must have the slide's aspect ratio (to within a pixel of rounding).
            if abs(mask.shape[0] * downsample - level0_size[1]) > downsample + 1:
                raise UserError(
                    f"tissue mask {path} is {mask.shape[1]}x{mask.shape[0]}: not the aspect ratio of "
                    f"the {level0_size[0]}x{level0_size[1]} slide (downsamples {downsample:.3f} vs {other:.3f})"
                )
        if downsample is None:
            raise UserError(f"tissue mask {path} does not say its downsample; give the slide's size")
        if level0_size is None:
            level0_size = saved_size
        if mpp is None:
            mpp = _float_or_none(text.get("wsi-espnet:mpp"))
        return cls(mask=mask, downsample=float(downsample), mpp=mpp, level0_size=level0_size,
                   mode=text.get("wsi-espnet:mode", "brightfield"))


def _float_or_none(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None


def _size_or_none(s: str | None) -> tuple[int, int] | None:
    try:
        w, h = (int(v) for v in s.split("x")) if s else (None, None)
        return (w, h) if w is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# The pure part: an RGB image in, a boolean mask out.


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


def remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = _counts(labels, n + 1)
    keep = sizes >= min_px
    if keep[1:].all():  # nothing to drop: spare the lookup over every pixel
        return mask
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill 4-connected background components with fewer than ``max_hole_px`` pixels."""
    if max_hole_px <= 1 or mask.all():
        return mask
    labels, n = ndi.label(~mask)
    sizes = _counts(labels, n + 1)
    small = sizes < max_hole_px
    small[0] = False
    if not small.any():  # no hole to fill
        return mask
    return mask | small[labels]


def otsu_from_histogram(hist: np.ndarray) -> float:
    """Otsu's threshold of integer values 0..len(hist)-1 given their histogram: foreground is
    ``value > t``.  +inf when there is nothing to split (fewer than two distinct values)."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0 or np.count_nonzero(hist) < 2:
        return math.inf
    p = hist / total
    levels = np.arange(len(hist), dtype=np.float64)
    omega = np.cumsum(p)
    mu = np.cumsum(p * levels)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def _row_blocks(n_rows: int, n_cols: int) -> range:
    """Row starts of blocks of about a million pixels: per-pixel rules run block by block so that
    their float temporaries never scale with the whole mask."""
    return range(0, n_rows, max(1, (1 << 20) // max(n_cols, 1)))


def _counts(values: np.ndarray, length: int) -> np.ndarray:
    """``np.bincount(values.ravel(), minlength=length)`` of a 2-D array of small non-negative
    integers, block by block: ``bincount`` first copies its whole input to 64-bit integers, 8 bytes a
    pixel (78 MB for the 3125² mask of a 100k² slide, on top of the 4-byte component labels)."""
    counts = np.zeros(length, np.int64)
    blocks = _row_blocks(values.shape[0], values.shape[1])
    for y in blocks:
        counts += np.bincount(values[y : y + blocks.step].ravel(), minlength=length)
    return counts


def channel_max(rgb: np.ndarray) -> np.ndarray:
    """``rgb.max(axis=-1)``, ~10x faster: numpy reduces a 3-long last axis one pixel at a time,
    while the maximum of the three channel planes runs vectorised (on a 100k² slide's thumbnail
    these reductions were half of tissue detection)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def channel_min(rgb: np.ndarray) -> np.ndarray:
    """``rgb.min(axis=-1)``, vectorised as :func:`channel_max`."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def saturation8(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0..255, uint8 (one byte per pixel, for histograms and thresholds)."""
    mx = channel_max(rgb).astype(np.uint16)
    mn = channel_min(rgb).astype(np.uint16)
    return ((mx - mn) * 255 + mx // 2) // np.maximum(mx, 1)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1], float32."""
    return (saturation8(rgb) / np.float32(255.0)).astype(np.float32)


_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the channels, log10 units, float32 (0 for white)."""
    return (_OD_LUT[rgb[..., 0]] + _OD_LUT[rgb[..., 1]] + _OD_LUT[rgb[..., 2]]) / np.float32(3.0)


def hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1), float32 (0 for grey); ``rgb`` is (..., 3)."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = channel_max(x)
    delta = mx - channel_min(x)
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return np.where(delta > 0, h / 6.0, 0.0).astype(np.float32)


def pen_mask(rgb: np.ndarray, sat8: np.ndarray | None = None) -> np.ndarray:
    """Blue and green ink: saturated (>= 0.35) hues between yellow-green (0.20) and blue (0.67).

    Eosin is pink-red (hue ~0.85-1.0) and haematoxylin violet (~0.70-0.80); neither reaches into
    this band with high saturation, while ink does.  Hue is computed only where saturation qualifies.
    """
    sat8 = saturation8(rgb) if sat8 is None else sat8
    out = sat8 >= 90  # 0.35 * 255
    if out.any():
        h = hue(rgb[out])
        out[out] = (h >= 0.20) & (h < 0.67)
    return out


def dark_mask(rgb: np.ndarray, sat8: np.ndarray | None = None) -> np.ndarray:
    """Black or dark grey: scanner borders, black ink, thick debris (stained tissue is never grey)."""
    sat8 = saturation8(rgb) if sat8 is None else sat8
    brightest = channel_max(rgb)
    return (brightest < 50) | ((brightest < 90) & (sat8 < 64))  # 0.25 * 255


def is_fluorescence(rgb: np.ndarray) -> bool:
    """A slide whose typical pixel is dark: fluorescence (dark background), not bright-field."""
    if rgb.size == 0:
        return False
    hist = np.zeros(256, np.int64)
    blocks = _row_blocks(rgb.shape[0], rgb.shape[1])
    for y in blocks:
        hist += np.bincount(channel_max(rgb[y : y + blocks.step]).ravel(), minlength=256)
    median = int(np.searchsorted(np.cumsum(hist), hist.sum() / 2.0))
    return median < FLUORESCENCE_MEDIAN_MAX


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    min_object_px: float = 150,
    min_hole_px: float = 150,
    closing_radius_px: float = 2,
    pen_dilation_px: float = 2,
    mode: Mode = "auto",
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image of a slide (see the module docstring).

    Sizes are in pixels of ``rgb``.  Never raises on odd content: a blank, black or constant image
    gives an all-False mask.  Memory: a few bytes per pixel beyond ``rgb`` (per-pixel rules run in
    blocks; thresholds come from histograms).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if rgb.shape[-1] != 3:
        rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=bool)
    if mode == "auto":
        mode = "fluorescence" if is_fluorescence(rgb) else "brightfield"
    if mode == "fluorescence":
        return _fluorescence_mask(rgb, min_object_px, min_hole_px, closing_radius_px)
    if mode != "brightfield":
        raise ValueError(f"mode must be auto, brightfield or fluorescence, got {mode!r}")

    blocks = _row_blocks(h, w)
    sat8 = np.empty((h, w), np.uint8)
    for y in blocks:
        sat8[y : y + blocks.step] = saturation8(rgb[y : y + blocks.step])
    lo, hi = SAT_THRESHOLD_RANGE
    t_sat = min(max(otsu_from_histogram(_counts(sat8, 256)) + 1, lo * 255), hi * 255)

    raw = np.empty((h, w), bool)
    exclude = np.empty((h, w), bool)
    for y in blocks:
        part, s8 = rgb[y : y + blocks.step], sat8[y : y + blocks.step]
        background = (channel_min(part) >= 215) & (s8 < 26)  # 0.10 * 255
        dark = dark_mask(part, s8)
        pen = pen_mask(part, s8)
        tissue = (s8 >= t_sat) | (optical_density(part) >= DARK_TISSUE_OD)
        raw[y : y + blocks.step] = tissue & ~background & ~dark & ~pen
        exclude[y : y + blocks.step] = pen | dark
    del sat8

    # Ink and dark blobs that are too small to be ink are ignored; the rest, grown by a few pixels,
    # is cut out *after* the closing and hole filling so that those cannot paint it back in.
    exclude = remove_small_objects(exclude, min_object_px / 4)
    if exclude.any() and pen_dilation_px > 0:
        exclude = ndi.binary_dilation(exclude, _disk(pen_dilation_px))

    mask = _clean(raw, min_object_px, min_hole_px, closing_radius_px)
    del raw
    mask &= ~exclude
    return remove_small_objects(mask, min_object_px)


def _fluorescence_mask(rgb: np.ndarray, min_object_px: float, min_hole_px: float, closing_radius_px: float) -> np.ndarray:
    signal = channel_max(rgb)
    t = max(otsu_from_histogram(_counts(signal, 256)) + 1, FLUORESCENCE_MIN_SIGNAL)
    raw = signal >= t
    # Nuclei are separate dots at this scale: close harder so they merge into their tissue region.
    return _clean(raw, min_object_px, max(min_hole_px, 4 * min_object_px), 2 * closing_radius_px)


def _clean(raw: np.ndarray, min_object_px: float, min_hole_px: float, closing_radius_px: float) -> np.ndarray:
    if not raw.any():
        return raw
    # Pad before closing so that tissue touching the image border is not eroded there.
    r = max(1, int(round(closing_radius_px)))
    padded = np.pad(raw, r, mode="edge")
    mask = ndi.binary_closing(padded, _disk(r))[r:-r, r:-r] if closing_radius_px > 0 else raw
    mask = fill_small_holes(mask, min_hole_px)
    return remove_small_objects(mask, min_object_px)


# --------------------------------------------------------------------------------------------------
# On a slide.


def _level_scale(downsample: float) -> float:
    """A level's true factor: pyramids halve with rounding, so 2.0005 or 4.0002 stand for 2 and 4."""
    k = round(downsample)
    return float(k) if k >= 1 and abs(downsample - k) <= 0.01 * k else float(downsample)


def mask_downsample(slide: _SlideLike, target_mpp: float, max_size: int | None) -> float:
    """Level-0 pixels per mask pixel: about ``target_mpp``, an *integer* multiple of a pyramid level's
    factor (so the low-resolution view is an exact block average of that level, the reader's fast
    path) and coarse enough that the mask's longer side is at most ``max_size``."""
    w0, h0 = slide.dimensions
    ds = target_mpp / (slide.mpp or NOMINAL_MPP)
    # A small crop gets a finer mask, so that morphology still has pixels to work with.
    ds = min(ds, max(w0, h0) / MIN_MASK_SIDE)
    capped = max_size is not None and max(w0, h0) / ds > max_size
    if capped:
        ds = max(w0, h0) / max_size
    ds = max(ds, 1.0)
    scale = _level_scale(float(slide.level_downsamples[slide.level_for_downsample(ds)]))
    factor = ds / scale
    factor = math.ceil(factor - 1e-9) if capped else max(1, round(factor))
    return scale * max(1, factor)


def render_lowres(slide: _SlideLike, downsample: float) -> np.ndarray:
    """The whole slide as one RGB image at ``downsample`` level-0 px per output px.

    The size is rounded *up* so that the mask covers every level-0 pixel (the reader pads the last
    partial row and column with white); each pixel is the area average of its footprint, read from
    the pyramid level just finer than ``downsample`` in bounded pieces.
    """
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(w0 / downsample)), max(1, math.ceil(h0 / downsample))
    return slide.read_at_downsample(0, 0, out_w, out_h, downsample)


def detect_tissue(
    slide: _SlideLike,
    target_mpp: float = 8.0,
    *,
    max_size: int | None = 4096,
    min_object_um2: float = 10_000.0,
    min_hole_um2: float = 10_000.0,
    closing_um: float = 16.0,
    mode: Mode = "auto",
) -> TissueMask:
    """Tissue mask of a slide, computed at about ``target_mpp`` µm/px (see the module docstring).

    ``max_size`` caps the mask's longer side (the resolution is coarsened for very large slides; at
    the default 8 µm/px it binds only past 32 mm).  The resolution is adjusted to a whole multiple of
    a pyramid level (:func:`mask_downsample`), so ``mask.mpp`` may differ a little from ``target_mpp``.
    Without a slide mpp, sizes are converted with :data:`NOMINAL_MPP`; the mask then has ``mpp=None``.
    """
    if not target_mpp > 0:
        raise UserError(f"tissue detection resolution must be > 0 µm/px, got {target_mpp}")
    ds = mask_downsample(slide, target_mpp, max_size)
    rgb = render_lowres(slide, ds)
    px_um = ds * (slide.mpp or NOMINAL_MPP)
    speck_cap = MAX_SPECK_SHARE * rgb.shape[0] * rgb.shape[1]
    resolved: Mode = mode if mode != "auto" else ("fluorescence" if is_fluorescence(rgb) else "brightfield")
    mask = tissue_mask_from_rgb(
        rgb,
        min_object_px=min(min_object_um2 / px_um**2, speck_cap),
        min_hole_px=min(min_hole_um2 / px_um**2, speck_cap),
        closing_radius_px=closing_um / px_um,
        pen_dilation_px=closing_um / px_um,
        mode=resolved,
    )
    return TissueMask(
        mask=mask,
        downsample=ds,
        mpp=(ds * slide.mpp) if slide.mpp else None,
        level0_size=tuple(slide.dimensions),  # type: ignore[arg-type]
        mode=resolved,
    )
