"""Region reads through wsi_espnet.slide: tiles/s per backend and resolution path.

    python benchmarks/bench_demo_read.py [--slide S.svs] [--size 8192] [--tiles 200] [--tile 512]

Reads random tiles of the virtual image with ``read_at_mpp`` at 0.5, 1.0 and 2.0 µm/px (demo levels
0, 1, 2 read as they are) and at 0.7 and 1.3 µm/px (fractional area resampling from the level below),
through OpenSlide and tifffile, from a demo slide written first unless ``--slide`` is given.
Single thread; the OS page cache is warm after the first pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

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
    print(f"{'backend':>10} {'mpp':>5} {'level':>5} {'tiles/s':>8} {'MB/s out':>9} {'ms/tile':>8}")
    rng = np.random.default_rng(0)
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as s:
            for mpp in (0.5, 0.7, 1.0, 1.3, 2.0):
                w, h = s.size_at_mpp(mpp)
                xs = rng.integers(0, max(1, w - args.tile), args.tiles)
                ys = rng.integers(0, max(1, h - args.tile), args.tiles)
                s.read_at_mpp(int(xs[0]), int(ys[0]), args.tile, args.tile, mpp)
                t0 = time.perf_counter()
                for x, y in zip(xs, ys):
                    s.read_at_mpp(int(x), int(y), args.tile, args.tile, mpp)
                dt = time.perf_counter() - t0
                level = s.level_for_downsample(mpp / s.mpp)
                mb = args.tiles * args.tile * args.tile * 3 / 1e6
                print(f"{backend:>10} {mpp:>5.1f} {level:>5} {args.tiles / dt:>8.1f} {mb / dt:>9.1f} "
                      f"{dt / args.tiles * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
