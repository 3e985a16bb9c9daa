"""``wsi-espnet export``: a model file to one self-contained ONNX file, float32 or int8.

The ONNX file is what an edge box without PyTorch runs (see :mod:`wsi_espnet.onnx_engine`), so it
must need nothing else: the input normalisation is part of the graph (input ``rgb``: float32 RGB
0-255, NHWC, any batch, height and width multiples of 8; output ``logits``: float32 NCHW), and the
dataset config rides along as JSON in the model's metadata.  Every export is checked against
PyTorch before it is put in place, at a size other than the one it was traced at, so a broken
dynamic axis fails here rather than on a slide.

The exporter is the TorchScript one (``dynamo=False``): the torch.export-based exporter needs
``onnxscript``, which would be a dependency for this one command, and the TorchScript exporter gives
a graph that matches PyTorch to ~1e-6 relative at every size for this network.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .checkpoint import flush_subnormals_
from .errors import UserError
from .outputs import atomic_file, check_output
from .onnx_engine import (
    INPUT_NAME,
    KEY_ARCH,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_PRECISION,
    ONNX_FORMAT,
    OUTPUT_NAME,
    OnnxEngine,
)

OPSET = 17
TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| over the logits: the bar for float32
TRACE_SHAPE = (1, 64, 64, 3)  # small: tracing cost grows with the sample's size, the graph does not
CHECK_SHAPE = (2, 72, 120, 3)  # differs from the trace in every dynamic axis


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """max |candidate - reference| / max |reference|: one number for "equal up to float rounding"
    that does not blow up where a logit happens to be near zero."""
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(candidate.astype(np.float64) - reference).max()) / scale


def deployable(model):
    """A copy of ``model`` wrapped to take RGB 0-255 NHWC float32 and apply its own normalisation
    (channel reorder, then one multiply-add per channel), so the ONNX file is usable without its
    config; subnormal weights are zeroed (see :func:`flush_subnormals_`)."""
    import copy

    import torch
    from torch import nn

    norm = model.config.normalization
    model = copy.deepcopy(model)
    flush_subnormals_(model)  # load_model already did; a model built in code may not have

    class NormalizedInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            scale, shift = norm.as_affine()
            self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1))
            self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1))
            self.bgr = norm.channel_order.upper() == "BGR"

        def forward(self, rgb: torch.Tensor) -> torch.Tensor:
            x = rgb.permute(0, 3, 1, 2)
            if self.bgr:
                x = x[:, [2, 1, 0]]
            return self.net(x * self.scale + self.shift)

    return NormalizedInput().eval()


def torch_logits(model, batch: np.ndarray) -> np.ndarray:
    """Reference logits straight from the PyTorch model, normalising with the config's own recipe
    (not the graph's multiply-add), so the comparison also checks the in-graph normalisation."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(model.config.normalization.apply(batch).transpose(0, 3, 1, 2)))
    torch.set_flush_denormal(True)  # same logits, without the released weights' slow subnormal maths
    try:
        with torch.inference_mode():
            return model(x).numpy()
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def atomic_output(path: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block finishes."""
    if path.suffix.lower() != ".onnx":
        raise UserError(f"output {path} should end in .onnx")
    check_output(path, overwrite)  # exists, a folder, or its folder missing or not writable: one line
    with atomic_file(path) as tmp:
        yield tmp


def set_metadata(path: Path, entries: dict[str, str]) -> None:
    """Add (or replace) metadata entries of an ONNX file in place."""
    import onnx

    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def model_metadata(model, precision: str) -> dict[str, str]:
    meta = {
        KEY_FORMAT: ONNX_FORMAT,
        KEY_CONFIG: json.dumps(model.config.to_dict()),
        KEY_ARCH: json.dumps(getattr(model, "arch", {})),
        KEY_PRECISION: precision,
        "wsi_espnet.input": f"{INPUT_NAME}: float32 RGB 0-255, NHWC; height and width multiples of 8",
        "wsi_espnet.output": f"{OUTPUT_NAME}: float32 NCHW logits at input size",
    }
    source = getattr(model, "source", None)
    if source and Path(source).is_file():
        from .checkpoint import file_sha256

        meta["wsi_espnet.source"] = f"{Path(source).name} sha256:{file_sha256(source)}"
    return meta


def write_float32(model, path: Path, opset: int = OPSET) -> None:
    """Trace ``model`` (with its normalisation) to ONNX at ``path``, dynamic in batch, height and
    width, with the wsi-espnet metadata.  Not atomic: callers write to a temporary path."""
    import onnx
    import torch

    wrapped = deployable(model)
    sample = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, TRACE_SHAPE).astype(np.float32))
    axes = {0: "batch", 1: "height", 2: "width"}
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation; the graph it writes is checked below.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    proto.producer_name = "wsi-espnet"
    proto.doc_string = f"ESPNet ({model.config.name}) exported by wsi-espnet; input and output described in metadata"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    set_metadata(path, model_metadata(model, "float32"))


def check_against_torch(model, path: Path, shape: tuple[int, int, int, int] = CHECK_SHAPE) -> float:
    """Relative error of the ONNX file against PyTorch on random RGB at ``shape``; raises if above
    :data:`TOLERANCE` (that would be an exporter bug, not a user mistake)."""
    batch = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = OnnxEngine(path, device="cpu").logits_numpy(batch)
    err = relative_error(got, torch_logits(model, batch))
    if not err <= TOLERANCE:
        raise RuntimeError(f"exported graph differs from PyTorch: relative error {err:.2e} > {TOLERANCE:g}")
    return err


def export_onnx(model, out: str | os.PathLike, *, overwrite: bool = False, opset: int = OPSET) -> float:
    """Export a loaded model (see :func:`wsi_espnet.checkpoint.load_model`) to a float32 ONNX file,
    atomically; returns its checked relative error against PyTorch."""
    model = model.eval()
    with atomic_output(Path(out), overwrite) as tmp:
        write_float32(model, tmp, opset)
        return check_against_torch(model, tmp)


def export_int8(
    model,
    out: str | os.PathLike,
    calibration: list[np.ndarray],
    held_out: list[np.ndarray],
    *,
    overwrite: bool = False,
    opset: int = OPSET,
) -> tuple[float, float]:
    """Export, then quantise to int8 (see :mod:`wsi_espnet.quantize`) calibrated on ``calibration`` tiles;
    returns (float32 relative error against PyTorch, int8 argmax agreement with float32 on
    ``held_out``).  The agreement is stored in the file's metadata too."""
    from .quantize import SCHEME, argmax_agreement, describe_tiles, quantize_int8

    model = model.eval()
    with atomic_output(Path(out), overwrite) as tmp, tempfile.TemporaryDirectory(
        prefix=f".{Path(out).name}.", dir=Path(out).parent
    ) as work:
        fp32 = Path(work) / "float32.onnx"
        write_float32(model, fp32, opset)
        err = check_against_torch(model, fp32)
        quantize_int8(fp32, tmp, calibration)
        agreement = argmax_agreement(OnnxEngine(fp32, device="cpu"), OnnxEngine(tmp, device="cpu"), held_out)
        meta = model_metadata(model, "int8")
        meta["wsi_espnet.int8"] = json.dumps(
            {
                "scheme": SCHEME,
                "calibration": describe_tiles(calibration),
                "held_out": describe_tiles(held_out),
                "argmax_agreement": round(agreement, 5),
            }
        )
        set_metadata(tmp, meta)
        return err, agreement


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--model", help="a wsi-espnet checkpoint or a released ESPNet .pth (default: the packaged tissue model)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="output format (onnx)")
    p.add_argument("--int8", action="store_true", help="quantise to int8 (static, calibrated: needs --calibration)")
    p.add_argument(
        "--calibration",
        nargs="+",
        type=Path,
        default=[],
        metavar="SLIDE_OR_IMAGE",
        help="slides (tissue tiles at the model's µm/px) or images to calibrate int8 ranges on",
    )
    p.add_argument("--calibration-tiles", type=int, default=32, help="tiles to calibrate on (default 32)")
    p.add_argument("--held-out", type=int, default=8, help="further tiles to measure int8 agreement on (default 8)")
    p.add_argument("--mpp", type=float, help="µm/px of calibration slides that do not record one")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load_model

    out: Path = args.out
    if out.suffix.lower() != ".onnx":
        raise UserError(f"output {out} should end in .onnx")
    check_output(out, args.overwrite)  # before the slow part
    if args.opset < 17:
        raise UserError(f"--opset {args.opset}: needs 17 or later")
    if args.calibration and not args.int8:
        raise UserError("--calibration is only used with --int8")
    if args.int8 and not args.calibration:
        raise UserError("--int8 needs --calibration SLIDE_OR_IMAGE ... (tiles like the ones it will see)")
    if args.calibration_tiles < 1 or args.held_out < 1:
        raise UserError("--calibration-tiles and --held-out must be at least 1")
    model = load_model(args.model)
    if not args.int8:
        err = export_onnx(model, out, overwrite=args.overwrite, opset=args.opset)
        print(f"{out}: float32 ONNX, {out.stat().st_size / 1e6:.1f} MB; matches PyTorch to {err:.1e} relative")
        return 0
    from .quantize import calibration_tiles, split_held_out

    tiles = calibration_tiles(args.calibration, model.config, args.calibration_tiles + args.held_out, mpp=args.mpp)
    if len(tiles) < 2:
        raise UserError(f"found {len(tiles)} calibration tile(s) in {len(args.calibration)} input(s): need at least 2")
    calib, held = split_held_out(tiles, args.held_out)
    err, agreement = export_int8(model, out, calib, held, overwrite=args.overwrite, opset=args.opset)
    print(
        f"{out}: int8 ONNX, {out.stat().st_size / 1e6:.1f} MB; calibrated on {len(calib)} tiles; "
        f"argmax agrees with float32 on {agreement:.2%} of pixels of {len(held)} held-out tiles "
        f"(float32 graph matches PyTorch to {err:.1e})"
    )
    return 0
