"""Whole-slide segmentation: slide → tissue → tiles → model → blended label map → outputs.

Data flows one way.  Tiles are read and decoded on a thread pool (:class:`TileReader`; OpenSlide and
the codecs release the GIL), the model runs on batches of tissue tiles, and :class:`BlendStitcher`
blends overlaps (the argmax of finished cells on a pool of their own) and emits finished cells into
a uint8 band that is flushed, a band of rows at a time (class areas counted on the way), into
``<out>.work/labels.u8`` (a :class:`LabelFile`; with ``--probs``, the blended probabilities go to
:class:`ChunkAssembler`, which writes each chunk of ``probs.zarr`` once it is complete).  The
writers (mask TIFF, GeoJSON, overlay) read that map block by block, and only where the tissue tiles
ran (:meth:`TileGrid.footprint`), so memory grows only with the slide's width (the blending strip),
never with its area.

Scheduling (:mod:`wsi_espnet.schedule`): how reading, the model and the blending share the machine
(beside the model on a GPU or on cores it leaves free; as two model streams on a CPU model with every
core).  Same operations in the same order whatever the schedule: the same bytes, given the same
threads per model call.

Resuming: after every tile row the flushed height is recorded in ``progress.json``.  A re-run with the
same slide, model and options recomputes from the first tile row that reaches below that height
(the blending state of earlier rows is not needed below it), with batches cut as in the first run
(:func:`feed_batches`), so the result is byte-identical to an uninterrupted run.  Final files are
written under temporary names and renamed; the mask, written last, marks the run as done, and the
work folder is then removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .chunk_assembler import ChunkAssembler
from .engine import NETWORK_STRIDE, Engine, available_cores, make_engine
from .errors import InputWarning, NoMppError, OutputLostError, UserError
from .label_file import LabelFile
from .labels import predict_split
from .outputs import (check_not_input, check_output, discard_folder, exclusive_output, link_or_copy_tree,
                      make_folder, remove_aside, remove_empty_folders, remove_path, remove_unfinished_writes,
                      replace_folder)
from .runtime import lazy_zeros, tune_for_inference
from .schedule import (MODEL_STREAMS, SCHEDULES, ModelStreams, TileReader, choose_schedule, default_batch,
                       feed_batches, model_threads)
from .slide import Slide, open_slide
from .stitch import BlendStitcher, feed_bands
from .tiling import Tile, TileGrid, tile_grid
from .tissue import TissueMask, detect_tissue

CHUNK = 512  # probability Zarr chunk side, for tile strides under 128
LABELS = "labels.u8"  # the label map in the work folder (LabelFile)
TISSUE = "tissue.png"  # the tissue mask in the work folder, so a resumed run keeps its grid
WORK_VERSION = 10  # 2: progress.json carries the class counts; 3: labels from the weighted sum, new
#                   resampling order and level tolerance (pixels of an older run's rows may differ);
#                   4: labels in a raw LabelFile, not Zarr; 5: batches cut across bands (feed_batches:
#                   an older run's batches, and so its floating-point results, differ); 6: a model
#                   without a Background class 0 gets one prepended (its ids shift by one); 7: a CPU
#                   model on every core runs two calls of half the threads, 2 tiles each ("streams");
#                   8: labels of a tile's central cell from the logits (labels.predict_split);
#                   9: the blending window trims the outer third of each overlap (stitch);
#                   10: a CPU model's calls are of 2 tiles under every schedule (schedule.default_batch)
BACKGROUND = ("Background", (255, 255, 255))  # what glass outside the tissue tiles is


def output_classes(cfg) -> tuple[list[str], list[tuple[int, int, int]], int]:
    """The outputs' class names and colours, and the shift from the model's class ids to theirs.

    Why: outside the tissue tiles the label map holds 0 (never computed, so never written), which
    must mean "no tissue".  The shipped and breast-biopsy models name their class 0 Background; a
    model trained without one (BCSS's code 0 is "outside the annotation", ignored in training)
    would have all glass labelled as its first tissue class.  Such a model's classes are shifted
    by one and a Background class 0 is prepended: the mask's metadata names every id."""
    names, colors = list(cfg.class_names), [tuple(c.color) for c in cfg.classes]
    if names and names[0].casefold() == BACKGROUND[0].casefold():
        return names, colors, 0
    if len(names) > 254:
        raise UserError(f"the model has {len(names)} classes and none is Background: at most 254 fit a mask")
    return [BACKGROUND[0], *names], [BACKGROUND[1], *colors], 1


@dataclass
class SegmentOptions:
    """Everything that changes the result; ``None`` takes the model config's value."""

    mpp: float | None = None  # the slide's level-0 µm/px, for files that do not record it
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None  # tiles per model call; None: default_batch(the model's device)
    tissue_threshold: float | None = None
    device: str = "auto"
    backend: str = "torch"
    workers: int = 4  # reader threads
    threads: int | None = None  # the model's CPU threads (None: one per core)
    schedule: str = "auto"  # "beside", "between" or "streams" (choose_schedule)
    probs: Path | None = None
    geojson: Path | None = None
    geojson_min_area: float = 0.0  # µm²: smaller parts dropped, smaller holes filled (GeoJSON only)
    overlay: Path | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class SegmentResult:
    slide: str
    mask: str
    tiles: int
    grid_tiles: int
    mpp: float
    size: tuple[int, int]
    tissue_mm2: float
    class_mm2: dict[str, float]
    seconds: float
    outputs: dict[str, str] = field(default_factory=dict)
    resumed_from_row: int = 0
    warnings: list[str] = field(default_factory=list)  # what was also warned (InputWarning)
    tiles_run: int | None = None  # tiles this call ran through the model (fewer than ``tiles`` when resumed)
    schedule: str = ""  # how reading, the model and the blending shared the machine (choose_schedule)
    batch: int = 0  # tiles per model call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        areas = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.class_mm2.items(), key=lambda kv: -kv[1]) if v > 0)
        return (
            f"{Path(self.slide).name}: {self.tiles} tiles, tissue {self.tissue_mm2:.3f} mm², "
            f"classes (mm²): {areas or 'none'}, {self.seconds:.1f} s -> {self.mask}"
        )


# ---------------------------------------------------------------------------------------------
# Outputs: check before any work, so a mistake costs nothing


def stride_note(tile: int, overlap: int) -> str:
    """Why a grid whose stride is not a multiple of the network's deserves a warning (measured:
    docs/performance.md, session 13).  Tiles are multiples of the stride, so the overlap is the fix."""
    up = overlap + (-overlap) % NETWORK_STRIDE
    better = up if 2 * up <= tile else overlap - overlap % NETWORK_STRIDE
    return (f"tile {tile} - overlap {overlap} = {tile - overlap} px is not a multiple of {NETWORK_STRIDE}, the "
            "network's stride: every tile then sees the image at another phase than its neighbours, and the "
            "blended map, as accurate, agrees less with one pass over the whole image (99.75-99.79 % against "
            f"99.90-99.93 % measured); --overlap {better} avoids that")


def check_options(opts: SegmentOptions) -> None:
    """Every option that can be checked without the slide or the model, before anything is made:
    a mistake costs nothing and leaves nothing (``wsi-batch`` runs it once for the whole archive)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)

    def whole(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if opts.mpp is not None and not (number(opts.mpp) and opts.mpp > 0):
        raise UserError(f"--mpp must be a positive number of µm per pixel, got {opts.mpp!r}")
    if opts.tile is not None and not (whole(opts.tile) and opts.tile >= NETWORK_STRIDE and opts.tile % NETWORK_STRIDE == 0):
        raise UserError(f"--tile {opts.tile!r}: ESPNet needs a tile size that is a positive multiple of {NETWORK_STRIDE}")
    if opts.overlap is not None and not (whole(opts.overlap) and opts.overlap >= 0):
        raise UserError(f"--overlap must be a whole number of pixels >= 0, got {opts.overlap!r}")
    if opts.tile is not None and opts.overlap is not None and 2 * opts.overlap > opts.tile:
        raise UserError(f"--overlap {opts.overlap}: the blending window ramps over the overlap at both borders "
                        f"of a tile, so it can be at most half the tile ({opts.tile // 2})")
    if opts.tissue_threshold is not None and not (number(opts.tissue_threshold) and 0 <= opts.tissue_threshold <= 1):
        raise UserError(f"--tissue-threshold must be a fraction between 0 and 1, got {opts.tissue_threshold!r}")
    for name, value in (("--batch", opts.batch), ("--workers", opts.workers), ("--threads", opts.threads)):
        if value is not None and not (whole(value) and value >= 1):
            raise UserError(f"{name} must be at least 1, got {value!r}")
    device = str(opts.device)
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    if opts.backend not in ("torch", "onnxruntime"):
        raise UserError(f"unknown backend {opts.backend!r}: use torch or onnxruntime")
    if opts.schedule not in SCHEDULES:
        raise UserError(f"schedule {opts.schedule!r}: use {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}")
    area = opts.geojson_min_area
    if not (number(area) and area >= 0):
        raise UserError(f"--geojson-min-area must be a number of µm² >= 0, got {area!r}")


GEOJSON_ENDS = (".geojson", ".json", ".geojson.gz", ".json.gz")  # what QuPath's import reads


def _check_names(out: Path, opts: SegmentOptions) -> None:
    """Names the outputs' readers accept: QuPath imports GeoJSON by extension only ("no objects
    found" otherwise), and a viewer takes the overlay for what its extension says; a Zarr store named
    ``x.npy`` would be taken for the file it is not."""
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise UserError(f"--out {out}: the mask is a TIFF, name it .tif or .tiff")
    if opts.geojson and not str(opts.geojson).lower().endswith(GEOJSON_ENDS):
        raise UserError(f"--geojson {opts.geojson}: QuPath imports only {', '.join(GEOJSON_ENDS)}; name it so")
    if opts.overlay and Path(opts.overlay).suffix.lower() != ".png":
        raise UserError(f"--overlay {opts.overlay}: the overlay is a PNG, name it .png")
    if opts.probs and Path(opts.probs).suffix.lower() not in ("", ".zarr"):  # a plain folder name is fine
        raise UserError(f"--probs {opts.probs}: the probabilities are a Zarr store (a folder), name it .zarr")


def _check_distinct(targets: list[tuple[str, Path]]) -> None:
    """One file per output: two options naming one path would have one writer replace the other's file."""
    seen: dict[str, str] = {}
    for key, p in targets:
        other = seen.setdefault(os.path.normcase(os.path.abspath(p)), key)
        if other != key:
            raise UserError(f"{p} is named for two outputs ({other} and {key}); give each its own file")


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _fingerprint(slide: Slide, model_id: str, settings: dict) -> str:
    st = slide.path.stat()
    key = json.dumps({"slide": [str(slide.path.resolve()), st.st_size, st.st_mtime_ns], "model": model_id,
                      "settings": settings, "v": WORK_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Label band: uint8 rows between the flushed height and the lowest pending cell


class LabelBand:
    """Holds emitted labels from ``flushed_y`` down to the lowest pending cell; finished rows go to
    ``labels`` (a :class:`LabelFile`, or any 2-D array) in one write per band.  ``height`` bounds how
    far below ``flushed_y`` a label may land (the deepest band: the last two tile rows are fed
    together)."""

    def __init__(self, labels, flushed_y: int, height: int, fill: int = 0, counts: list[int] | None = None) -> None:
        self.labels = labels
        self.width = labels.shape[1]
        self.total_height = labels.shape[0]
        self.flushed_y = flushed_y
        self.fill = fill
        # Lazily zeroed: pages become resident only where labels land (a 50k-wide buffer, two tile
        # rows deep for the last band, is ~50 MB, most of it glass on most slides).
        self.buf = lazy_zeros((height, self.width), np.uint8)
        if fill:
            self.buf[:] = fill
        self.used = 0  # rows of buf that may hold labels
        self.x_range = (self.width, 0)  # columns written since the last flush
        #: Pixels per class id in the flushed rows (counted here, as rows are finished, so the class
        #: areas never need a pass over the whole label map).
        self.counts = np.zeros(256, np.int64)
        if counts:
            self.counts[: len(counts)] = counts

    def write(self, y: int, x: int, block: np.ndarray) -> None:
        if y < self.flushed_y:  # recomputed on resume, already on disk
            block = block[self.flushed_y - y :]
            y = self.flushed_y
        if block.shape[0] == 0:
            return
        r = y - self.flushed_y
        if r + block.shape[0] > self.buf.shape[0]:
            raise AssertionError("label band overflow: tile rows fed out of order")
        self.buf[r : r + block.shape[0], x : x + block.shape[1]] = block
        self.used = max(self.used, r + block.shape[0])
        self.x_range = (min(self.x_range[0], x), max(self.x_range[1], x + block.shape[1]))

    def flush(self, final_y: int) -> int:
        """Write the final rows < ``final_y`` (once per band: resuming loses at most one band)."""
        end = min(final_y, self.total_height)
        n = end - self.flushed_y
        if n <= 0:
            return self.flushed_y
        # Only the columns written since the last flush (outside them the buffer holds the fill
        # value, never written in the array either): a band without tissue writes nothing.
        x0, x1 = self.x_range
        if x1 > x0:
            self.labels[self.flushed_y : end, x0:x1] = self.buf[:n, x0:x1]
        self._count(self.buf[:n])
        # Move the rows still in use up by n, n rows at a time (source and destination never
        # overlap, so numpy copies in place instead of through a temporary as large as the band),
        # and clear what they leave: in those columns only.
        keep = max(self.used - n, 0)
        for i in range(0, keep, n):
            j = min(i + n, keep)
            self.buf[i:j, x0:x1] = self.buf[n + i : n + j, x0:x1]
        self.buf[keep : max(self.used, keep), x0:x1] = self.fill
        self.used = keep
        self.x_range = (x0, x1) if keep else (self.width, 0)
        self.flushed_y = end
        return end

    def _count(self, rows: np.ndarray) -> None:
        """Add ``rows`` to the class counts; columns never written hold the fill value, uncounted.
        Class by class up to the highest present: for a model's few classes 3x faster than
        ``bincount``, which first widens every uint8 label to 64 bits."""
        x0, x1 = self.x_range
        counted = 0
        if x1 > x0:
            block = rows[:, x0:x1]
            hit = np.empty(block.shape, bool)
            for c in range(int(block.max()) + 1):
                if c != self.fill:
                    n = np.count_nonzero(np.equal(block, c, out=hit))
                    self.counts[c] += n
                    counted += n
        self.counts[self.fill] += rows.shape[0] * self.width - counted


# ---------------------------------------------------------------------------------------------


def segment_slide(slide_path: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike | None = None,
                  options: SegmentOptions | None = None, engine: Engine | None = None) -> SegmentResult:
    """Segment one slide into ``out`` (a pyramidal OME-TIFF of class ids) and the optional outputs.

    ``engine`` lets a caller reuse a loaded model across slides (the batch pipeline does); otherwise
    ``model`` (a file; None = the shipped model) is loaded with ``options.backend`` on
    ``options.device``.  Raises :class:`UserError` for anything the user can fix.
    """
    opts = options or SegmentOptions()
    t_start = time.perf_counter()
    out = Path(out)
    check_options(opts)
    _check_names(out, opts)
    extra = {"probs": opts.probs, "geojson": opts.geojson, "overlay": opts.overlay}
    targets = [("mask", out), *[(k, Path(v)) for k, v in extra.items() if v]]
    _check_distinct(targets)
    for _, p in targets:
        check_not_input(p, Path(slide_path))
    made: list[Path] = []  # output folders this run created: taken away again if it fails empty-handed
    try:
        with contextlib.ExitStack() as held:
            # Every output locked before anything is looked at: a second run on any of them stops here
            # (two runs on different masks would otherwise race to rename onto one --probs or --geojson).
            for _, p in targets:
                made += filter(None, [make_folder(p.parent)])
                held.enter_context(exclusive_output(p))
            work = out.with_name(out.name + ".work")
            remove_aside(work)  # what a run killed while deleting its finished work folder left
            resuming = work.is_dir() and (work / "progress.json").is_file()
            for key, p in targets:  # a resumed run may replace its own earlier attempt's outputs
                check_output(p, opts.overwrite or resuming, zarr_store=key == "probs")
            try:
                result = _segment(slide_path, out, work, model, opts, engine)
            except BaseException:
                _discard_if_nothing_done(work)  # still under the lock: no other run's folder
                raise
    except BaseException:
        for folder in made:
            remove_empty_folders(folder)
        raise
    result.seconds = time.perf_counter() - t_start
    return result


def _discard_if_nothing_done(work: Path) -> None:
    """A run that stops before its first band of labels is on disk leaves nothing a re-run could
    use (tissue detection finds the same mask again), so it leaves no work folder either: a slide
    that cannot be read at all, or a mistake found on opening it, must not leave a trace beside
    the output.  A folder with finished rows (or a finished grid) stays, for the re-run to continue from."""
    try:
        state = json.loads((work / "progress.json").read_text())
    except FileNotFoundError:
        state = {}
    except (OSError, ValueError):
        return  # unreadable: not ours to judge
    if not state.get("flushed_y") and "done" not in state:
        discard_folder(work)


def _segment(slide_path: str | os.PathLike, out: Path, work: Path, model: str | os.PathLike | None,
             opts: SegmentOptions, engine: Engine | None) -> SegmentResult:
    """The run itself, holding the output's lock: tissue, tiles, outputs, then the work folder goes."""
    # The pool's thread (see below) is done with the slide before the slide closes.
    with open_slide(slide_path, mpp=opts.mpp) as slide, ThreadPoolExecutor(1, thread_name_prefix="tissue") as pool:
        if slide.mpp is None:
            raise NoMppError(f"{slide.path.name} records no pixel size (µm/px){slide.no_mpp_reason}; give it with "
                             "--mpp, e.g. --mpp 0.25")
        notes: list[str] = []  # warnings, also kept in the result (a batch report has no stderr)
        if opts.mpp is not None and slide.file_mpp and not 2 / 3 < opts.mpp / slide.file_mpp < 3 / 2:
            notes.append(f"--mpp {opts.mpp:g} replaces the {slide.file_mpp:.4g} µm/px that {slide.path.name} records "
                         "(--mpp is for files that record none): areas and the model's view follow --mpp")
            warnings.warn(notes[-1], InputWarning, stacklevel=3)
        if slide.non_square_pixels:
            notes.append(slide.non_square_pixels)
            warnings.warn(notes[-1], InputWarning, stacklevel=3)
        early = None
        if engine is None:
            # Tissue detection needs only the slide: a thread runs it while the model loads (torch,
            # the file, the fold: most of a second; detection takes 0.4-0.8 s on a 100k² slide).
            # A resumed run reads the mask it kept instead.
            if not (work / TISSUE).is_file():
                early = pool.submit(detect_tissue, slide)
            engine = make_engine(model, backend=opts.backend, device=opts.device, threads=opts.threads)
        schedule = choose_schedule(engine, opts.schedule)  # decided once, before any work
        opts = replace(opts, schedule=schedule, batch=opts.batch or default_batch(engine.device))
        cfg = engine.config
        mpp = cfg.slide.mpp
        upsampled = slide.upsampling_note(mpp)
        if upsampled:
            notes.append(upsampled)
            warnings.warn(upsampled, InputWarning, stacklevel=3)
        tile = cfg.slide.tile if opts.tile is None else opts.tile
        overlap = cfg.slide.overlap if opts.overlap is None else opts.overlap
        threshold = cfg.slide.tissue_threshold if opts.tissue_threshold is None else opts.tissue_threshold
        check_options(replace(opts, tile=tile, overlap=overlap))  # the model's own, too
        if (tile - overlap) % NETWORK_STRIDE:
            notes.append(stride_note(tile, overlap))
            warnings.warn(notes[-1], InputWarning, stacklevel=3)
        settings = {"mpp": mpp, "tile": tile, "overlap": overlap, "threshold": threshold, "slide_mpp": slide.mpp,
                    "probs": bool(opts.probs), "backend": opts.backend}
        fp = _fingerprint(slide, getattr(engine, "model_id", cfg.name + str(cfg.num_classes)), settings)
        provenance = _provenance(slide, engine, settings)

        state = _open_work(work, fp)
        provenance["device"] = _devices_used(state, provenance["device"], work)
        tissue = _tissue(slide, work, early)
        size = slide.size_at_mpp(mpp)
        grid = tile_grid(size, tile, overlap, mpp, slide.mpp, tissue, threshold, level0_size=slide.dimensions)
        if not grid.tiles:
            notes.append(_no_tissue_note(slide, threshold))
            warnings.warn(notes[-1], InputWarning, stacklevel=3)
        result = _run_grid(slide, engine, grid, work, state, opts)
        result.schedule, result.batch = opts.schedule, opts.batch
        result.tissue_mm2 = tissue.tissue_fraction * slide.dimensions[0] * slide.dimensions[1] * (slide.mpp / 1000) ** 2
        thumbnail = slide.get_thumbnail(1024) if opts.overlay else None
        bounds = slide.bounds
        slide_name = str(slide.path)

    labels = LabelFile.open(work / LABELS, result.size[::-1])
    names, colors, _ = output_classes(cfg)
    counts = state["counts"][: len(names)]  # counted by LabelBand as rows were finished
    px_mm2 = (mpp / 1000.0) ** 2
    class_mm2 = {name: float(counts[i]) * px_mm2 for i, name in enumerate(names)}
    with labels:
        try:
            outputs = _write_outputs(labels, cfg, mpp, grid, out, work, opts, thumbnail, bounds, class_mm2, provenance)
        except UserError as exc:  # every writer checks its target again; all passed before the run
            raise OutputLostError(f"{exc} (changed during the run; fix it and re-run the same command: "
                                  "finished work is kept)") from None
    discard_folder(work)
    result.slide, result.mask, result.class_mm2 = slide_name, str(out), class_mm2
    result.outputs = outputs
    result.warnings = notes
    return result


def _no_tissue_note(slide: Slide, threshold: float) -> str:
    """Why a mask is all Background: a blank slide, or one without colour (a grey scan, a
    fluorescence channel), where tissue detection, which looks for the stain's colour, finds none."""
    thumb = slide.get_thumbnail(256).astype(np.int16)
    grey = int(np.abs(thumb - thumb.mean(axis=2, keepdims=True)).max()) <= 4
    content = np.percentile(thumb.mean(axis=2), 5) < 200  # something darker than glass is there
    why = ": the slide has no colour, and tissue is found by its stain's colour" if grey and content else ""
    return (f"{slide.path.name}: no tile has tissue (fraction >= {threshold:g}){why}; the mask is all Background "
            "(--tissue-threshold 0 segments every tile)")


def _provenance(slide: Slide, engine: Engine, settings: dict) -> dict[str, str]:
    """What made this result, recorded in the mask and the probabilities: a mask found on a share
    years later must still say which software, model (by content, not by path) and settings made
    it.  Nothing that changes from run to run (no time stamp), so a resumed run's files stay
    byte-identical to an uninterrupted run's."""
    made = {"software": f"wsi-espnet {__version__}", "model": engine.config.name}
    if getattr(engine, "model_id", None):
        made["model-sha256"] = engine.model_id
    width, height = slide.dimensions
    made.update({"device": str(getattr(engine, "device", "")), "slide": slide.path.name,
                 "slide-size": f"{width}x{height}", "slide-mpp": repr(float(settings["slide_mpp"])),
                 "mpp": repr(float(settings["mpp"])), "tile": str(settings["tile"]), "overlap": str(settings["overlap"]),
                 "tissue-threshold": repr(float(settings["threshold"])), "backend": settings["backend"]})
    return made


def _devices_used(state: dict, device: str, work: Path) -> str:
    """Every device that ran part of this result, in order ("cuda:0, cpu" for a run resumed on the
    CPU): a resumed run's tiles before the interruption came from the first attempt's device, and
    fp16 on a GPU and float32 on a CPU differ in the last bits."""
    used = state.setdefault("devices", [])
    if device not in used:
        used.append(device)
        _atomic_json(work / "progress.json", state)
    return ", ".join(used)


def _open_work(work: Path, fingerprint: str) -> dict:
    progress = work / "progress.json"
    if progress.is_file():
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("fingerprint") == fingerprint:
            return state
        # A work folder for other inputs or settings: start again.
        discard_folder(work)
    elif work.exists():
        discard_folder(work)
    work.mkdir(parents=True)
    state = {"fingerprint": fingerprint, "flushed_y": 0}
    _atomic_json(progress, state)
    return state


def _label_file(work: Path, shape: tuple[int, int], state: dict) -> LabelFile:
    """The run's label map: the one on disk when resuming (``flushed_y`` rows of it are done), else a
    new, all-background one, and nothing done.  Starting again is recorded before the new file
    exists: should this attempt stop before its first band, the next must not trust the old
    progress over a fresh file (it would keep the rows above ``flushed_y`` as background)."""
    path = work / LABELS
    if state["flushed_y"] > 0:
        try:
            return LabelFile.open(path, shape, writable=True)
        except (OSError, ValueError):
            pass  # gone or cut short: start the rows again
    if state["flushed_y"] or "counts" in state or "done" in state:
        state["flushed_y"] = 0
        state.pop("counts", None)
        state.pop("done", None)
        _atomic_json(work / "progress.json", state)
    return LabelFile.create(path, shape)


def _tissue(slide: Slide, work: Path, early: Future | None = None) -> TissueMask:
    """Detect once and keep the mask in the work folder, so a resumed run uses the very same grid.
    ``early``: the detection, already under way."""
    path = work / TISSUE
    if path.is_file():
        try:
            return TissueMask.load_png(path)
        except Exception:
            pass
    mask = early.result() if early is not None else detect_tissue(slide)
    mask.save_png(path)
    return mask


def _probs_codec():
    """Blosc LZ4 over the float16 bytes shuffled (high bytes together, then low): on the shipped
    model's probabilities 0.78 of the raw size in 8.3 ms a 448² chunk of 8 classes, where Zarr's
    default Zstandard gave 0.82 in 12.7 ms, on the thread that blends between the model's batches."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)


def _run_grid(slide: Slide, engine: Engine, grid: TileGrid, work: Path, state: dict,
              opts: SegmentOptions) -> SegmentResult:
    width, height = grid.image_size
    # Closed however the run ends (a failed attempt kept by a task framework keeps its exception,
    # and an open descriptor would keep the deleted file's disk space with it).
    with _label_file(work, (height, width), state) as labels:
        return _fill_labels(slide, engine, grid, work, state, opts, labels)


def _fill_labels(slide: Slide, engine: Engine, grid: TileGrid, work: Path, state: dict,
                 opts: SegmentOptions, labels: LabelFile) -> SegmentResult:
    """Read, run the model on and blend the tiles still to do, into ``labels``."""
    import zarr

    width, height = grid.image_size
    stride = grid.tile - grid.overlap
    probs_arr = None
    if opts.probs:
        probs_path = work / "probs.zarr"
        if probs_path.exists() and state["flushed_y"] > 0:
            remove_unfinished_writes(probs_path)  # chunks a killed run was writing: written again
            probs_arr = zarr.open_array(str(probs_path), mode="r+")
        else:
            # Chunks one tile stride square, aligned with the grid: each completes within the tile
            # row that covers it, so ChunkAssembler holds only a few at a time.
            side = stride if stride >= 128 else CHUNK
            probs_arr = zarr.create_array(str(probs_path), shape=(engine.config.num_classes, height, width),
                                          chunks=(engine.config.num_classes, side, side), dtype="float16",
                                          fill_value=0, compressors=[_probs_codec()], overwrite=True)
            probs_arr.attrs.update({"mpp": grid.mpp, "classes": engine.config.class_names,
                                    "axes": ["class", "y", "x"], "level0_mpp": grid.level0_mpp})

    flushed_y = int(state["flushed_y"])
    # Resume at the first band that reaches below the flushed height: bands above it touch only
    # rows already on disk, and cells below it are covered only by this band and later ones.
    every_band = feed_bands(grid)
    first = next((i for i, b in enumerate(every_band) if grid.ys[b.rows[-1]] + grid.tile > flushed_y), len(every_band))
    bands = every_band[first:]
    schedule = opts.schedule  # as _segment resolved it (choose_schedule), as is the batch
    batches, lead = feed_batches(every_band, opts.batch, first)
    # The band buffer spans the deepest band: one tile row, or the last two fed together.
    depth = max((min(grid.ys[b.rows[-1]] + grid.tile, height) - max(b.top, flushed_y) for b in bands), default=1)
    band = LabelBand(labels, flushed_y, height=max(depth, 1), counts=state.get("counts") if flushed_y else None)

    probs_out = probs_writer = None
    if probs_arr is not None:
        probs_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probs-writer")
        probs_out = ChunkAssembler(probs_arr, [(t.y, t.y + t.height, t.x, t.x + t.width) for t in grid.tiles],
                                   start_y=flushed_y, writer=probs_writer)
    labeler = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="labeler")
    shift = output_classes(engine.config)[2]
    on_labels = band.write if not shift else lambda y, x, block: band.write(y, x, block + np.uint8(shift))
    stitcher = BlendStitcher(grid, engine.config.num_classes, on_labels, probs_out.write if probs_out else None,
                             labeler=labeler)
    bar = _progress(sum(len(b.tiles) for b in bands), slide.path.name, opts.progress)

    band_ends = np.cumsum([len(b.tiles) for b in bands]).tolist()  # tiles fed when each band is done
    fed = 0  # tiles of ``bands`` blended so far
    done = 0  # bands finished so far

    def finish_bands() -> None:
        """Flush every band whose tiles have all been blended (a glass-only band as soon as the band
        above it is done), before any tile of the next band: the label band holds one band."""
        nonlocal done
        while done < len(bands) and fed >= band_ends[done]:
            stitcher.deliver()
            if band.flush(bands[done].bottom) != int(state["flushed_y"]):
                if probs_out is not None:
                    probs_out.flush_above(band.flushed_y)  # on disk before the resume point moves past it
                state["flushed_y"] = band.flushed_y
                state["counts"] = band.counts.tolist()
                _atomic_json(work / "progress.json", state)
            done += 1

    # Probabilities everywhere when they are an output, else only where the blending reads them
    # (weighted), with each tile's labels where it alone decides (labels.predict_split).
    split = probs_out is None

    def run_model(tiles: list[Tile], images: np.ndarray) -> tuple[np.ndarray, list]:
        """The model on a batch, as ``split`` says."""
        if not split:
            return engine.predict_proba(images), [None] * len(tiles)
        return predict_split(engine, images, [stitcher.plan(t.row, t.col) for t in tiles])

    def blend(tiles: list[Tile], result: tuple[np.ndarray, list], skip: int = 0, then=None) -> None:
        """Blend a batch but its first ``skip`` tiles (the overlap cells' argmax goes to the labeler
        pool), finishing bands as they complete; then ``then``, then the labels."""
        nonlocal fed
        probs, box_labels = result
        for t, p, lab in zip(tiles[skip:], probs[skip:], box_labels[skip:]):
            stitcher.add(t.row, t.col, p, lab, weighted=split)
            fed += 1
            finish_bands()
        if then is not None:
            then()
        stitcher.deliver()

    reader = TileReader(slide, batches, grid.mpp, opts.workers)
    # Blending and label writes happen in feed order whatever the schedule (the same operations in
    # the same order, so the same result).  "beside": on a thread of their own, one batch behind
    # the model, while reads run two batches ahead.  "between": on this thread, after the model
    # and before its next batch; the next batch's reads start once this batch's adds (and the band
    # flushes they complete) are done, so that the adds (one thread, the longest chain) never
    # share the cores with them.  "streams": on this thread, while the model runs the next batches
    # on MODEL_STREAMS threads of its own; reads run a batch ahead of every stream.
    blender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blender")
    behind: deque[Future] = deque()
    streams: ModelStreams | None = None

    def wait_blender() -> None:
        while behind:
            behind.popleft().result()

    try:
        with model_threads(engine, schedule):
            finish_bands()  # glass-only bands at the top
            if schedule == "streams":
                streams = ModelStreams(reader, run_model, len(batches), MODEL_STREAMS)
            else:
                reader.read_ahead(2 if schedule == "beside" else 1)
            for i in range(len(batches)):
                skip = lead if i == 0 else 0
                if streams is not None:
                    tiles, result = streams.result(i)
                    blend(tiles, result, skip)
                else:
                    tiles, images = reader.next_batch()
                    if schedule == "beside":
                        reader.read_ahead(2)
                        result = run_model(tiles, images)
                        wait_blender()
                        behind.append(blender.submit(blend, tiles, result, skip))
                    else:
                        result = run_model(tiles, images)
                        blend(tiles, result, skip, then=lambda: reader.read_ahead(1))
                bar.update(len(tiles) - skip)
            wait_blender()
        finish_bands()  # glass-only bands at the bottom
        if probs_out is not None:
            probs_out.close()
    finally:
        blender.shutdown(wait=True, cancel_futures=True)
        if streams is not None:
            streams.close()
        labeler.shutdown(wait=True, cancel_futures=True)
        if probs_writer is not None:
            probs_writer.shutdown(wait=True)
        reader.close()  # stop and join the reader threads before the slide is closed
    bar.close()
    band.flush(height)
    state["flushed_y"] = height
    state["counts"] = band.counts.tolist()
    state["done"] = True
    _atomic_json(work / "progress.json", state)
    return SegmentResult(slide="", mask="", tiles=len(grid.tiles), grid_tiles=grid.n_positions, mpp=grid.mpp,
                         size=grid.image_size, tissue_mm2=0.0, class_mm2={}, seconds=0.0,
                         resumed_from_row=bands[0].rows[0] if bands else len(grid.ys),
                         tiles_run=sum(len(b) for b in batches))


def _progress(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name[:30], unit="tile", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


def _write_outputs(labels, cfg, mpp: float, grid: TileGrid, out: Path, work: Path, opts: SegmentOptions,
                   thumbnail, bounds, class_mm2: dict, provenance: dict[str, str]) -> dict[str, str]:
    """Optional outputs first, the mask last: the mask's presence means the run is complete."""
    written: dict[str, str] = {}
    names, colors, _ = output_classes(cfg)
    footprint = grid.footprint(2048)  # outside the tissue tiles the label map is background: not read back
    scale = grid.mpp / grid.level0_mpp
    offset = (bounds[0], bounds[1]) if bounds else (0, 0)
    if opts.geojson:
        from .geojson import write_geojson

        write_geojson(opts.geojson, labels, scale=scale, offset=offset, class_names=names,
                      colors=colors, mpp=mpp, min_area=opts.geojson_min_area,
                      overwrite=True, occupied=footprint, extent=grid.level0_size)
        written["geojson"] = str(opts.geojson)
    if opts.overlay:
        from .overlay import downsample_labels, write_overlay

        small = downsample_labels(labels, max(thumbnail.shape[:2]), occupied=footprint)
        write_overlay(opts.overlay, thumbnail, small, colors, names,
                      areas_mm2=class_mm2, overwrite=True)
        written["overlay"] = str(opts.overlay)
    if opts.probs:
        dst = Path(opts.probs)
        tmp = dst.with_name(dst.name + ".partial")
        remove_path(tmp)  # a killed run's (a folder, or whatever else took the name)
        link_or_copy_tree(work / "probs.zarr", tmp)
        import zarr

        zarr.open_array(str(tmp), mode="r+").attrs["provenance"] = provenance
        replace_folder(tmp, dst)
        written["probs"] = str(dst)
    from .mask_tiff import write_mask_tiff

    write_mask_tiff(out, labels, mpp, names, colors, overwrite=True,
                    scale=scale, offset=offset, occupied=footprint, provenance=provenance)
    written["mask"] = str(out)
    return written


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", type=Path, help="a slide OpenSlide opens (SVS, NDPI, MRXS, DICOM, TIFF…), an OME-TIFF, or a DICOM "
                   "slide's folder")
    p.add_argument("--out", required=True, type=Path, help="mask.tif: pyramidal OME-TIFF of class ids")
    p.add_argument("--model", help="model file (default: the tissue model shipped with the package)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--mpp", type=float, help="the slide's level-0 µm/px, for files that do not record it")
    p.add_argument("--tile", type=int, help="tile side in pixels at the model's resolution (default: model config)")
    p.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles, blended (default: model config)")
    p.add_argument("--batch", type=int, help="tiles per model call (default 2 on a CPU, 4 on a GPU)")
    p.add_argument("--tissue-threshold", type=float, help="minimum tissue fraction of a tile (default: model config)")
    p.add_argument("--workers", type=int, default=4, help="tile reader threads (default 4)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: one per core; fewer leaves "
                   "cores to other work, e.g. several runs side by side)")
    p.add_argument("--schedule", default="auto", choices=SCHEDULES,
                   help="how reading and blending share the CPU with the model (default auto: streams for a CPU "
                   "model with every core, beside on a GPU or with cores left free; see the README's design notes)")
    p.add_argument("--probs", type=Path, help="also write per-class probabilities (float16 Zarr)")
    p.add_argument("--geojson", type=Path, help="also write QuPath GeoJSON (one MultiPolygon per class); "
                   "a name ending in .gz is gzip-compressed")
    p.add_argument("--geojson-min-area", type=float, default=0.0, metavar="UM2",
                   help="leave out of the GeoJSON the parts of a class smaller than this many µm², and fill its "
                   "holes smaller than that (default 0: every pixel, exactly as the mask)")
    p.add_argument("--overlay", type=Path, help="also write a PNG preview with a legend")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    tune_for_inference()  # this process exists to run the model (before torch is imported)
    opts = SegmentOptions(mpp=args.mpp, tile=args.tile, overlap=args.overlap, batch=args.batch,
                          tissue_threshold=args.tissue_threshold, device=args.device, backend=args.backend,
                          workers=args.workers, threads=args.threads, schedule=args.schedule, probs=args.probs,
                          geojson=args.geojson,
                          geojson_min_area=args.geojson_min_area, overlay=args.overlay,
                          overwrite=args.overwrite, progress=not args.quiet)
    result = segment_slide(args.slide, args.out, args.model, opts)
    print(result.summary())
    return 0
