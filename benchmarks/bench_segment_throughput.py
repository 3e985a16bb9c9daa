"""End-to-end throughput of whole-slide segmentation against the model alone (issue 4, "Must show:
throughput").

The target: slide pixels per second through ``segment_slide`` divided by the model's own rate on the
same tiles is at least 0.9 on CPU, i.e. reading, decoding, resampling, blending and writing labels
cost under 10 % on top of the network.

* The slide: a demo slide (``write_demo_slide``: tiled-JPEG Aperio SVS), ``--size`` px square at
  0.5 µm/px (default 8192, a 4 x 4 mm biopsy at 20x), segmented at the model's 1 µm/px.
* Model alone: the very tiles ``segment_slide`` runs (same tissue mask, grid, feed order and batch
  composition: ``--batch`` tiles at a time in feed order), read into memory beforehand, then only
  ``engine.predict_proba`` timed over all batches, two ways: one call at a time on all the model's
  threads, and (CPU) two calls side by side on half the threads each, as the ``streams`` schedule
  runs it.  The faster of the two (``model alone s``: both given) is the reference for every ratio:
  the model's own best rate on this machine, whichever way the pipeline runs it: its class
  probabilities for every pixel of every tile, what ``wsi-espnet predict`` computes.  The pipeline
  computes less than that where it can: the softmax only where tiles overlap, the argmax of the logits
  elsewhere (``labels.predict_split``).  So the same is also timed for the network alone, logits out
  (``network alone s``; ``ratio all, against the network`` = that / wall): the strictest reference,
  against which the softmax and the argmax count as the pipeline's.
* End to end: ``segment_slide`` with the same engine object (the model is loaded once, outside the
  timing, as a batch run over many slides does).  Its wall time is split by timing three of its
  functions (``_tissue``: tissue detection; ``_run_grid``: reading, model, blending and label-file
  writes; ``_write_outputs``: the mask TIFF pyramid) so the rate is given with and without writers.
* Rate = working-resolution pixels of the processed tiles (tiles x tile²) / seconds.  Ratios:
  ``tiles`` = model alone / ``_run_grid``; ``no writers`` = model alone / (wall - writers);
  ``all`` = model alone / wall; ``all, against one call``: the same against the model alone one call at
  a time (the reference before the ``streams`` schedule).  The first model-alone run of each batch
  size follows a warm-up batch.
  ``model busy`` = seconds spent in the model's calls (``predict_proba`` or ``predict_split``) during the end-to-end run / (wall - writers):
  both measured in the same run, so it shows how much of the run the model is kept busy whatever
  the machine's load (it does not show the model being slowed by the reader threads' CPU use).
  Under the ``between`` schedule it is below 1 by design: the rest is the time between batches;
  under ``streams`` it adds up both streams, so up to 2.
* ``--profile``: one more end-to-end run (the CLI's default batch, readers and schedule) with
  timers around each stage inside ``_run_grid``: the model's calls and the time spent waiting for
  decoded tiles (on the main thread, or under ``streams`` on the model's threads, added up); on the
  thread that blends, ``BlendStitcher.add`` and ``LabelBand.flush`` (label-file writes, class
  counts); and the reader threads' own busy time (``schedule.read_tile``: read + JPEG decode + resample).
  On 2 cores they compete with each other, and under ``beside`` and ``streams`` with the model.
* ``--schedules``: ``SegmentOptions.schedule`` per run: ``auto`` (the default: on CPU with a torch
  thread per core that is ``streams``), ``streams`` (two model calls side by side, blending on the
  main thread while they run), ``beside`` (reads and blending while the model runs, as on a GPU)
  or ``between`` (between the model's batches).

Runs are interleaved (model alone, then end to end, per configuration) so that a change in the
machine's load hits both sides of a ratio alike.  On a shared machine wall times still swing by tens
of percent from minute to minute, so each row also gives CPU seconds (``time.process_time``: all
threads of this process, so other processes' load does not count): ``CPU ratio`` = model-alone CPU
/ end-to-end CPU (whole ``segment_slide``, writers included) is the pipeline's extra work, the
figure that the wall ratio approaches on an idle machine where the model keeps every core busy.

    python benchmarks/bench_segment_throughput.py                    # batch 4/8/16 x workers 2/4
    python benchmarks/bench_segment_throughput.py --batches 8 --workers 4 --profile
    python benchmarks/bench_segment_throughput.py --batches 4 --workers 4 --torch-threads 1  # a core left free
    python benchmarks/bench_segment_throughput.py --batches 4 --workers 4 --tile 640          # another tile size
    python benchmarks/bench_segment_throughput.py --backend onnxruntime --schedules auto,between  # the edge runtime
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_espnet.runtime import tune_for_inference  # noqa: E402

# As the CLI does (before torch loads): glibc keeps freed memory, OpenMP threads spin less.
TUNED = tune_for_inference() if "--untuned" not in sys.argv else None
import wsi_espnet.segment as seg  # noqa: E402
from wsi_espnet.checkpoint import DEFAULT_MODEL, load_model  # noqa: E402
from wsi_espnet.demo import write_demo_slide  # noqa: E402
from wsi_espnet.engine import make_engine  # noqa: E402
from wsi_espnet.errors import UserError  # noqa: E402
import wsi_espnet.schedule as scheduling  # noqa: E402
from wsi_espnet.schedule import MODEL_STREAMS, feed_batches  # noqa: E402
from wsi_espnet.segment import SegmentOptions, segment_slide  # noqa: E402
from wsi_espnet.slide import open_slide  # noqa: E402
from wsi_espnet.labels import predict_split  # noqa: E402
from wsi_espnet.stitch import feed_bands  # noqa: E402
from wsi_espnet.tiling import tile_grid  # noqa: E402
from wsi_espnet.tissue import detect_tissue  # noqa: E402

SLIDE_MPP = 0.5


def demo_slide(work: Path, size: int, seed: int) -> Path:
    path = work / f"throughput_demo_{size}_s{seed}.svs"
    if not path.is_file():
        t0 = time.perf_counter()
        write_demo_slide(path, size, size, mpp=SLIDE_MPP, seed=seed)
        print(f"wrote {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def the_tiles(slide_path: Path, engine, tile: int, overlap: int) -> tuple[int, np.ndarray]:
    """segment_slide's tiles in its feed order, read beforehand: (number of bands, pixels)."""
    cfg = engine.config.slide
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
        grid = tile_grid(slide.size_at_mpp(cfg.mpp), tile, overlap, cfg.mpp, slide.mpp, tissue,
                         cfg.tissue_threshold, level0_size=slide.dimensions)
        bands = feed_bands(grid)
        (order,), _ = feed_batches(bands, batch=len(grid.tiles))
        return len(bands), np.stack([slide.read_at_mpp(t.x, t.y, t.width, t.height, cfg.mpp) for t in order])


