"""Region reads through wsi_espnet.slide: tiles/s per backend and resolution path.

    python benchmarks/bench_demo_read.py [--slide S.svs] [--size 8192] [--tiles 200] [--tile 512]

Reads random tiles of the virtual image with ``read_at_mpp`` at 0.5, 1.0 and 2.0 µm/px (demo levels
0, 1, 2 read as they are) and at 0.7 and 1.3 µm/px (fractional area resampling from the level below),
and a raster of tiles overlapping by the default overlap at 1 µm/px as segmentation reads them ("grid"), through
OpenSlide and tifffile, each with the tile decoder of ``wsi_espnet.tiff_tiles`` (the default) and
without it (``WSI_ESPNET_TILE_DECODE=0``: OpenSlide's own compositing, tifffile's Zarr store), from
a demo slide written first unless ``--slide`` is given.  Single thread; the OS page cache is warm
after the first pass, the cache of decoded tiles is new for every row.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_espnet.config import SlideSettings
from wsi_espnet.demo import write_demo_slide
from wsi_espnet.slide import open_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    path = args.slide
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="bench_read_")) / "demo.svs"
        write_demo_slide(path, args.size, args.size)
    print(f"slide: {path}")
    print(f"{'backend':>10} {'decode':>6} {'mpp':>5} {'level':>5} {'pattern':>7} {'tiles/s':>8} {'MB/s out':>9} "
          f"{'ms/tile':>8}")
    for backend in ("openslide", "tifffile"):
        for decode in ("tiles", "own"):
            os.environ["WSI_ESPNET_TILE_DECODE"] = "1" if decode == "tiles" else "0"
            rng = np.random.default_rng(0)
            for mpp, pattern in [(0.5, "random"), (0.7, "random"), (1.0, "random"), (1.3, "random"),
                                 (2.0, "random"), (1.0, "grid")]:
                with open_slide(path, backend=backend) as s:  # each row from a cold cache of decoded tiles
                    w, h = s.size_at_mpp(mpp)
                    if pattern == "grid":
                        step = args.tile - SlideSettings().overlap
                        spots = [(x, y) for y in range(0, max(1, h - args.tile), step)
                                 for x in range(0, max(1, w - args.tile), step)][: args.tiles]
                    else:
                        spots = list(zip(rng.integers(0, max(1, w - args.tile), args.tiles).tolist(),
                                         rng.integers(0, max(1, h - args.tile), args.tiles).tolist()))
                    s.read_at_mpp(spots[-1][0], spots[-1][1], args.tile, args.tile, mpp)
                    t0 = time.perf_counter()
                    for x, y in spots:
                        s.read_at_mpp(x, y, args.tile, args.tile, mpp)
                    dt = time.perf_counter() - t0
                    level = s.level_for_downsample(mpp / s.mpp)
                    mb = len(spots) * args.tile * args.tile * 3 / 1e6
                    print(f"{backend:>10} {decode:>6} {mpp:>5.1f} {level:>5} {pattern:>7} {len(spots) / dt:>8.1f} "
                          f"{mb / dt:>9.1f} {dt / len(spots) * 1e3:>8.1f}")
    os.environ.pop("WSI_ESPNET_TILE_DECODE", None)


if __name__ == "__main__":
    main()
