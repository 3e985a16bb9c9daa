"""``wsi-espnet train``: ESPNet-C first, then ESPNet on the trained encoder, as in the paper.

The recipe (Mehta et al. 2018, sec. 4, and the authors' code):

1. **ESPNet-C** (the encoder) is trained on labels downsampled ×8 by nearest neighbour, so it
   learns to classify at 1/8 resolution; the ESPNet-C checkpoint with the best validation mIoU
   (scored at full resolution, its logits upsampled bilinearly as at inference) is kept.
2. **ESPNet** is built around that encoder (weights copied) and trained at full resolution.

Both stages: Adam (β = 0.9, 0.999; the authors' weight decay 5e-4), class-weighted cross-entropy
with ENet's weights ``1 / ln(1.02 + p_c)`` (:mod:`wsi_espnet.losses`) and the ignore index, mixed
precision on CUDA.  The learning rate follows a poly schedule ``lr · (1 - epoch / epochs) ** 0.9``
per stage, a function of the epoch number only, so a resumed run is the run it continues.

Outputs in ``--out``: ``last.pt`` (every epoch, with the optimiser state: what ``--resume``
continues from), ``best_encoder.pt`` and ``best.pt`` (best validation mIoU; ``best.pt`` is the final
model), ``log.csv`` (loss and validation metrics per epoch; TensorBoard events too when
``torch.utils.tensorboard`` is importable), ``class_weights.json`` and ``metrics.json``.  Every
``.pt`` is a :func:`wsi_espnet.checkpoint.save_checkpoint` file: ``load_model`` reads it with its
classes, colours, normalisation and working resolution, and it records the command that made it.

Fine-tuning (``--init FILE``): weights are copied by name wherever the shape fits; every tensor whose
shape depends on the class count (the classifiers, the decoder) keeps its fresh initialisation.  A
released Cityscapes ESPNet file thus gives a tissue model its whole trained encoder trunk.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from .checkpoint import FORMAT, _torch_load, save_checkpoint
from .config import DatasetConfig, config_from_dict, load_config, with_overrides
from .errors import UserError
from .outputs import remove_empty_folders
from .espnet import ESPNet, ESPNetC, Upsampled, build_model
from .losses import enet_class_weights, weighted_cross_entropy
from .metrics import ConfusionMatrix, write_json

ENCODER_STRIDE = 8
LOG_FIELDS = ("stage", "epoch", "epochs", "lr", "train_loss", "val_miou", "val_pixel_accuracy", "seconds", "best")


# ------------------------------------------------------------------------------------------------
# Weights transfer (fine-tuning) and label downsampling.


def _state_dict_of(path: str | Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(Path(path))
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj["state_dict"])
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise UserError(f"{path}: not a model file (neither a wsi-espnet checkpoint nor a state dict)")


def transfer_weights(model: nn.Module, source: Mapping[str, torch.Tensor], where: str = "init") -> dict[str, list[str]]:
    """Copy every tensor of ``source`` whose name and shape fit ``model``; the rest of ``model``
    keeps its initialisation.  Encoder-only and full-network files both fit both networks (the
    ``encoder.`` prefix is added or dropped).  Returns ``{"copied": [...], "reinitialised": [...]}``."""
    own = model.state_dict()
    src = dict(source)
    has_prefix = any(k.startswith("encoder.") for k in src)
    wants_prefix = isinstance(model, ESPNet)
    if has_prefix and not wants_prefix:
        src = {k[len("encoder."):]: v for k, v in src.items() if k.startswith("encoder.")}
    elif wants_prefix and not has_prefix:
        src = {"encoder." + k: v for k, v in src.items()}
    copied, fresh = [], []
    new_state = {}
    for k, v in own.items():
        if k in src and tuple(src[k].shape) == tuple(v.shape):
            new_state[k] = src[k].to(v.dtype)
            copied.append(k)
        elif not k.endswith("num_batches_tracked"):
            fresh.append(k)
    if not copied:
        raise UserError(f"{where}: no tensor of the file fits this network (is it an ESPNet file with the same p, q?)")
    model.load_state_dict(new_state, strict=False)
    return {"copied": copied, "reinitialised": fresh}


def _module_names(keys: list[str]) -> list[str]:
    """``encoder.classifier.conv.weight`` -> ``encoder.classifier``; ``up_l3.0.weight`` -> ``up_l3``."""
    return sorted({".".join(k.split(".")[:2]) if k.startswith("encoder.") else k.split(".")[0] for k in keys})


def downsample_labels(labels: torch.Tensor, size: tuple[int, int], stride: int = ENCODER_STRIDE) -> torch.Tensor:
    """(N, H, W) labels to the encoder's (N, h, w) grid by nearest neighbour: the label at the
    centre of each stride × stride block."""
    h, w = size
    rows = torch.clamp(torch.arange(h, device=labels.device) * stride + stride // 2, max=labels.shape[1] - 1)
    cols = torch.clamp(torch.arange(w, device=labels.device) * stride + stride // 2, max=labels.shape[2] - 1)
    return labels[:, rows][:, :, cols]


def poly_lr(base: float, epoch: int, epochs: int, power: float = 0.9) -> float:
    return base * (1.0 - epoch / max(1, epochs)) ** power


# ------------------------------------------------------------------------------------------------
# Logging.


class RunLog:
    """``log.csv`` (appended, so a resumed run continues it) and TensorBoard when importable."""

    def __init__(self, out: Path) -> None:
        self.path = out / "log.csv"
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except Exception:
            self.writer = None

    def row(self, values: dict[str, Any], step: int) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: values.get(k, "") for k in LOG_FIELDS})
        if self.writer is not None:
            for k in ("train_loss", "val_miou", "val_pixel_accuracy", "lr"):
                v = values.get(k)
                if isinstance(v, (int, float)) and not math.isnan(v):
                    self.writer.add_scalar(f"{values['stage']}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------
# The training loop.


@dataclass
class TrainResult:
    out: Path
    best: Path
    best_miou: float
    metrics: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0


def _resolve_device(device: str) -> str:
    from .engine import _resolve_device as resolve

    return resolve(device)


def _validation(cfg: DatasetConfig, cache: Path, log: Callable[[str], None], workers: int | None):
    """A function model -> ConfusionMatrix on the ``val`` split, or None when there is none."""
    from .datasets import HISTOLOGY, build_split_stores, image_folder_dataset
    from .evaluate import evaluate_images, evaluate_stores

    root = Path(cfg.data.root)
    if cfg.data.layout in HISTOLOGY:
        has_val = (root / "val").is_dir() or (root / "val.txt").is_file()
        if not has_val:
            log(f"note: no validation split under {root} (val/): best.pt is the last epoch")
            return None
        stores = build_split_stores(cfg, "val", cache, purpose="eval", workers=workers)
        return lambda model, device: evaluate_stores(model, stores, cfg.num_classes, cfg.ignore_index, cfg.normalization, device)
    try:
        dataset = image_folder_dataset(cfg, "val")
    except UserError as exc:
        log(f"note: no validation split ({exc}): best.pt is the last epoch")
        return None
    size = tuple(cfg.input_size) if cfg.input_size else None
    return lambda model, device: evaluate_images(model, dataset, device, size)


def _loader(dataset, cfg: DatasetConfig, seed: int, device: str) -> DataLoader:
    weights = dataset.sampling_weights()
    n = cfg.train.steps_per_epoch * cfg.train.batch_size if cfg.train.steps_per_epoch > 0 else len(dataset)
    g = torch.Generator().manual_seed(seed)
    if weights is not None:
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=n, replacement=True, generator=g)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, replacement=n > len(dataset), num_samples=n, generator=g)
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.train.workers,
        drop_last=n >= cfg.train.batch_size, pin_memory=device.startswith("cuda"),
    )


def _stage_model(variant: str, cfg: DatasetConfig) -> nn.Module:
    return build_model(variant, cfg.num_classes, cfg.model.p, cfg.model.q, cfg.model.skip)


def _eval_view(model: nn.Module) -> nn.Module:
    """The network as inference sees it: ESPNet-C's logits upsampled to input size."""
    return Upsampled(model) if isinstance(model, ESPNetC) else model


