"""Train the demo tissue model from scratch on this machine and score it on held-out demo slides.

    python benchmarks/bench_train_demo.py [--workdir DIR] [--threads N] [overrides ...]

This is the full run behind ``wsi_espnet/weights/tissue_demo.pt``: the demo data (synthetic SVS slides
with their truth exported as QuPath GeoJSON, ``configs/demo_tissue.yaml``) are generated in
``WORKDIR/data/demo_tissue`` if missing, ``wsi-espnet train demo_tissue --make-demo-data --out
runs/demo_tissue`` is run in ``WORKDIR`` (through the same CLI entry point), and the best checkpoint is
scored on the ``test`` split: slides with seeds that neither training nor model selection saw, on the
model's own inference grid (1 µm/px, 512 px tiles, 72 px overlap).

Prints the per-class IoU table, the mIoU on ``val`` (used to pick the epoch) and ``test`` (not used for
anything), and the wall time of each phase.  Timings depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-train-demo"), help="where data/ and runs/ go")
    ap.add_argument("--threads", type=int, help="torch threads, passed on to wsi-espnet train (default: torch's own)")
    ap.add_argument("--copy-to", type=Path, help="copy best.pt here when done (e.g. wsi_espnet/weights/tissue_demo.pt)")
    ap.add_argument("overrides", nargs="*", help="config overrides, as for wsi-espnet train")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from wsi_espnet import cli
    from wsi_espnet.checkpoint import load_model
    from wsi_espnet.config import load_config, with_overrides
    from wsi_espnet.datasets import make_demo_dataset
    from wsi_espnet.evaluate import evaluate_split

    copy_to = args.copy_to.resolve() if args.copy_to is not None else None
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    cfg = with_overrides(load_config("demo_tissue"), list(args.overrides))

    t0 = time.perf_counter()
    make_demo_dataset(cfg.data.root, log=print)
    t_data = time.perf_counter() - t0

    out = Path("runs") / cfg.name
    t0 = time.perf_counter()
    threads = ["--threads", str(args.threads)] if args.threads else []
    rc = cli.main(["train", "demo_tissue", *args.overrides, "--out", str(out), "--make-demo-data", *threads])
    t_train = time.perf_counter() - t0
    if rc:
        return rc

    model = load_model(out / "best.pt")
    t0 = time.perf_counter()
    test = evaluate_split(model, cfg, "test", out / "patches")
    t_eval = time.perf_counter() - t0
    val_miou = model.meta["metrics"]["val_miou"]

    print()
    print(f"held-out demo slides (split 'test', seeds never used in training or model selection), "
          f"{model.config.slide.mpp:g} µm/px, tile {model.config.slide.tile}, overlap {model.config.slide.overlap}:")
    print(test.table(cfg.class_names))
    print()
    print("| phase | wall s |\n|---|---|")
    print(f"| demo data (slides + GeoJSON) | {t_data:.0f} |")
    print(f"| train (stores, ESPNet-C, ESPNet, validation) | {t_train:.0f} |")
    print(f"| evaluate test split | {t_eval:.0f} |")
    print()
    print(f"val mIoU (epoch selection): {val_miou:.4f}   test mIoU: {test.mean_iou():.4f}   "
          f"pixel accuracy (test): {test.pixel_accuracy():.4f}")
    print(f"best checkpoint: {out / 'best.pt'} ({(out / 'best.pt').stat().st_size / 1e6:.2f} MB), "
          f"stage {model.meta['stage']} epoch {model.meta['epoch'] + 1}")
    print(f"command: {model.meta['command']}")
    if copy_to is not None:
        import shutil

        shutil.copyfile(out / "best.pt", copy_to)
        print(f"copied to {copy_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
