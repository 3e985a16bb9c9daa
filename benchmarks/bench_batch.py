"""Archive throughput of wsi-batch, and what the Dask layer costs per slide.

Writes N demo slides, then times:

* ``loop T``: ``segment_slide`` called in a loop (one engine, T PyTorch threads) in a fresh Python
  process tuned as ``wsi-segment`` tunes itself: what a lab would write without Dask, and the baseline;
* ``dask 1xT``: the same slides through ``run_batch`` on a warm LocalCluster of one worker process
  with T PyTorch threads: the same compute, so the difference is the Dask layer (task submission,
  scheduling, result transfer, the worker's own threads, the per-slide done-check and report
  rewrite);
* ``dask WxT``: W worker processes sharing the cores (the scaling to report); the warm clusters'
  workers are tuned as wsi-batch tunes those of its own LocalCluster; ``dask WxT untuned``
  (``--untuned-workers``) leaves them as Dask starts them, as wsi-batch leaves a cluster you give it;
* ``cold dask WxT``: ``run_batch`` from nothing: cluster start, worker imports and model loads included;
* ``dask 1xT dflt`` (``--compare-defaults``): as ``dask 1xT`` but with Dask's default worker settings
  rather than wsi-batch's :data:`~pipelines.batch.QUIET_CLUSTER`;
* ``model alone``: only ``predict_proba`` on the archive's very tiles (read beforehand, batched as
  ``segment_slide`` batches them), on every core, in a fresh process tuned as ``wsi-segment`` tunes
  itself: the archive's end-to-end ratio is this time over a configuration's wall time (the issue's
  throughput measure, for a lab's archive rather than one slide).

"Warm" clusters have run one slide per worker first, so every worker has its model loaded, as in the
steady state of a long archive.  Each configuration runs ``--repeat`` times, interleaved with its
loop, and the best run counts.

Two clocks.  Wall time is what a user waits, but on a shared machine it measures the neighbours as
much as us.  CPU time (user + system of every process involved: for Dask the driver with its
scheduler, the nannies and the workers) is the work done, and much steadier; the Dask overhead is
given in both.

    python benchmarks/bench_batch.py                        # 6 slides of 2048x1536 at 0.5 µm/px
    python benchmarks/bench_batch.py --slides 16 --size 4096 3072 --workers 1 2 4
    python benchmarks/bench_batch.py --slides 4 --size 8192 8192 --no-cold   # the archive's ratio
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

Timing = dict  # {"wall": s, "cpu": s, "tiles": n}

# Starting a LocalCluster sets Dask's worker environment in *this* process's os.environ and leaves it
# there (MALLOC_TRIM_THRESHOLD_=65536, OMP_NUM_THREADS=1, ...); a loop started afterwards with it ran
# 2x slower.  The baselines run in fresh processes with the environment this one started with.
CLEAN_ENV = dict(os.environ)


def make_slides(folder: Path, n: int, size: tuple[int, int], mpp: float) -> list[Path]:
    from wsi_espnet.demo import write_demo_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"case{i % 3}" / f"slide{i:03d}.svs"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            write_demo_slide(path, *size, mpp=mpp, seed=100 + i)
        paths.append(path)
    return paths


def make_model(path: Path, p: int, q: int) -> Path:
    import wsi_espnet

    if not path.exists():
        wsi_espnet.save_checkpoint(path, wsi_espnet.ESPNet(8, p, q), wsi_espnet.load_config("breast_biopsy"))
    return path


def _tree_cpu() -> float:
    """CPU seconds of this process and all its descendants, alive or ended (a cold run's workers
    have exited by the time it returns; ended children count through getrusage)."""
    import resource

    import psutil

    me = psutil.Process()
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ended.ru_utime + ended.ru_stime
    for proc in [me, *me.children(recursive=True)]:  # nannies live in this process; workers are children
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def loop_in_this_process(slides_root: Path, out: Path, model: Path, tile: int | None, threads: int) -> Timing:
    from wsi_espnet.runtime import tune_for_inference

    tune_for_inference()  # as wsi-segment and wsi-batch's own workers do (before torch is imported)
    import torch

    from wsi_espnet.engine import make_engine
    from wsi_espnet.segment import SegmentOptions, segment_slide

    torch.set_num_threads(threads)
    engine = make_engine(model, "torch", "cpu")
    slides = sorted(slides_root.rglob("*.svs"))
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    tiles = 0
    for s in slides:
        opts = SegmentOptions(tile=tile, device="cpu", progress=False)
        tiles += segment_slide(s, out / f"{s.stem}.mask.tif", model, opts, engine=engine).tiles
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "tiles": tiles}


def model_alone_in_this_process(slides_root: Path, model: Path, tile: int | None, threads: int) -> Timing:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_segment_throughput import model_alone, the_tiles  # tunes this process, as wsi-segment does

    import torch

    from wsi_espnet.engine import make_engine
    from wsi_espnet.schedule import default_batch

    torch.set_num_threads(threads)
    engine = make_engine(model, "torch", "cpu")
    cfg = engine.config.slide
    timing = {"wall": 0.0, "cpu": 0.0, "tiles": 0}
    for i, s in enumerate(sorted(slides_root.rglob("*.svs"))):
        _, pixels = the_tiles(s, engine, tile or cfg.tile, cfg.overlap)
        if i == 0:
            engine.predict_proba(pixels[:2])  # warm-up
        alone = model_alone(engine, pixels, default_batch(engine.device))  # the workers' batches (one thread each)
        wall, cpu = alone["alone"], alone["alone_cpu"]
        timing = {"wall": timing["wall"] + wall, "cpu": timing["cpu"] + cpu, "tiles": timing["tiles"] + len(pixels)}
    return timing


def time_model_alone(slides_root: Path, model: Path, tile: int | None, threads: int) -> Timing:
    cmd = [sys.executable, __file__, "--alone-only", str(slides_root), str(model), str(tile or 0), str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=CLEAN_ENV).stdout.splitlines()[-1])


def time_loop(slides_root: Path, out: Path, model: Path, tile: int | None, threads: int) -> Timing:
    """The loop in a fresh process, so neither this process's cluster nor its imports are counted."""
    cmd = [sys.executable, __file__, "--loop-only", str(slides_root), str(out), str(model), str(tile or 0),
           str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=CLEAN_ENV).stdout.splitlines()[-1])


