"""int8 static quantisation of an exported ESPNet, calibrated on tiles like those it will see.

Static (not dynamic) quantisation because ESPNet is all convolutions: dynamic quantisation only
covers MatMul/Gemm-like ops and would leave it in float.  The recipe is ONNX Runtime's for x86 CPUs:
QDQ format, uint8 activations, int8 weights per output channel (per-channel keeps
the small decoder convolutions, whose channel scales differ by orders of magnitude, accurate).
Only convolutions are quantised, with percentile ranges: see :data:`QUANTIZED_OPS` and
:data:`PERCENTILE` for why.

Calibration data decides the activation ranges, so it must look like the deployment data: tissue
tiles at the model's µm/px for a slide model (glass-only tiles would calibrate for white), whole
images at the model's working size for a Cityscapes-like model.  The accuracy cost is measured, not
assumed: :func:`argmax_agreement` on tiles held out from calibration, stored in the int8 file.
Measured (benchmarks/bench_onnx.py): the shipped tissue model on 16 held-out demo-slide tiles keeps
99.9% of its float32 labels (mIoU 0.9349 -> 0.9347); the released Cityscapes model, on photos that
are not street scenes, keeps 79% at 1024x512 (88% where float32's top-2 margin is at least 1), and
much less when calibrated at another resolution than it runs at.  ESPNet's long chain of small
convolutions accumulates rounding, and its time goes as much to memory-bound element-wise work as to
convolutions, so int8 is only ~15% faster than float32 on this CPU: check the agreement before using it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import DatasetConfig
from .errors import UserError
from .onnx_engine import INPUT_NAME
from .predict import _pad_to_multiple, read_image, resize_bilinear

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def evenly_spaced(items: Sequence, k: int) -> list:
    """``k`` items spread over the whole sequence (deterministic: same file, same calibration)."""
    if k >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round()]


def split_held_out(tiles: Sequence[np.ndarray], held_out: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration, held-out): every n-th tile is held out, at most half of them, at least one."""
    n_held = max(1, min(held_out, len(tiles) // 2))
    held_idx = {int(i) for i in np.linspace(0, len(tiles) - 1, n_held + 2).round()[1:-1]}
    calib = [t for i, t in enumerate(tiles) if i not in held_idx]
    return calib, [tiles[i] for i in sorted(held_idx)]


def image_tiles(rgb: np.ndarray, config: DatasetConfig, max_tiles: int) -> list[np.ndarray]:
    """Calibration inputs from one ordinary image.  A whole-image model (one with ``input_size``)
    sees the image resized to that size, as ``predict`` feeds it; a slide model sees tiles of its
    tile size cut from the image, which is taken to be at the model's µm/px already."""
    if config.input_size:
        w, h = config.input_size
        return [_pad_to_multiple(resize_bilinear(rgb, (h, w))).round().astype(np.uint8)]
    t = config.slide.tile
    pad = ((0, max(0, t - rgb.shape[0])), (0, max(0, t - rgb.shape[1])), (0, 0))
    padded = np.pad(rgb, pad, mode="reflect" if min(rgb.shape[:2]) > 1 else "edge")
    ys = range(0, padded.shape[0] - t + 1, t)
    xs = range(0, padded.shape[1] - t + 1, t)
    corners = evenly_spaced([(y, x) for y in ys for x in xs], max_tiles)
    return [np.ascontiguousarray(padded[y : y + t, x : x + t]) for y, x in corners]


def slide_tiles(path: Path, config: DatasetConfig, max_tiles: int, mpp: float | None = None) -> list[np.ndarray]:
    """Tissue tiles of one slide at the model's µm/px and tile size, spread evenly over the tiles that
    are at least a quarter tissue (glass-only tiles would calibrate the int8 ranges for white)."""
    from .slide import open_slide
    from .tissue import detect_tissue

    with open_slide(path, mpp=mpp) as slide:
        t, work_mpp = config.slide.tile, config.slide.mpp
        width, height = slide.size_at_mpp(work_mpp)
        mask = detect_tissue(slide)
        ds = work_mpp / slide.mpp  # level-0 pixels per working pixel
        step = t // 2  # overlapping tiles: a small slide still gives a few distinct calibration views
        corners = [(x, y) for y in range(0, max(1, height - t + 1), step) for x in range(0, max(1, width - t + 1), step)]
        rects = np.asarray([(x * ds, y * ds, t * ds, t * ds) for x, y in corners], np.float64)
        fractions = mask.fractions(rects)
        tissue = [c for c, f in zip(corners, fractions) if f >= max(config.slide.tissue_threshold, 0.25)]
        if not tissue:  # a small or faint slide: its most tissue-rich tiles are still the best guess
            order = np.argsort(-fractions)[:max_tiles]
            tissue = [corners[i] for i in sorted(order)]
        return [slide.read_at_mpp(x, y, t, t, work_mpp) for x, y in evenly_spaced(tissue, max_tiles)]


def calibration_tiles(
    paths: Iterable[str | os.PathLike], config: DatasetConfig, max_tiles: int = 32, mpp: float | None = None
) -> list[np.ndarray]:
    """Up to ``max_tiles`` uint8 RGB calibration inputs (H, W multiples of 8), shared evenly over
    ``paths``: ordinary images (PNG, JPEG...) via :func:`image_tiles`, anything else as a slide."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no calibration inputs given")
    tiles: list[np.ndarray] = []
    for i, path in enumerate(paths):
        budget = (max_tiles - len(tiles)) // (len(paths) - i)
        if budget <= 0:
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            tiles += image_tiles(read_image(path), config, budget)
        else:
            tiles += slide_tiles(path, config, budget, mpp)
    return tiles


def describe_tiles(tiles: Sequence[np.ndarray]) -> str:
    shapes = sorted({f"{t.shape[1]}x{t.shape[0]}" for t in tiles})
    return f"{len(tiles)} tile(s) of {', '.join(shapes)}"


class _TileReader:
    """ONNX Runtime's CalibrationDataReader protocol over tiles, one per batch (tiles of different
    sizes cannot share one).  ``set_range`` lets calibration run tile by tile: the histogram
    calibrators otherwise keep every intermediate activation of every tile in memory at once
    (about 200 MB per 1024×512 frame)."""

    def __init__(self, input_name: str, tiles: Sequence[np.ndarray]) -> None:
        self._name, self._tiles = input_name, tiles
        self.set_range(0, len(tiles))

    def __len__(self) -> int:
        return len(self._tiles)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._tiles))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        tile = self._tiles[self._next]
        self._next += 1
        return {self._name: tile[None].astype(np.float32)}

    def rewind(self) -> None:
        self.set_range(0, len(self._tiles))


# Only convolutions are quantised: they are nearly all of ESPNet's arithmetic, and quantising the
# batch norms, PReLUs and adds between them as well added rounding steps that cost agreement
# (0.80 vs 0.87 on calibration images for the Cityscapes model) and was slower, not faster.
QUANTIZED_OPS = ["Conv", "ConvTranspose"]
# Percentile ranges rather than min/max: one extreme activation on one calibration tile otherwise
# stretches a layer's int8 grid for every tile (held-out agreement 0.98 vs 0.32 on one photo).
PERCENTILE = 99.999
SCHEME = (
    f"static QDQ of {'/'.join(QUANTIZED_OPS)}: int8 per-channel weights, "
    f"uint8 activations with {PERCENTILE}th-percentile ranges"
)


def quantize_int8(fp32_path: Path, out_path: Path, tiles: Sequence[np.ndarray]) -> None:
    """Quantise an exported float32 model to int8 QDQ at ``out_path`` (metadata is not carried
    over: the caller sets it)."""
    import contextlib
    import io
    import logging
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not tiles:
        raise UserError("int8 quantisation needs at least one calibration tile")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantiser logs (and prints) its progress
    try:
        work_dir = tempfile.TemporaryDirectory(prefix=f".{Path(out_path).name}.", dir=Path(out_path).parent)
        with work_dir as work, contextlib.redirect_stdout(io.StringIO()):
            # Folding batch norms into the convolutions before them first gives one int8 grid per
            # fused conv instead of quantising conv output and batch norm separately.
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(out_path),
                _TileReader(INPUT_NAME, tiles),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=QUANTIZED_OPS,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1},
            )
    finally:
        logging.getLogger().setLevel(quiet)


def argmax_agreement(reference, candidate, tiles: Sequence[np.ndarray]) -> float:
    """Fraction of pixels whose arg-max class is the same under two engines (float32 vs int8)."""
    same = total = 0
    for tile in tiles:
        a = reference.logits_numpy(tile[None]).argmax(1)
        b = candidate.logits_numpy(tile[None]).argmax(1)
        same += int((a == b).sum())
        total += a.size
    return same / total if total else float("nan")
