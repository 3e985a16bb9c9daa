"""Segment an archive of slides on Dask: ``wsi-batch INPUT... --out DIR``.

Every slide is one Dask task that calls :func:`wsi_espnet.segment.segment_slide`.  The unit of work
is the slide because that is what fails independently (a corrupt file, a worker killed for memory)
and what resumes independently (``segment_slide`` keeps its state beside its output).

* Cluster.  By default a ``LocalCluster`` of worker *processes*, one slide per process at a time, with
  the machine's cores shared out as PyTorch threads; or any existing scheduler (``--scheduler``), so a
  lab's SLURM or Kubernetes Dask cluster runs the same command.  With CUDA every task asks for the
  Dask resource ``GPU: 1``, so a GPU never runs two slides at once.
* Faults.  A slide the user must fix (:class:`~wsi_espnet.errors.UserError`: unreadable, truncated,
  no pixel size) is reported at once and not retried.  Any other exception is retried by Dask up to
  ``--retries`` times; a worker that dies (killed, out of memory, crashed in native code) has its slide
  rescheduled on another worker up to ``--retries`` times (``allowed_failures`` of the scheduler we
  start).  A retried slide resumes from its ``.work`` folder, so nothing is done twice.
* Idempotence.  Whether a slide is done is read from its outputs (:mod:`pipelines.archive`), so a
  re-run skips finished slides, resumes partial ones, and a slide named twice runs once.
* Report.  ``OUT/report.csv`` and ``.json`` (:mod:`pipelines.report`) are rewritten after every slide.

Paths are shared: the driver and all workers must see the slides and OUT at the same paths (a shared
file system on a cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from distributed.diagnostics.plugin import WorkerPlugin

from wsi_espnet.engine import available_cores
from wsi_espnet.errors import ModelFileError, OutputBusyError, OutputLostError, UserError
from wsi_espnet.outputs import discard_folder, exclusive_output
from wsi_espnet.schedule import SCHEDULES

from .archive import (DEFAULT_PATTERNS, OUTPUT_SUFFIXES, Archive, SlideJob, find_slides, output_state,
                      outputs_state, work_folder)
from .report import BatchReport, check_report_target, one_line

EXTRA_OUTPUTS = ("geojson", "overlay", "probs")
#: Dask settings of the LocalCluster we start.  Dask's background machinery (the event-loop watchdog
#: ticking every 20 ms in every process, the statistical profiler sampling every 10 ms, the system
#: monitor, work stealing every 100 ms) costs about 4% of a core per worker and driver even when idle,
#: and competes with the slide for the GIL; on a busy machine that was most of the Dask layer's cost
#: (benchmarks/bench_batch.py).  What it feeds (the dashboard's profile page, blocked-loop warnings
#: within 20 ms, rebalancing of queued tasks that the scheduler's queuing makes unnecessary) is not
#: what a batch of slides needs; with these settings idle cost is about 1% of a core.
QUIET_CLUSTER = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.scheduler.work-stealing": False,
}
WORKER_MEMORY_GIB = 3  # what one slide process may need at most (model, band buffers, mask writer)
# A slide whose outputs another run is making (an earlier batch's task still running on the cluster):
# checked every BUSY_POLL_S, and taken as that run leaves it; a failed row after BUSY_WAIT_S.
BUSY_POLL_S = 2.0
BUSY_WAIT_S = 2 * 3600.0


@dataclass
class BatchOptions:
    """The batch's settings; the per-slide ones (``mpp``…``tissue_threshold``) can be overridden by
    a manifest's columns."""

    model: str | None = None
    scheduler: str | None = None  # address of an existing Dask scheduler; None = start a LocalCluster
    workers: int | None = None  # local worker processes (with --scheduler: wait for this many)
    threads_per_worker: int | None = None  # PyTorch threads per worker process; None = cores / workers
    gpus: int | None = None  # local GPU workers; None = every visible GPU when the device allows CUDA
    retries: int = 2
    patterns: Sequence[str] = DEFAULT_PATTERNS
    geojson: bool = False
    geojson_min_area: float = 0.0  # µm² (see SegmentOptions)
    overlay: bool = False
    probs: bool = False
    mpp: float | None = None
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None  # None: wsi_espnet.schedule.default_batch
    schedule: str = "auto"  # SegmentOptions.schedule, for every slide
    tissue_threshold: float | None = None
    device: str = "auto"
    backend: str = "torch"
    reader_threads: int = 4
    report: Path | None = None  # CSV path; the JSON goes beside it.  None = OUT/report.csv
    overwrite: bool = False  # redo slides whose outputs are complete
    progress: bool = True
    wait_for_workers_s: float = 600.0

    @property
    def extras(self) -> list[str]:
        return [kind for kind in EXTRA_OUTPUTS if getattr(self, kind)]


