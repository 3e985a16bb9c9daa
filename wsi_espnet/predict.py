"""``wsi-espnet predict``: ordinary images (PNG, JPEG, TIFF) to label PNGs and colour overlays.

This is how a Cityscapes or VOC user runs the shared ESPNet core: each image is normalised with the
recipe its checkpoint declares, resized to the checkpoint's working size when it declares one (the
released Cityscapes models were trained on 1024×512 frames), and the logits are resized back, so the
label map always has the input image's size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from .engine import NETWORK_STRIDE, Engine, make_engine
from .errors import OutputExistsError, UserError
from .outputs import atomic_file
from .runtime import tune_for_inference


def read_image(path: Path) -> np.ndarray:
    """Any PNG/JPEG/TIFF as uint8 RGB; grey is expanded, alpha dropped."""
    from skimage import io

    if not path.is_file():
        raise UserError(f"image not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        img = io.imread(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read as an image ({type(exc).__name__})") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise UserError(f"{path}: expected an RGB or grey image, got shape {img.shape}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        else:
            raise UserError(f"{path}: unsupported pixel type {img.dtype}")
    return np.ascontiguousarray(img)


def _pad_to_multiple(img: np.ndarray, multiple: int = NETWORK_STRIDE) -> np.ndarray:
    h, w = img.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    return img


def resize_bilinear(a: np.ndarray, size: tuple[int, int], axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Bilinear resize of ``a`` along ``axes`` to ``size`` (height, width), float32, with PyTorch's
    ``align_corners=False`` sampling (half-pixel centres, edge clamped, no antialiasing), so the
    torch-free path gives the same labels as the PyTorch one."""
    out = np.asarray(a, np.float32)
    for axis, n_out in zip(axes, size):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        shape = [1] * out.ndim
        shape[axis] = n_out
        lam = (src - i0).astype(np.float32).reshape(shape)
        lo = np.take(out, i0, axis=axis)
        lo *= 1.0 - lam
        lo += np.take(out, i1, axis=axis) * lam
        out = lo
    return out


def predict_image(engine: Engine, rgb: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Label map (H, W) uint8 of one RGB image at its own size.  ``size`` (width, height) is the
    resolution the network sees; None runs at the image's own size (padded to a multiple of 8).

    Resizing before or after the per-channel affine normalisation is the same (it is linear), so the
    uint8→float resize here reproduces the authors' normalise-then-resize recipe.  A PyTorch engine
    (one with ``logits``) resizes with torch; any other (ONNX Runtime) with numpy, so an edge install
    needs no torch.
    """
    if hasattr(engine, "logits"):
        return _predict_image_torch(engine, rgb, size)
    h, w = rgb.shape[:2]
    if size is not None and (size[0], size[1]) != (w, h):
        work = resize_bilinear(rgb, (size[1], size[0]))
    else:
        work = rgb.astype(np.float32)
    padded = _pad_to_multiple(work)
    if hasattr(engine, "logits_numpy"):
        scores = engine.logits_numpy(padded[None])  # type: ignore[attr-defined]
    else:
        scores = engine.predict_proba(padded[None])
    scores = scores[0, :, : work.shape[0], : work.shape[1]]
    if scores.shape[-2:] != (h, w):
        scores = resize_bilinear(scores, (h, w), axes=(1, 2))
    return scores.argmax(0).astype(np.uint8)


def _predict_image_torch(engine: Engine, rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    h, w = rgb.shape[:2]
    if size is not None and (size[0], size[1]) != (w, h):
        t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)
        work = t[0].permute(1, 2, 0).numpy()
    else:
        work = rgb.astype(np.float32)
    padded = _pad_to_multiple(work)
    logits = engine.logits(padded[None])  # type: ignore[attr-defined]
    logits = logits[:, :, : work.shape[0], : work.shape[1]].float()
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.minimum(labels, len(palette) - 1)]


def blend(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (rgb.astype(np.float32) * (1 - alpha) + colorize(labels, palette).astype(np.float32) * alpha).round().astype(np.uint8)


def save_png(path: Path, array: np.ndarray) -> None:
    """Atomic PNG write: a killed run never leaves a truncated file under the final name."""
    from skimage import io

    with atomic_file(path, suffix=".png") as tmp:
        io.imsave(tmp, array, check_contrast=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or TIFF images")
    p.add_argument("--model", required=True, help="a wsi-espnet checkpoint or a released ESPNet .pth file")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--size", help="network input WxH (default: the checkpoint's, else the image's own)")
    p.add_argument("--native", action="store_true", help="run at each image's own size")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument("--overwrite", action="store_true", help="replace label maps and overlays already in --out")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WxH, e.g. 1024x512") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--size {text!r}: both sides must be positive")
    return w, h


def run(args: argparse.Namespace) -> int:
    tune_for_inference()  # this process exists to run the model (before torch is imported)
    engine = make_engine(args.model, backend=args.backend, device=args.device)
    size = parse_size(args.size) if args.size else None
    if size is None and not args.native and engine.config.input_size:
        size = tuple(engine.config.input_size)  # type: ignore[assignment]
    images = [read_image(p) for p in args.images]  # fail on a bad input before writing anything
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: is a file; --out names a folder for the label maps")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot create it ({exc.strerror})") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise UserError(f"--out {args.out}: folder is not writable")
    written = [args.out / f"{p.stem}.{kind}.png" for p in args.images for kind in ("labels", "overlay")]
    existing = [w for w in written if w.exists()]
    if existing and not args.overwrite:
        raise OutputExistsError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
                                "pass --overwrite to replace")
    palette = engine.config.palette
    for path, rgb in zip(args.images, images):
        labels = predict_image(engine, rgb, size)
        save_png(args.out / f"{path.stem}.labels.png", labels)
        save_png(args.out / f"{path.stem}.overlay.png", blend(rgb, labels, palette, args.alpha))
        present = np.bincount(labels.ravel(), minlength=len(palette))
        top = ", ".join(f"{engine.config.class_names[i]} {present[i] / labels.size:.0%}" for i in np.argsort(-present)[:3])
        print(f"{path.name}: {labels.shape[1]}x{labels.shape[0]} -> {args.out / (path.stem + '.labels.png')} ({top})")
    return 0
