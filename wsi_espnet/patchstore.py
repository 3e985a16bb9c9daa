"""Zarr v3 patch stores: a slide's tissue tiles at a working resolution, for training and inspection.

``wsi-espnet tile SLIDE --out patches.zarr`` (or :func:`write_patch_store`) writes one Zarr v3 group:

=============  ===========================  ===================================================
array          shape, dtype                 content
=============  ===========================  ===================================================
``patches``    (N, tile, tile, 3) uint8     RGB patches at ``mpp`` µm/px; one patch per chunk,
                                            zstd level 1 (lossless)
``coords``     (N, 4) int64                 level-0 (x0, y0, w0, h0), rounded to nearest
                                            (:meth:`Tile.level0_box`)
``xy``         (N, 2) int64                 patch origin (x, y) in pixels at ``mpp``
``grid``       (N, 2) int32                 (row, col) in the full tile grid
``tissue``     (N,) float32                 tissue fraction of the patch
``done``       (N,) bool                    which patches are written (the resume record)
``labels``     (N, tile, tile) uint8        *optional*, added by training-data tools: a class
                                            map per patch, same chunking as ``patches``
=============  ===========================  ===================================================

Group attributes (``zarr.open_group(path).attrs``) record where the patches come from and how they
were cut: ``format`` ("wsi-espnet.patches", ``format_version`` 1), ``complete``, ``source`` (path,
size, ``sha256`` and ``hash_method``, backend, vendor, level-0 size, level-0 mpp and whether it was
overridden), ``mpp``, ``tile``, ``overlap``, ``tissue_threshold``, ``grid`` (the full geometry: rows,
columns, origins; see :mod:`wsi_espnet.tiling`), ``tissue`` (how the mask was made), ``software`` and
``run`` (timings of the last run).  Readers should ignore attributes and arrays they do not know;
new ones (such as ``labels``) are added, never renamed.

Guarantees:

* **Complete or absent.**  The store is written at ``OUT.partial`` and renamed to ``OUT`` only when
  every patch is in; a path ``OUT`` never holds half a store.
* **Resumable.**  ``done`` is flushed as patches land; re-running the same command continues a
  ``.partial`` where it stopped (a ``.partial`` of different settings is started afresh).
* **Parallel and bounded.**  A thread pool reads (OpenSlide and the codecs release the GIL), with at
  most ``2 * workers`` patches in flight, so memory does not depend on the slide's size.
* **Slide identity.**  ``sha256`` is the hash of the whole file up to :data:`FULL_HASH_LIMIT`; a
  larger file is identified by ``sha256-head-tail`` (the file size, its first and its last
  :data:`PARTIAL_HASH_SPAN` bytes), which changes with any rewrite in practice without reading
  gigabytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputWarning, NoMppError, OutputExistsError, SlideError, UserError
from .outputs import (check_not_input, check_output, exclusive_output, make_folder, remove_empty_folders,
                      remove_unfinished_writes, replace_folder)
from .slide import Slide, open_slide
from .tiling import TileGrid, tile_grid, validate_tiling
from .tissue import TissueMask, detect_tissue

FORMAT = "wsi-espnet.patches"
FORMAT_VERSION = 1
FULL_HASH_LIMIT = 512 * 2**20
PARTIAL_HASH_SPAN = 64 * 2**20
#: Patches between flushes of the ``done`` record (also flushed every FLUSH_SECONDS).
FLUSH_EVERY = 256
FLUSH_SECONDS = 5.0
DONE_CHUNK = 4096
#: zstd level of the ``patches`` array (see ``_compressor``).
ZSTD_LEVEL = 1


# --------------------------------------------------------------------------------------------------
# Identity of the source file.


def source_hash(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256", "hash_method", "size"}`` of a slide file (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            method = "sha256"
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            method = f"sha256-head-tail:{PARTIAL_HASH_SPAN}"
            h.update(f"size:{size}\n".encode())
            for start in (0, size - PARTIAL_HASH_SPAN):
                f.seek(start)
                left = PARTIAL_HASH_SPAN
                while left:
                    block = f.read(min(1 << 20, left))
                    if not block:
                        break
                    h.update(block)
                    left -= len(block)
    return {"sha256": h.hexdigest(), "hash_method": method, "size": size}


# --------------------------------------------------------------------------------------------------
# Writing.


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _fingerprint(source: dict, grid: TileGrid, slide_mpp: float) -> dict[str, Any]:
    """What must match for a ``.partial`` to be resumed rather than restarted."""
    boxes = grid.level0_boxes()
    return {
        "sha256": source["sha256"],
        "size": source["size"],
        "slide_mpp": slide_mpp,
        "mpp": grid.mpp,
        "tile": grid.tile,
        "overlap": grid.overlap,
        "tissue_threshold": grid.threshold,
        "n": len(grid),
        "coords_sha256": hashlib.sha256(np.ascontiguousarray(boxes).tobytes()).hexdigest(),
    }


def _compressor() -> Any:
    from zarr.codecs import ZstdCodec

    # H&E patches that came out of a scanner's JPEG compress poorly without loss (to ~0.7-0.8 of raw
    # whatever the codec); zstd level 1 gets ~0.76 at ~3.5 ms per 512² patch, where level 3 gets ~0.70
    # at ~18 ms and would be the largest cost of tiling (benchmarks/bench_tiling.py).
    return ZstdCodec(level=ZSTD_LEVEL)


def _create_store(path: Path, grid: TileGrid, attrs: dict[str, Any]) -> Any:
    import zarr

    group = zarr.open_group(str(path), mode="w")
    n, t = len(grid), grid.tile
    group.create_array(
        "patches", shape=(n, t, t, 3), dtype="uint8", chunks=(1, t, t, 3), compressors=_compressor(),
        fill_value=0, dimension_names=("patch", "y", "x", "channel"),
    )
    for name, data, dims in (
        ("coords", grid.level0_boxes(), ("patch", "x0_y0_w0_h0")),
        ("xy", grid.xy(), ("patch", "xy")),
        ("grid", grid.rowcol(), ("patch", "row_col")),
        ("tissue", grid.tissue_fractions(), ("patch",)),
    ):
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(max(1, min(len(data), 65536)),) + data.shape[1:],
                                 fill_value=0, dimension_names=dims)
        if len(data):
            arr[...] = data
    group.create_array("done", shape=(n,), dtype="bool", chunks=(DONE_CHUNK,), fill_value=False,
                       dimension_names=("patch",))
    group.attrs.update(attrs)
    return group


def _open_resumable(path: Path, fingerprint: dict[str, Any]) -> Any | None:
    """The ``.partial`` group if it was started with the same settings, else None."""
    import zarr

    if not path.exists():
        return None
    try:
        group = zarr.open_group(str(path), mode="r+")
        if group.attrs.get("fingerprint") != fingerprint:
            return None
        for name in ("patches", "done", "coords"):
            group[name]
        remove_unfinished_writes(path)  # chunks a killed run was writing: written again below
        return group
    except Exception:  # a .partial too broken to read: it is ours, start again
        return None


class _Done:
    """In-memory ``done`` flags, written back to the store chunk by chunk (only the changed ones)."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.flags = np.asarray(array[...], dtype=bool) if array.shape[0] else np.zeros(0, bool)
        self.dirty: set[int] = set()
        self.since_flush = 0
        self.last_flush = time.monotonic()

    def mark(self, index: int) -> None:
        self.flags[index] = True
        self.dirty.add(index // DONE_CHUNK)
        self.since_flush += 1
        if self.since_flush >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for c in sorted(self.dirty):
            lo, hi = c * DONE_CHUNK, min((c + 1) * DONE_CHUNK, len(self.flags))
            self.array[lo:hi] = self.flags[lo:hi]
        self.dirty.clear()
        self.since_flush = 0
        self.last_flush = time.monotonic()


class _SlidePerThread:
    """One slide handle per worker thread: no backend is asked to share a file handle across threads."""

    def __init__(self, path: Path, mpp: float | None, backend: str) -> None:
        self.path, self.mpp, self.backend = path, mpp, backend
        self.local = threading.local()
        self.handles: list[Slide] = []
        self.lock = threading.Lock()

    def get(self) -> Slide:
        slide = getattr(self.local, "slide", None)
        if slide is None:
            slide = open_slide(self.path, mpp=self.mpp, backend=self.backend)
            self.local.slide = slide
            with self.lock:
                self.handles.append(slide)
        return slide

    def close(self) -> None:
        for s in self.handles:
            s.close()
        self.handles.clear()


def write_patch_store(
    slide_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mpp: float = 1.0,
    tile: int = 512,
    overlap: int = 0,
    tissue_threshold: float = 0.5,
    slide_mpp: float | None = None,
    tissue_mask: str | os.PathLike | TissueMask | None = None,
    save_tissue_mask: str | os.PathLike | None = None,
    tissue_mpp: float = 8.0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    backend: str = "auto",
) -> Path:
    """Tile a slide's tissue into a Zarr v3 patch store at ``out`` and return its path.

    ``mpp`` is the output resolution (µm/px), ``slide_mpp`` overrides the slide's own level-0 µm/px.
    ``tissue_mask`` is a mask (or mask PNG) to use instead of detecting tissue.  A slide without tissue
    gives a valid store with N = 0 and a warning.  Raises :class:`UserError` for bad input, before
    anything is written.
    """
    validate_tiling(tile, overlap)
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise UserError(f"output resolution must be a positive number of µm/px, got {mpp!r}")
    if not 0.0 <= float(tissue_threshold) <= 1.0:
        raise UserError(f"tissue threshold must be between 0 and 1, got {tissue_threshold}")
    # Default: one reader per core, at most 16 (each holds a slide handle and its decode cache).
    workers = int(workers) if workers is not None else min(os.cpu_count() or 1, 16)
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    partial = _partial_path(out)
    check_not_input(out, Path(slide_path))
    made = make_folder(out.parent)  # as wsi-segment does, and taken away again if the run fails empty-handed
    try:
        with exclusive_output(out):  # one run per store, from before the checks: the .partial is not shared
            return _write_locked(slide_path, out, partial, mpp=mpp, tile=tile, overlap=overlap,
                                 tissue_threshold=tissue_threshold, slide_mpp=slide_mpp, tissue_mask=tissue_mask,
                                 save_tissue_mask=save_tissue_mask, tissue_mpp=tissue_mpp, workers=workers,
                                 overwrite=overwrite, progress=progress, backend=backend)
    except BaseException:
        if made is not None:
            remove_empty_folders(made)
        raise


def _write_locked(slide_path: str | os.PathLike, out: Path, partial: Path, *, mpp: float, tile: int, overlap: int,
                  tissue_threshold: float, slide_mpp: float | None, tissue_mask: str | os.PathLike | TissueMask | None,
                  save_tissue_mask: str | os.PathLike | None, tissue_mpp: float, workers: int, overwrite: bool,
                  progress: bool, backend: str) -> Path:
    """:func:`write_patch_store` once its arguments are checked and the store's lock is held."""
    if out.is_symlink() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    # An existing store is replaced only with --overwrite, and only if it *is* a Zarr store: never a
    # folder a mistyped --out names (the slides' own folder, say).
    check_output(out, overwrite, zarr_store=True)
    if save_tissue_mask is not None:  # checked as an output too, before anything is read
        save_tissue_mask = Path(save_tissue_mask)
        check_not_input(save_tissue_mask, Path(slide_path))
        check_output(save_tissue_mask, overwrite)

    started = time.monotonic()
    slide = open_slide(slide_path, mpp=slide_mpp, backend=backend)
    try:
        if slide.mpp is None:
            raise NoMppError(
                f"{slide.path}: the slide has no physical pixel size; pass --mpp (µm per pixel at full resolution)"
            )
        if slide.non_square_pixels:
            warnings.warn(slide.non_square_pixels, InputWarning, stacklevel=3)
        upsampled = slide.upsampling_note(mpp, whose="the patches'")
        if upsampled:
            warnings.warn(upsampled, InputWarning, stacklevel=3)
        if isinstance(tissue_mask, TissueMask):
            if tissue_mask.level0_size is not None and tuple(tissue_mask.level0_size) != tuple(slide.dimensions):
                raise UserError(f"the tissue mask was made for a {tissue_mask.level0_size} slide, not {slide.dimensions}")
            tissue, tissue_info = tissue_mask, {"source": "given"}
        elif tissue_mask is not None:
            tissue = TissueMask.load_png(tissue_mask, level0_size=tuple(slide.dimensions))
            tissue_info = {"source": "file", "path": str(Path(tissue_mask).resolve())}
        else:
            tissue = detect_tissue(slide, target_mpp=tissue_mpp)
            tissue_info = {"source": "detected", "target_mpp": tissue_mpp}
        tissue_info.update(
            mode=tissue.mode, downsample=tissue.downsample, mask_mpp=tissue.mpp,
            mask_size=[int(tissue.mask.shape[1]), int(tissue.mask.shape[0])], fraction=tissue.tissue_fraction,
        )
        if save_tissue_mask is not None:
            tissue.save_png(save_tissue_mask)

        image_size = slide.size_at_mpp(mpp)
        grid = tile_grid(image_size, tile, overlap, mpp=mpp, level0_mpp=slide.mpp, tissue=tissue,
                         threshold=float(tissue_threshold), level0_size=tuple(slide.dimensions))
        source = source_hash(slide.path)
        fingerprint = _fingerprint(source, grid, slide.mpp)
        attrs = _attributes(slide, slide_mpp, source, grid, tissue_info, fingerprint)
        if len(grid) == 0:
            warnings.warn(
                f"{slide.path}: no tile has tissue fraction >= {tissue_threshold} "
                f"(slide tissue fraction {tissue.tissue_fraction:.3f}); writing an empty store (N = 0)",
                stacklevel=3,
            )
        backend_used = slide.backend
    finally:
        slide.close()

    group = _open_resumable(partial, fingerprint)
    if group is None:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial)
        elif partial.exists() or partial.is_symlink():
            partial.unlink()
        group = _create_store(partial, grid, attrs)
    done = _Done(group["done"])
    todo = [t for t in grid.tiles if not done.flags[t.index]]
    try:
        timings = _write_tiles(
            group["patches"], todo, done, len(grid), slide.path, slide_mpp, backend_used, mpp, workers, progress
        )
    except SlideError as exc:
        written = int(done.flags.sum())
        if written == 0:  # nothing worth keeping: leave no trace
            del group
            shutil.rmtree(partial, ignore_errors=True)
            raise
        raise SlideError(f"{exc} (the {written} patches written so far are kept in {partial})") from None
    done.flush()
    if not done.flags.all():  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"{int((~done.flags).sum())} patches were not written")
    group.attrs.update(
        complete=True,
        run={**timings, "wall_s": round(time.monotonic() - started, 3), "workers": workers,
             "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    )
    del group
    replace_folder(partial, out)  # an old store (--overwrite) goes only after
    return out


def _write_tiles(
    patches: Any,
    todo: list,
    done: _Done,
    total: int,
    slide_path: Path,
    slide_mpp: float | None,
    backend: str,
    mpp: float,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    """Read and write ``todo`` with a bounded thread pool; returns summed per-stage seconds."""
    from tqdm import tqdm

    handles = _SlidePerThread(slide_path, slide_mpp, backend)
    read_s = write_s = 0.0

    def job(t) -> tuple[int, float, float]:
        s = handles.get()
        t0 = time.perf_counter()
        patch = s.read_at_mpp(t.x, t.y, t.width, t.height, mpp)
        t1 = time.perf_counter()
        patches[t.index] = patch
        return t.index, t1 - t0, time.perf_counter() - t1

    bar = tqdm(total=total, initial=total - len(todo), unit="patch", desc=slide_path.name, disable=not progress,
               dynamic_ncols=True, smoothing=0.05, file=sys.stderr)
    wall0 = time.perf_counter()
    pending: set[cf.Future] = set()
    it = iter(todo)
    limit = 2 * workers
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile")
    try:
        while True:
            while len(pending) < limit:
                t = next(it, None)
                if t is None:
                    break
                pending.add(pool.submit(job, t))
            if not pending:
                break
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            failed = None
            for fut in finished:
                if fut.exception() is not None:
                    failed = failed or fut  # record the others first, then raise (a SlideError)
                    continue
                index, r, w = fut.result()
                read_s += r
                write_s += w
                done.mark(index)
                bar.update(1)
            if failed is not None:
                failed.result()
    except BaseException:
        # Keep what finished: cancel what has not started, let running jobs end, record them.
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        for fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                done.mark(fut.result()[0])
        done.flush()
        raise
    finally:
        pool.shutdown(wait=True)
        handles.close()
        bar.close()
    wall = time.perf_counter() - wall0
    n = len(todo)
    return {
        "patches_written": n,
        "write_wall_s": round(wall, 3),
        "patches_per_s": round(n / wall, 2) if wall > 0 and n else 0.0,
        "read_s": round(read_s, 3),  # thread-seconds: read + decode + resample
        "store_s": round(write_s, 3),  # thread-seconds: compress + write
    }


def _attributes(slide: Slide, slide_mpp: float | None, source: dict, grid: TileGrid, tissue_info: dict,
                fingerprint: dict) -> dict[str, Any]:
    import zarr

    from . import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "source": {
            "path": str(Path(slide.path).resolve()),
            "name": Path(slide.path).name,
            **source,
            "backend": slide.backend,
            "vendor": slide.vendor,
            "level0_size": list(slide.dimensions),
            "level0_mpp": slide.mpp,
            "mpp_overridden": slide_mpp is not None,
            "objective_power": slide.objective_power,
        },
        "mpp": grid.mpp,
        "tile": grid.tile,
        "overlap": grid.overlap,
        "tissue_threshold": grid.threshold,
        "n_patches": len(grid),
        "grid": grid.describe(),
        "tissue": tissue_info,
        "software": {"name": "wsi-espnet", "version": __version__, "zarr": zarr.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------------------------------
# Reading.


def open_patch_store(path: str | os.PathLike) -> Any:
    """Open a finished patch store read-only (a zarr Group); a UserError for anything else."""
    import zarr

    path = Path(path)
    if not path.exists():
        if _partial_path(path).exists():
            raise UserError(f"{path} is not finished ({_partial_path(path).name} exists: re-run `wsi-espnet tile` to resume)")
        raise UserError(f"{path}: no such patch store")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise UserError(f"{path} is not a Zarr group: {' '.join(str(exc).split())}") from None
    if group.attrs.get("format") != FORMAT:
        raise UserError(f"{path} is not a wsi-espnet patch store")
    if not group.attrs.get("complete"):
        raise UserError(f"{path} is an incomplete patch store")
    return group


# --------------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", metavar="SLIDE", help="slide file (any format OpenSlide or tifffile reads)")
    parser.add_argument("--out", required=True, metavar="PATCHES.zarr", help="output Zarr store (a directory)")
    parser.add_argument("--mpp-out", type=float, default=1.0, metavar="UM", help="output resolution, µm/px (default 1.0)")
    parser.add_argument("--tile", type=int, default=512, help="patch size in pixels at --mpp-out (default 512)")
    parser.add_argument("--overlap", type=int, default=0, help="overlap between neighbouring patches, pixels (default 0)")
    parser.add_argument("--tissue-threshold", type=float, default=0.5, metavar="F",
                        help="keep patches with at least this tissue fraction; 0 keeps all (default 0.5)")
    parser.add_argument("--mpp", type=float, default=None, metavar="UM",
                        help="the slide's level-0 µm/px, overriding (or supplying) the file's own")
    parser.add_argument("--tissue-mask", default=None, metavar="MASK.png", help="use this tissue mask instead of detecting")
    parser.add_argument("--save-tissue-mask", default=None, metavar="MASK.png", help="save the tissue mask as a PNG")
    parser.add_argument("--workers", type=int, default=None, help="reader threads (default: number of CPUs, at most 16)")
    parser.add_argument("--backend", default="auto", choices=("auto", "openslide", "tifffile", "image"),
                        help="slide reader (default auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = write_patch_store(
                args.slide, args.out, mpp=args.mpp_out, tile=args.tile, overlap=args.overlap,
                tissue_threshold=args.tissue_threshold, slide_mpp=args.mpp, tissue_mask=args.tissue_mask,
                save_tissue_mask=args.save_tissue_mask, workers=args.workers, overwrite=args.overwrite,
                progress=not args.quiet, backend=args.backend,
            )
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
    import zarr

    group = zarr.open_group(str(out), mode="r")
    n = group["patches"].shape[0]
    print(f"{out}: {n} patches of {args.tile}x{args.tile} at {args.mpp_out} µm/px")
    return 0