@dataclass
class BatchSummary:
    total: int
    done: int
    skipped: int
    failed: int
    pending: int
    seconds: float
    tiles: int
    report_csv: Path
    report_json: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    dashboard: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.pending) else 0

    def lines(self) -> list[str]:
        rate = self.tiles / self.seconds if self.seconds > 0 else 0.0
        out = [f"{self.total} slides: {self.done} done, {self.skipped} skipped, {self.failed} failed"
               + (f", {self.pending} not run" if self.pending else "")
               + f" in {self.seconds:.1f} s ({self.tiles} tiles, {rate:.1f} tiles/s)"]
        for r in self.rows:
            if r["status"] == "failed":
                error = r.get("error") or "unknown error"
                out.append(f"failed: {error}" if r["slide"] in error else f"failed: {r['slide']}: {error}")
            elif r.get("warning"):
                out.append(f"warning: {r['slide']}: {r['warning']}")
        out.append(f"report: {self.report_csv} and {self.report_json}")
        return out


# ---------------------------------------------------------------------------------------------
# The task: runs on a worker, one slide


_ENGINES: dict[tuple[str, str, str], Any] = {}


def _engine(model: str | None, backend: str, device: str):
    """The worker's loaded model, kept for the next slide: loading costs more than a small slide."""
    from wsi_espnet.engine import make_engine

    key = (str(model), backend, device)
    if key not in _ENGINES:
        _ENGINES.clear()  # one model per worker process; a new one replaces the old
        _ENGINES[key] = make_engine(model, backend=backend, device=device)
    return _ENGINES[key]


