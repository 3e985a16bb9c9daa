"""Pipelines built on :mod:`wsi_espnet`: whole archives of slides rather than one slide.

:mod:`pipelines.batch` runs :func:`wsi_espnet.segment.segment_slide` over an archive on Dask
(``wsi-batch``); :mod:`pipelines.archive` decides which slides and where their outputs go;
:mod:`pipelines.report` keeps the per-slide report.
"""

from .archive import DEFAULT_PATTERNS, SlideJob, find_slides
from .batch import BatchOptions, BatchSummary, process_slide, run_batch

__all__ = ["DEFAULT_PATTERNS", "BatchOptions", "BatchSummary", "SlideJob", "find_slides", "process_slide",
           "run_batch"]
