"""``wsi-espnet evaluate``: confusion matrix, per-class IoU, mIoU and pixel accuracy of a model.

Histology is scored the way it will be used: held-out slides are cut on the model's own inference
grid (its ``slide.mpp``, ``slide.tile``, ``slide.overlap``), each tile is predicted whole, and every
slide pixel is scored exactly once, by the tile whose centre is nearest (the middle of the overlap is
where a tile's context is thinnest on both sides).  Street-scene images are predicted at the
config's ``input_size`` when it has one (the authors' protocol) and scored at full label resolution.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .config import DatasetConfig, Normalization, load_config, with_overrides
from .errors import UserError
from .metrics import ConfusionMatrix, write_json
from .outputs import check_output


def _affine(norm: Normalization, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    scale, shift = norm.as_affine()
    order = [2, 1, 0] if norm.channel_order.upper() == "BGR" else [0, 1, 2]
    return (torch.tensor(scale, device=device).view(1, 3, 1, 1), torch.tensor(shift, device=device).view(1, 3, 1, 1), order)


@torch.inference_mode()
def predict_labels(model: nn.Module, rgb: np.ndarray, norm: Normalization, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W) uint8 argmax class ids, normalised with ``norm``.
    H and W must be multiples of 8 (ESPNet's three stride-2 stages)."""
    scale, shift, order = _affine(norm, device)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2)[:, order].float()
    x = x * scale + shift
    with torch.autocast("cuda", dtype=torch.float16, enabled=str(device).startswith("cuda")):
        logits = model(x)
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def _ownership(positions: Sequence[int], tile: int, length: int) -> dict[int, tuple[int, int]]:
    """Along one axis: tile origin -> the [start, stop) image pixels it scores (nearest centre)."""
    pos = sorted(set(int(p) for p in positions))
    centres = [p + tile / 2 for p in pos]
    bounds = [0] + [int((a + b) // 2) for a, b in zip(centres, centres[1:])] + [length]
    return {p: (bounds[i], bounds[i + 1]) for i, p in enumerate(pos)}


def evaluate_stores(
    model: nn.Module,
    stores: Sequence[str | Path],
    num_classes: int,
    ignore_index: int,
    norm: Normalization,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
) -> ConfusionMatrix:
    """Score ``model`` on labelled patch stores cut on an inference grid (see the module docstring)."""
    import zarr

    cm = ConfusionMatrix(num_classes, ignore_index)
    was_training = model.training
    model.eval()
    try:
        for path in stores:
            g = zarr.open_group(str(path), mode="r")
            grid = g.attrs["grid"]
            tile = int(g.attrs["tile"])
            width, height = grid["image_size"]
            own_x = _ownership(grid["xs"], tile, width)
            own_y = _ownership(grid["ys"], tile, height)
            xy = np.asarray(g["xy"][...]).reshape(-1, 2)
            for start in range(0, len(xy), batch_size):
                stop = min(len(xy), start + batch_size)
                rgb = np.asarray(g["patches"][start:stop])
                truth = np.asarray(g["labels"][start:stop])
                pred = predict_labels(model, rgb, norm, device)
                for k, (x, y) in enumerate(xy[start:stop]):
                    x0, x1 = own_x[int(x)]
                    y0, y1 = own_y[int(y)]
                    sl = (slice(y0 - int(y), y1 - int(y)), slice(x0 - int(x), x1 - int(x)))
                    cm.update(truth[k][sl], pred[k][sl])
    finally:
        model.train(was_training)
    return cm


def evaluate_images(model: nn.Module, dataset, device: torch.device | str = "cpu", input_size: tuple[int, int] | None = None) -> ConfusionMatrix:
    """Score ``model`` on an :class:`~wsi_espnet.datasets.ImageFolderDataset` (un-augmented)."""
    from .augment import resize_image, resize_label

    cfg: DatasetConfig = dataset.cfg
    cm = ConfusionMatrix(cfg.num_classes, cfg.ignore_index)
    was_training = model.training
    model.eval()
    try:
        for k in range(len(dataset)):
            rgb, truth = dataset.raw(k)
            h, w = truth.shape
            if input_size is not None:
                iw, ih = input_size
                pred = predict_labels(model, resize_image(rgb, ih, iw)[None], cfg.normalization, device)[0]
                pred = resize_label(pred, h, w)
            else:
                ph, pw = -h % 8, -w % 8
                padded = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect") if (ph or pw) else rgb
                pred = predict_labels(model, padded[None], cfg.normalization, device)[0][:h, :w]
            cm.update(truth, pred)
    finally:
        model.train(was_training)
    return cm


def check_classes(model_cfg: DatasetConfig, data_cfg: DatasetConfig, where: str) -> None:
    if list(model_cfg.class_names) != list(data_cfg.class_names):
        raise UserError(
            f"{where}: the model's classes ({', '.join(model_cfg.class_names)}) are not the data config's "
            f"({', '.join(data_cfg.class_names)})"
        )


def evaluate_split(
    model: nn.Module,
    data_cfg: DatasetConfig,
    split: str,
    cache: str | Path,
    device: torch.device | str = "cpu",
    root: str | Path | None = None,
    workers: int | None = None,
) -> ConfusionMatrix:
    """Score ``model`` (with its ``.config``) on ``split`` of the data ``data_cfg`` describes."""
    from .datasets import HISTOLOGY, build_split_stores, image_folder_dataset

    model_cfg: DatasetConfig = getattr(model, "config", data_cfg)
    check_classes(model_cfg, data_cfg, "evaluate")
    if data_cfg.data.layout in HISTOLOGY:
        # The model's working resolution and tiling decide the grid; the data config the labels.
        cfg = dataclasses.replace(data_cfg, slide=model_cfg.slide)
        stores = build_split_stores(cfg, split, cache, purpose="eval", root=root, workers=workers)
        return evaluate_stores(model, stores, cfg.num_classes, cfg.ignore_index, model_cfg.normalization, device)
    cfg = dataclasses.replace(data_cfg, normalization=model_cfg.normalization)
    dataset = image_folder_dataset(cfg, split, augment=None, root=root)
    size = tuple(model_cfg.input_size) if model_cfg.input_size else None
    return evaluate_images(model, dataset, device, size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="dataset config (name in configs/ or a YAML path) that says where the data are")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (e.g. data.root=/data/slides)")
    parser.add_argument("--model", required=True, help="model file (a wsi-espnet checkpoint or a released ESPNet file)")
    parser.add_argument("--split", default="val", help="split to score (default val)")
    parser.add_argument("--json", type=Path, help="also write the metrics as JSON here")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--cache", type=Path, help="folder for the patch stores cut from slides (default: a temporary folder)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .engine import _resolve_device

    cfg = with_overrides(load_config(args.config), list(args.overrides))
    if args.json is not None:  # before the evaluation, not after it: a folder that is not there, say
        check_output(args.json, overwrite=True)
    device = _resolve_device(args.device)
    model = load_model(args.model, device=device)
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
        cm = evaluate_split(model, cfg, args.split, args.cache, device)
    else:
        with tempfile.TemporaryDirectory(prefix="wsi-espnet-eval-") as tmp:
            cm = evaluate_split(model, cfg, args.split, tmp, device)
    names = cfg.class_names
    print(f"{args.model} on {cfg.name} / {args.split} ({cfg.data.layout} at {cfg.data.root})")
    print(cm.table(names))
    if args.json is not None:
        summary = cm.to_dict(names)
        summary.update(model=str(args.model), config=cfg.name, split=args.split, data_root=str(cfg.data.root),
                       mpp=getattr(model, "config", cfg).slide.mpp)
        write_json(str(args.json), summary)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
