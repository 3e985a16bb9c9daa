"""A PNG preview: the slide thumbnail with the class colours blended on it, and a legend.

The legend sits in a panel to the right of the image, so it never hides tissue. Classes named in
``transparent`` (default ``("Background",)``, case-insensitive) and "not computed" pixels (255) are
not tinted. :func:`downsample_labels` makes the small label image from the full-resolution Zarr
labels block by block, by majority vote (mode) in each window: unlike nearest-neighbour sampling it
does not alias thin structures into noise, and a class's share of the preview matches its share of
the slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .outputs import check_output
from .tiling import Occupancy

NOT_COMPUTED = 255


def write_overlay(
    path: str | os.PathLike,
    thumbnail_rgb: Any,
    labels_small: np.ndarray,
    colors: Sequence[Sequence[int]],
    class_names: Sequence[str],
    *,
    alpha: float = 0.4,
    legend: bool = True,
    areas_mm2: Mapping[str, float] | None = None,
    transparent: Sequence[str] = ("Background",),
    overwrite: bool = False,
) -> Path:
    """Write the thumbnail (H x W x 3 uint8, or a PIL image) with ``labels_small`` blended on it.

    ``labels_small`` may have any size: it is resized to the thumbnail (nearest neighbour).
    ``areas_mm2`` (class name -> mm²) adds the area to each legend row (as "mm^2": the built-in
    font has no "²").
    """
    path = Path(path)
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
    rgb = rgb[..., :3]
    labels_small = np.asarray(labels_small)
    if labels_small.ndim != 2 or labels_small.dtype != np.uint8:
        raise ValueError(f"labels_small must be 2-D uint8, got {labels_small.shape} {labels_small.dtype}")
    if len(colors) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_output(path, overwrite)

    h, w = rgb.shape[:2]
    if labels_small.shape != (h, w):
        labels_small = np.asarray(Image.fromarray(labels_small).resize((w, h), Image.Resampling.NEAREST))
    hidden = {t.casefold() for t in transparent}
    lut = np.zeros((256, 3), np.float32)
    tint = np.zeros(256, bool)
    for i, (name, color) in enumerate(zip(class_names, colors)):
        lut[i] = color
        tint[i] = name.casefold() not in hidden
    mask = tint[labels_small]
    blended = rgb.astype(np.float32)
    blended[mask] = (1 - alpha) * blended[mask] + alpha * lut[labels_small[mask]]
    image = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))

    if legend:
        present = np.bincount(labels_small.ravel(), minlength=256)
        rows = [(name, tuple(int(v) for v in colors[i]), (areas_mm2 or {}).get(name))
                for i, name in enumerate(class_names)
                if tint[i] and (present[i] > 0 or (areas_mm2 or {}).get(name, 0) > 0)]
        image = _with_legend(image, rows)

    partial = path.with_name(path.name + ".partial")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def downsample_labels(labels: Any, max_size: int, *, block: int = 2048, occupied: Occupancy | None = None) -> np.ndarray:
    """Label image whose longer side is at most ``max_size``, by mode over ``f x f`` windows.

    ``f = ceil(longer side / max_size)``; windows cut by the array's edge vote with the pixels they
    have; ties go to the lower class id. Reads ``labels`` (Zarr or NumPy) about ``block`` x
    ``block`` source pixels at a time, so memory stays bounded whatever the slide size. ``255``
    (not computed) is counted as class 0, as everywhere else in the writers.  ``occupied``: where
    ``labels`` may be non-zero; blocks it rules out are class 0 without being read.
    """
    height, width = (int(v) for v in labels.shape)
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    if occupied is not None:
        occupied.check_shape((height, width))
    f = max(1, math.ceil(max(height, width) / max_size))
    out_h, out_w = math.ceil(height / f), math.ceil(width / f)
    out = np.zeros((out_h, out_w), np.uint8)
    step = max(1, block // f)  # output pixels per block side
    for oy in range(0, out_h, step):
        for ox in range(0, out_w, step):
            y0, y1, x0, x1 = oy * f, min((oy + step) * f, height), ox * f, min((ox + step) * f, width)
            if occupied is not None and not occupied.may_have(y0, y1, x0, x1):
                continue  # background: out is already 0
            src = np.asarray(labels[y0:y1, x0:x1], dtype=np.uint8)
            src = np.where(src == NOT_COMPUTED, np.uint8(0), src)
            out[oy: oy + step, ox: ox + step] = window_mode(src, f)
    return out


def window_mode(src: np.ndarray, f: int) -> np.ndarray:
    """Most frequent value in each ``f x f`` window (partial windows at the edges count what they
    hold); ties go to the lower value.

    One vote counter per window and class present, filled by a single ``bincount`` over keys
    ``window * k + rank(class)``, a band of windows at a time (at most ~1M pixels and ~2M counters,
    ~24 MB): 3.5-5x faster than comparing the block with each class in turn (a 2048² block of a demo
    mask: 21 against 75 ms at f = 8), the same answers."""
    if f == 1:
        return src.copy()
    h, w = src.shape
    oh, ow = math.ceil(h / f), math.ceil(w / f)
    present = np.flatnonzero(np.bincount(src.ravel(), minlength=256))  # not np.unique: no sort
    if present.size == 1:  # one class in the whole block (background, mostly): every window's mode
        return np.full((oh, ow), present[0], np.uint8)
    k = present.size
    rank = np.zeros(256, np.intp)  # intp: what bincount counts without a copy
    rank[present] = np.arange(k)
    col = (np.arange(w) // f) * k
    rows = max(1, min((1 << 21) // (ow * k), (1 << 20) // (f * w)))  # window rows a pass
    out = np.empty((oh, ow), np.uint8)
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        part = src[r0 * f : r1 * f]
        keys = rank[part]
        keys += ((np.arange(part.shape[0]) // f) * (ow * k))[:, None]
        keys += col
        votes = np.bincount(keys.ravel(), minlength=(r1 - r0) * ow * k).reshape(r1 - r0, ow, k)
        out[r0:r1] = present[votes.argmax(2)]  # argmax: the first of tied counts, the lower class
    return out


def _with_legend(image: Image.Image, rows: list[tuple[str, tuple[int, int, int], float | None]]) -> Image.Image:
    """The image with a white legend panel on its right: swatch, class name, area."""
    if not rows:
        return image
    size = max(12, min(24, image.height // 30))
    font = _font(size)
    pad, swatch = size // 2, size
    texts = [name if area is None else f"{name}  {area:.2f} mm^2" for name, _, area in rows]
    measure = ImageDraw.Draw(image)
    text_w = max(measure.textlength(t, font=font) for t in texts)
    panel_w = int(pad * 3 + swatch + text_w + pad)
    row_h = swatch + pad
    panel_h = pad + row_h * len(rows)
    out = Image.new("RGB", (image.width + panel_w, max(image.height, panel_h)), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    x0 = image.width + pad
    for i, ((_, color, _), text) in enumerate(zip(rows, texts)):
        y = pad + i * row_h
        draw.rectangle([x0, y, x0 + swatch, y + swatch], fill=color, outline=(0, 0, 0))
        draw.text((x0 + swatch + pad, y + swatch / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


