"""Peak memory of whole-slide segmentation against slide size (issue 4, "Must show: memory").

The claim: the same ``wsi-segment`` run on a 20k x 20k and a 100k x 100k slide differs in peak RSS
by less than 200 MB, because tiles are streamed, probabilities are blended in a thin band and labels
go to disk as they are finished.

The slides.  Rendering a whole 100k x 100k demo slide takes about an hour and segmenting 10^10
pixels of tissue far longer on 2 cores, so the slides here hold tissue only where it costs memory:

* a real tiled-JPEG Aperio SVS (256 x 256 JPEG tiles, YCbCr 4:2:0 as ``write_demo_slide`` makes,
  Aperio ImageDescription with MPP and AppMag, a stripped thumbnail as the second IFD, then a 2x
  pyramid down to one tile; BigTIFF for the large one), 0.5 µm/px, opened by OpenSlide as vendor
  aperio;
* tissue in two bands: a **full-width horizontal band**, 592 µm tall (stride + 152 px), placed so that it covers
  exactly two rows of the model's tile grid (512 px tiles overlapping by 72 at 1 µm/px), and a
  **full-height vertical band**, 364 µm wide (stride - 76 px), covering exactly one column.  Two rows matter: the
  overlap strip between them is the blending state the stitcher keeps pending, and across a
  full-width band it spans the whole slide width, the worst case for memory.  The vertical band
  makes every tile row carry tissue, so every band writes labels, down the whole
  height (one column is enough for that, and keeps the tile count, hence the run time, small);
* the band pixels are the demo slide's own rendering (:meth:`DemoSlideSpec.rgb`) of the interior of
  a larger demo slide (offset by 12.5 % of the side, so the demo's fade to glass at its edges falls
  outside the crop and the bands are tissue end to end, with the demo's own small holes); every
  pyramid level is rendered from the demo function at its own resolution, as ``write_demo_slide``
  does, so tissue detection sees the bands; everything else is glass: one pre-encoded tile of the
  demo's glass colour (243, 243, 245), repeated.

The run.  ``wsi-segment SLIDE --out mask.tif`` (the CLI with its defaults: batch 4, 4 reader
threads) runs in a child process that reports its own peak RSS (VmHWM from /proc/self/status: per
address space, so nothing of this parent process is counted), and the RSS high-water mark at each
phase's end: tissue detection, tiles (read, model, blend, label file, class counts), and writers (mask
TIFF pyramid, and GeoJSON/probabilities when asked).  Phase timing wraps three functions of
``wsi_espnet.segment`` in the child (``_tissue``, ``_run_grid``, ``_write_outputs``) with a timer;
nothing else changes.

Peak RSS of the same run varies by up to ~150 MB from run to run (where the C library's heap
happens to place the model's feature maps), so use ``--repeats 3``: the verdict compares the
medians, and the largest-minus-smallest difference is printed beside it.

    python benchmarks/bench_segment_memory.py                         # 20k and 100k, mask only
    python benchmarks/bench_segment_memory.py --extras                # also --probs and --geojson
    python benchmarks/bench_segment_memory.py --workdir /tmp/mem      # keep (and reuse) the slides
    python benchmarks/bench_segment_memory.py --segment-args="--tile 640"   # another tile size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_espnet.checkpoint import DEFAULT_MODEL  # noqa: E402
from wsi_espnet.config import load_config  # noqa: E402
from wsi_espnet.demo import DemoSlideSpec  # noqa: E402
from wsi_espnet.tiling import axis_positions  # noqa: E402

TILE = 256  # slide file tile
QUALITY = 90
GLASS_RGB = (243, 243, 245)  # the demo slide's glass colour
SLIDE_MPP = 0.5


# --------------------------------------------------------------------------- the banded slide
def _levels(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while max(dims[-1]) > TILE:
        w, h = dims[-1]
        dims.append((-(-w // 2), -(-h // 2)))
    return dims


def _encode(rgb: np.ndarray) -> bytes:
    import imagecodecs

    # What tifffile writes for compression="jpeg", photometric="rgb": YCbCr 4:2:0 in each tile.
    return bytes(imagecodecs.jpeg_encode(rgb, level=QUALITY, colorspace="RGB", outcolorspace="YCBCR",
                                         subsampling=(2, 2)))


def band_layout(size: int, mpp: float = SLIDE_MPP) -> dict:
    """Level-0 pixel spans of the two bands.  The horizontal one starts 70 working px into a grid row
    and runs ``stride + 152`` px, so that row holds 442 px of it (86 %), the next 222 px (43 %) and
    no other row more than 2 px: two tile rows, both well over the 5 % tissue threshold.  The vertical one starts
    70 px into a grid column and runs ``stride - 76`` px: one tile column (71 %), none other (the
    neighbours overlap it by 2 px, 0.4 %)."""
    cfg = load_config("breast_biopsy").slide
    stride, work_mpp = cfg.tile - cfg.overlap, cfg.mpp
    f = work_mpp / mpp  # level-0 px per working px
    n = round(size / f)
    starts = axis_positions(n, cfg.tile, stride)
    h_row, v_col = starts[int(0.4 * len(starts))], starts[int(0.6 * len(starts))]
    tall, wide = stride + 152, stride - 76
    return {"horizontal": (round((h_row + 70) * f), round((h_row + 70 + tall) * f)),
            "vertical": (round((v_col + 70) * f), round((v_col + 70 + wide) * f)),
            "working_size": n, "grid_cols": len(starts), "band_um": [tall * work_mpp, wide * work_mpp]}


class BandedSlide:
    """The slide's content as a function of (level downsample, tile position)."""

    def __init__(self, size: int, seed: int, mpp: float = SLIDE_MPP) -> None:
        self.size, self.mpp = size, mpp
        self.layout = band_layout(size, mpp)
        # Offset into a larger demo slide, a multiple of every power of two used below, so that the
        # crop lies inside the demo's unfaded interior (its fade margin is 10 % of its side).
        self.offset = -(-int(0.125 * size) // 1024) * 1024
        big = size + 2 * self.offset
        self.spec = DemoSlideSpec(big, big, mpp, seed)
        self.glass = {}

    def _mask(self, start: int, n: int, ds: int, span: tuple[int, int]) -> np.ndarray:
        centres = (np.arange(start, start + n) + 0.5) * ds  # level-0 px
        return (centres >= span[0]) & (centres < span[1])

    def touches(self, x: int, y: int, n: int, ds: int) -> bool:
        return bool(self._mask(y, n, ds, self.layout["horizontal"]).any()
                    or self._mask(x, n, ds, self.layout["vertical"]).any())

    def rgb(self, x: int, y: int, w: int, h: int, ds: int) -> np.ndarray:
        """Pixels (x, y, w, h) of the level with downsample ``ds`` (a power of two)."""
        rows = self._mask(y, h, ds, self.layout["horizontal"])
        cols = self._mask(x, w, ds, self.layout["vertical"])
        inside = rows[:, None] | cols[None, :]
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS_RGB
        if inside.any():
            o = self.offset // ds
            tissue = self.spec.rgb(x + o, y + o, w, h, self.mpp * ds)
            out[inside] = tissue[inside]
        return out

    def tile_bytes(self, tx: int, ty: int, ds: int) -> bytes:
        x, y = tx * TILE, ty * TILE
        if not self.touches(x, y, TILE, ds):
            if ds not in self.glass:
                self.glass[ds] = _encode(np.full((TILE, TILE, 3), GLASS_RGB, np.uint8))
            return self.glass[ds]
        return _encode(self.rgb(x, y, TILE, TILE, ds))


def _level_tiles(content: BandedSlide, dims: tuple[int, int], ds: int, workers: int):
    """Encoded tiles of one level in row-major order; band tiles rendered ahead on a thread pool."""
    w, h = dims
    coords = [(tx, ty) for ty in range(-(-h // TILE)) for tx in range(-(-w // TILE))]
    window = 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        queue: deque = deque()
        it = iter(coords)
        done = False
        while True:
            while not done and len(queue) < window:
                c = next(it, None)
                if c is None:
                    done = True
                    break
                if content.touches(c[0] * TILE, c[1] * TILE, TILE, ds):
                    queue.append(pool.submit(content.tile_bytes, c[0], c[1], ds))
                else:
                    queue.append(content.tile_bytes(c[0], c[1], ds))
            if not queue:
                return
            item = queue.popleft()
            yield item.result() if hasattr(item, "result") else item


def build_slide(path: Path, size: int, seed: int = 0, workers: int = 2) -> dict:
    """Write the banded slide (module docstring) to ``path``; returns facts about it."""
    import tifffile

    t0 = time.perf_counter()
    content = BandedSlide(size, seed)
    dims = _levels(size, size)
    mpp = SLIDE_MPP
    head = f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE})"
    desc0 = (f"{head} JPEG/RGB Q={QUALITY}|AppMag = {10 / mpp:g}|MPP = {mpp:g}|Filename = banded-demo"
             f"|Title = wsi-espnet banded demo slide (bench_segment_memory), seed {seed}")
    big = size * size * 4 > 2**31
    tmp = path.with_name(path.name + ".tmp")
    jpeg = dict(compression="jpeg", photometric="rgb", metadata=None)
    with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
        for level, d in enumerate(dims):
            ds = 2**level
            desc = desc0 if level == 0 else f"{head} -> {d[0]}x{d[1]} JPEG/RGB Q={QUALITY}"
            tw.write(_level_tiles(content, d, ds, workers), shape=(d[1], d[0], 3), dtype=np.uint8,
                     tile=(TILE, TILE), description=desc, **jpeg,
                     **({"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if level == 0 else {}))
            if level == 0:  # Aperio's stripped thumbnail, second IFD
                tds = 1
                while size / tds > 1024:
                    tds *= 2
                n = -(-size // tds)
                thumb = content.rgb(0, 0, n, n, tds)
                tw.write(thumb, description=f"{head} -> {n}x{n} JPEG/RGB Q={QUALITY}", rowsperstrip=16,
                         compressionargs={"level": QUALITY}, **jpeg)
    os.replace(tmp, path)
    lay = content.layout
    return {"size": size, "seconds": round(time.perf_counter() - t0, 1), "bytes": path.stat().st_size,
            "levels": len(dims), "band_level0_px": [lay["horizontal"], lay["vertical"]],
            "band_um": lay["band_um"], "working_size": lay["working_size"], "grid_cols": lay["grid_cols"],
            "demo_offset_px": content.offset, "seed": seed}


def slide_for(workdir: Path, size: int, seed: int) -> tuple[Path, dict]:
    path = workdir / f"banded_{size}_s{seed}.svs"
    info = path.with_suffix(".json")
    if path.is_file() and info.is_file():
        facts = json.loads(info.read_text())
        lay = band_layout(size)
        if facts.get("band_level0_px") == [list(lay["horizontal"]), list(lay["vertical"])]:
            return path, facts  # the same slide, built before
    facts = build_slide(path, size, seed)
    info.write_text(json.dumps(facts))
    return path, facts


# --------------------------------------------------------------------------- the run
#: Child: the CLI with a timer around the three phases of segment_slide, VmHWM after each.
_CHILD = r"""
import json, sys, time
import wsi_espnet.segment as seg
from wsi_espnet.cli import segment_main

def status():
    with open('/proc/self/status') as f:
        d = dict(line.split(':', 1) for line in f)
    return int(d['VmHWM'].split()[0]) // 1024, int(d['VmRSS'].split()[0]) // 1024

phases = {}
def timed(name, fn):
    def wrapped(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            hwm, rss = status()
            phases[name] = {'s': round(time.perf_counter() - t0, 1), 'hwm_mb': hwm, 'rss_mb': rss}
    return wrapped

seg._tissue = timed('tissue', seg._tissue)
seg._run_grid = timed('tiles', seg._run_grid)
seg._write_outputs = timed('writers', seg._write_outputs)
t0 = time.perf_counter()
rc = segment_main(sys.argv[1:])
hwm, rss = status()
sys.stderr.write('BENCH ' + json.dumps({'rc': rc, 'seconds': round(time.perf_counter() - t0, 1),
                                        'hwm_mb': hwm, 'phases': phases}) + '\n')
sys.exit(rc)
"""


def run_segment(slide: Path, out: Path, model: Path, extras: bool, more: list[str] = ()) -> dict:
    probs, geojson = out.with_suffix(".probs.zarr"), out.with_suffix(".geojson")
    for old in (out, probs, geojson, out.with_name(out.name + ".work")):  # a fresh run, never a resumed one
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _CHILD, str(slide), "--out", str(out), "--model", str(model),
           "--overwrite", "--quiet", "--device", "cpu", *more]
    if extras:
        cmd += ["--probs", str(probs), "--geojson", str(geojson)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"wsi-segment failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("BENCH ")][-1]
    res = json.loads(line[6:])
    res["wall"] = round(wall, 1)
    res["summary"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    res["tiles"] = int(res["summary"].split(": ", 1)[1].split(" tiles")[0]) if " tiles" in res["summary"] else -1
    sizes = {p.name: _size_of(p) for p in out.parent.glob(out.stem + "*")}
    res["outputs_mb"] = {k: round(v / 1e6, 1) for k, v in sizes.items()}
    return res


def _size_of(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000,100000", help="level-0 sides in px, comma-separated")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extras", action="store_true", help="also run with --probs and --geojson")
    p.add_argument("--extras-only", action="store_true", help="only the runs with --probs and --geojson")
    p.add_argument("--repeats", type=int, default=1, help="runs per slide and output set (peak RSS varies a little)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) slides and outputs here")
    p.add_argument("--segment-args", default="", help="more wsi-segment options for every run, e.g. "
                   "--segment-args='--tile 640' (with '=': the value starts with a dash; split on spaces)")
    args = p.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}; pass --model")
    sizes = [int(v) for v in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_segmem_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for size in sizes:
            slide, facts = slide_for(work, size, args.seed)
            print(f"slide {slide.name}: {json.dumps(facts)}", flush=True)
            variants = [True] if args.extras_only else [False, True] if args.extras else [False]
            for extras in [v for v in variants for _ in range(args.repeats)]:
                load = os.getloadavg()[0]
                out = work / f"mask_{size}{'_extras' if extras else ''}.tif"
                res = run_segment(slide, out, args.model, extras, args.segment_args.split())
                res.update(size=size, extras=extras, load=load, slide_mb=facts["bytes"] / 1e6,
                           working=facts["working_size"])
                print(json.dumps(res), flush=True)
                rows.append(res)
    print(f"\nmodel {args.model}, 2 torch threads, CLI defaults; load average (1 min) before each run")
    print("peak RSS (VmHWM) of the child at the end of each phase, MB; phase times in s")
    print("| slide (level 0) | working px | outputs | tiles | peak RSS MB | after tissue | after tiles | "
          "after writers | tissue s | tiles s | writers s | total s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases"]
        print(f"| {r['size']}² | {r['working']}² | {'mask+probs+geojson' if r['extras'] else 'mask'} | {r['tiles']} | "
              f"{r['hwm_mb']} | {ph['tissue']['hwm_mb']} | {ph['tiles']['hwm_mb']} | "
              f"{ph['writers']['hwm_mb']} | {ph['tissue']['s']} | {ph['tiles']['s']} | "
              f"{ph['writers']['s']} | {r['wall']} | {r['load']:.1f} |")
    for extras in (False, True):
        sel: dict = {}
        for r in rows:
            if r["extras"] == extras:
                sel.setdefault(r["size"], []).append(r["hwm_mb"])
        if len(sel) >= 2:
            lo, hi = min(sel), max(sel)
            d = int(statistics.median(sel[hi]) - statistics.median(sel[lo]))
            worst = max(sel[hi]) - min(sel[lo])
            print(f"peak RSS {hi}² - {lo}² ({'with extras' if extras else 'mask only'}): median {d} MB "
                  f"({'PASS' if d < 200 else 'FAIL'} < 200 MB); largest minus smallest over the runs {worst} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
