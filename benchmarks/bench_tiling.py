"""Scale benchmark of `wsi-espnet tile`: a 100k x 100k demo slide tiled at 1 µm/px.

What it shows (issue 3, "Must show: scale"): peak RSS stays under 1 GB however large the slide,
patches per second on the machine's cores, and where the time goes (read, decode, resample,
compress, write).

The slide.  Rendering all 10^10 pixels of the demo slide (``wsi-espnet demo-slide``) takes about an
hour of CPU; what this benchmark measures does not depend on every tile being different, so the
slide is assembled from the demo slide's own parts: its tissue layout (the demo slide's class map at
128 µm/px, so tissue and glass sit where the demo slide has them) and, per pyramid level, a pool of
real demo-slide tiles rendered at that level's resolution and JPEG-encoded once.  Each 256 x 256 tile
of a level finer than 8 µm/px is a pool tile where the layout has tissue and a glass tile elsewhere;
the levels from 8 µm/px down are rendered in full (they are small), so tissue detection sees the demo
slide's real outline.  The file is a
real tiled-JPEG Aperio SVS (BigTIFF, 10 levels), opened by OpenSlide as vendor aperio with its mpp;
every patch read decodes real JPEG tiles from disk, as with a scanner's file.

The run.  ``wsi-espnet tile`` runs in a child process (so its peak RSS is its own), with
``--workers`` threads; then a profiling pass over a sample of the written patches times each stage
alone, single-threaded: reading the compressed tile bytes from the file, decoding them (imagecodecs
libjpeg-turbo, as OpenSlide does), the reader's whole ``read_at_mpp`` (read + decode + compose +
resample), compressing a patch with the store's codec, and writing the compressed chunk to disk.

    python benchmarks/bench_tiling.py                     # 100000 x 100000, 2 workers
    python benchmarks/bench_tiling.py --size 20000        # a quicker run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_espnet.demo import BACKGROUND, DemoSlideSpec  # noqa: E402
from wsi_espnet.patchstore import ZSTD_LEVEL  # noqa: E402

TILE = 256
LAYOUT_MPP = 128.0
#: Levels at this resolution or coarser are rendered tile by tile from the demo slide (cheap there,
#: and what tissue detection reads); finer levels are pooled.
RENDER_FROM_MPP = 8.0
POOL = 24
QUALITY = 90


def _levels(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while max(dims[-1]) > TILE:
        w, h = dims[-1]
        dims.append((-(-w // 2), -(-h // 2)))
    return dims


def _encode(tile: np.ndarray) -> bytes:
    import imagecodecs

    # Exactly what tifffile does for compression="jpeg", photometric="rgb": YCbCr 4:2:0.
    return bytes(imagecodecs.jpeg_encode(tile, level=QUALITY, colorspace="RGB", outcolorspace="YCBCR",
                                         subsampling=(2, 2)))


def build_slide(path: Path, size: int, mpp: float = 0.5, seed: int = 0) -> dict:
    """Write the pooled demo slide (see the module docstring); returns facts about it."""
    import tifffile

    t0 = time.perf_counter()
    spec = DemoSlideSpec(size, size, mpp, seed)
    lw, lh = spec.size_at_mpp(LAYOUT_MPP)
    layout = spec.labels(0, 0, lw, lh, LAYOUT_MPP) != BACKGROUND  # tissue where the demo slide has it
    ys, xs = np.nonzero(layout)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(xs), size=min(POOL, len(xs)), replace=False)
    gy, gx = np.nonzero(~layout)
    dims = _levels(size, size)
    pools, glass = [], []
    for level in range(len(dims)):
        lmpp = mpp * 2**level
        scale = LAYOUT_MPP / lmpp  # level px per layout px
        pool = [_encode(spec.rgb(int(xs[i] * scale), int(ys[i] * scale), TILE, TILE, lmpp)) for i in picks]
        pools.append(pool)
        glass.append(_encode(spec.rgb(int(gx[0] * scale), int(gy[0] * scale), TILE, TILE, lmpp)))

    def rendered(level: int):
        from concurrent.futures import ThreadPoolExecutor

        w, h = dims[level]
        lmpp = mpp * 2**level
        coords = [(tx * TILE, ty * TILE) for ty in range(-(-h // TILE)) for tx in range(-(-w // TILE))]
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            yield from pool.map(lambda c: _encode(spec.rgb(c[0], c[1], TILE, TILE, lmpp)), coords)

    def tiles(level: int):
        if mpp * 2**level >= RENDER_FROM_MPP:
            yield from rendered(level)
            return
        w, h = dims[level]
        footprint = TILE * mpp * 2**level / LAYOUT_MPP  # layout px per tile
        for ty in range(-(-h // TILE)):
            y0, y1 = int(ty * footprint), max(int(ty * footprint) + 1, int((ty + 1) * footprint))
            for tx in range(-(-w // TILE)):
                x0, x1 = int(tx * footprint), max(int(tx * footprint) + 1, int((tx + 1) * footprint))
                if layout[y0:y1, x0:x1].any():
                    yield pools[level][(tx * 7919 + ty * 104729) % len(pools[level])]
                else:
                    yield glass[level]

    desc0 = (f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) "
             f"JPEG/RGB Q={QUALITY}|AppMag = {10 / mpp:g}|MPP = {mpp:g}|Title = wsi-espnet pooled demo slide")
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level, (w, h) in enumerate(dims):
            desc = desc0 if level == 0 else f"Aperio Image Library v12.0.15 \r\n{size}x{size} -> {w}x{h} JPEG/RGB Q={QUALITY}"
            tw.write(tiles(level), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                     photometric="rgb", description=desc, metadata=None,
                     **({"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if level == 0 else {}))
    os.replace(tmp, path)
    return {"seconds": round(time.perf_counter() - t0, 1), "bytes": path.stat().st_size,
            "layout_tissue_fraction": float(layout.mean()), "levels": len(dims)}


#: The child reports its own peak RSS (VmHWM, per address space, so it excludes the memory of this
#: process that a fork would otherwise lend it: ru_maxrss survives exec and would count it).
_CHILD = """
import sys
from wsi_espnet.cli import main
rc = main(sys.argv[1:])
with open('/proc/self/status') as f:
    hwm = [line.split()[1] for line in f if line.startswith('VmHWM')]
