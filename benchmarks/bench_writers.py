"""Speed and memory of the three output writers on synthetic tissue-like label maps in Zarr.

Each (writer, size) runs in its own process so its peak RSS is its own. The label maps are smooth
blobs of 4 classes with holes (an interpolated random field, thresholded), written block by block so
the benchmark itself never holds a full map.

    python benchmarks/bench_writers.py                 # 4096 and 8192 squared
    python benchmarks/bench_writers.py --sizes 4096 16384
    python benchmarks/bench_writers.py --writers geojson --blob 3 --sizes 4096 8192   # fragmented
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NAMES = ["Background", "Tumor", "Stroma", "Necrosis"]
COLORS = [(255, 255, 255), (200, 0, 0), (0, 150, 0), (90, 60, 20)]


def make_labels(store: Path, n: int, block: int = 2048, seed: int = 0, cell: int = 48):
    """``cell``: blob scale in label pixels (48: tissue-like regions; 2-4: a map in ~10^5-10^6
    specks, the worst case for the GeoJSON writer)."""
    import zarr
    from scipy.ndimage import gaussian_filter, map_coordinates

    coarse = gaussian_filter(np.random.default_rng(seed).random((n // cell + 3, n // cell + 3)), 1.5)
    cuts = np.quantile(coarse, [0.45, 0.7, 0.9])
    z = zarr.create_array(store=str(store), shape=(n, n), chunks=(512, 512), dtype="uint8")
    for y in range(0, n, block):
        for x in range(0, n, block):
            yy, xx = np.mgrid[y: min(y + block, n), x: min(x + block, n)]
            field = map_coordinates(coarse, [yy / cell, xx / cell], order=1)
            z[y: y + block, x: x + block] = np.digitize(field, cuts).astype(np.uint8)
    return z


def run_one(writer: str, store: str, out: str) -> dict:
    import zarr

    labels = zarr.open_array(store, mode="r")
    t0 = time.perf_counter()
    if writer == "mask_tiff":
        from wsi_espnet.mask_tiff import write_mask_tiff

        write_mask_tiff(out, labels, 1.0, NAMES, COLORS, overwrite=True)
        extra = ""
    elif writer == "geojson":
        from wsi_espnet.geojson import write_geojson

        summary = write_geojson(out, labels, 4.0, class_names=NAMES, colors=COLORS, mpp=1.0, overwrite=True)
        extra = f"{sum(c['vertices'] for c in summary['classes'].values())} vertices"
    else:
        from wsi_espnet.overlay import downsample_labels, write_overlay

        small = downsample_labels(labels, 1024)
        thumb = np.full((*small.shape, 3), 230, np.uint8)
        write_overlay(out, thumb, small, COLORS, NAMES, overwrite=True)
        extra = f"{small.shape[1]}x{small.shape[0]} preview"
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bytes": Path(out).stat().st_size, "extra": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--writers", nargs="+", default=["mask_tiff", "geojson", "overlay"])
    parser.add_argument("--blob", type=int, default=48,
                        help="blob scale in label pixels (default 48; 3 makes a map of specks)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return

    print(f"{'writer':<10} {'labels':>12} {'seconds':>8} {'MP/s':>7} {'peak RSS MB':>12} {'file MB':>8}  notes")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            store = Path(tmp) / f"labels{n}.zarr"
            make_labels(store, n, cell=args.blob)
            for writer in args.writers:
                suffix = {"mask_tiff": ".tif", "geojson": ".geojson", "overlay": ".png"}[writer]
                out = Path(tmp) / f"out{n}{suffix}"
                done = subprocess.run([sys.executable, __file__, "--child", writer, str(store), str(out)],
                                      check=True, capture_output=True, text=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{writer:<10} {f'{n}x{n}':>12} {r['seconds']:8.2f} {n * n / 1e6 / r['seconds']:7.1f} "
                      f"{r['peak_rss_mb']:12.0f} {r['bytes'] / 2**20:8.2f}  {r['extra']}", flush=True)
                out.unlink()


if __name__ == "__main__":
    main()