def bench_engine(model: Path, backend: str, device: str, threads: int | None, work: Path):
    """The engine ``wsi-segment --backend`` makes; for onnxruntime a model that is not ``.onnx`` yet is
    exported into ``work`` first (``wsi-espnet export``)."""
    if backend == "onnxruntime" and model.suffix != ".onnx":
        from wsi_espnet.export import export_onnx

        onnx_path = work / f"{model.stem}.onnx"
        if not onnx_path.is_file():
            export_onnx(load_model(model), onnx_path)
        model = onnx_path
    return make_engine(model, backend=backend, device=device, threads=threads)


def network_call(engine):
    """The network alone, logits out (no softmax): PyTorch's ``logits``, ONNX Runtime's ``logits_numpy``."""
    return getattr(engine, "logits_numpy", None) or engine.logits


def model_alone(engine, pixels: np.ndarray, batch: int, call=None) -> dict:
    """Wall and CPU seconds of ``call`` (default ``engine.predict_proba``) over the batches
    segment_slide forms (``feed_batches``: ``batch`` tiles at a time in feed order, across bands),
    run both ways the model can run alone: one call at a time on all its threads (``one``), and on
    CPU also as segment_slide's ``streams`` schedule does (``streams``: MODEL_STREAMS calls side by
    side, each on its share of the threads).  ``alone``/``alone_cpu``: the faster of the two, the
    reference for every ratio."""
    call = call or engine.predict_proba
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(pixels), batch):
        call(pixels[i : i + batch])
    out = {"one": time.perf_counter() - t0, "one_cpu": time.process_time() - c0}
    out["streams"] = out["streams_cpu"] = math.nan
    threads = getattr(engine, "cpu_threads", None) or 1
    if engine.device == "cpu" and threads >= MODEL_STREAMS:
        with engine.threads_per_call(threads // MODEL_STREAMS), \
                ThreadPoolExecutor(MODEL_STREAMS) as pool:
            running: deque = deque()
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, len(pixels), batch):  # at most MODEL_STREAMS calls at once, as segment_slide
                if len(running) == MODEL_STREAMS:
                    running.popleft().result()
                running.append(pool.submit(call, pixels[i : i + batch]))
            for f in running:
                f.result()
            out["streams"], out["streams_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    way = "streams" if out["streams"] < out["one"] else "one"
    out["alone"], out["alone_cpu"] = out[way], out[way + "_cpu"]
    return out


@contextmanager
def phase_timers(times: dict):
    """Time segment_slide's three phases by wrapping them in the module, restored afterwards."""
    saved = {name: getattr(seg, name) for name in ("_tissue", "_run_grid", "_write_outputs")}

    def wrap(name, fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return wrapped

    for name, fn in saved.items():
        setattr(seg, name, wrap(name, fn))
    try:
        yield times
    finally:
        for name, fn in saved.items():
            setattr(seg, name, fn)


class _TimedEngine:
    """The engine, with the seconds spent in predict_proba added up."""

    def __init__(self, engine, prof: dict) -> None:
        self._engine, self._prof = engine, prof
        self.config, self.device = engine.config, engine.device
        self.model_id = getattr(engine, "model_id", "bench")
        self.cpu_threads = getattr(engine, "cpu_threads", None)  # segment's schedule reads it
        if hasattr(engine, "threads_per_call"):
            self.threads_per_call = engine.threads_per_call

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self._engine.predict_proba(batch)
        self._prof["model"] += time.perf_counter() - t0
        return out

    def predict_split(self, batch: np.ndarray, plans: list):
        t0 = time.perf_counter()
        out = predict_split(self._engine, batch, plans)
        self._prof["model"] += time.perf_counter() - t0
        return out


@contextmanager
def stage_timers(prof: dict):
    """Timers inside _run_grid: waiting for tiles, blending, label flushes, reader threads' work."""
    lock = threading.Lock()
    saved = (seg.TileReader, seg.BlendStitcher, seg.LabelBand, scheduling.read_tile)

    class TimedReader(saved[0]):
        def next_batch(self):
            t0 = time.perf_counter()
            try:
                return super().next_batch()
            finally:
                prof["wait_tiles"] += time.perf_counter() - t0

    class TimedStitcher(saved[1]):
        def add(self, *a, **k):
            t0 = time.perf_counter()
            super().add(*a, **k)
            prof["stitch"] += time.perf_counter() - t0

    class TimedBand(saved[2]):
        def flush(self, *a, **k):
            t0 = time.perf_counter()
            out = super().flush(*a, **k)
            prof["flush"] += time.perf_counter() - t0
            return out

    def timed_read(*a, **k):
        t0 = time.perf_counter()
        out = saved[3](*a, **k)
        with lock:
            prof["read_threads"] += time.perf_counter() - t0
        return out

    seg.TileReader, seg.BlendStitcher, seg.LabelBand, scheduling.read_tile = (
        TimedReader, TimedStitcher, TimedBand, timed_read)
    try:
        yield prof
    finally:
        seg.TileReader, seg.BlendStitcher, seg.LabelBand, scheduling.read_tile = saved


def end_to_end(slide: Path, out: Path, engine, batch: int, workers: int, prof: dict | None = None,
               schedule: str = "auto", tile: int | None = None, overlap: int | None = None) -> dict:
    """One ``segment_slide`` run, its phases timed, and the seconds its engine spent in the model."""
    opts = SegmentOptions(batch=batch, workers=workers, overwrite=True, progress=False, schedule=schedule,
                          tile=tile, overlap=overlap)
    times: dict = {}
    prof = prof if prof is not None else {"model": 0.0}
    timed = _TimedEngine(engine, prof)
    t0, c0 = time.perf_counter(), time.process_time()
    with phase_timers(times):
        result = segment_slide(slide, out, options=opts, engine=timed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # A left-over work folder of a killed run would make this a (faster) resumed run.
    assert result.resumed_from_row == 0, f"resumed from tile row {result.resumed_from_row}"
    return {"wall": wall, "cpu": cpu, "tissue": times["_tissue"], "tiles_s": times["_run_grid"],
            "writers": times["_write_outputs"], "tiles": result.tiles, "model_in": prof["model"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: the shipped one)")
    p.add_argument("--size", type=int, default=8192, help="demo slide side at 0.5 µm/px (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="4,8,16")
    p.add_argument("--workers", default="2,4")
    p.add_argument("--schedules", default="auto", help="comma list of SegmentOptions.schedule: auto, streams "
                   "(two model calls side by side), beside (read and blend while the model runs), between "
                   "(between its batches)")
    p.add_argument("--repeats", type=int, default=1, help="end-to-end runs per configuration")
    p.add_argument("--profile", action="store_true", help="also break the default run down by stage")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the slide here")
    p.add_argument("--slide", type=Path, help="measure on this slide instead of a demo slide (e.g. the 100k² "
                   "banded slide of bench_segment_memory.py: most of it background)")
    p.add_argument("--untuned", action="store_true", help="leave the process as a library call finds it "
                   "(no runtime.tune_for_inference, which wsi-segment applies)")
    p.add_argument("--tile", type=int, help="tile side at the working resolution (default: the model's)")
    p.add_argument("--overlap", type=int, help="tile overlap (default: the model's)")
    p.add_argument("--torch-threads", type=int, help="the model's threads: torch's intra-op threads, or the "
                   "onnxruntime session's (default: one per core); fewer leaves cores to reading and blending")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="the engine (onnxruntime: --model may be an .onnx, or a checkpoint exported first)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: on a GPU the model alone includes "
                   "the copies to and from the device, as segment_slide's calls do")
    args = p.parse_args(argv)
    if args.tile is not None and (args.tile < 8 or args.tile % 8):
        p.error(f"--tile {args.tile}: ESPNet needs a positive tile size divisible by 8")
    bad = [v for v in args.schedules.split(",") if v not in scheduling.SCHEDULES]
    if bad:
        p.error(f"--schedules: {', '.join(bad)} is not one of {', '.join(scheduling.SCHEDULES)}")
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}; pass --model")
    if args.slide is not None and not args.slide.is_file():
        p.error(f"--slide {args.slide}: no such file")
    counts = {}
    for name in ("batches", "workers"):
        try:
            counts[name] = [int(v) for v in getattr(args, name).split(",")]
        except ValueError:
            p.error(f"--{name} {getattr(args, name)}: a comma list of whole numbers, e.g. 2,4")
        if min(counts[name]) < 1:
            p.error(f"--{name} {getattr(args, name)}: each at least 1")
    import torch

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            p.error(f"--torch-threads must be at least 1, got {args.torch_threads}")
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="bench_segtp_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            engine = bench_engine(args.model, args.backend, args.device, args.torch_threads, work)
        except UserError as e:
            raise SystemExit(f"error: {e}")
        tile = args.tile or engine.config.slide.tile
        overlap = engine.config.slide.overlap if args.overlap is None else args.overlap
        if not 0 <= overlap <= tile // 2:
            p.error(f"--overlap {overlap}: between 0 and half the tile ({tile // 2})")
        on = torch.cuda.get_device_name(engine.device) if engine.device.startswith("cuda") else "CPU"
        print(f"model {args.model.name} on {on} ({engine.device}), {args.backend} ({torch.__version__}), "
              f"{engine.cpu_threads} model threads, {os.cpu_count()} CPUs, process tuning (as wsi-segment): "
              f"{TUNED or 'off (--untuned)'}", flush=True)
        slide = args.slide or demo_slide(work, args.size, args.seed)
        n_bands, pixels = the_tiles(slide, engine, tile, overlap)
        n = len(pixels)
        mpx = n * tile * tile / 1e6
        print(f"{slide.name}: {n} tissue tiles of {tile}² (overlap {overlap}) in {n_bands} bands ({mpx:.1f} Mpx at 1 µm/px)", flush=True)
        engine.predict_proba(pixels[:2])  # warm-up
        rows = []
        for batch in counts["batches"]:
            if engine.device != "cpu":  # kernels are chosen per input shape on first use
                engine.predict_proba(pixels[:batch])
            for workers in counts["workers"]:
                for _ in range(args.repeats):
                    for schedule in args.schedules.split(","):
                        load = os.getloadavg()[0]
                        alone = model_alone(engine, pixels, batch)
                        net = model_alone(engine, pixels, batch, network_call(engine))
                        alone.update(net=net["alone"], net_cpu=net["alone_cpu"])
                        e2e = end_to_end(slide, work / "mask.tif", engine, batch, workers, schedule=schedule,
                                         tile=tile, overlap=overlap)
                        assert e2e["tiles"] == n, (e2e["tiles"], n)
                        row = {"batch": batch, "workers": workers, "schedule": schedule, **alone,
                               "load": load, **e2e}
                        rows.append(row)
                        print(_fmt(row, mpx), flush=True)
        prof = None
        if args.profile:
            schedule = scheduling.choose_schedule(engine)  # the CLI's defaults
            batch, workers = scheduling.default_batch(engine.device), SegmentOptions().workers
            prof = {"model": 0.0, "wait_tiles": 0.0, "stitch": 0.0, "flush": 0.0, "read_threads": 0.0}
            alone = model_alone(engine, pixels, batch)["alone"]
            with stage_timers(prof):
                e2e = end_to_end(slide, work / "mask.tif", engine, batch, workers, prof, tile=tile, overlap=overlap)
            prof.update(alone=alone, **e2e)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print(HEADER)
    for row in rows:
        print(_fmt(row, mpx))
    by: dict = {}
    for r in rows:
        by.setdefault((r["batch"], r["workers"], r["schedule"]), []).append(r)
    print("\nper configuration, over its runs: the median wall ratio, all (writers included) and without "
          "the writers; best/best: the fastest model-alone run over the fastest end-to-end run (noise on a "
          "shared machine only ever adds time, so the fastest runs are the least disturbed); the median "
          "CPU-time ratio (all)")
    for (b, w, sch), rs in by.items():
        med_all = statistics.median(r["alone"] / r["wall"] for r in rs)
        med = statistics.median(r["alone"] / (r["wall"] - r["writers"]) for r in rs)
        best_all = min(r["alone"] for r in rs) / min(r["wall"] for r in rs)
        best = min(r["alone"] for r in rs) / min(r["wall"] - r["writers"] for r in rs)
        cpu = statistics.median(r["alone_cpu"] / r["cpu"] for r in rs)
        print(f"  batch {b}, readers {w}, schedule {sch}: {len(rs)} runs, median all {med_all:.3f} "
              f"(no writers {med:.3f}), best/best all {best_all:.3f} (no writers {best:.3f}), CPU {cpu:.3f}")
    if prof:
        head = f"\nprofile, batch {batch}, {workers} readers, schedule {schedule}: _run_grid {prof['tiles_s']:.1f} s"
        if schedule == "streams":  # the model's calls overlap each other and the rest
            head += (f"; model calls {prof['model']:.1f} s over {MODEL_STREAMS} streams (alone, just before: "
                     f"{prof['alone']:.1f} s of wall); waiting for tiles {prof['wait_tiles']:.1f} s on the streams")
        else:
            other = prof["tiles_s"] - prof["model"] - prof["wait_tiles"]
            head += (f" = model {prof['model']:.1f} (alone, just before: {prof['alone']:.1f}) + waiting for tiles "
                     f"{prof['wait_tiles']:.1f} + other {other:.1f} (waiting for the blender, the last band)")
        print(head + f"; blending: adds {prof['stitch']:.1f} s + label flush {prof['flush']:.1f} s; "
              f"reader threads busy {prof['read_threads']:.1f} s in all; tissue {prof['tissue']:.1f} s, "
              f"writers {prof['writers']:.1f} s, wall {prof['wall']:.1f} s")
    return 0


HEADER = ("| batch | readers | schedule | tiles | model alone s (one call / streams) | e2e s | tissue s | tiles s | writers s | "
          "model Mpx/s | e2e Mpx/s (no writers) | ratio tiles | ratio no writers | ratio all | "
          "ratio all, against one call | model busy in e2e | CPU s alone / e2e | CPU ratio | "
          "network alone s (CPU s) | ratio all, against the network | load |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(r: dict, mpx: float) -> str:
    nw = r["wall"] - r["writers"]
    return (f"| {r['batch']} | {r['workers']} | {r['schedule']} | {r['tiles']} | {r['one']:.2f} / {r['streams']:.2f} | {r['wall']:.1f} | "
            f"{r['tissue']:.1f} | {r['tiles_s']:.1f} | {r['writers']:.1f} | {mpx / r['alone']:.2f} | "
            f"{mpx / nw:.2f} | {r['alone'] / r['tiles_s']:.3f} | {r['alone'] / nw:.3f} | "
            f"{r['alone'] / r['wall']:.3f} | {r['one'] / r['wall']:.3f} | {r['model_in'] / nw:.3f} | {r['alone_cpu']:.1f} / {r['cpu']:.1f} | {r['alone_cpu'] / r['cpu']:.3f} | "
            f"{r['net']:.2f} ({r['net_cpu']:.1f}) | {r['net'] / r['wall']:.3f} | {r['load']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