def train(
    cfg: DatasetConfig,
    out: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    init: str | Path | None = None,
    command: str | None = None,
    workers: int | None = None,
    cache: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg``'s model on ``cfg``'s data into ``out`` (see the module docstring).

    ``cache``: where the patch stores cut from slides go (default ``out/patches``); stores are
    reused whenever slide, labels and cutting recipe are unchanged, so runs can share one."""
    out = Path(out)
    last_path = out / "last.pt"
    if last_path.exists() and not resume:
        raise UserError(f"{out} holds a previous run (last.pt): pass --resume to continue it, or choose another --out")
    if cfg.train.batch_size < 1 or cfg.train.lr <= 0:
        raise UserError("train.batch_size must be >= 1 and train.lr > 0")
    device = _resolve_device(device)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(cfg, out, last_path, resume=resume, device=device, init=init, command=command,
                      workers=workers, cache=cache, log=log)
    except BaseException:
        if created:  # a mistake found before anything was written leaves no empty run folder
            remove_empty_folders(out)
        raise


#: What a resumed run must share with the run it continues (epochs, learning rate, batch size, the
#: data's root may change): the network, its input, and what the labels mean.
_RESUME_KEYS = ("model", "normalization", "ignore_index", "slide.mpp", "data.layout", "data.class_map")


def _config_changes(saved: DatasetConfig, cfg: DatasetConfig, keys: Sequence[str] = _RESUME_KEYS) -> list[str]:
    def get(c: DatasetConfig, key: str) -> Any:
        value: Any = c
        for part in key.split("."):
            value = getattr(value, part)
        return value

    return [f"{key} {get(saved, key)!r} -> {get(cfg, key)!r}" for key in keys if get(saved, key) != get(cfg, key)]


def _train_changes(saved: DatasetConfig, cfg: DatasetConfig) -> list[str]:
    """The ``train.*`` settings a resumed run changes (epochs, rate, batch size...)."""
    import dataclasses

    return _config_changes(saved, cfg, [f"train.{f.name}" for f in dataclasses.fields(cfg.train)])


def _train(cfg: DatasetConfig, out: Path, last_path: Path, *, resume: bool, device: str, init, command,
           workers, cache, log: Callable[[str], None]) -> TrainResult:
    from .datasets import training_dataset, write_class_counts

    command = command or "wsi-espnet train (library call)"

    state: dict[str, Any] | None = None
    if resume and last_path.exists():
        state = _torch_load(last_path)
        saved = config_from_dict(state["config"], where=f"{last_path} (config)")
        if saved.class_names != cfg.class_names:
            raise UserError(f"--resume: {last_path} was trained for classes {saved.class_names}, the config has {cfg.class_names}")
        changes = _config_changes(saved, cfg)
        if changes:
            raise UserError(f"--resume: the config is not the one {last_path} was trained with ({'; '.join(changes)}); "
                            "resume with the run's settings, or start a new run in another --out")
        log(f"resuming from {last_path}: stage {state['stage']}, epoch {state['epoch'] + 1} of {state['stage_epochs']} done")
        retuned = _train_changes(saved, cfg)
        if retuned:  # allowed (more epochs, a lower rate), but never unnoticed: overrides are easy to leave off
            log(f"note: the resumed epochs use other training settings than the run's: {'; '.join(retuned)} "
                "(give the run's overrides again to keep its own)")
    elif resume:
        log(f"note: --resume but no {last_path}: starting a new run")

    cache = Path(cache) if cache is not None else out / "patches"
    dataset = training_dataset(cfg, cache, workers=workers)
    sampled = dataset.sampled_class_counts() if hasattr(dataset, "sampled_class_counts") else dataset.class_counts()
    if float(np.sum(sampled)) <= 0:
        raise UserError("empty dataset: the training labels hold no pixel of any class")
    class_weights = enet_class_weights(sampled)
    write_class_counts(out / "class_pixels.json", dataset.class_counts(), cfg.class_names)
    (out / "class_weights.json").write_text(json.dumps(dict(zip(cfg.class_names, map(float, class_weights))), indent=2) + "\n")
    log(f"{len(dataset)} training {'patches' if hasattr(dataset, 'paths') else 'images'}; class weights "
        + ", ".join(f"{n} {w:.2f}" for n, w in zip(cfg.class_names, class_weights)))
    validate = _validation(cfg, cache, log, workers)
    criterion = weighted_cross_entropy(class_weights, cfg.ignore_index).to(device)
    amp = device.startswith("cuda")
    runlog = RunLog(out)

    stages = [("encoder", "espnet_c", cfg.train.encoder_epochs)]
    if cfg.model.variant == "espnet":
        stages.append(("decoder", "espnet", cfg.train.decoder_epochs))
    elif cfg.model.variant != "espnet_c":
        raise UserError(f"model.variant must be espnet or espnet_c, got {cfg.model.variant!r}")
    final_stage = [s for s in stages if s[2] > 0][-1][0] if any(s[2] > 0 for s in stages) else None
    if final_stage is None:
        raise UserError("nothing to train: train.encoder_epochs and train.decoder_epochs are both 0")

    best_miou = float(state["best_miou"]) if state else -1.0
    best_metrics: dict[str, Any] = dict(state.get("best_metrics", {})) if state else {}
    epochs_run = 0
    step = int(state.get("global_step", 0)) if state else 0
    stage_names = [s[0] for s in stages]
    for stage, variant, epochs in stages:
        if epochs <= 0:
            continue
        if state is not None and stage_names.index(stage) < stage_names.index(state["stage"]):
            continue  # finished before the interruption
        torch.manual_seed(cfg.train.seed * 100003 + stage_names.index(stage))  # same init on every run
        model = _stage_model(variant, cfg)
        start = 0
        resumed_here = state is not None and state["stage"] == stage
        if resumed_here:
            model.load_state_dict(state["state_dict"])
            start = int(state["epoch"]) + 1
            stage_best = float(state.get("stage_best_miou", -1.0))
        else:
            stage_best = -1.0
            if stage == "decoder" and (out / "best_encoder.pt").exists():
                info = transfer_weights(model, _state_dict_of(out / "best_encoder.pt"), "best_encoder.pt")
                log(f"decoder stage: encoder weights from best_encoder.pt ({len(info['copied'])} tensors)")
            elif init is not None:
                info = transfer_weights(model, _state_dict_of(init), str(init))
                log(f"{stage} stage: {len(info['copied'])} tensors from {init}, {len(info['reinitialised'])} re-initialised "
                    f"(class-count dependent: {', '.join(_module_names(info['reinitialised']))})")
        model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.999), weight_decay=cfg.train.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        if resumed_here:
            opt.load_state_dict(state["optimizer"])
            if amp and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        state = None  # consumed
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            lr = poly_lr(cfg.train.lr, epoch, epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            seed = cfg.train.seed * 100003 + stage_names.index(stage) * 1009 + epoch
            torch.manual_seed(seed)
            dataset.set_epoch(seed)
            model.train()
            total, batches = 0.0, 0
            for x, y in _loader(dataset, cfg, seed, device):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    logits = model(x)
                    target = downsample_labels(y, tuple(logits.shape[-2:])) if variant == "espnet_c" else y
                    loss = criterion(logits.float(), target)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                value = float(loss.detach())
                if math.isfinite(value):
                    total += value
                    batches += 1
                step += 1
            train_loss = total / max(1, batches)
            cm = validate(_eval_view(model), device) if validate is not None else None
            miou = cm.mean_iou() if cm is not None else float("nan")
            acc = cm.pixel_accuracy() if cm is not None else float("nan")
            # Without a validation score the latest epoch is the best one there is.
            improved = math.isnan(miou) or miou > stage_best
            if improved and not math.isnan(miou):
                stage_best = miou
            metrics: dict[str, Any] = {"stage": stage, "epoch": epoch + 1, "train_loss": train_loss,
                                       "val_miou": miou, "val_pixel_accuracy": acc}
            if cm is not None:
                metrics["val"] = cm.to_dict(cfg.class_names)
            if improved and stage == final_stage:
                best_miou, best_metrics = miou, metrics
            meta = dict(
                stage=stage, epoch=epoch, stage_epochs=epochs, metrics=metrics, command=command,
                best_miou=best_miou, best_metrics=best_metrics, stage_best_miou=stage_best,
                global_step=step, class_weights=[float(w) for w in class_weights],
            )
            if improved:
                save_checkpoint(out / ("best_encoder.pt" if stage == "encoder" else "best.pt"), model, cfg, **meta)
                if stage == final_stage:
                    if stage == "encoder":
                        save_checkpoint(out / "best.pt", model, cfg, **meta)
                    write_json(str(out / "metrics.json"), {**metrics, "checkpoint": "best.pt", "command": command})
            save_checkpoint(last_path, model, cfg, optimizer=opt.state_dict(), scaler=scaler.state_dict() if amp else {}, **meta)
            seconds = time.perf_counter() - t0
            runlog.row({"stage": stage, "epoch": epoch + 1, "epochs": epochs, "lr": f"{lr:.3g}", "train_loss": f"{train_loss:.4f}",
                        "val_miou": f"{miou:.4f}", "val_pixel_accuracy": f"{acc:.4f}", "seconds": f"{seconds:.1f}",
                        "best": int(improved)}, step)
            epochs_run += 1
            log(f"{stage} {epoch + 1}/{epochs}  loss {train_loss:.4f}  val mIoU {miou:.4f}  acc {acc:.4f}  "
                f"lr {lr:.2e}  {seconds:.0f} s{'  *best' if improved else ''}")
    runlog.close()
    _note_a_weaker_decoder(out, final_stage, best_miou, log)
    return TrainResult(out, out / "best.pt", best_miou, best_metrics, epochs_run)


def _note_a_weaker_decoder(out: Path, final_stage: str, best_miou: float, log: Callable[[str], None]) -> None:
    """best.pt is the final stage's best; a decoder stage too short to catch up can leave it below its
    own encoder, which is then the better model: say so rather than hand over the weaker one silently."""
    encoder = out / "best_encoder.pt"
    if final_stage != "decoder" or not encoder.exists() or math.isnan(best_miou):
        return
    encoder_miou = float(_torch_load(encoder).get("stage_best_miou", float("nan")))
    if encoder_miou > best_miou:
        log(f"note: best.pt (val mIoU {best_miou:.4f}) scores below the encoder stage's best_encoder.pt "
            f"({encoder_miou:.4f}); more decoder epochs (train.decoder_epochs) usually close the gap, and "
            "best_encoder.pt is a model wsi-segment runs as it is")


# ------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="dataset config: a name in configs/ (e.g. demo_tissue) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value, e.g. train.lr=1e-3 data.root=/data/slides")
    parser.add_argument("--out", type=Path, help="run folder (default runs/CONFIG-NAME)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--init", type=Path, help="start from this model file (e.g. a released Cityscapes ESPNet); "
                        "tensors whose shape depends on the class count are re-initialised")
    parser.add_argument("--make-demo-data", action="store_true", help="first generate the synthetic demo slides and "
                        "their QuPath GeoJSON truth in data.root (if not there yet)")
    parser.add_argument("--workers", type=int, help="threads for cutting patch stores (default: all cores)")
    parser.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's choice; 1 is fastest on a "
                        "machine busy with other work)")
    parser.add_argument("--cache", type=Path, help="folder for the patch stores cut from slides (default OUT/patches; "
                        "reused while slides, labels and settings are unchanged)")


def run(args: argparse.Namespace) -> int:
    cfg = with_overrides(load_config(args.config), list(args.overrides))
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.make_demo_data:
        from .datasets import make_demo_dataset

        make_demo_dataset(cfg.data.root, log=print)
    out = args.out or Path("runs") / cfg.name
    words = ["wsi-espnet", "train", str(args.config), *args.overrides, "--out", str(out)]
    words += ["--init", str(args.init)] if args.init else []
    words += ["--make-demo-data"] if args.make_demo_data else []
    words += ["--threads", str(args.threads)] if args.threads else []
    command = " ".join(shlex.quote(w) for w in words)
    try:
        result = train(cfg, out, resume=args.resume, device=args.device, init=args.init, command=command,
                       workers=args.workers, cache=args.cache)
    except KeyboardInterrupt as exc:
        if not args.resume:  # the same command again would refuse the run folder it left
            exc.resume_hint = "re-run the same command with --resume to continue"
        raise
    print(f"best: {result.best} (val mIoU {result.best_miou:.4f})")
    return 0