def time_batch(slides_root: Path, out: Path, model: Path, tile: int | None, scheduler: str | None,
               workers: int, threads: int, schedule: str = "auto") -> Timing:
    from pipelines.batch import BatchOptions, run_batch

    shutil.rmtree(out, ignore_errors=True)
    opts = BatchOptions(model=str(model), scheduler=scheduler, workers=workers, threads_per_worker=threads,
                        tile=tile, device="cpu", schedule=schedule, progress=False)
    t0, c0 = time.perf_counter(), _tree_cpu()
    summary = run_batch([slides_root], out, opts, log=lambda msg: None)
    timing = {"wall": time.perf_counter() - t0, "cpu": _tree_cpu() - c0, "tiles": summary.tiles}
    if summary.failed or summary.done != summary.total:
        raise RuntimeError(f"batch did not finish cleanly: {summary.lines()}")
    return timing


def warm_cluster(workers: int, threads: int, warm_slide: Path, model: Path, tile: int | None, scratch: Path,
                 quiet: bool = True, tune: bool = True):
    import dask
    from distributed import Client, LocalCluster

    from pipelines.batch import _TASK_FIELDS, QUIET_CLUSTER, process_slide
    from wsi_espnet.segment import SegmentOptions

    with dask.config.set(QUIET_CLUSTER if quiet else {}):  # as wsi-batch starts its LocalCluster
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    # A task as wsi-batch makes one (the same fields), to warm each worker up (imports, model load).
    options = SegmentOptions(tile=tile, batch=8, device="cpu")
    spec = {"slide": str(warm_slide), "model": str(model), "torch_threads": threads,
            "segment": {name: getattr(options, name) for name in _TASK_FIELDS}}
    with Client(cluster) as client:
        if tune:  # as wsi-batch tunes the workers of its own LocalCluster, before torch is imported there
            from wsi_espnet.runtime import tune_for_inference

            client.run(tune_for_inference)
        futures = []
        for i, w in enumerate(client.scheduler_info()["workers"]):
            s = dict(spec, outputs={"mask": str(scratch / f"warm{i}.mask.tif")})
            futures.append(client.submit(process_slide, s, workers=[w], pure=False))
        client.gather(futures)
    return cluster


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--loop-only":
        root, out, model, tile, threads = argv[1:6]
        print(json.dumps(loop_in_this_process(Path(root), Path(out), Path(model), int(tile) or None, int(threads))))
        return 0
    if argv and argv[0] == "--alone-only":
        root, model, tile, threads = argv[1:5]
        print(json.dumps(model_alone_in_this_process(Path(root), Path(model), int(tile) or None, int(threads))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, nargs=2, default=(2048, 1536), metavar=("W", "H"))
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile", type=int, help="tile size (default: the model config's, 512)")
    ap.add_argument("--pq", type=int, nargs=2, default=(2, 8), metavar=("P", "Q"),
                    help="ESPNet p and q of the random-weight model (default 2 8, the breast_biopsy config's)")
    ap.add_argument("--model", type=Path, help="a model file instead of the random-weight one")
    ap.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    ap.add_argument("--overhead-threads", type=int, nargs="+", default=(1,),
                    help="PyTorch threads of the loop / 1-worker pairs that measure the Dask layer (default 1)")
    ap.add_argument("--threads-per-worker", type=int,
                    help="PyTorch threads of each Dask worker (default: cores / workers; more oversubscribes)")
    ap.add_argument("--schedules", default="auto",
                    help="comma list of wsi-batch --schedule values, each timed on every Dask configuration")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold runs")
    ap.add_argument("--compare-defaults", action="store_true",
                    help="also time the 1-worker pairs with Dask's default worker settings (profiler on)")
    ap.add_argument("--untuned-workers", action="store_true",
                    help="also time workers left as Dask starts them, as wsi-batch leaves a cluster you give it")
    ap.add_argument("--dir", type=Path, help="work folder, kept (default: a temporary one)")
    args = ap.parse_args(argv)
    from wsi_espnet.schedule import SCHEDULES

    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad or not schedules:
        ap.error(f"--schedules: {', '.join(bad) or 'none given'}: use {', '.join(SCHEDULES)}")

    from wsi_espnet.engine import available_cores

    cores = available_cores()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_batch_"))
    slides = make_slides(work / "slides", args.slides, tuple(args.size), args.mpp)
    warm_slide = make_slides(work / "warm", 1, (512, 512), args.mpp)[0]
    model = args.model or make_model(work / f"espnet_p{args.pq[0]}_q{args.pq[1]}.pt", *args.pq)
    n = len(slides)
    print(f"{n} demo slides {args.size[0]}x{args.size[1]} at {args.mpp} µm/px, model {model.name}, "
          f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)

    results: dict[str, list[Timing]] = {}

    def record(name: str, timing: Timing) -> None:
        results.setdefault(name, []).append(timing)
        print(f"  {name:<18} wall {timing['wall']:7.2f} s  cpu {timing['cpu']:7.2f} s  ({timing['tiles']} tiles)",
              flush=True)

    def threads_of(workers: int) -> int:
        return args.threads_per_worker or max(1, cores // workers)

    if not args.no_cold:
        for w in args.workers:
            t = threads_of(w)
            record(f"cold dask {w}x{t}", time_batch(work / "slides", work / "out_cold", model, args.tile, None, w, t))

    configs = sorted({(w, threads_of(w)) for w in args.workers} | {(1, t) for t in args.overhead_threads})
    runs = [(w, t, True, True) for w, t in configs]
    if args.compare_defaults:
        runs += [(1, t, False, True) for t in args.overhead_threads]
    if args.untuned_workers:
        runs += [(w, t, True, False) for w, t in configs]
    for w, t, quiet, tune in runs:
        record("model alone", time_model_alone(work / "slides", model, args.tile, cores))
        cluster = warm_cluster(w, t, warm_slide, model, args.tile, work, quiet=quiet, tune=tune)
        name = f"dask {w}x{t}" + ("" if quiet else " dflt") + ("" if tune else " untuned")
        try:
            for _ in range(args.repeat):
                if w == 1 and tune:
                    record(f"loop {t}", time_loop(work / "slides", work / "out_loop", model, args.tile, t))
                for sched in schedules:
                    record(name + ("" if sched == "auto" else f" {sched}"),
                           time_batch(work / "slides", work / f"out_{w}x{t}", model, args.tile,
                                      cluster.scheduler_address, w, t, sched))
        finally:
            cluster.close()

    best = {name: {k: min(r[k] for r in runs) for k in ("wall", "cpu")} | {"tiles": runs[0]["tiles"]}
            for name, runs in results.items()}
    print(f"\nbest of {args.repeat} (configuration: W worker processes x T PyTorch threads)")
    print(f"{'configuration':<18} {'wall s':>8} {'slides/hour':>12} {'tiles/s':>8} {'CPU s':>8} {'CPU s/slide':>12}")
    for name, b in best.items():
        print(f"{name:<18} {b['wall']:8.2f} {n / b['wall'] * 3600:12.0f} {b['tiles'] / b['wall']:8.1f} "
              f"{b['cpu']:8.2f} {b['cpu'] / n:12.3f}")
    alone = best["model alone"]
    print(f"\narchive end to end / model alone on the same {alone['tiles']} tiles ({cores} threads, "
          f"{alone['wall']:.2f} s), target >= 0.9:")
    for name, b in best.items():
        if name != "model alone" and not name.startswith("cold"):
            print(f"  {name:<18} {alone['wall'] / b['wall']:.3f}")
    print()
    pairs = [(t, f"dask 1x{t}") for t in sorted({t for w, t in configs if w == 1})]
    pairs += [(t, f"dask 1x{t} dflt") for t in args.overhead_threads if args.compare_defaults]
    for t, name in pairs:
        if name not in best or f"loop {t}" not in best:  # not timed under the auto schedule
            continue
        loop, dask = best[f"loop {t}"], best[name]
        print(f"Dask layer, {name} vs a loop with {t} thread(s): "
              f"CPU {dask['cpu'] / loop['cpu'] - 1:+.1%} ({(dask['cpu'] - loop['cpu']) / n * 1000:+.0f} ms/slide), "
              f"wall {dask['wall'] / loop['wall'] - 1:+.1%} ({(dask['wall'] - loop['wall']) / n * 1000:+.0f} ms/slide); "
              "target < 5%")
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes share the machine)")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
