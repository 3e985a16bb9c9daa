"""Inference engines: uint8 RGB tiles in, class probabilities out.

The whole-slide pipeline and ``predict`` only talk to this interface, so the same stitching runs on
PyTorch (CPU or CUDA) or on ONNX Runtime on an edge box without PyTorch.  Normalisation happens
inside the engine, from the model's own config, because a model is only correct with the recipe it
was trained with.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from .config import DatasetConfig
from .errors import UserError

# ESPNet's three x2 down- and up-samplings: tile sides must be multiples of it, and grid strides that
# are multiples of it see the image at the phase one pass over it would (segment.stride_note).
NETWORK_STRIDE = 8
# Blending windows kept on a GPU: a stitcher has at most 16 (one per set of kept neighbours).
KEPT_WINDOWS = 32
# Input widths whose normalisation rows are kept (a slide's tiles have one or two).
KEPT_WIDTHS = 32


class Engine(Protocol):
    config: DatasetConfig
    device: str

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, C, H, W) float32 softmax probabilities."""
        ...

    # Optional: predict_split(batch, plans) -> (probabilities, labels): see
    # wsi_espnet.labels.predict_split, which stands in for engines without it.


def available_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this PyTorch has no CUDA device (install a CUDA build: see README)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


class TorchEngine:
    """PyTorch engine.  On CPU it uses the optimised path (folded batch norms, channels_last) when
    available; on CUDA, channels_last and fp16 autocast.  Input normalisation is one multiply-add
    on the device, so only uint8 crosses the host-device boundary."""

    def __init__(self, model, device: str = "auto", optimize: bool = True, amp: bool = True) -> None:
        import torch

        self.device = _resolve_device(device)
        self.config: DatasetConfig = model.config
        self.num_classes = self.config.num_classes
        net = model
        if optimize:
            try:
                from .fastpath import optimize_for_inference
            except ImportError:  # the fast path is an optimisation, never a requirement
                optimize_for_inference = None
            if optimize_for_inference is not None:
                net = optimize_for_inference(model)
        self.net = net.to(self.device).eval()
        self.channels_last = True
        self.net = self.net.to(memory_format=torch.channels_last)
        self.amp = amp and self.device.startswith("cuda")
        scale, shift = self.config.normalization.as_affine()
        bgr = self.config.normalization.channel_order.upper() == "BGR"
        order = [2, 1, 0] if bgr else [0, 1, 2]
        # scale/shift are in model channel order; the gather below reorders the RGB input to match
        # (none for an RGB model).
        self._order = None if order == [0, 1, 2] else torch.tensor(order, device=self.device)
        self._scale = torch.tensor(scale, device=self.device)
        self._shift = torch.tensor(shift, device=self.device)
        self._rows: dict[int, tuple] = {}  # image width -> (scale, shift) along a row of pixels
        self._kept: dict[int, tuple] = {}  # id -> (array, its tensor on the device): see _on_device

    @property
    def cpu_threads(self) -> int:
        """The model's CPU threads (PyTorch's, process-wide; see schedule.cores_free_beside)."""
        import torch

        return torch.get_num_threads()

    @contextlib.contextmanager
    def threads_per_call(self, threads: int) -> Iterator[None]:
        """Run each call on ``threads`` intra-op threads while inside, for calls made side by side
        from several threads (``schedule="streams"``).  PyTorch's setting is process-wide: it is
        restored on exit.  A thread takes the setting at its first parallel operation, so the calling
        threads must start inside the block."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def logits(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device != "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self._order is not None:
            x = x.index_select(3, self._order)
        # Normalised where the pixels lie: (N, H, W, 3) is (N, 3, H, W) in channels_last, so no
        # copy to another layout, with the same products and sums as (x * scale + shift).  Scale and
        # shift run along whole rows of pixels: broadcast over a last axis of 3, the multiply-add
        # is not vectorised (a 2×512² batch: 0.26 against 2.1 ms on a CPU thread).
        n, h, w, _ = x.shape
        scale, shift = self._row_affine(w)
        if x.dtype == torch.float32 and self._order is None and self.device == "cpu":
            x = x.clone()  # still the caller's float array: normalised in place below
        else:
            x = x.float()
        x.view(n * h, w * 3).mul_(scale).add_(shift)
        x = x.permute(0, 3, 1, 2)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            return self.net(x).float()

    def _row_affine(self, width: int) -> tuple:
        """(scale, shift) repeated for a row of ``width`` RGB pixels."""
        row = self._rows.get(width)
        if row is None:
            if len(self._rows) >= KEPT_WIDTHS:  # images of many widths (predict): start over
                self._rows.clear()
            row = self._rows[width] = (self._scale.repeat(width), self._shift.repeat(width))
        return row

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return torch.softmax(self.logits(batch), dim=1).cpu().numpy()

    def predict_split(self, batch: np.ndarray, plans: list) -> tuple[np.ndarray, list]:
        """:func:`wsi_espnet.labels.predict_split`: the softmax only in each tile's span outside its
        box, the argmax of the logits inside the box.  On CPU 3.4-3.7 ms after the network for two 512²
        tiles of 8 classes (span 464², box 416²) against 6.2 ms for ``predict_proba``'s softmax
        (docs/performance.md), and the box's argmax is not read back by another thread from memory.
        On a GPU the labels are taken there and brought back together at the end (one wait)."""
        import torch

        from .labels import class_argmax, outside

        with torch.inference_mode():
            logits = self.logits(batch)
            probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # NCHW, as numpy reads it
            labels = []
            for i, plan in enumerate(plans):
                weights = None if plan.window is None else self._on_device(plan.window)
                for ys, xs in outside(plan.box, plan.span):
                    if weights is None:
                        probs[i, :, ys, xs] = torch.softmax(logits[i, :, ys, xs], dim=0)
                    else:  # the product written where the plain copy would go: no extra pass
                        torch.mul(torch.softmax(logits[i, :, ys, xs], dim=0), weights[ys, xs], out=probs[i, :, ys, xs])
                if plan.box is None:
                    labels.append(None)
                    continue
                y0, y1, x0, x1 = plan.box
                inside = logits[i, :, y0:y1, x0:x1]
                if self.device == "cpu":  # channels_last: copied to planes, class_argmax's 0.2 ms beats torch's 2 ms
                    # numpy's transposing copy, not torch's: 0.5 against 0.6-1.2 ms a 416² box of 8 classes
                    labels.append(class_argmax(np.ascontiguousarray(inside.numpy())))
                else:
                    labels.append(device_argmax(inside))
            if self.device != "cpu":  # every kernel queued: one wait for them all
                labels = [None if lab is None else lab.cpu().numpy() for lab in labels]
            return probs.cpu().numpy(), labels

    def _on_device(self, array: np.ndarray):
        """``array`` as a tensor on the model's device.  The stitcher's windows (a few shared arrays,
        one per kind of neighbourhood) are kept there, so a GPU gets each once."""
        import torch

        if self.device == "cpu":
            return torch.from_numpy(array)  # shares the memory
        kept = self._kept.get(id(array))
        if kept is None or kept[0] is not array:
            if len(self._kept) >= KEPT_WINDOWS:  # another slide's stitcher: start over
                self._kept.clear()
            kept = self._kept[id(array)] = (array, torch.from_numpy(array).to(self.device))
        return kept[1]


def device_argmax(scores):
    """:func:`~wsi_espnet.labels.class_argmax` of a (C, h, w) torch tensor on its own device, as uint8:
    ties to the lower class (torch's argmax returns the first maximum), NaN never wins, a pixel of
    NaN only is class 0."""
    import torch

    return torch.nan_to_num(scores, nan=float("-inf")).argmax(dim=0).to(torch.uint8)


def make_engine(model_path=None, backend: str = "torch", device: str = "auto", optimize: bool = True,
                threads: int | None = None) -> Engine:
    """The engine a CLI asks for: ``backend`` is ``torch`` or ``onnxruntime``.  ``threads``: CPU
    threads for the model (default: one per core); for PyTorch this is process-wide
    (``torch.set_num_threads``)."""
    from .fileid import file_sha256

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if backend == "torch":
        import torch

        from .checkpoint import DEFAULT_MODEL, load_model

        if threads:
            torch.set_num_threads(threads)
        engine: Engine = TorchEngine(load_model(model_path), device=device, optimize=optimize)
        model_path = model_path or DEFAULT_MODEL
    elif backend == "onnxruntime":
        from .onnx_engine import OnnxEngine

        if model_path is None:
            raise UserError("--backend onnxruntime needs --model FILE.onnx (make one with wsi-espnet export)")
        engine = OnnxEngine(model_path, device=device, threads=threads)
    else:
        raise UserError(f"unknown backend {backend!r}: use torch or onnxruntime")
    # Identifies the weights in resume fingerprints: a changed model file never resumes old work.
    engine.model_id = file_sha256(model_path)  # type: ignore[attr-defined]
    return engine
