"""Write demo slides of growing size and print a table: seconds, MB/s of raw pixels, file size, peak RSS.

    python benchmarks/bench_demo_write.py --sizes 4096 20000 [100000] [--workers 2] [--keep DIR]

Raw MB/s counts every pyramid level's uncompressed RGB bytes (level 0 plus about a third more), the work
the writer really does.  Peak RSS is the process high-water mark (ru_maxrss) after each size, so it must
stay flat as the size grows: the slide is rendered tile by tile, never held.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from wsi_espnet.demo import _pyramid, write_demo_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 20000])
    parser.add_argument("--workers", type=int, default=None, help="render threads (default: cores, max 4)")
    parser.add_argument("--fmt", choices=["svs", "ome"], default="svs")
    parser.add_argument("--keep", type=Path, help="write here and keep the slides (default: temp, deleted)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_demo_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}  workers: {args.workers or 'auto'}  format: {args.fmt}")
    print(f"{'size':>15} {'levels':>6} {'seconds':>9} {'raw MB/s':>9} {'Mpx/s':>7} {'file MB':>9} {'peak RSS MB':>11}")
    for n in args.sizes:
        path = folder / (f"demo_{n}.svs" if args.fmt == "svs" else f"demo_{n}.ome.tif")
        dims = _pyramid(n, n, 256)
        raw = sum(w * h * 3 for w, h in dims)
        t0 = time.perf_counter()
        write_demo_slide(path, n, n, fmt=args.fmt, workers=args.workers, overwrite=True)
        dt = time.perf_counter() - t0
        size = path.stat().st_size
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{f'{n}x{n}':>15} {len(dims):>6} {dt:>9.1f} {raw / dt / 1e6:>9.1f} {raw / 3 / dt / 1e6:>7.2f} "
              f"{size / 1e6:>9.1f} {rss:>11.0f}", flush=True)
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
