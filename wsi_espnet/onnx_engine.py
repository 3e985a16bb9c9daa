"""ONNX Runtime engine: the same :class:`~wsi_espnet.engine.Engine` interface with no PyTorch.

An edge box gets one ``.onnx`` file from ``wsi-espnet export``.  That file is self-contained: the
input normalisation is inside the graph (it takes RGB 0-255 as float32, NHWC, as tiles come off a
slide) and the dataset config (class names, colours, normalisation, slide µm/px and tile size) is
stored as JSON in the model's metadata.  So this module needs only numpy and onnxruntime, and it
must never import torch: ``pip install wsi-espnet[onnx]`` without torch has to run ``predict`` and
``wsi-segment`` through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import DatasetConfig, config_from_dict
from .engine import NETWORK_STRIDE, available_cores
from .errors import ModelFileError, UserError

# Metadata keys written by wsi_espnet.export; the format tag lets a later version refuse (or
# convert) a file whose graph contract it does not know.
ONNX_FORMAT = "wsi-espnet-onnx/1"
KEY_FORMAT = "wsi_espnet.format"
KEY_CONFIG = "wsi_espnet.config"
KEY_ARCH = "wsi_espnet.arch"
KEY_PRECISION = "wsi_espnet.precision"
INPUT_NAME = "rgb"  # float32 RGB 0-255, NHWC
OUTPUT_NAME = "logits"  # float32 NCHW


def read_metadata(session: Any, where: str) -> dict[str, str]:
    """The wsi-espnet metadata of a loaded session; a file without it was not made by ``export``."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get(KEY_FORMAT) != ONNX_FORMAT:
        found = meta.get(KEY_FORMAT)
        if found is None:
            raise ModelFileError(
                f"{where}: an ONNX model without wsi-espnet metadata (no class names or normalisation); "
                "make it with `wsi-espnet export`"
            )
        raise ModelFileError(f"{where}: ONNX format {found!r}, this version reads {ONNX_FORMAT!r}")
    return meta


def _providers(device: str, available: list[str]) -> tuple[str, list[Any]]:
    """(resolved device, provider list) for ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    has_cuda = "CUDAExecutionProvider" in available
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return device, ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if not has_cuda:
            raise UserError(
                "--device cuda asked for, but this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
            )
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
        return device, [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")


def softmax_(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax in place (a (8, C, 512, 512) batch of logits is 8 MB per class; no copies)."""
    logits -= logits.max(axis=axis, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=axis, keepdims=True)
    return logits


class OnnxEngine:
    """Runs a model exported by ``wsi-espnet export`` (float32 or int8) with ONNX Runtime.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when this onnxruntime has it).
    ``threads``: intra-op threads, default every core this process may use.
    ``spin``: let idle intra-op threads spin between calls (ONNX Runtime's default).  Off here: in
    the whole-slide pipeline the same cores read and decode the next tiles between calls, and
    spinning threads steal them (on 2 busy cores: 410 ms a 1024x512 frame with spinning, 285 ms
    without); turn it on for a box that does nothing but inference.
    """

    def __init__(
        self, path: str | os.PathLike, device: str = "auto", threads: int | None = None, spin: bool = False
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--backend onnxruntime needs onnxruntime: pip install 'wsi-espnet[onnx]'") from None
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"model file not found: {self.path}")
        if self.path.is_dir():
            raise ModelFileError(f"model path is a directory, not a file: {self.path}")
        self.device, self._providers = _providers(device, ort.get_available_providers())
        self._spin = spin
        self.cpu_threads = threads or available_cores()  # see schedule.cores_free_beside
        self.session = self._new_session(self.cpu_threads)
        self._per_call: int | None = None  # threads_per_call's setting while inside it
        self._idle: dict[int, list[Any]] = {}  # sessions of so many threads, for calls side by side
        self._lock = threading.Lock()
        self.metadata = read_metadata(self.session, str(self.path))
        try:
            raw = json.loads(self.metadata[KEY_CONFIG])
        except (KeyError, json.JSONDecodeError):
            raise ModelFileError(f"{self.path}: its wsi-espnet config metadata is missing or not JSON") from None
        self.config: DatasetConfig = config_from_dict(raw, where=f"{self.path} (config)")
        self.num_classes = self.config.num_classes
        self.precision = self.metadata.get(KEY_PRECISION, "float32")
        self.input_name = self.session.get_inputs()[0].name
        out = self.session.get_outputs()[0]
        if isinstance(out.shape[1], int) and out.shape[1] != self.num_classes:
            raise ModelFileError(
                f"{self.path}: config lists {self.num_classes} classes but the model has {out.shape[1]} outputs"
            )

    def _new_session(self, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one chain of convolutions: nothing to run side by side
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's warnings about unused initialisers are noise to a user
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=self._providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{self.path}: not a readable ONNX model ({first[:160]})") from None

    @contextlib.contextmanager
    def threads_per_call(self, threads: int) -> Iterator[None]:
        """Run each call on ``threads`` intra-op threads while inside, for calls made side by side
        from several threads (``schedule="streams"``).  ONNX Runtime fixes a session's threads and
        runs concurrent calls of one session on its one thread pool, so each concurrent call gets a
        session of its own, made on first need and kept for later runs (the model is 1.5 MB).
        Measured on 2 cores: two one-thread sessions side by side 16 % faster than one of two."""
        self._per_call = threads
        try:
            yield
        finally:
            self._per_call = None

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        threads = self._per_call
        if threads is None:
            return self.session.run(None, feed)[0]
        with self._lock:
            idle = self._idle.setdefault(threads, [])
            session = idle.pop() if idle else None
        if session is None:
            session = self._new_session(threads)
        try:
            return session.run(None, feed)[0]
        finally:
            with self._lock:
                self._idle[threads].append(session)

    def logits_numpy(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) RGB 0-255 (uint8 or float) -> (N, C, H, W) float32 logits.  H and W must be
        multiples of 8 (pad first: see :func:`wsi_espnet.predict.predict_image`)."""
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected an (N, H, W, 3) RGB batch, got shape {batch.shape}")
        if batch.shape[1] % NETWORK_STRIDE or batch.shape[2] % NETWORK_STRIDE:
            raise ValueError(f"tile sides must be multiples of {NETWORK_STRIDE}, got {batch.shape[2]}x{batch.shape[1]}")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self._run({self.input_name: x})

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) RGB -> (N, C, H, W) float32 softmax probabilities."""
        return softmax_(self.logits_numpy(batch), axis=1)

    def predict_split(self, batch: np.ndarray, plans: list) -> tuple[np.ndarray, list]:
        """:func:`wsi_espnet.labels.predict_split`: the argmax of the logits inside each tile's box,
        the softmax (in place, times the plan's window if it has one) in the rest of its span."""
        from .labels import box_labels, outside

        scores = self.logits_numpy(batch)
        labels = []
        for i, plan in enumerate(plans):
            labels.append(None if plan.box is None else box_labels(scores[i], plan.box))
            for ys, xs in outside(plan.box, plan.span):
                softmax_(scores[i, :, ys, xs], axis=0)
                if plan.window is not None:
                    scores[i, :, ys, xs] *= plan.window[ys, xs]
        return scores, labels

    def __repr__(self) -> str:
        return f"OnnxEngine({str(self.path)!r}, device={self.device!r}, precision={self.precision!r})"