def _torch_threads(spec: dict) -> int | None:
    """Threads for this worker: fixed by the driver, or this host's cores shared by its workers."""
    if spec.get("torch_threads"):
        return int(spec["torch_threads"])
    per_host = spec.get("workers_per_host") or {}
    try:
        from distributed import get_worker

        host = get_worker().address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    except (ImportError, ValueError):
        return None
    if host in per_host:
        return max(1, available_cores() // int(per_host[host]))
    return None


def _set_torch_threads(threads: int | None) -> None:
    """Dask's nanny starts workers with OMP_NUM_THREADS=1; the worker's share of cores is set here."""
    if not threads:
        return
    try:
        import torch
    except ImportError:  # an ONNX Runtime install without PyTorch
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def process_slide(spec: dict) -> dict:
    """Segment one slide as ``spec`` says; return its report row.

    A :class:`UserError` becomes a ``failed`` row rather than an exception, because Dask retries
    exceptions and a corrupt file stays corrupt.  Everything else propagates, for Dask to retry.
    """
    from wsi_espnet.runtime import retained_memory, tune_for_inference
    from wsi_espnet.segment import SegmentOptions, segment_slide

    t0 = time.perf_counter()
    row: dict[str, Any] = {"slide": spec["slide"], "worker": f"{socket.gethostname()}:{os.getpid()}"}
    if spec.get("tune_process"):  # a worker process of our own LocalCluster, there to run the model
        tune_for_inference()
    _set_torch_threads(_torch_threads(spec))
    outputs = spec["outputs"]
    seg = spec["segment"]
    try:
        engine = _engine(spec.get("model"), seg["backend"], seg["device"])
        options = SegmentOptions(**seg, probs=outputs.get("probs"), geojson=outputs.get("geojson"),
                                 overlay=outputs.get("overlay"), overwrite=True, progress=False)
        waited = 0.0
        while True:
            try:
                # Someone else's worker is tuned for the task only (Dask starts workers with settings that
                # halve the model's speed); a worker of our own LocalCluster was tuned for good above.
                with contextlib.nullcontext() if spec.get("tune_process") else retained_memory():
                    result = segment_slide(spec["slide"], outputs["mask"], spec.get("model"), options, engine=engine)
                break
            except OutputBusyError:
                # Another run is making this slide: most often this batch's own task from a run that was
                # stopped (a driver killed or interrupted while its cluster's workers ran on) and then
                # started again.  Wait for it rather than fail the slide, then take what it made.
                if waited >= BUSY_WAIT_S:
                    raise
                time.sleep(BUSY_POLL_S)
                waited += BUSY_POLL_S
                if not spec.get("redo") and outputs_state(outputs) == "done":
                    row.update(status="done", error="", outputs=outputs, seconds=round(time.perf_counter() - t0, 3),
                               waited_s=round(waited, 1),
                               warning=f"made by another run that held it while this task waited {waited:.0f} s")
                    return row
    except UserError as exc:
        if not isinstance(exc, (OutputBusyError, OutputLostError)):  # the slide's own fault: it stays so
            _discard_work(Path(outputs["mask"]))
        row.update(status="failed", error=one_line(str(exc)), error_type=type(exc).__name__,
                   seconds=round(time.perf_counter() - t0, 3))
        return row
    row.update(status="done", error="", tiles=result.tiles, tiles_run=result.tiles_run, grid_tiles=result.grid_tiles,
               seconds=round(result.seconds, 3), tissue_mm2=result.tissue_mm2, mpp=result.mpp,
               size=list(result.size), class_mm2=result.class_mm2, outputs=result.outputs,
               resumed_from_row=result.resumed_from_row, warning="; ".join(result.warnings),
               schedule=result.schedule, batch=result.batch, waited_s=round(waited, 1))
    return row


def _discard_work(mask: Path) -> None:
    """After a user error the slide (or an option) is wrong and stays wrong: its partial work is
    worthless, and a fixed file would not resume it anyway (the work folder is tied to the file's size
    and mtime).  Under the output's lock, so that a run that started on it meanwhile keeps its work;
    and never on :class:`OutputBusyError`, whose work folder belongs to the live run that holds it."""
    try:
        with exclusive_output(mask):
            discard_folder(work_folder(mask))
    except UserError:
        pass


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class LocalPlan:
    workers: int
    torch_threads: int
    gpus: int


def plan_local_cluster(n_slides: int, cores: int, memory_bytes: int, workers: int | None = None,
                       threads: int | None = None, gpus: int = 0) -> LocalPlan:
    """Size a LocalCluster to the machine.  GPUs: one worker per GPU.  CPU: one single-threaded worker
    per core, as many as memory allows and no more than slides: whole slides in parallel need no
    synchronisation, while PyTorch's intra-op threads wait on each other at every layer (and a slide's
    serial parts, tissue detection and mask writing, leave a core idle); left-over cores go to
    PyTorch threads (benchmarks/bench_batch.py measures both ways)."""
    if gpus:
        n = workers or gpus
    elif workers:
        n = workers
    else:
        by_memory = max(1, memory_bytes // (WORKER_MEMORY_GIB << 30))
        n = max(1, min(cores, by_memory, n_slides))
    return LocalPlan(workers=n, torch_threads=threads or max(1, cores // n), gpus=gpus)


def _visible_gpus(device: str) -> int:
    if device == "cpu":
        return 0
    try:
        import torch
    except ImportError:
        return 0

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class PinGPU(WorkerPlugin):
    """Worker plugin: each local worker process sees one GPU, chosen by its name (0, 1, …), so N
    workers on N GPUs never share one.  Set before the worker's first CUDA call."""

    name = "wsi-batch-pin-gpu"

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def setup(self, worker) -> None:
        try:
            index = int(worker.name) % self.gpus
        except (TypeError, ValueError):
            return
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)


def _dashboard_line(link: str) -> str:
    try:
        import bokeh  # noqa: F401  (the dashboard needs it; it is not a dependency of ours)
    except ImportError:
        return "Dask dashboard: not available (pip install bokeh to get one)"
    return f"Dask dashboard: {link}" if link else "Dask dashboard: not available"


# Run in each worker process of our LocalCluster as it starts (a Dask preload given as source).
# * Ctrl-C at a terminal reaches every process of the job, and a worker would die printing a
#   traceback while this process is already stopping them in order (and saying so in one line).
# * The scheduler lives in this process: when it stops (Ctrl-C, or an error said in one line), a
#   worker whose heartbeat was in flight logs the closed connection as an ERROR with a traceback
#   (seen about once in 10-25 interrupts on a loaded machine).  The scheduler going away is this
#   process's own doing, so that one message is dropped; every other worker log is left as it is.
# * A slide's warnings (InputWarning) travel in its report row and this process prints them, one
#   line each (BatchSummary.lines); printed by the worker too, they came as Python's two-line warning.
HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat."
_WORKER_PRELOAD = f"""
import logging, signal, warnings
from wsi_espnet.errors import InputWarning
signal.signal(signal.SIGINT, signal.SIG_IGN)
logging.getLogger("distributed.worker").addFilter(lambda record: record.getMessage() != {HEARTBEAT_LOST!r})
warnings.filterwarnings("ignore", category=InputWarning)
"""


@contextlib.contextmanager
def dask_client(opts: BatchOptions, n_slides: int, log: Callable[[str], None]) -> Iterator[tuple[Any, dict]]:
    """A connected Client and the task settings that depend on the cluster (resources, threads)."""
    import dask
    from distributed import Client, LocalCluster

    if opts.scheduler:
        try:
            client = Client(opts.scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {opts.scheduler}: {one_line(str(exc))}") from None
        with client:
            log(f"scheduler: {opts.scheduler}")
            log(_dashboard_line(client.dashboard_link))
            want = opts.workers or 1
            if len(client.scheduler_info()["workers"]) < want:
                log(f"waiting for {want} worker(s) to join…")
                try:
                    client.wait_for_workers(want, timeout=opts.wait_for_workers_s)
                except TimeoutError:
                    raise UserError(f"fewer than {want} worker(s) joined {opts.scheduler} within "
                                    f"{opts.wait_for_workers_s:.0f} s") from None
            workers = client.scheduler_info()["workers"].values()
            gpu = opts.device.startswith("cuda")
            if gpu and not any(w.get("resources", {}).get("GPU") for w in workers):
                raise UserError("--device cuda: no worker declares a GPU; start them with "
                                "`dask worker SCHEDULER --resources GPU=1` (one per GPU)")
            per_host: dict[str, int] = {}
            for w in workers:
                per_host[w["host"]] = per_host.get(w["host"], 0) + 1
            yield client, {"device": opts.device, "resources": {"GPU": 1} if gpu else None,
                           "torch_threads": opts.threads_per_worker, "workers_per_host": per_host,
                           "tune_process": False}  # someone else's workers: their process settings stay
        return

    gpus = opts.gpus if opts.gpus is not None else _visible_gpus(opts.device)
    if opts.device.startswith("cuda") and not gpus:
        raise UserError("--device cuda asked for, but no GPU is visible here")
    import psutil

    plan = plan_local_cluster(n_slides, available_cores(), psutil.virtual_memory().total, opts.workers,
                              opts.threads_per_worker, gpus)
    try:
        import bokeh  # noqa: F401

        dashboard = ":8787"
    except ImportError:  # no dashboard; the scheduler's HTTP endpoints then take any free port
        dashboard = ":0"
    with dask.config.set(QUIET_CLUSTER):  # the nannies hand this config to the worker processes
        cluster = LocalCluster(n_workers=plan.workers, threads_per_worker=1, processes=True,
                               resources={"GPU": 1} if gpus else None, dashboard_address=dashboard,
                               preload=[_WORKER_PRELOAD],
                               scheduler_kwargs={"allowed_failures": opts.retries}, silence_logs=logging.ERROR)
    with cluster, Client(cluster) as client:
        if gpus:
            client.register_plugin(PinGPU(gpus))
        log(f"LocalCluster: {plan.workers} worker process(es) x {plan.torch_threads} torch thread(s)"
            + (f", {gpus} GPU(s)" if gpus else "") + f" at {cluster.scheduler_address}")
        log(_dashboard_line(client.dashboard_link))
        device = ("cuda" if opts.device in ("auto", "cuda") else opts.device) if gpus else (
            "cpu" if opts.device == "auto" else opts.device)
        try:
            yield client, {"device": device, "resources": {"GPU": 1} if gpus else None,
                           "torch_threads": plan.torch_threads, "workers_per_host": {}, "tune_process": True}
        except BaseException:
            # Interrupted (or failed): the workers are stopped mid-task, and the nannies log that as
            # errors with tracebacks the user need not read; what happened is said in one line.
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
            raise


# ---------------------------------------------------------------------------------------------
# The driver


def _validate(opts: BatchOptions, jobs: Sequence[SlideJob] = ()) -> None:
    """Every mistake in the invocation, once, before a cluster starts: a bad option would otherwise
    fail every slide of the archive in turn (``wsi-segment``'s own checks, on the options each
    slide gets, with the model's tile where none is given)."""
    if opts.model is not None and not Path(opts.model).is_file():
        raise UserError(f"--model {opts.model}: no such file")
    checks = [("--retries", opts.retries, 0), ("--workers", opts.workers, 1),
              ("--threads-per-worker", opts.threads_per_worker, 1), ("--gpus", opts.gpus, 0),
              ("--reader-threads", opts.reader_threads, 1)]
    for name, value, low in checks:
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    from wsi_espnet.segment import check_options

    model_tile = _model_tile(opts.model, opts.backend)
    for job in [None, *jobs]:  # the batch's own options, then each manifest row's
        if job is not None and not job.options:
            continue
        seg = _segment_options(opts, job.options if job else {})
        if seg.tile is None and seg.overlap is not None and model_tile is not None:
            seg.tile = model_tile
        try:
            check_options(seg)
        except UserError as exc:
            raise UserError(f"{job.source}: {job.slide.name}: {exc}" if job else str(exc)) from None


#: The fields of ``SegmentOptions`` a task carries (its outputs travel apart, as paths of the job).
_TASK_FIELDS = ("mpp", "tile", "overlap", "batch", "schedule", "tissue_threshold", "device", "backend", "workers",
                "geojson_min_area")


def _segment_options(opts: BatchOptions, overrides: dict | None = None, device: str | None = None):
    """The options of ``wsi-segment`` that a slide of this batch gets (its manifest row's first;
    ``device``: the one the cluster chose, where it chose)."""
    from wsi_espnet.segment import SegmentOptions

    seg = SegmentOptions(mpp=opts.mpp, tile=opts.tile, overlap=opts.overlap, batch=opts.batch, schedule=opts.schedule,
                         tissue_threshold=opts.tissue_threshold, device=device or opts.device, backend=opts.backend,
                         workers=opts.reader_threads, geojson_min_area=opts.geojson_min_area)
    for key, value in (overrides or {}).items():
        setattr(seg, key, value)
    return seg


@functools.lru_cache(maxsize=4)
def _model_tile(model: str | os.PathLike | None, backend: str) -> int | None:
    """The model's tile side, for an overlap given without a tile.  A PyTorch model is loaded here,
    once, so that a file that is not a model stops the batch before any slide runs (every slide
    would fail the same way); an ONNX model is first opened by a worker."""
    if backend != "torch":
        return None
    from wsi_espnet.checkpoint import load_model

    return int(load_model(model).config.slide.tile)


def _task_spec(job: SlideJob, opts: BatchOptions, cluster: dict) -> dict:
    options = _segment_options(opts, job.options, device=cluster["device"])
    seg = {name: getattr(options, name) for name in _TASK_FIELDS}
    return {"slide": str(job.slide), "outputs": {k: str(v) for k, v in job.outputs(opts.extras).items()},
            "model": str(opts.model) if opts.model else None, "segment": seg,
            "torch_threads": cluster["torch_threads"], "workers_per_host": cluster["workers_per_host"],
            "tune_process": cluster.get("tune_process", False),
            "redo": opts.overwrite}  # --overwrite: what another run made meanwhile is made again


def _task_key(job: SlideJob, spec: dict) -> str:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"segment-{job.stem.name}-{digest}"


def _failed_row(slide: str, exc: BaseException, tb: Any) -> dict:
    from distributed import KilledWorker

    row: dict[str, Any] = {"slide": slide, "status": "failed", "error_type": type(exc).__name__}
    if isinstance(exc, KilledWorker):
        row["error"] = (f"the worker died running this slide {exc.allowed_failures + 1} times (killed, out of "
                        f"memory, or crashed in native code); last worker {exc.last_worker.address}")
    else:
        row["error"] = one_line(f"{type(exc).__name__}: {exc}")
        if tb is not None:
            row["traceback"] = "".join(traceback.format_tb(tb))
    return row


def _skipped_row(job: SlideJob, opts: BatchOptions, previous: dict | None) -> dict:
    """A skipped slide keeps the numbers of the run that made its outputs, when that run's report is
    at hand."""
    row: dict[str, Any] = {}
    if previous and previous.get("status") in ("done", "skipped"):
        row.update(previous)
    row.update(slide=str(job.slide), status="skipped", error="",
               outputs={k: str(v) for k, v in job.outputs(opts.extras).items()})
    row.pop("traceback", None)
    return row


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="slide", desc="slides", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr, smoothing=0.0)


def run_batch(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              options: BatchOptions | None = None, log: Callable[[str], None] | None = None) -> BatchSummary:
    """Segment every slide the inputs name into ``out_dir``; see the module docstring.

    Returns the summary (``exit_code`` 0 when every slide is done or skipped, 1 when some failed).
    Raises :class:`UserError` for a mistake in the invocation (nothing found, a bad manifest, a model
    file that cannot be loaded), before or instead of running anything else.
    """
    opts = options or BatchOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _validate(opts)
    out = Path(out_dir).expanduser().resolve()
    archive = find_slides(inputs, out, opts.patterns)
    _validate(opts, archive.jobs)  # the manifest's per-slide options too, and the model's tile
    for note in archive.warnings:
        log(f"warning: {note}")
    if archive.duplicates:
        log(f"{len(archive.duplicates)} slide(s) listed more than once: each runs once")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: not writable")
    csv_path = Path(opts.report).expanduser().resolve() if opts.report else out / "report.csv"
    if csv_path.suffix.lower() != ".csv":  # --report x.json: the CSV goes beside it, not over it
        csv_path = csv_path.with_suffix(".csv")
    for path in (csv_path, csv_path.with_suffix(".json")):
        check_report_target(path)
    # One batch per report: a second wsi-batch on the same --out (the same command started twice)
    # stops here with one line (exit 75) instead of racing the first slide by slide.
    with exclusive_output(csv_path):
        return _run_archive(inputs, out, archive, csv_path, opts, log)


def _run_archive(inputs: Sequence[str | os.PathLike], out: Path, archive: Archive, csv_path: Path, opts: BatchOptions,
                 log: Callable[[str], None]) -> BatchSummary:
    """:func:`run_batch` once its arguments are checked and the report's lock is held."""
    meta = {"inputs": [str(i) for i in inputs], "out": str(out), "model": opts.model,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "options": {k: v for k, v in asdict(opts).items() if k not in ("report", "patterns")}}
    report = BatchReport(csv_path, [str(j.slide) for j in archive.jobs], meta=meta)
    previous = report.previous_rows()
    report.keep_earlier(previous)

    todo: list[SlideJob] = []
    for job in archive.jobs:
        state = output_state(job, opts.extras)
        if state == "done" and not opts.overwrite:
            report.set(_skipped_row(job, opts, previous.get(str(job.slide))), write=False)
        else:
            todo.append(job)
    t0 = time.perf_counter()
    tiles = 0
    dashboard = ""
    if todo:
        resumable = sum(work_folder(j.mask).exists() for j in todo)
        log(f"{len(archive.jobs)} slides: {len(archive.jobs) - len(todo)} already done, {len(todo)} to run"
            + (f" ({resumable} resume partial work)" if resumable else ""))
        with dask_client(opts, len(todo), log) as (client, cluster):
            # Only now: a cluster that cannot start (no GPU, no scheduler) leaves the last report as it was.
            report.write()
            dashboard = client.dashboard_link
            tiles = _run_tasks(client, cluster, todo, opts, report, t0)
    report.meta["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.write()
    counts = report.counts()
    return BatchSummary(total=len(report.rows), done=counts["done"], skipped=counts["skipped"],
                        failed=counts["failed"], pending=counts["pending"], seconds=time.perf_counter() - t0,
                        tiles=tiles, report_csv=report.csv_path, report_json=report.json_path,
                        rows=list(report.rows.values()), dashboard=dashboard)


def _slide_bytes(slide: Path) -> int:
    """Size on disk: a file's, or a DICOM slide folder's files together (0 if it went away)."""
    try:
        if slide.is_dir():
            return sum(p.stat().st_size for p in slide.iterdir() if p.is_file())
        return slide.stat().st_size
    except OSError:
        return 0


def _run_tasks(client, cluster: dict, todo: list[SlideJob], opts: BatchOptions, report: BatchReport,
               t0: float) -> int:
    """Submit every slide, then record each as it finishes.  Returns the tiles segmented."""
    from distributed import as_completed

    futures = {}
    for job in todo:
        spec = _task_spec(job, opts, cluster)
        size = _slide_bytes(job.slide)
        # Largest slides first: the archive's last slide to finish is then a small one.
        fut = client.submit(process_slide, spec, key=_task_key(job, spec), retries=opts.retries,
                            resources=cluster["resources"], priority=size // (1 << 20), pure=False)
        futures[fut] = str(job.slide)
    counts = report.counts()
    bar = _progress_bar(len(report.rows), counts["skipped"], opts.progress)
    tiles = 0
    fatal: UserError | None = None
    try:
        for fut in as_completed(futures):
            slide = futures[fut]
            if fut.status == "finished":
                row = fut.result()
            elif fut.status == "cancelled":
                continue
            else:
                row = _failed_row(slide, fut.exception(), fut.traceback())
            fut.release()
            report.set(row)
            if row.get("error_type") == ModelFileError.__name__ and fatal is None:
                # The model is the same for every slide: stop rather than fail them all one by one.
                fatal = ModelFileError(row["error"])
                client.cancel(list(futures))
            tiles += int(row.get("tiles_run") or 0) if row["status"] == "done" else 0  # not a resume's earlier ones
            counts = report.counts()
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(done=counts["done"], failed=counts["failed"], skipped=counts["skipped"],
                            tiles_s=f"{tiles / elapsed:.1f}", refresh=False)
            bar.update(1)
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        bar.close()
    if fatal is not None:
        raise fatal
    return tiles


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a folder (searched recursively), a glob ('scans/**/*.svs', quoted), a slide file, or a CSV "
                        "manifest (column 'slide'; optional " + ", ".join(["out", "mpp", "tile", "overlap", "batch",
                                                                            "tissue_threshold"]) + ")")
    p.add_argument("--out", required=True, type=Path, help="output folder; mirrors the input tree")
    p.add_argument("--model", help="model file (default: the tissue model shipped with the package)")
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786 "
                                       "(default: start a LocalCluster on this machine)")
    g.add_argument("--workers", type=int, help="local worker processes, one slide each (default: one per core, "
                                               "as memory allows, at most one per slide); with --scheduler: wait until this many have joined")
    g.add_argument("--threads-per-worker", type=int, help="PyTorch threads per worker process (default: cores/workers)")
    g.add_argument("--gpus", type=int, help="local GPU workers, one slide per GPU (default: all visible GPUs unless "
                                            "--device cpu)")
    g.add_argument("--retries", type=int, default=2, help="retries of a slide whose worker died or that raised an "
                                                          "unexpected error (default 2); unreadable slides are never retried")
    p.add_argument("--pattern", default=",".join(DEFAULT_PATTERNS),
                   help="comma-separated file patterns for folder inputs (default: %(default)s)")
    p.add_argument("--geojson", action="store_true", help="also write <slide>" + OUTPUT_SUFFIXES["geojson"])
    p.add_argument("--geojson-min-area", type=float, default=0.0, metavar="UM2",
                   help="leave specks smaller than this many µm² out of the GeoJSON, and fill smaller holes (default 0)")
    p.add_argument("--overlay", action="store_true", help="also write <slide>" + OUTPUT_SUFFIXES["overlay"])
    p.add_argument("--probs", action="store_true", help="also write <slide>" + OUTPUT_SUFFIXES["probs"])
    p.add_argument("--mpp", type=float, help="level-0 µm/px for slides that do not record it")
    p.add_argument("--tile", type=int, help="tile side at the model's resolution (default: model config)")
    p.add_argument("--overlap", type=int, help="overlap between tiles (default: model config)")
    p.add_argument("--batch", type=int, help="tiles per model call (default 2 on a CPU, 4 on a GPU, as wsi-segment)")
    p.add_argument("--schedule", default="auto", choices=SCHEDULES,
                   help="how each worker's reading and blending share the CPU with its model, as wsi-segment's "
                   "--schedule (default auto)")
    p.add_argument("--tissue-threshold", type=float, help="minimum tissue fraction of a tile (default: model config)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--reader-threads", type=int, default=4, help="tile reader threads per slide (default 4)")
    p.add_argument("--report", type=Path, help="report CSV (default OUT/report.csv; another suffix is replaced by "
                   ".csv); the JSON goes beside it. An existing file is replaced only if it is an earlier report")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose outputs are already complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> BatchOptions:
    patterns = tuple(p.strip() for p in args.pattern.split(",") if p.strip())
    if not patterns:
        raise UserError("--pattern: give at least one pattern, e.g. '*.svs'")
    return BatchOptions(
        model=args.model, scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
        gpus=args.gpus, retries=args.retries, patterns=patterns, geojson=args.geojson,
        geojson_min_area=args.geojson_min_area, overlay=args.overlay, probs=args.probs, mpp=args.mpp, tile=args.tile,
        overlap=args.overlap, batch=args.batch, schedule=args.schedule,
        tissue_threshold=args.tissue_threshold, device=args.device, backend=args.backend,
        reader_threads=args.reader_threads, report=args.report, overwrite=args.overwrite, progress=not args.quiet)


def run(args: argparse.Namespace) -> int:
    summary = run_batch(args.inputs, args.out, options_from_args(args))
    for line in summary.lines():
        print(line)
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    """``wsi-batch``: exit 0 when every slide is done or skipped, 1 when some failed, 2 for a mistake
    in the invocation (one line on stderr), 130 when interrupted, 143 when terminated (re-run to resume)."""
    from wsi_espnet.cli import CommandParser, run_guarded

    parser = CommandParser(prog="wsi-batch", description="Segment an archive of slides on Dask "
                           "(a local cluster or an existing scheduler).")
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    # Worker processes stopped by Ctrl-C leave semaphores that multiprocessing's resource tracker (a
    # process of its own, started with this environment) cleans up, printing a warning meant for
    # developers; this process is ours, so the filter is set here, not in the library.
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]))
    # As every wsi-espnet command: a mistake, a full disk (rewriting the report) or Ctrl-C is one line.
    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