sys.stderr.write(f'VMHWM_KB {hwm[0]}\\n')
sys.exit(rc)
"""


def run_tile(slide: Path, out: Path, workers: int, mpp_out: float, tile: int) -> dict:
    """`wsi-espnet tile` in a child process: wall time and the child's own peak RSS."""
    cmd = [sys.executable, "-c", _CHILD, "tile", str(slide), "--out", str(out), "--mpp-out", str(mpp_out),
           "--tile", str(tile), "--workers", str(workers), "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"tile failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    hwm = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB")]
    return {"wall_s": wall, "peak_rss_mb": int(hwm[0]) / 1024.0}


def profile_stages(slide_path: Path, store: Path, sample: int, mpp_out: float) -> dict[str, float]:
    """Seconds per patch of each stage, measured alone on ``sample`` patches of the store."""
    import imagecodecs
    import tifffile
    import zarr
    from numcodecs import Zstd

    from wsi_espnet.slide import open_slide

    g = zarr.open_group(str(store), mode="r")
    n = g["patches"].shape[0]
    idx = np.linspace(0, n - 1, min(sample, n)).astype(int)
    xy = g["xy"][...][idx]
    tile = int(g.attrs["tile"])
    times = {"read": 0.0, "decode": 0.0, "reader": 0.0, "compress": 0.0, "write": 0.0}
    codec = Zstd(level=ZSTD_LEVEL)  # what the store's ZstdCodec runs
    scratch = Path(tempfile.mkdtemp(dir=store.parent))
    with open_slide(slide_path) as slide, tifffile.TiffFile(slide_path) as tif:
        ds = mpp_out / slide.mpp
        level = slide.level_for_downsample(ds)
        page = tif.pages[level]  # no thumbnail IFD in this file: IFD index = level
        lds = slide.level_downsamples[level]
        offsets, counts = page.dataoffsets, page.databytecounts
        tiles_across = -(-page.imagewidth // page.tilewidth)
        fd = os.open(slide_path, os.O_RDONLY)
        try:
            for k, (x, y) in enumerate(xy):
                # The level's tiles under this patch's source rectangle.
                f = ds / lds
                sx0, sy0 = int(x * f), int(y * f)
                sx1, sy1 = int(np.ceil((x + tile) * f)), int(np.ceil((y + tile) * f))
                ids = [ty * tiles_across + tx for ty in range(sy0 // TILE, (sy1 - 1) // TILE + 1)
                       for tx in range(sx0 // TILE, (sx1 - 1) // TILE + 1)]
                t0 = time.perf_counter()
                blobs = [os.pread(fd, counts[i], offsets[i]) for i in ids]
                t1 = time.perf_counter()
                for b in blobs:
                    imagecodecs.jpeg_decode(b)
                t2 = time.perf_counter()
                patch = slide.read_at_mpp(int(x), int(y), tile, tile, mpp_out)
                t3 = time.perf_counter()
                enc = codec.encode(patch)
                t4 = time.perf_counter()
                with open(scratch / f"{k}", "wb") as fh:
                    fh.write(enc)
                t5 = time.perf_counter()
                times["read"] += t1 - t0
                times["decode"] += t2 - t1
                times["reader"] += t3 - t2
                times["compress"] += t4 - t3
                times["write"] += t5 - t4
        finally:
            os.close(fd)
            shutil.rmtree(scratch)
    return {k: v / len(idx) for k, v in times.items()} | {"sample": len(idx), "level": level}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="slide side in pixels at 0.5 µm/px (default 100000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mpp-out", type=float, default=1.0)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--sample", type=int, default=200, help="patches in the per-stage profile")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-espnet-bench")
    ap.add_argument("--keep", action="store_true", help="keep the patch store (the slide is always kept)")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"pooled-demo-{args.size}.svs"
    if slide.exists():
        built = {"seconds": 0.0, "bytes": slide.stat().st_size, "layout_tissue_fraction": float("nan"), "levels": 0}
        print(f"reusing {slide}")
    else:
        print(f"building {slide} ...", flush=True)
        built = build_slide(slide, args.size)
    out = args.workdir / f"patches-{args.size}.zarr"
    tiled = run_tile(slide, out, args.workers, args.mpp_out, args.tile)
    import zarr

    g = zarr.open_group(str(out), mode="r")
    n = g["patches"].shape[0]
    run = dict(g.attrs["run"])
    store_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    stages = profile_stages(slide, out, args.sample, args.mpp_out)
    if not args.keep:
        shutil.rmtree(out)

    cpu = os.cpu_count()
    print()
    print(f"slide: {args.size} x {args.size} px at 0.5 µm/px, pooled demo SVS, {built['bytes'] / 1e9:.2f} GB"
          + (f", built in {built['seconds']:.0f} s, layout tissue {built['layout_tissue_fraction']:.0%}" if built["seconds"] else ""))
    print(f"tiling: {args.tile}x{args.tile} at {args.mpp_out} µm/px, threshold 0.5, {args.workers} workers on {cpu} CPUs")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| patches written | {n} of {g.attrs['grid']['n_positions']} grid positions |")
    print(f"| wall time, whole command | {tiled['wall_s']:.1f} s |")
    print(f"| wall time, patch writing | {run['write_wall_s']:.1f} s |")
    print(f"| patches/s (writing phase) | {run['patches_per_s']:.1f} |")
    print(f"| patches/s (whole command) | {n / tiled['wall_s']:.1f} |")
    print(f"| peak RSS | {tiled['peak_rss_mb']:.0f} MB |")
    print(f"| store size | {store_bytes / 1e9:.2f} GB ({store_bytes / max(n, 1) / 1e3:.0f} kB/patch, raw {args.tile**2 * 3 / 1e3:.0f} kB) |")
    print(f"| tissue detection + grid + hash (wall - writing) | {run['wall_s'] - run['write_wall_s']:.1f} s |")
    print()
    ms = {k: stages[k] * 1e3 for k in ("read", "decode", "reader", "compress", "write")}
    resample = max(ms["reader"] - ms["read"] - ms["decode"], 0.0)
    total = ms["reader"] + ms["compress"] + ms["write"]
    print(f"where the time goes: one thread, mean over {stages['sample']} patches, level {stages['level']}")
    print()
    print("| stage | ms/patch | share |")
    print("|---|---|---|")
    for name, value in (
        ("read: compressed JPEG tile bytes from the file", ms["read"]),
        ("decode: JPEG tiles to pixels (libjpeg-turbo)", ms["decode"]),
        ("reader beyond read+decode: OpenSlide paint/ARGB->RGBA/PIL, wrapper, resample", resample),
        (f"compress: zstd-{ZSTD_LEVEL} of the patch", ms["compress"]),
        ("write: chunk file to disk", ms["write"]),
    ):
        print(f"| {name} | {value:.2f} | {value / total:.0%} |")
    print(f"| total | {total:.2f} | 100% |")
    print()
    print(f"store's own thread-seconds: read {run['read_s']:.1f} s, compress+write {run['store_s']:.1f} s "
          f"({run['read_s'] / max(n, 1) * 1e3:.1f} / {run['store_s'] / max(n, 1) * 1e3:.1f} ms per patch per thread)")
    print(json.dumps({"n": n, "wall_s": round(tiled["wall_s"], 2), "peak_rss_mb": round(tiled["peak_rss_mb"]),
                      "patches_per_s": run["patches_per_s"], "stages_ms": {k: round(v, 3) for k, v in ms.items()}}))


if __name__ == "__main__":
    main()
